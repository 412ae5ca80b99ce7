"""LoRA on a `MultimodalModel` through PEFT: add adapters, and merge them back into plain weights.

The language model is wrapped by ``peft.get_peft_model`` (the model records the adapter config in
``config.json``, so ``from_pretrained`` rebuilds the wrapper); encoders, when asked, get LoRA layers
injected in place by ``peft.inject_adapter_in_model`` (their class is unchanged, the adapter config
is recorded in the encoder's record). Either way `MultimodalModel.save_pretrained` writes ONE
directory holding the base weights, the adapters and the trained projectors, and
`MultimodalModel.from_pretrained` loads it back with the adapters in place.

>>> add_lora(model, r=8)                    # doctest: +SKIP
>>> ...train...; model.save_pretrained("out")   # one directory: adapters + projectors + base  # doctest: +SKIP
>>> plain = merge_lora(MultimodalModel.from_pretrained("out"))  # no PEFT left   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from mmcore.errors import ConfigError


def _peft() -> Any:
    try:
        import peft
    except ImportError as exc:  # pragma: no cover - peft is a test dependency
        raise ConfigError("LoRA needs the peft package: pip install 'mmcore[peft]'") from exc
    return peft


def linear_names(module: nn.Module) -> list[str]:
    """The (leaf) names of every ``nn.Linear`` inside ``module``: a LoRA target list that works for
    any encoder, transformers or timm (PEFT's ``"all-linear"`` needs a transformers model)."""
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, sub in module.named_modules()
            if isinstance(sub, nn.Linear) and name
        }
    )


def has_lora(model: nn.Module) -> bool:
    """Whether any part of ``model`` carries PEFT adapters."""
    peft = _peft()
    return any(isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer) for m in model.modules())


def add_lora(
    model: nn.Module,
    r: int = 8,
    alpha: int | None = None,
    dropout: float = 0.0,
    target_modules: str | list[str] = "all-linear",
    encoders: bool | Iterable[str] = False,
) -> nn.Module:
    """Add LoRA adapters to ``model``'s language model (and to ``encoders``: ``True`` for all, or names).

    Only the adapter weights are left trainable in the parts that get adapters; other parts keep their
    ``requires_grad``. A language model that is already PEFT-wrapped keeps its adapters. Returns
    ``model`` (changed in place).
    """
    from mmcore.modeling.adapters import adapter_configs, is_peft_model, wrap_with_peft

    peft = _peft()
    alpha = 2 * r if alpha is None else alpha
    if not is_peft_model(model.language_model):
        config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules)
        wrapped = wrap_with_peft(model.language_model, config)
        _adopt_language_model(model, wrapped)
    else:
        model.config.peft_config = adapter_configs(model.language_model)
    _only_adapters_train(model.language_model)

    names = list(model.encoders) if encoders is True else list(encoders or [])
    for name in names:
        if name not in model.encoders:
            raise ConfigError(
                f"no encoder {name!r} to add LoRA to; the encoders are {sorted(model.encoders)}"
            )
        module = model.encoders[name].module
        if getattr(module, "peft_config", None) is None:
            targets = linear_names(module) if target_modules == "all-linear" else target_modules
            if not targets:
                raise ConfigError(f"encoder {name!r} has no nn.Linear layers to put LoRA on")
            config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
            peft.inject_adapter_in_model(config, module)
        _only_adapters_train(module)
    return model


def _only_adapters_train(module: nn.Module) -> None:
    for name, param in module.named_parameters():
        param.requires_grad_("lora_" in name)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base weight and drop PEFT: the language model becomes the plain
    transformers model again and the encoders lose their adapter layers. The result saves and loads
    as a plain model (no ``peft_config`` in ``config.json``). Changes ``model`` in place; returns it."""
    from mmcore.modeling.adapters import is_peft_model

    peft = _peft()
    if is_peft_model(model.language_model):
        _adopt_language_model(model, model.language_model.merge_and_unload())
    for encoder in model.encoders.values():
        module = encoder.module
        for path, layer in list(module.named_modules()):
            if isinstance(layer, peft.tuners.tuners_utils.BaseTunerLayer):
                layer.merge(safe_merge=True)
                parent, _, child = path.rpartition(".")
                setattr(module.get_submodule(parent), child, layer.get_base_layer())
        if hasattr(module, "peft_config"):
            del module.peft_config
    return model


def _adopt_language_model(model: nn.Module, llm: nn.Module) -> None:
    """Put ``llm`` (wrapped or unwrapped) in place and bring config and tied-weight keys up to date."""
    from mmcore.modeling.adapters import adapter_configs, is_peft_model

    model.language_model = llm
    model.config.peft_config = adapter_configs(llm) if is_peft_model(llm) else None
    # What post_init computes, again: the LLM's tied weights now live under other names.
    keys = model.get_expanded_tied_weights_keys(all_submodels=False)
    for name, child in model.named_children():
        if tied := getattr(child, "all_tied_weights_keys", None):
            keys.update({f"{name}.{k}": f"{name}.{v}" for k, v in tied.items()})
    model.all_tied_weights_keys = keys
    model._collect_wrapped_tied_weights()
