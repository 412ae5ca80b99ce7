"""Language-model presets: named configs built in code, so an LLM can be assembled with no download.

A preset is a ``transformers`` config (model type plus arguments) with random weights. The full-size
ones copy the released model's ``config.json`` (architecture fields only), so ``mmcore assemble
--dry-run`` counts their parameters exactly, and a real tokenizer of that model fits them.

Only ``tiny`` and ``tiny-qwen2`` come with a tokenizer offline (`mmcore.testing.tiny_tokenizer`).
The full-size presets have none: they serve ``--dry-run`` as they are, and a real assembly needs
``--tokenizer`` (the matching model's hub id or directory, or ``tiny`` for a shape-and-speed test
whose text is meaningless).

>>> sorted(LLM_PRESETS)[:3]
['llama3-8b', 'mistral-7b', 'qwen2-0.5b']
>>> LLM_PRESETS["llama3-8b"].config["num_key_value_heads"]
8

This module imports no torch or transformers at import time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mmcore._names import did_you_mean
from mmcore.errors import UnknownNameError

#: The tokenizer name meaning `mmcore.testing.tiny_tokenizer` (offline, 384 ids).
TINY_TOKENIZER = "tiny"


@dataclass(frozen=True)
class LLMPreset:
    """A named LLM config: ``model_type`` plus the config arguments, and where it comes from."""

    name: str
    model_type: str
    summary: str
    config: dict[str, Any] = field(default_factory=dict)
    #: tokenizer that ships with the preset (``"tiny"``), or None: pass ``--tokenizer``
    tokenizer: str | None = None

    def build_config(self) -> Any:
        """The ``transformers`` config (imports transformers)."""
        from transformers import AutoConfig

        return AutoConfig.for_model(self.model_type, **self.config)


_TINY = dict(
    vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=3,
    tie_word_embeddings=False,
)  # fmt: skip

LLM_PRESETS: dict[str, LLMPreset] = {
    p.name: p
    for p in (
        LLMPreset("tiny", "llama", "2-layer Llama, width 32 (tests)", dict(_TINY), TINY_TOKENIZER),
        LLMPreset("tiny-qwen2", "qwen2", "2-layer Qwen2, width 32 (tests)", dict(_TINY), TINY_TOKENIZER),
        LLMPreset(
            "llama3-8b",
            "llama",
            "Meta-Llama-3-8B (8.03B)",
            dict(
                vocab_size=128256,
                hidden_size=4096,
                intermediate_size=14336,
                num_hidden_layers=32,
                num_attention_heads=32,
                num_key_value_heads=8,
                max_position_embeddings=8192,
                rms_norm_eps=1e-5,
                rope_theta=500000.0,
                bos_token_id=128000,
                eos_token_id=128001,
                tie_word_embeddings=False,
            ),
        ),
        LLMPreset(
            "qwen2-0.5b",
            "qwen2",
            "Qwen2-0.5B (0.49B, tied)",
            dict(
                vocab_size=151936,
                hidden_size=896,
                intermediate_size=4864,
                num_hidden_layers=24,
                num_attention_heads=14,
                num_key_value_heads=2,
                max_position_embeddings=131072,
                rms_norm_eps=1e-6,
                rope_theta=1000000.0,
                bos_token_id=151643,
                eos_token_id=151643,
                tie_word_embeddings=True,
            ),
        ),
        LLMPreset(
            "qwen2-7b",
            "qwen2",
            "Qwen2-7B (7.62B)",
            dict(
                vocab_size=152064,
                hidden_size=3584,
                intermediate_size=18944,
                num_hidden_layers=28,
                num_attention_heads=28,
                num_key_value_heads=4,
                max_position_embeddings=131072,
                rms_norm_eps=1e-6,
                rope_theta=1000000.0,
                bos_token_id=151643,
                eos_token_id=151643,
                tie_word_embeddings=False,
            ),
        ),
        LLMPreset(
            "mistral-7b",
            "mistral",
            "Mistral-7B-v0.1 (7.24B)",
            dict(
                vocab_size=32000,
                hidden_size=4096,
                intermediate_size=14336,
                num_hidden_layers=32,
                num_attention_heads=32,
                num_key_value_heads=8,
                max_position_embeddings=32768,
                rms_norm_eps=1e-5,
                rope_theta=10000.0,
                sliding_window=4096,
                bos_token_id=1,
                eos_token_id=2,
                tie_word_embeddings=False,
            ),
        ),
        LLMPreset(
            "vicuna-7b",
            "llama",
            "Vicuna-7B v1.5, Llama-2 (6.74B)",
            dict(
                vocab_size=32000,
                hidden_size=4096,
                intermediate_size=11008,
                num_hidden_layers=32,
                num_attention_heads=32,
                num_key_value_heads=32,
                max_position_embeddings=4096,
                rms_norm_eps=1e-5,
                rope_theta=10000.0,
                bos_token_id=1,
                eos_token_id=2,
                pad_token_id=0,
                tie_word_embeddings=False,
            ),
        ),
    )
}


def get_llm_preset(name: str) -> LLMPreset:
    """The preset called ``name``; `UnknownNameError` with suggestions otherwise."""
    try:
        return LLM_PRESETS[name]
    except KeyError:
        hint = did_you_mean(name, LLM_PRESETS)
        raise UnknownNameError(
            f"unknown LLM preset {name!r}{hint} (presets: {', '.join(LLM_PRESETS)})"
        ) from None
