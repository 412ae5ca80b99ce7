"""Which transformers VLM families mmcore converts, and the errors conversion raises.

A family is a transformers ``model_type`` (``config.json``) with a module in this package that
names its transformers class (``ARCHITECTURE``) and implements ``from_hf(hf_model, ...)``,
``to_hf(mllm)``, ``claims(mllm)`` (export: is this model the family's; LLaVA, the fallback, has none), ``processor_from_hf(...)``
and ``hf_processor_for(hf_model, processor)`` (export: transformers' processor from mmcore's). `MISSING` names
the families transformers has that mmcore cannot express yet, with the reason; the error for an
unknown source lists both. This module imports no torch.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from mmcore.errors import ConfigError

#: model_type -> module of mmcore.convert that converts it.
FAMILIES: dict[str, str] = {
    "llava": "mmcore.convert.llava",
    "llava_next": "mmcore.convert.llava_next",
    "llava_onevision": "mmcore.convert.llava_onevision",
    "qwen2_audio": "mmcore.convert.qwen2_audio",
    "qwen2_vl": "mmcore.convert.qwen2_vl",
    "qwen2_5_vl": "mmcore.convert.qwen2_5_vl",
}

#: the families `mmcore.convert.family_for` asks, in turn, whether an mmcore model has their shape
#: (``claims(mllm)``): the most specific first (OneVision's tiling is LLaVA-NeXT's plus more); LLaVA,
#: the plain shape, answers when none does.
EXPORT_ORDER: tuple[str, ...] = ("llava_onevision", "qwen2_5_vl", "qwen2_vl", "llava_next", "qwen2_audio")

#: model_type -> why it is not converted yet (shown in errors and in docs/converting.md).
MISSING: dict[str, str] = {}


class UnknownFamilyError(ConfigError):
    """A source's ``model_type`` is not a family mmcore converts; the message names the known ones."""


class NoTransformersCounterpartError(ConfigError):
    """An mmcore model has a part (two encoders, a resampler, a timm tower, a callback...) that no
    transformers VLM class can hold, so `to_hf` / ``mmcore export`` cannot write it."""


def known_families() -> str:
    return ", ".join(sorted(FAMILIES))


def family_module(model_type: str | None, where: str = "source") -> ModuleType:
    """The converter module of ``model_type``; `UnknownFamilyError` naming the known families."""
    if model_type in FAMILIES:
        return importlib.import_module(FAMILIES[model_type])
    if model_type in MISSING:
        raise UnknownFamilyError(
            f"{where}: model_type {model_type!r} is not converted yet ({MISSING[model_type]}); "
            f"families mmcore converts: {known_families()}"
        )
    raise UnknownFamilyError(
        f"{where}: model_type {model_type!r} is not a transformers VLM family mmcore knows; "
        f"families mmcore converts: {known_families()} (not yet: {', '.join(sorted(MISSING))})"
    )
