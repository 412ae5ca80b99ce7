"""Whisper presets: encoder dimensions of the released checkpoints, built with random weights (no
download). Imports no torch.

Every released Whisper encoder reads 30 s windows: 3000 log-mel frames, 1500 positions (20 ms each).
"""

from __future__ import annotations

from typing import Any


def _dims(d_model: int, layers: int, heads: int, mels: int = 80) -> dict[str, int]:
    return {
        "d_model": d_model,
        "encoder_layers": layers,
        "encoder_attention_heads": heads,
        "encoder_ffn_dim": 4 * d_model,
        "num_mel_bins": mels,
        "max_source_positions": 1500,
    }


#: preset -> {"config": WhisperConfig encoder fields, "checkpoint": the hub id it mirrors, "summary"}
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "config": {**_dims(16, 2, 2, mels=8), "max_source_positions": 10},
        "checkpoint": None,
        "summary": "test size: width 16, 2 layers, 8 mel bins, a 0.2 s window (10 tokens)",
    },
    "whisper-tiny": {
        "config": _dims(384, 4, 6),
        "checkpoint": "openai/whisper-tiny",
        "summary": "8M, width 384",
    },
    "whisper-base": {
        "config": _dims(512, 6, 8),
        "checkpoint": "openai/whisper-base",
        "summary": "21M, width 512",
    },
    "whisper-small": {
        "config": _dims(768, 12, 12),
        "checkpoint": "openai/whisper-small",
        "summary": "88M, width 768",
    },
    "whisper-medium": {
        "config": _dims(1024, 24, 16),
        "checkpoint": "openai/whisper-medium",
        "summary": "307M, width 1024",
    },
    "whisper-large": {
        "config": _dims(1280, 32, 20),
        "checkpoint": "openai/whisper-large",
        "summary": "637M, width 1280",
    },
    "whisper-large-v2": {
        "config": _dims(1280, 32, 20),
        "checkpoint": "openai/whisper-large-v2",
        "summary": "637M, width 1280",
    },
    "whisper-large-v3": {
        "config": _dims(1280, 32, 20, mels=128),
        "checkpoint": "openai/whisper-large-v3",
        "summary": "637M, width 1280, 128 mel bins",
    },
    "whisper-large-v3-turbo": {
        "config": _dims(1280, 32, 20, mels=128),
        "checkpoint": "openai/whisper-large-v3-turbo",
        "summary": "the large-v3 encoder (turbo shrinks only the decoder)",
    },
}

PRESET_NAMES: tuple[str, ...] = tuple(PRESETS)

#: What `build_encoder("whisper")` loads when no checkpoint or preset is named.
DEFAULT_CHECKPOINT = "openai/whisper-large-v3"
