"""`ModalEncoderModule`: one modality's encoder, its projector and the callbacks around them.

Per forward (Cornstarch's callback contract)::

    inputs = preprocess(inputs)                     # dict of the encoder's call arguments
    output = module(**inputs)                       # BaseModelOutput or tuple (a bare tensor is wrapped)
    output = postprocess_module(inputs, output)     # -> BaseModelOutput or tuple; [0]: (items, tokens, width)
    output = BaseModelOutput(projector(output[0]))  # [0]: (items, tokens', llm_width)
    output = postprocess_projector(inputs, output)  # -> BaseModelOutput or tuple; [0] goes to the merge

``[0]`` may also be a list of per-item ``(tokens_i, llm_width)`` tensors (items with their own token
count).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from mmcore.errors import ConfigError

# Names that belong to the language model's call; never routed to an encoder by signature (pass them
# through `encoder_inputs={...}` when an encoder really needs one, e.g. Whisper's attention_mask).
RESERVED_INPUT_NAMES = frozenset(
    {
        "input_ids", "attention_mask", "position_ids", "past_key_values", "cache", "inputs_embeds", "labels",
        "use_cache", "cache_position", "logits_to_keep", "output_attentions", "output_hidden_states",
        "return_dict", "return_loss", "head_mask", "interpolate_pos_encoding", "kwargs", "self",
        "encoder_inputs", "num_items_in_batch",
    }
)  # fmt: skip

CallbackFn = Callable[..., Any]


def first_output(output: Any) -> Any:
    """``output[0]`` for a ModelOutput or tuple; the tensor itself for an encoder that returns one."""
    if isinstance(output, torch.Tensor):
        return output
    return output[0]


def signature_input_names(module: nn.Module) -> tuple[str, ...]:
    """The data inputs an encoder takes, read off its forward signature."""
    params = inspect.signature(module.forward).parameters.values()
    return tuple(
        p.name
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in RESERVED_INPUT_NAMES
    )


class ModalEncoderModule(nn.Module):
    """An encoder for one modality plus its projector and optional callbacks.

    Args:
        module: the encoder: an HF ``PreTrainedModel`` (CLIP/SigLIP vision tower, Whisper encoder, ...)
            or any ``nn.Module`` (a timm model).
        projector: maps the encoder's features to the LLM's width: a module, or a projector type name
            (``"resampler"``, ``"mlp2x_gelu"``, a plugin's) that `MultimodalModel` builds for this encoder.
            ``None``: `MultimodalModel` builds one from its ``init_projector_type``.
        preprocess_callback: ``(inputs) -> inputs`` before the encoder.
        postprocess_module_callback: ``(inputs, output) -> output`` after the encoder; ``output`` is
            what the encoder returned (a ``BaseModelOutput`` or tuple; a bare tensor arrives as
            ``BaseModelOutput(last_hidden_state=tensor)``), and ``output[0]`` of the result feeds the
            projector.
        postprocess_projector_callback: ``(inputs, output) -> output`` after the projector; ``output``
            is a ``BaseModelOutput`` whose ``[0]`` is the projected features, and ``output[0]`` of the
            result goes to the merge.
        model: Cornstarch's name for ``module`` (pass one of the two).
        additional_args: call arguments routed to this encoder for its callbacks (e.g. ``image_sizes``
            for a packing callback) that are not passed on to the encoder itself (Cornstarch's
            ``additional_args``).
        input_names: which call arguments reach the encoder. Default: the encoder's forward signature
            (``pixel_values`` reaches a vision tower, ``input_features`` Whisper). A mapping renames,
            e.g. ``{"pixel_values": "x"}`` for a timm model whose forward takes ``x``.
        output_width: width of the features the projector receives, when it cannot be read off the
            encoder's config (``hidden_size``, ``d_model``, ``num_features`` or ``embed_dim``).
        source: how to rebuild the encoder at load time (set by plugins; HF encoders need none).
    """

    def __init__(
        self,
        module: nn.Module | None = None,
        projector: nn.Module | str | None = None,
        preprocess_callback: CallbackFn | None = None,
        postprocess_module_callback: CallbackFn | None = None,
        postprocess_projector_callback: CallbackFn | None = None,
        *,
        model: nn.Module | None = None,
        additional_args: Sequence[str] = (),
        input_names: Sequence[str] | Mapping[str, str] | None = None,
        output_width: int | None = None,
        source: dict[str, Any] | None = None,
    ):
        super().__init__()
        if model is not None:
            if module is not None:
                raise ConfigError(
                    "ModalEncoderModule: pass the encoder once, as module= or as model= (Cornstarch's name), not both"
                )
            module = model
        if module is None:
            raise ConfigError("ModalEncoderModule needs the encoder: ModalEncoderModule(module) or ModalEncoderModule(model=...)")
        if not isinstance(module, nn.Module):
            raise ConfigError(f"ModalEncoderModule: module must be an nn.Module, got {type(module).__name__}")
        if isinstance(preprocess_callback, (list, tuple)):
            raise ConfigError(
                "ModalEncoderModule: the third positional argument is preprocess_callback; pass Cornstarch's "
                f"additional_args by keyword: additional_args={list(preprocess_callback)!r}"
            )
        if isinstance(additional_args, str) or not all(isinstance(a, str) for a in additional_args):
            raise ConfigError(f"ModalEncoderModule: additional_args must be a list of argument names, got {additional_args!r}")
        self.module = module
        #: the projector type `MultimodalModel` builds when ``projector`` was given as a name
        self.requested_projector: str | None = projector if isinstance(projector, str) else None
        self.projector = None if isinstance(projector, str) else projector
        self.preprocess_callback = preprocess_callback
        self.postprocess_module_callback = postprocess_module_callback
        self.postprocess_projector_callback = postprocess_projector_callback
        if input_names is None:
            input_names = signature_input_names(module)
        # call argument name -> encoder argument name
        self.input_map: dict[str, str] = (
            dict(input_names) if isinstance(input_names, Mapping) else {n: n for n in input_names}
        )
        # routed here for the callbacks, never passed to the encoder itself
        self.additional_args: tuple[str, ...] = tuple(dict.fromkeys(additional_args))
        for name in self.additional_args:
            self.input_map.setdefault(name, name)
        if not self.input_map:
            raise ConfigError(
                f"ModalEncoderModule: cannot tell which inputs {type(module).__name__} takes from its forward "
                "signature; pass input_names=[...] or a mapping such as {'pixel_values': 'x'}"
            )
        self._output_width = output_width
        self.source = source
        self._checkpointed = False

    # -- introspection ---------------------------------------------------------------------------
    @property
    def output_width(self) -> int | None:
        """Width of the features the projector receives (None if unknown)."""
        if self._output_width is not None:
            return self._output_width
        config = getattr(self.module, "config", None)
        for attr in ("hidden_size", "d_model"):
            value = getattr(config, attr, None)
            if isinstance(value, int):
                return self._callback_width(value)
        for attr in ("num_features", "embed_dim"):
            value = getattr(self.module, attr, None)
            if isinstance(value, int):
                return self._callback_width(value)
        return None

    def _callback_width(self, width: int) -> int:
        """The width after the ``postprocess_module`` callback, as it declares (`Callback.output_width`)."""
        declared = getattr(self.postprocess_module_callback, "output_width", None)
        return int(declared(width)) if callable(declared) else width

    def callbacks(self) -> dict[str, CallbackFn | None]:
        return {
            "preprocess": self.preprocess_callback,
            "postprocess_module": self.postprocess_module_callback,
            "postprocess_projector": self.postprocess_projector_callback,
        }

    def select_inputs(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The subset of ``kwargs`` this encoder takes, renamed to its forward arguments."""
        return {arg: kwargs[name] for name, arg in self.input_map.items() if kwargs.get(name) is not None}

    # -- forward -----------------------------------------------------------------------------------
    def run_encoder(self, inputs: dict[str, Any]) -> Any:
        """Callbacks + encoder, without the projector: ``(inputs, output)``, the (preprocessed) inputs
        the callbacks see and the encoder's output after ``postprocess_module``."""
        if self.preprocess_callback is not None:
            inputs = self.preprocess_callback(inputs)
        call_kwargs = {k: v for k, v in inputs.items() if k not in self.additional_args}
        for callback in (self.postprocess_module_callback, self.postprocess_projector_callback):
            call_kwargs.update(getattr(callback, "module_kwargs", {}))
        # A frozen encoder keeps no activations for backward.
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.module.parameters())
        with torch.set_grad_enabled(grad):
            if self._checkpointed and grad and self.training:
                output = torch.utils.checkpoint.checkpoint(
                    lambda kw: self.module(**kw), call_kwargs, use_reentrant=False
                )
            else:
                output = self.module(**call_kwargs)
        if self.postprocess_module_callback is not None:
            if isinstance(output, torch.Tensor):  # a timm model's bare tensor, in the documented form
                output = BaseModelOutput(last_hidden_state=output)
            output = self.postprocess_module_callback(inputs, output)
        return inputs, output

    def forward(self, **inputs: Any) -> Any:
        """Features for the merge: ``(items, tokens, llm_width)`` or a list of ``(tokens_i, llm_width)``."""
        inputs, output = self.run_encoder(inputs)
        features = first_output(output)
        if self.projector is not None:
            features = self.projector(features)
        if self.postprocess_projector_callback is not None:
            output = self.postprocess_projector_callback(inputs, BaseModelOutput(last_hidden_state=features))
            # the documented form returns a BaseModelOutput or tuple; a bare tensor or list is taken as is
            features = output if isinstance(output, (torch.Tensor, list)) else first_output(output)
        return features

    def train(self, mode: bool = True, projector: bool | None = None) -> ModalEncoderModule:
        """``train(mode)`` as any module; Cornstarch's ``train(module_mode, projector_mode)`` sets the
        projector apart."""
        super().train(mode)
        if projector is not None and self.projector is not None:
            self.projector.train(projector)
        return self

    # -- activation checkpointing ------------------------------------------------------------------
    def set_checkpointing(self, enable: bool) -> None:
        """Checkpointing for encoders HF's mechanism does not reach (`MultimodalModel` switches HF
        modules itself): timm models through ``set_grad_checkpointing``, any other module by
        checkpointing its whole forward."""
        if any(hasattr(m, "gradient_checkpointing") for m in self.module.modules()):
            return
        if hasattr(self.module, "set_grad_checkpointing"):
            self.module.set_grad_checkpointing(enable)
        else:
            self._checkpointed = enable
