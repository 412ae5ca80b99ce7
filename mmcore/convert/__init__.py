"""Released transformers VLMs to mmcore and back: `from_hf`, `from_pretrained_multimodal_model`, `to_hf`.

In: a transformers VLM (in memory, or a directory / hub id) becomes the `MultimodalModel` that
computes the same logits, holding the source's own modules (no weight is copied), with the plugin
encoder, projector, callbacks and image token of the checkpoint, and its processor and chat template.
Out: an mmcore model of a shape transformers has a class for becomes that class, sharing weights;
`mmcore.convert.export.export_model` writes it as a plain transformers directory (``mmcore export``).

>>> mllm = from_pretrained_multimodal_model("llava-hf/llava-1.5-7b-hf")   # doctest: +SKIP
>>> llava = to_hf(mllm)                                                    # doctest: +SKIP

Families: see `mmcore.convert.families`. This module imports no torch; the
functions import what they need.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from typing import Any

from mmcore.convert.families import (
    EXPORT_ORDER,
    FAMILIES,
    MISSING,
    NoTransformersCounterpartError,
    UnknownFamilyError,
    family_module,
)

__all__ = [
    "FAMILIES",
    "MISSING",
    "Converted",
    "NoTransformersCounterpartError",
    "UnknownFamilyError",
    "convert_pretrained",
    "from_hf",
    "from_pretrained_multimodal_model",
    "to_hf",
]


def from_hf(hf_model: Any, **kwargs: Any) -> Any:
    """The `MultimodalModel` equivalent to transformers VLM ``hf_model``, sharing its modules.

    ``kwargs`` go to the family's converter (LLaVA: ``image_processor=``, ``source=``, ``modality=``).
    `UnknownFamilyError` for a ``model_type`` mmcore does not convert (the message names those it does).
    """
    model_type = getattr(getattr(hf_model, "config", None), "model_type", None)
    return family_module(model_type, type(hf_model).__name__).from_hf(hf_model, **kwargs)


def to_hf(mllm: Any) -> Any:
    """The transformers VLM holding ``mllm``'s modules: ``LlavaOnevisionForConditionalGeneration`` for an
    anyres encoder with OneVision's downscaling (and a pooled video encoder),
    ``LlavaNextForConditionalGeneration`` for an anyres encoder, ``LlavaForConditionalGeneration`` otherwise; `NoTransformersCounterpartError`
    naming the part that has no transformers counterpart."""
    return family_for(mllm).to_hf(mllm)


def family_for(mllm: Any) -> Any:
    """The converter module whose transformers class can hold ``mllm``'s shape: the first family of
    `EXPORT_ORDER` whose ``claims(mllm)`` says so, else LLaVA (its ``to_hf`` names what does not fit)."""
    from mmcore.convert import llava

    for model_type in EXPORT_ORDER:
        family = family_module(model_type)
        if family.claims(mllm):
            return family
    return llava


@dataclass
class Converted:
    """What `convert_pretrained` made: the model, its processor (None when the source has no
    tokenizer mmcore can use, see ``notes``), the family and what the user should know."""

    model: Any
    processor: Any
    family: str
    notes: list[str] = field(default_factory=list)


def convert_pretrained(
    path_or_id: str | os.PathLike,
    *,
    dtype: Any = None,
    device: str | None = None,
    trust_remote_code: bool = False,
) -> Converted:
    """Load transformers VLM ``path_or_id`` (a directory or hub id; safetensors weights, or
    ``weights_only`` pickles) and convert it with its processor. ``device="meta"`` reads configs only:
    no weights (for ``mmcore convert --dry-run``)."""
    import torch
    import transformers
    from transformers import AutoConfig

    source = str(path_or_id)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        from mmcore.errors import ConfigError

        raise ConfigError(
            f"{source}: cannot read a transformers config (expected a model directory or hub id): "
            f"{' '.join(str(exc).split())[:300]}"
        ) from exc
    family = family_module(config.model_type, source)
    notes: list[str] = []
    hf_processor = _hf_processor(source, trust_remote_code, notes)
    model_class = getattr(transformers, family.ARCHITECTURE)  # the family's transformers class
    if device == "meta":
        with torch.device("meta"):
            hf_model = model_class._from_config(config)
    else:
        hf_model = model_class.from_pretrained(
            source, dtype=dtype or "auto", trust_remote_code=trust_remote_code, **({"device_map": device} if device else {})
        )
    image_processor = getattr(hf_processor, "image_processor", None)
    mllm = family.from_hf(hf_model.eval(), image_processor=image_processor, source=source)
    processor = None
    tokenizer = getattr(hf_processor, "tokenizer", None)
    if tokenizer is not None:
        from mmcore.errors import MMCoreError

        try:
            extra = {}
            for part in ("video_processor", "feature_extractor"):  # the families that take one
                if part in inspect.signature(family.processor_from_hf).parameters:
                    extra[part] = getattr(hf_processor, part, None)
            processor = family.processor_from_hf(
                mllm, tokenizer, getattr(hf_processor, "chat_template", None), image_processor=image_processor, **extra
            )
        except MMCoreError as exc:
            notes.append(f"no processor: {exc}")
    return Converted(mllm, processor, config.model_type, notes)


def from_pretrained_multimodal_model(
    path_or_id: str | os.PathLike, *, return_processor: bool = False, **kwargs: Any
) -> Any:
    """Cornstarch's name: the `MultimodalModel` converted from transformers VLM ``path_or_id``
    (``(model, processor)`` with ``return_processor=True``). ``kwargs``: see `convert_pretrained`."""
    converted = convert_pretrained(path_or_id, **kwargs)
    return (converted.model, converted.processor) if return_processor else converted.model


def _hf_processor(source: str, trust_remote_code: bool, notes: list[str]) -> Any:
    """The checkpoint's processor (tokenizer, image processor, chat template), or its tokenizer alone,
    or None (noted) when it has neither."""
    from transformers import AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        first = exc
    from types import SimpleNamespace

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError):
        notes.append(f"no tokenizer or processor in {source} ({' '.join(str(first).split())[:200]})")
        return None
    notes.append(f"no image processor in {source}; the vision tower's default preprocessing is recorded")
    return SimpleNamespace(tokenizer=tokenizer, image_processor=None, chat_template=None)
