"""EVA02 presets: named timm architectures built with random weights (no download). Imports no torch.

Each preset is a timm model name (with the pretrained tag whose image transforms it should use) and,
for ``tiny``, keyword overrides that shrink it to test size.
"""

from __future__ import annotations

from typing import Any

#: preset -> {"model_name": timm name, "overrides": create_model kwargs, "summary": one line}
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "model_name": "eva02_tiny_patch14_224.mim_in22k",
        "overrides": {"img_size": 28, "depth": 2, "embed_dim": 32, "num_heads": 2},
        "summary": "EVA02 tiny shrunk to 2 blocks, width 32, 28 px (tests); 4 tokens per image",
    },
    "eva02-tiny": {
        "model_name": "eva02_tiny_patch14_224.mim_in22k",
        "summary": "timm eva02_tiny_patch14_224: 5.5M parameters, width 192, 224 px",
    },
    "eva02-small": {
        "model_name": "eva02_small_patch14_224.mim_in22k",
        "summary": "timm eva02_small_patch14_224: 22M parameters, width 384, 224 px",
    },
    "eva02-base": {
        "model_name": "eva02_base_patch14_224.mim_in22k",
        "summary": "timm eva02_base_patch14_224: 86M parameters, width 768, 224 px",
    },
    "eva02-large": {
        "model_name": "eva02_large_patch14_clip_224.merged2b",
        "summary": "timm eva02_large_patch14_clip_224 (EVA02-CLIP-L): 303M parameters, width 1024, 224 px",
    },
    "eva02-enormous": {
        "model_name": "eva02_enormous_patch14_clip_224.laion2b_plus",
        "summary": "timm eva02_enormous_patch14_clip_224 (OmniLMM's tower): 4.3B parameters, width 1792",
    },
}

PRESET_NAMES: tuple[str, ...] = tuple(PRESETS)

#: What `build_encoder("eva02")` loads when no checkpoint or preset is named.
DEFAULT_CHECKPOINT = "eva02_large_patch14_clip_224.merged2b"
