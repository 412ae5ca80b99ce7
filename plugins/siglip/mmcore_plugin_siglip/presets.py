"""Named SigLIP vision-tower architectures (presets), as plain data: no torch, so listing stays cheap.

Each full-size preset copies the vision half of a Google SigLIP checkpoint's ``config.json``.
Presets build with random weights, offline; with ``device="meta"`` a full-size one is instantiated
without allocating memory.
"""

from __future__ import annotations

from mmcore.presets import vit_config

# SigLIP's image normalisation (the checkpoints' preprocessor_config.json): [0, 1] -> [-1, 1].
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)


def _vit(hidden: int, intermediate: int, layers: int, heads: int, patch: int, image: int) -> dict:
    return vit_config(hidden, intermediate, layers, heads, patch, image, act="gelu_pytorch_tanh", eps=1e-6)


#: preset name -> summary, the checkpoint whose architecture it copies, SiglipVisionConfig fields.
PRESETS: dict[str, dict] = {
    "tiny": {
        "summary": "2 layers, width 32, 28 px, patch 14 (4 patches); for tests",
        "checkpoint": None,
        "config": _vit(32, 64, 2, 4, 14, 28),
    },
    "base-patch16-224": {
        "summary": "ViT-B/16, 224 px (196 patches), as google/siglip-base-patch16-224",
        "checkpoint": "google/siglip-base-patch16-224",
        "config": _vit(768, 3072, 12, 12, 16, 224),
    },
    "so400m-patch14-224": {
        "summary": "So400m/14, 224 px (256 patches), as google/siglip-so400m-patch14-224",
        "checkpoint": "google/siglip-so400m-patch14-224",
        "config": _vit(1152, 4304, 27, 16, 14, 224),
    },
    "so400m-patch14-384": {
        "summary": "So400m/14, 384 px (729 patches; LLaVA-OneVision), as google/siglip-so400m-patch14-384",
        "checkpoint": "google/siglip-so400m-patch14-384",
        "config": _vit(1152, 4304, 27, 16, 14, 384),
    },
}

PRESET_NAMES: tuple[str, ...] = tuple(PRESETS)
