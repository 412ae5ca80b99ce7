"""Language-model presets: named configs built in code, so an LLM can be assembled with no download;
and `vit_config`, the field names vision plugins build their ViT presets with.

A preset is a ``transformers`` config (model type plus arguments) with random weights. The full-size
ones copy the released model's ``config.json`` (architecture fields only), so ``mmcore assemble
--dry-run`` counts their parameters exactly, and a real tokenizer of that model fits them.

Only the ``tiny*`` presets come with a tokenizer offline (`mmcore.testing.tiny_tokenizer`).
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

def _decoder(
    vocab: int, width: int, ffn: int, layers: int, heads: int, kv_heads: int, positions: int, eps: float,
    theta: float | None, bos: int, eos: int, tied: bool = False, **extra: Any,
) -> dict[str, Any]:  # fmt: skip
    """A decoder-only LLM config (Llama / Qwen2 / Mistral field names) from its published numbers."""
    return dict(
        vocab_size=vocab, hidden_size=width, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=positions,
        rms_norm_eps=eps, bos_token_id=bos, eos_token_id=eos, tie_word_embeddings=tied,
        **({"rope_theta": theta} if theta is not None else {}), **extra,
    )  # fmt: skip


def _mrope(theta: float, section: list[int]) -> dict[str, Any]:
    """Qwen2-VL's rotary parameters: ``section`` splits each head's rotary half over (t, h, w)."""
    return {"rope_type": "default", "rope_theta": theta, "mrope_section": section}


def vit_config(
    width: int, ffn: int, layers: int, heads: int, patch: int, image: int, *, act: str, eps: float
) -> dict[str, Any]:
    """A transformers ViT vision-tower config (CLIP / SigLIP / DINOv2 field names) from its published
    numbers, as plain data: a vision plugin's presets module stays free of torch.

    >>> vit_config(1024, 4096, 24, 16, 14, 336, act="quick_gelu", eps=1e-5)["num_hidden_layers"]
    24
    """
    return dict(
        hidden_size=width, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
        patch_size=patch, image_size=image, num_channels=3, hidden_act=act, layer_norm_eps=eps,
    )  # fmt: skip


# Real-size presets (meta-device dry runs, random-weight runs): numbers as in each model's config.json.
#              vocab    width  ffn    layers heads kv  positions  eps   theta  bos     eos
LLM_PRESETS: dict[str, LLMPreset] = {
    p.name: p
    for p in (
        LLMPreset("tiny", "llama", "2-layer Llama, width 32 (tests)", dict(_TINY), TINY_TOKENIZER),
        LLMPreset("tiny-qwen2", "qwen2", "2-layer Qwen2, width 32 (tests)", dict(_TINY), TINY_TOKENIZER),
        LLMPreset("llama3-8b", "llama", "Meta-Llama-3-8B (8.03B)",
                  _decoder(128256, 4096, 14336, 32, 32, 8, 8192, 1e-5, 500000.0, 128000, 128001)),
        LLMPreset("qwen2-0.5b", "qwen2", "Qwen2-0.5B (0.49B, tied)",
                  _decoder(151936, 896, 4864, 24, 14, 2, 131072, 1e-6, 1000000.0, 151643, 151643, tied=True)),
        LLMPreset("qwen2-7b", "qwen2", "Qwen2-7B (7.62B)",
                  _decoder(152064, 3584, 18944, 28, 28, 4, 131072, 1e-6, 1000000.0, 151643, 151643)),
        LLMPreset("tiny-qwen2-vl", "qwen2_vl_text", "2-layer Qwen2-VL text model (3-D positions: mrope), width 32 (tests)",
                  dict(_TINY, rope_parameters=_mrope(10000.0, [2, 1, 1])), TINY_TOKENIZER),
        LLMPreset("tiny-qwen2.5-vl", "qwen2_5_vl_text", "2-layer Qwen2.5-VL text model (mrope), width 32 (tests)",
                  dict(_TINY, rope_parameters=_mrope(10000.0, [2, 1, 1])), TINY_TOKENIZER),
        LLMPreset("qwen2-vl-7b", "qwen2_vl_text", "Qwen2-VL-7B's language model (7.62B, mrope)",
                  _decoder(152064, 3584, 18944, 28, 28, 4, 32768, 1e-6, None, 151643, 151645,
                           rope_parameters=_mrope(1000000.0, [16, 24, 24]))),
        LLMPreset("qwen2.5-vl-7b", "qwen2_5_vl_text", "Qwen2.5-VL-7B's language model (7.62B, mrope)",
                  _decoder(152064, 3584, 18944, 28, 28, 4, 128000, 1e-6, None, 151643, 151645,
                           rope_parameters=_mrope(1000000.0, [16, 24, 24]))),
        LLMPreset("mistral-7b", "mistral", "Mistral-7B-v0.1 (7.24B)",
                  _decoder(32000, 4096, 14336, 32, 32, 8, 32768, 1e-5, 10000.0, 1, 2, sliding_window=4096)),
        LLMPreset("vicuna-7b", "llama", "Vicuna-7B v1.5, Llama-2 (6.74B)",
                  _decoder(32000, 4096, 11008, 32, 32, 32, 4096, 1e-5, 10000.0, 1, 2, pad_token_id=0)),
    )
}  # fmt: skip


def get_llm_preset(name: str) -> LLMPreset:
    """The preset called ``name``; `UnknownNameError` with suggestions otherwise."""
    try:
        return LLM_PRESETS[name]
    except KeyError:
        hint = did_you_mean(name, LLM_PRESETS)
        raise UnknownNameError(
            f"unknown LLM preset {name!r}{hint} (presets: {', '.join(LLM_PRESETS)})"
        ) from None
