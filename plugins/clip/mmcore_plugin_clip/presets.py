"""Named CLIP vision-tower architectures (presets), as plain data: no torch, so listing stays cheap.

Each full-size preset copies the vision half of an OpenAI CLIP checkpoint's ``config.json`` (the
projection width does not matter: a vision tower has no projection). Presets build with random
weights, offline; with ``device="meta"`` a full-size one is instantiated without allocating memory.
"""

from __future__ import annotations

from mmcore.presets import vit_config

# OpenAI CLIP's image normalisation (the checkpoints' preprocessor_config.json).
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def _vit(hidden: int, intermediate: int, layers: int, heads: int, patch: int, image: int) -> dict:
    return vit_config(hidden, intermediate, layers, heads, patch, image, act="quick_gelu", eps=1e-5)


#: preset name -> summary, the checkpoint whose architecture it copies, CLIPVisionConfig fields.
PRESETS: dict[str, dict] = {
    "tiny": {
        "summary": "2 layers, width 32, 28 px, patch 14 (4 patches + CLS); for tests",
        "checkpoint": None,
        "config": _vit(32, 64, 2, 4, 14, 28),
    },
    "vit-b-32": {
        "summary": "ViT-B/32, 224 px (49 patches + CLS), as openai/clip-vit-base-patch32",
        "checkpoint": "openai/clip-vit-base-patch32",
        "config": _vit(768, 3072, 12, 12, 32, 224),
    },
    "vit-b-16": {
        "summary": "ViT-B/16, 224 px (196 patches + CLS), as openai/clip-vit-base-patch16",
        "checkpoint": "openai/clip-vit-base-patch16",
        "config": _vit(768, 3072, 12, 12, 16, 224),
    },
    "vit-l-14": {
        "summary": "ViT-L/14, 224 px (256 patches + CLS), as openai/clip-vit-large-patch14",
        "checkpoint": "openai/clip-vit-large-patch14",
        "config": _vit(1024, 4096, 24, 16, 14, 224),
    },
    "vit-l-14-336": {
        "summary": "ViT-L/14, 336 px (576 patches + CLS; LLaVA-1.5), as openai/clip-vit-large-patch14-336",
        "checkpoint": "openai/clip-vit-large-patch14-336",
        "config": _vit(1024, 4096, 24, 16, 14, 336),
    },
}

PRESET_NAMES: tuple[str, ...] = tuple(PRESETS)
