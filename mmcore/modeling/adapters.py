"""PEFT adapters as mmcore records them: telling a PEFT-wrapped module apart, and an adapter
config as ``config.json`` can hold it (one home for both; the model, LoRA training and save/load use it)."""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn


def wrap_with_peft(module: nn.Module, config: Any, **kwargs: Any) -> nn.Module:
    """``peft.get_peft_model(module, config, **kwargs)``, without the FutureWarning peft's own wrapper
    raises on transformers 5 (it reads the deprecated ``is_gradient_checkpointing``): a warning users
    of mmcore cannot act on. Every other warning passes."""
    import peft

    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        return peft.get_peft_model(module, config, **kwargs)


def is_peft_model(module: nn.Module) -> bool:
    """Whether ``module`` is a ``peft`` wrapper (``get_peft_model``'s result)."""
    return type(module).__module__.startswith("peft.") and hasattr(module, "get_base_model")


def adapter_configs(module: Any) -> dict[str, Any] | None:
    """``{adapter name: its PEFT config as JSON}`` of a PEFT-wrapped model or a module with LoRA
    injected in place; None when it has no adapters."""
    configs = getattr(module, "peft_config", None)
    if not configs:
        return None
    return {str(name): jsonable(config.to_dict()) for name, config in configs.items()}


def jsonable(value: Any) -> Any:
    """PEFT configs hold sets and enums; config.json wants lists and strings."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(jsonable(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "value") and type(value).__module__.startswith("peft"):
        return value.value
    return value
