"""Qwen2-VL / Qwen2.5-VL tower presets: the released vision towers' shapes (random weights, no
download) and tiny ones for tests. Imports no torch.

Every released tower reads 14 px patches, two frames per temporal patch, and merges 2x2 patches into
one language-model token (the patch merger, this plugin's projector).
"""

from __future__ import annotations

from typing import Any

#: the released image processors' pixel budget (Qwen2VLImageProcessor's min_pixels / max_pixels)
RELEASED_PIXELS = {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 1280}
#: tiny presets: 4 px patches, images resized to between 8x8 and 32x32 pixels (1 to 16 tokens)
TINY_PIXELS = {"min_pixels": 8 * 8, "max_pixels": 32 * 32}


def _qwen2_vl(hidden_size: int) -> dict[str, Any]:
    return {"depth": 32, "embed_dim": 1280, "num_heads": 16, "mlp_ratio": 4, "hidden_act": "quick_gelu",
            "patch_size": 14, "temporal_patch_size": 2, "spatial_merge_size": 2, "in_channels": 3,
            "hidden_size": hidden_size}  # fmt: skip


def _qwen2_5_vl(out_hidden_size: int) -> dict[str, Any]:
    return {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "hidden_act": "silu",
            "patch_size": 14, "temporal_patch_size": 2, "spatial_merge_size": 2, "in_channels": 3,
            "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
            "out_hidden_size": out_hidden_size}  # fmt: skip


#: family -> preset -> {"config": the vision config's fields, "pixels", "checkpoint", "summary"}
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "qwen2_vl": {
        "tiny": {
            "config": {
                "depth": 2,
                "embed_dim": 32,
                "num_heads": 2,
                "mlp_ratio": 2,
                "hidden_act": "quick_gelu",
                "patch_size": 4,
                "temporal_patch_size": 2,
                "spatial_merge_size": 2,
                "in_channels": 3,
                "hidden_size": 64,
            },  # fmt: skip
            "pixels": TINY_PIXELS,
            "checkpoint": None,
            "summary": "test size: width 32, 2 blocks, 4 px patches, 1 to 16 tokens per image",
        },
        "qwen2-vl-2b": {
            "config": _qwen2_vl(1536),
            "pixels": RELEASED_PIXELS,
            "checkpoint": "Qwen/Qwen2-VL-2B-Instruct",
            "summary": "Qwen2-VL-2B's tower: 631M + its merger 34M (to width 1536)",
        },
        "qwen2-vl-7b": {
            "config": _qwen2_vl(3584),
            "pixels": RELEASED_PIXELS,
            "checkpoint": "Qwen/Qwen2-VL-7B-Instruct",
            "summary": "Qwen2-VL-7B's tower: 631M + its merger 45M (to width 3584)",
        },
    },
    "qwen2_5_vl": {
        "tiny": {
            "config": {
                "depth": 2,
                "hidden_size": 32,
                "intermediate_size": 48,
                "num_heads": 2,
                "hidden_act": "silu",
                "patch_size": 4,
                "temporal_patch_size": 2,
                "spatial_merge_size": 2,
                "in_channels": 3,
                "window_size": 16,
                "fullatt_block_indexes": [1],
                "tokens_per_second": 2,
                "out_hidden_size": 64,
            },  # fmt: skip
            "pixels": TINY_PIXELS,
            "checkpoint": None,
            "summary": "test size: width 32, 2 blocks (windowed, then full), 4 px patches, 16 px windows",
        },
        "qwen2.5-vl-3b": {
            "config": _qwen2_5_vl(2048),
            "pixels": RELEASED_PIXELS,
            "checkpoint": "Qwen/Qwen2.5-VL-3B-Instruct",
            "summary": "Qwen2.5-VL-3B's tower: 632M + its merger 37M (to width 2048)",
        },
        "qwen2.5-vl-7b": {
            "config": _qwen2_5_vl(3584),
            "pixels": RELEASED_PIXELS,
            "checkpoint": "Qwen/Qwen2.5-VL-7B-Instruct",
            "summary": "Qwen2.5-VL-7B's tower: 632M + its merger 45M (to width 3584)",
        },
    },
}

PRESET_NAMES: dict[str, tuple[str, ...]] = {family: tuple(presets) for family, presets in PRESETS.items()}

#: family -> what `build_encoder(name)` loads when no checkpoint or preset is named
DEFAULT_CHECKPOINTS = {"qwen2_vl": "Qwen/Qwen2-VL-2B-Instruct", "qwen2_5_vl": "Qwen/Qwen2.5-VL-3B-Instruct"}
