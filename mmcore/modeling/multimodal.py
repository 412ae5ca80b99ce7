"""`MultimodalModel`: modality encoders + projectors feeding any HuggingFace causal LM.

Data path of one forward, in `MultimodalModel.forward`'s four named steps:

1. modality features: route the call's inputs to the encoders (by their forward signatures, or
   ``encoder_inputs``) and run each present encoder (callbacks, encoder, projector):
   modality -> ``(total_tokens, llm_width)``;
2. merge: embed the text with the placeholder ids masked out, ``(batch, seq, llm_width)``, and write
   the features into the placeholder positions;
3. labels: mask those positions out of the labels;
4. call the language model with ``inputs_embeds``.

Recording the parts in config.json and rebuilding them at load lives in
`mmcore.modeling.serialization`.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.utils import logging

from mmcore.builtin import register_text_lm
from mmcore.errors import (
    ConfigError,
    EncoderInputError,
    TokenIdError,
    TrainableSpecError,
    WidthMismatchError,
)
from mmcore.files import recover, staged_directory
from mmcore.modeling.adapters import adapter_configs, is_peft_model, wrap_with_peft
from mmcore.modeling.configuration import MultimodalConfig
from mmcore.modeling.encoder import ModalEncoderModule
from mmcore.modeling.merge import (
    check_placeholders_have_inputs,
    flatten_features,
    merge_modality_features,
    placeholder_masks,
)
from mmcore.modeling.projector import (
    CUSTOM,
    MultimodalProjector,
    MultimodalProjectorConfig,
    parse_projector_type,
    projector_widths,
)
from mmcore.modeling.serialization import (
    MODEL_FILES,
    TRUST_REMOTE_CODE,
    build_encoders,
    build_llm_callback,
    load_checked,
    record_encoders,
    record_llm_callback,
)

logger = logging.get_logger(__name__)



def _is_dtensor(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "DTensor" or type(getattr(tensor, "data", None)).__name__ == "DTensor"


def _keeps_some(logits_to_keep: int | torch.Tensor) -> bool:
    """Pass ``logits_to_keep`` on only when it asks for something, so LLMs without it still work."""
    return isinstance(logits_to_keep, torch.Tensor) or logits_to_keep != 0


def _mark_initialized(module: nn.Module) -> None:
    """Modules handed in by the user arrive initialised (often pretrained); HF's init must skip them."""
    for sub in module.modules():
        sub._is_hf_initialized = True
    for param in module.parameters():
        param._is_hf_initialized = True


class MultimodalModel(PreTrainedModel, GenerationMixin):
    """A multimodal causal LM assembled from parts.

    Example:
        >>> mllm = MultimodalModel(
        ...     encoders={"vision": ModalEncoderModule(clip_vision_tower)},
        ...     language_model=llm,               # any transformers causal LM, PEFT-wrapped or not
        ...     init_projector_type="mlp2x_gelu",  # for encoders given without a projector
        ... )                                      # doctest: +SKIP
        >>> mllm.set_modality_token_ids({"vision": image_token_id})  # doctest: +SKIP

    Args:
        encoders: modality name -> `ModalEncoderModule`.
        language_model: a transformers causal LM (``AutoModelForCausalLM``-style), optionally wrapped
            by ``peft.get_peft_model``.
        init_projector_type: projector built for encoders that come without one: ``linear`` (the
            default, as in Cornstarch), ``mlp``, ``mlp<N>x_<act>``, ``resampler`` or a plugin's.
        init_activation: activation of ``mlp`` projectors (a key of ``ACT2CLS``).
        preprocess_llm_callback: ``fn(**llm_inputs) -> dict`` of updates, called after the merge with
            the language model's inputs its signature names (``inputs_embeds``, ``attention_mask``,
            ``position_ids``, ``labels``, ``input_ids`` and the call's other arguments; all of them for
            a ``**kwargs`` signature). Where a language model family's own needs live (3-D rotary
            positions). A registered `~mmcore.callbacks.Callback` with slot ``preprocess_llm`` is
            recorded in config.json like the encoders' callbacks.
        encoder_modules / callbacks: used by ``from_pretrained`` for parts that config.json cannot
            rebuild: ``encoder_modules={"vision": module_or_ModalEncoderModule}``,
            ``callbacks={"vision": {"preprocess": fn}}``.
    """

    config: MultimodalConfig
    config_class = MultimodalConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _skip_keys_device_placement = ["past_key_values", "cache"]

    def __init__(
        self,
        encoders: Mapping[str, ModalEncoderModule] | MultimodalConfig | None = None,
        language_model: nn.Module | None = None,
        init_projector_type: str = "linear",
        init_activation: str = "gelu",
        *,
        preprocess_llm_callback: Any = None,
        config: MultimodalConfig | None = None,
        encoder_modules: Mapping[str, nn.Module] | None = None,
        callbacks: Mapping[str, Mapping[str, Any]] | None = None,
    ):
        if isinstance(encoders, MultimodalConfig):  # the HF from_pretrained / from_config path
            config, encoders = encoders, None
        if callable(init_projector_type):  # Cornstarch's order: (encoders, language_model, preprocess_llm_callback, ...)
            if preprocess_llm_callback is not None:
                raise ConfigError("preprocess_llm_callback given twice (third positional argument and keyword)")
            preprocess_llm_callback, init_projector_type, init_activation = (
                init_projector_type, init_activation if init_activation != "gelu" else "linear", "gelu"
            )
        if not isinstance(init_projector_type, str) or not isinstance(init_activation, str):
            raise ConfigError(
                f"init_projector_type and init_activation are names (e.g. 'mlp2x_gelu', 'gelu'), got "
                f"{init_projector_type!r} and {init_activation!r}"
            )
        if config is not None:
            if language_model is not None or encoders is not None:
                raise ConfigError("pass either a config or encoders + language_model, not both")
            super().__init__(config)
            language_model = self._build_language_model(config)
            encoders = build_encoders(config, encoder_modules or {}, callbacks or {})
            if preprocess_llm_callback is None:
                preprocess_llm_callback = build_llm_callback(config, callbacks or {})
        else:
            if language_model is None:
                raise ConfigError("MultimodalModel needs a language_model (a transformers causal LM)")
            encoders = dict(encoders or {})
            for name, encoder in encoders.items():
                if not isinstance(encoder, ModalEncoderModule):
                    raise ConfigError(
                        f"encoders[{name!r}] must be a ModalEncoderModule, got {type(encoder).__name__}; "
                        "wrap it: ModalEncoderModule(module)"
                    )
            llm_config = getattr(language_model, "config", None)
            if llm_config is None:
                raise ConfigError(
                    f"language_model must be a transformers causal LM with a .config, got {type(language_model).__name__}"
                )
            _mark_initialized(language_model)
            for encoder in encoders.values():
                _mark_initialized(encoder)
            peft_config = None
            if is_peft_model(language_model):
                peft_config = adapter_configs(language_model)
                llm_config = language_model.get_base_model().config
            config = MultimodalConfig(text_config=llm_config, peft_config=peft_config)
            super().__init__(config)
        self.language_model = language_model
        # The language model computes the loss, shifted as a causal LM's: HF Trainer then counts the
        # tokens that normalise it over labels[..., 1:] (it reads this attribute).
        self.loss_type = "ForCausalLM"
        for name, encoder in encoders.items():
            # An encoder may name its own projector type (a plugin's default: EVA02's resampler).
            self._attach_projector(name, encoder, encoder.requested_projector or init_projector_type, init_activation)
        self.encoders = nn.ModuleDict(encoders)
        if config is not None and self.config.shared_modules:  # the load: parts saved once, shared again
            given = {f"encoders.{name}." for name in (encoder_modules or {})}  # the caller's own modules stay
            self._share_modules({
                alias: source for alias, source in self.config.shared_modules.items()
                if not any(alias.startswith(g) or source.startswith(g) for g in given)
            })  # fmt: skip
        self.config.shared_modules = _shared_modules(self.encoders)
        self.preprocess_llm_callback = preprocess_llm_callback
        if getattr(language_model, "generation_config", None) is not None:
            self.generation_config = language_model.generation_config
        self.config.encoders = record_encoders(self.encoders, strict=False)
        self.config.preprocess_llm_callback = record_llm_callback(self.preprocess_llm_callback, strict=False)
        self.post_init()
        self._collect_wrapped_tied_weights()
        self._declare_shared_parameters()

    # -- forward: modality features -> merge -> labels -> language model --------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        cache: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        encoder_inputs: Mapping[str, Mapping[str, Any]] | None = None,
        modality_features: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ):
        """Encode every modality present in the call, merge, and run the language model.

        Modality inputs (``pixel_values=``, ``input_features=``, ...) reach the encoder whose forward
        takes them; ``encoder_inputs={"vision": {...}}`` says it explicitly. ``modality_features``
        (from `encode`) are merged as they are, with no encoder run for them. Returns the language
        model's output (``loss`` when ``labels`` are given; placeholder positions never count).
        """
        training = self.training and torch.is_grad_enabled()
        # 1. modality features: modality -> (total_tokens, llm_width), items in text order
        routed, llm_kwargs = self.route_inputs(kwargs, encoder_inputs)
        features, zero = self._modality_features(routed, modality_features, training)
        # 2. merge into the text embeddings (batch, seq, llm_width), 3. placeholders out of the labels
        text_ids, inputs_embeds, labels = self._merge(input_ids, inputs_embeds, labels, features, training)
        if training:
            inputs_embeds = inputs_embeds + zero  # every trainable encoder parameter is in the graph
        # 4. the language model
        llm_inputs = dict(
            **({"input_ids": text_ids} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}),
            attention_mask=attention_mask,
            position_ids=position_ids,
            **self._cache_kwargs(cache if cache is not None else past_key_values),
            labels=labels,
            use_cache=use_cache,
            **({"logits_to_keep": logits_to_keep} if _keeps_some(logits_to_keep) else {}),
            **llm_kwargs,
        )
        if self.preprocess_llm_callback is not None:  # it sees the modality arguments, encoder_inputs too
            given = {**kwargs, "encoder_inputs": encoder_inputs} if encoder_inputs else kwargs
            llm_inputs = self._preprocess_llm(llm_inputs, input_ids, given)
        return self.language_model(**llm_inputs)

    def _modality_features(
        self, routed: Mapping[str, Mapping[str, Any]], given: Mapping[str, Any] | None, training: bool
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | float]:
        """The features of every modality in the call (its encoder's, or ``modality_features`` as
        given), and in training a zero that depends on every trainable encoder parameter (data parallel
        reduces them all; see `_agree_on_modalities` and `_untouched_encoders_zero`)."""
        given = dict(given or {})
        both = sorted(set(given) & set(routed))
        if both:
            raise ConfigError(f"{both}: pass a modality's inputs or its modality_features, not both")
        unknown = sorted(set(given) - set(self.encoders))
        if unknown:
            raise ConfigError(f"modality_features for {unknown}, but the encoders are {sorted(self.encoders)}")
        stand_ins = self._agree_on_modalities(routed, set(given)) if training else {}
        # Encoders run in the model's order (the same on every rank), stand-ins among them.
        ordered = {n: routed[n] if n in routed else stand_ins[n] for n in self.encoders if n in routed or n in stand_ins}
        encoded = self.encode(ordered)  # modality -> (total_tokens, llm_width)
        features = {**{m: f for m, f in encoded.items() if m not in stand_ins},
                    **{m: flatten_features(f, m) for m, f in given.items()}}  # fmt: skip
        if not training:
            return features, 0.0
        zero = sum((encoded[m].sum() * 0.0 for m in stand_ins), 0.0)
        return features, zero + self._untouched_encoders_zero(set(features) | set(stand_ins))

    def _merge(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        labels: torch.Tensor | None,
        features: Mapping[str, torch.Tensor],
        training: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """``(input_ids, inputs_embeds, labels)`` for the language model: the text embeddings with each
        modality's features written at its placeholders, and the placeholders masked out of the
        labels. With nothing to merge outside training (every decode step) the language model gets
        the ids and embeds them itself, as it would alone."""
        if inputs_embeds is not None:
            if features:
                raise ConfigError("modality inputs need input_ids (to find the placeholders), not inputs_embeds")
            return None, inputs_embeds, labels
        if input_ids is None:
            raise ConfigError("pass input_ids or inputs_embeds")
        token_ids = self.config.modality_token_ids
        missing = set(features) - set(token_ids)
        if missing:
            raise TokenIdError(f"no placeholder token id for {sorted(missing)}; call set_modality_token_ids(...) first")
        # modality -> (batch, seq) bool: where its placeholders are
        masks = placeholder_masks(input_ids, {m: token_ids[m] for m in self.encoders if m in token_ids})
        if labels is not None and training:
            check_placeholders_have_inputs(masks, features, self.config.merge_check)
        # Masked for the lookup: placeholders about to be replaced by features, and ids outside the
        # vocabulary. Any other placeholder (one the model generated while decoding) is embedded as the
        # token it is, as HF's LLaVA does.
        vocab = getattr(self.get_input_embeddings(), "num_embeddings", None)
        embed_mask = _union(m for name, m in masks.items() if name in features or vocab is None or token_ids[name] >= vocab)
        text_ids = input_ids.masked_fill(embed_mask, 0) if embed_mask is not None else input_ids
        placeholders = _union(masks.values())
        if labels is not None and placeholders is not None:
            labels = labels.masked_fill(placeholders, -100)
        if not features and not training:
            return text_ids, None, labels
        inputs_embeds = self.get_input_embeddings()(text_ids)  # (batch, seq, llm_width)
        # The lookup is a fresh tensor this call owns: write the feature rows into it rather than copying
        # all of it. Not when it is a view (an unusual embedding module), nor a leaf that requires grad
        # (HF's enable_input_require_grads hook makes it one under frozen embeddings).
        owned = inputs_embeds._base is None and not (inputs_embeds.is_leaf and inputs_embeds.requires_grad)
        inputs_embeds = merge_modality_features(inputs_embeds, masks, features, self.config.merge_check, inplace=owned)
        return None, inputs_embeds, labels

    def _preprocess_llm(self, llm_inputs: dict[str, Any], input_ids: Any, call_kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Run ``preprocess_llm_callback`` on the language model's inputs (plus the call's ``input_ids``
        and modality arguments, which it may need, e.g. for 3-D rotary positions) and apply the updates
        it returns."""
        callback = self.preprocess_llm_callback
        seen = {**call_kwargs, **llm_inputs, "input_ids": input_ids}
        params = inspect.signature(callback).parameters.values()
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            names = {p.name for p in params}
            seen = {k: v for k, v in seen.items() if k in names}
        updates = callback(**seen)
        if updates is None:
            return llm_inputs
        if not isinstance(updates, Mapping):
            raise ConfigError(
                f"preprocess_llm_callback must return a dict of the language model inputs it changes (or None), "
                f"got {type(updates).__name__}"
            )
        updated = {**llm_inputs, **updates}
        if updated.get("inputs_embeds") is not None and "inputs_embeds" in llm_inputs:
            updated.pop("input_ids", None)  # the language model takes one of the two
        return updated

    def _agree_on_modalities(self, routed: Mapping[str, Mapping[str, Any]], given: set[str]) -> dict[str, dict[str, Any]]:
        """Under a process group of several ranks (training): the ranks agree, with one all-gather of a
        presence vector, which encoders run this step; a rank without inputs for one of them gets one
        item of a rank that has them (a broadcast, only when the ranks differ) and runs the encoder on
        it with a contribution of exactly zero. So every FSDP2 unit's all-gather and reduce-scatter
        happen on every rank (no hang, no size mismatch) whatever modalities each rank's batch holds.
        Returns encoder name -> the stand-in inputs this rank runs. ``config.agree_on_modalities=False``
        turns it off (every rank's batch then must hold the same modalities)."""
        import torch.distributed as dist

        if not (self.config.agree_on_modalities and dist.is_available() and dist.is_initialized()):
            return {}
        world = dist.get_world_size()
        if world < 2:
            return {}
        names = list(self.encoders)
        have = set(routed) | given
        device = _collective_device()
        local = torch.tensor([n in have for n in names], dtype=torch.int32, device=device)
        gathered = torch.empty(world * len(names), dtype=torch.int32, device=device)
        dist.all_gather_into_tensor(gathered, local)
        presence = gathered.view(world, len(names)).cpu().tolist()  # one small host read per step
        rank = dist.get_rank()
        stand_ins: dict[str, dict[str, Any]] = {}
        for j, name in enumerate(names):  # the same order on every rank
            holders = [r for r in range(world) if presence[r][j]]
            if not holders or len(holders) == world:
                continue
            payload = [_one_item(routed[name]) if rank == holders[0] else None]
            dist.broadcast_object_list(payload, src=holders[0], device=device)
            if name not in have:
                stand_ins[name] = _to_device(payload[0], self.device)
        return stand_ins

    def _cache_kwargs(self, kv_cache: Any) -> dict[str, Any]:
        """The KV cache under the name the language model takes it by: ``cache`` where transformers
        has renamed it (5.24+, ``past_key_values`` deprecated), ``past_key_values`` before. Nothing
        when there is no cache, so neither name is passed in vain."""
        if kv_cache is None:
            return {}
        llm = self.language_model.get_base_model() if is_peft_model(self.language_model) else self.language_model
        name = "cache" if "cache" in inspect.signature(llm.forward).parameters else "past_key_values"
        return {name: kv_cache}

    def _untouched_encoders_zero(self, used: set[str]) -> torch.Tensor | float:
        """A zero that depends on every trainable parameter of encoders absent from this batch, so
        data-parallel gradient reduction never waits on parameters that got no gradient (DDP). FSDP2's
        sharded parameters (DTensors) are left out: FSDP2 reduces only what got gradients, and its
        training sampler gives every rank the same modalities per step."""
        zero: torch.Tensor | float = 0.0
        for name, encoder in self.encoders.items():
            if name in used:
                continue
            for param in encoder.parameters():
                if param.requires_grad and not _is_dtensor(param):
                    zero = zero + param.sum() * 0.0
        return zero

    # -- routing and encoding ---------------------------------------------------------------------------
    def route_inputs(
        self, kwargs: dict[str, Any], encoder_inputs: Mapping[str, Mapping[str, Any]] | None = None
    ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
        """Split call kwargs into per-encoder inputs and the rest (for the LLM)."""
        if not encoder_inputs:  # the common text-only case (every decode step) in one set test
            if not any(arg in kwargs for arg in self._input_takers()):
                return {}, dict(kwargs)
        encoder_inputs = dict(encoder_inputs or {})
        unknown = set(encoder_inputs) - set(self.encoders)
        if unknown:
            raise EncoderInputError(f"encoder_inputs for {sorted(unknown)}, but the encoders are {sorted(self.encoders)}")
        takers = self._input_takers()
        routed: dict[str, dict[str, Any]] = {}
        rest: dict[str, Any] = {}
        for key, value in kwargs.items():
            names = [n for n in takers.get(key, ()) if n not in encoder_inputs]
            if not takers.get(key):
                rest[key] = value
                continue
            if value is None:
                continue
            if len(names) > 1:
                raise EncoderInputError(
                    f"{key!r} is taken by encoders {names}; say which gets what: "
                    f"encoder_inputs={{{names[0]!r}: {{{key!r}: ...}}, ...}}"
                )
            if names:
                routed.setdefault(names[0], {})[key] = value
        for name, explicit in encoder_inputs.items():
            routed[name] = {k: v for k, v in explicit.items() if v is not None}
        selected = {}
        for name, inputs in routed.items():
            encoder = self.encoders[name]
            chosen = {encoder.input_map.get(k, k): v for k, v in inputs.items()}
            if chosen:
                selected[name] = chosen
        return selected, rest

    def _input_takers(self) -> dict[str, list[str]]:
        """Call argument -> the encoders that take it; rebuilt only when the encoders or their input
        names change."""
        key = tuple((name, id(encoder), tuple(encoder.input_map)) for name, encoder in self.encoders.items())
        cached = self.__dict__.get("_takers_cache")
        if cached is None or cached[0] != key:
            takers: dict[str, list[str]] = {}
            for name, encoder in self.encoders.items():
                for arg in encoder.input_map:
                    takers.setdefault(arg, []).append(name)
            cached = self.__dict__["_takers_cache"] = (key, takers)
        return cached[1]

    def encode(
        self, encoder_inputs: Mapping[str, Mapping[str, Any]] | None = None, **inputs: Any
    ) -> dict[str, torch.Tensor]:
        """Run the encoders that have inputs; modality -> ``(total_tokens, llm_width)`` features.

        ``mllm.encode(pixel_values=...)`` routes call arguments as `forward` does;
        ``mllm.encode({"vision": {...}})`` gives each encoder its inputs. The features can be passed
        back as ``forward(modality_features=...)`` / ``generate(modality_features=...)``, which then run
        no encoder for those modalities (encode an image once, ask many questions about it).

        With ``config.concurrent_encoders`` and more than one encoder in the call, each encoder after
        the first runs on its own device stream (see `_encode_on_streams`).
        """
        if inputs:
            encoder_inputs, rest = self.route_inputs(inputs, encoder_inputs)
            if rest:
                raise EncoderInputError(f"encode: no encoder takes {sorted(rest)}")
        encoder_inputs = encoder_inputs or {}
        if self.config.concurrent_encoders and len(encoder_inputs) > 1 and not torch.compiler.is_compiling():
            return self._encode_on_streams(encoder_inputs)
        return {
            name: flatten_features(self.encoders[name](**inputs), name) for name, inputs in encoder_inputs.items()
        }

    def _encode_on_streams(self, encoder_inputs: Mapping[str, Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Launch independent encoders on separate streams so that, on a GPU, towers too small to fill
        it overlap. The first encoder runs on the current stream, every other one on a fresh side
        stream that first waits for the current one (the inputs are ready); the current stream waits
        for all of them before the merge. Autograd runs each op's backward on the stream its forward
        ran on and orders the streams itself. Features made on a side stream are recorded on the
        current one, so the caching allocator does not hand their memory back to the side stream
        while the merge may still read it. On CPU, streams are no-ops and this is the sequential path.
        """
        tensors = (v for inputs in encoder_inputs.values() for v in inputs.values() if isinstance(v, torch.Tensor))
        device = next(tensors, None)
        device = device.device if device is not None else next(self.parameters()).device
        backend = torch.get_device_module(device)  # torch.cuda, torch.xpu, ...; torch.cpu's are no-ops
        main = backend.current_stream(device)
        names = list(encoder_inputs)
        sides = {name: backend.Stream() if device.type == "cpu" else backend.Stream(device) for name in names[1:]}
        for stream in sides.values():
            stream.wait_stream(main)
        features = {}
        for name in names:
            stream = sides.get(name)
            if stream is None:
                features[name] = flatten_features(self.encoders[name](**encoder_inputs[name]), name)
                continue
            with backend.stream(stream):
                features[name] = flatten_features(self.encoders[name](**encoder_inputs[name]), name)
        for name, stream in sides.items():
            main.wait_stream(stream)
            if device.type != "cpu":
                features[name].record_stream(main)
        return features

    # -- Cornstarch's model tree and training modes ------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        # Cornstarch's model tree: ``mllm.vision_encoder`` is ``mllm.encoders["vision"]`` (an alias:
        # state_dict keys and saved directories keep the ``encoders.vision.`` prefix).
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.endswith("_encoder"):
                encoders = self.__dict__.get("_modules", {}).get("encoders")
                if encoders is not None and name[: -len("_encoder")] in encoders:
                    return encoders[name[: -len("_encoder")]]
            raise

    def train(
        self,
        mode: bool = True,
        *,
        encoders_mode: Mapping[str, tuple[bool, bool]] | None = None,
        llm_mode: bool | None = None,
    ) -> MultimodalModel:
        """``train(mode)``: the training mode of every part, as for any module (what HF Trainer calls).

        Cornstarch's form, ``train(encoders_mode={"vision": (encoder_mode, projector_mode)},
        llm_mode=...)``, sets the mode *and* ``requires_grad`` of the parts it names: the encoders in
        ``encoders_mode`` (all of them, as ``(llm_mode, llm_mode)``, when it is omitted) and the
        language model (``llm_mode``, default True).
        """
        if encoders_mode is None and llm_mode is None:
            return super().train(mode)
        llm_mode = True if llm_mode is None else bool(llm_mode)
        if encoders_mode is None:
            encoders_mode = {name: (llm_mode, llm_mode) for name in self.encoders}
        unknown = sorted(set(encoders_mode) - set(self.encoders))
        if unknown:
            raise TrainableSpecError(f"encoders_mode names {unknown}, but the encoders are {sorted(self.encoders)}")
        for name, modes in encoders_mode.items():
            if not (isinstance(modes, (tuple, list)) and len(modes) == 2):
                raise TrainableSpecError(
                    f"encoders_mode[{name!r}] must be (encoder_mode, projector_mode), got {modes!r}"
                )
            encoder = self.encoders[name]
            for part, flag in zip((encoder.module, encoder.projector), modes):
                part.train(bool(flag))
                part.requires_grad_(bool(flag))
        self.language_model.train(llm_mode)
        self.language_model.requires_grad_(llm_mode)
        self.training = any(m.training for m in self.children())
        return self

    # -- construction -----------------------------------------------------------------------------
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        # HF's loader leaves non-HF modules' non-persistent buffers (timm's rope tables, EVA's zero
        # k_bias) as empty tensors; timm modules know how to compute theirs again.
        init_buffers = getattr(module, "init_non_persistent_buffers", None)
        if callable(init_buffers):
            init_buffers()

    @property
    def text_width(self) -> int:
        return self.get_input_embeddings().embedding_dim

    def _attach_projector(self, name: str, encoder: ModalEncoderModule, projector_type: str, activation: str) -> None:
        in_width, out_width = encoder.output_width, self.text_width
        if encoder.projector is None:
            parse_projector_type(projector_type, activation)
            if in_width is None:
                raise WidthMismatchError(
                    f"encoder {name!r}: cannot read its output width from {type(encoder.module).__name__}; "
                    "pass ModalEncoderModule(..., output_width=N) or a projector"
                )
            projector_config = MultimodalProjectorConfig(
                projector_type=projector_type, activation=activation, in_features=in_width, out_features=out_width
            )
            encoder.projector = MultimodalProjector(projector_config)
            return
        if not isinstance(encoder.projector, MultimodalProjector):
            got_in, got_out = projector_widths(encoder.projector)
            encoder.projector = MultimodalProjector(
                MultimodalProjectorConfig(projector_type=CUSTOM, in_features=got_in, out_features=got_out),
                projection=encoder.projector,
            )
        got_in, got_out = encoder.projector.config.in_features, encoder.projector.config.out_features
        if in_width is not None and got_in is not None and got_in != in_width:
            raise WidthMismatchError(
                f"encoder {name!r}: projector takes width {got_in} but the encoder outputs width {in_width}"
            )
        if got_out is not None and got_out != out_width:
            raise WidthMismatchError(
                f"encoder {name!r}: projector outputs width {got_out} but the language model's embeddings "
                f"have width {out_width}"
            )

    @staticmethod
    def _build_language_model(config: MultimodalConfig) -> nn.Module:
        register_text_lm(getattr(config.text_config, "model_type", None))
        llm = AutoModelForCausalLM.from_config(config.text_config)
        if config.peft_config:
            import peft

            adapters = list(config.peft_config.items())
            name, first = adapters[0]
            llm = wrap_with_peft(llm, peft.PeftConfig.from_peft_type(**first), adapter_name=name)
            for name, other in adapters[1:]:
                llm.add_adapter(name, peft.PeftConfig.from_peft_type(**other))
        return llm

    def _collect_wrapped_tied_weights(self) -> None:
        """PEFT wrappers hide the LLM's tied-weight declaration from HF's child scan (which, through the
        wrapper's attribute forwarding, records it under unwrapped names); record it under the real ones."""
        if not is_peft_model(self.language_model):
            return
        self.all_tied_weights_keys = {
            k: v for k, v in self.all_tied_weights_keys.items() if not k.startswith("language_model.")
        }
        for path, module in self.language_model.named_modules():
            if isinstance(module, PreTrainedModel) and getattr(module, "all_tied_weights_keys", None):
                prefix = f"language_model.{path}."
                self.all_tied_weights_keys.update(
                    {prefix + k: prefix + v for k, v in module.all_tied_weights_keys.items()}
                )
                break

    def _share_modules(self, shared: Mapping[str, str]) -> None:
        """Make each recorded alias (``encoders.video.module``) the very module or parameter it shares
        (``encoders.image.module``)."""
        for alias, source in shared.items():
            if not alias.startswith("encoders.") or not source.startswith("encoders."):
                raise ConfigError(f"shared_modules: {alias!r} -> {source!r}: only encoders' parts can be shared")
            parent, _, attr = alias.rpartition(".")
            try:
                try:
                    part = self.get_submodule(source)
                except AttributeError:
                    part = self.get_parameter(source)
                setattr(self.get_submodule(parent), attr, part)
            except AttributeError as exc:
                raise ConfigError(f"shared_modules: {alias!r} -> {source!r}: {exc}") from exc

    def _declare_shared_parameters(self) -> None:
        """Parameters that encoders share (one module under two names) are declared to transformers as
        tied, so the checkpoint holds them once and the load neither misses nor re-initialises them."""
        ties = _aliases(self.encoders.named_parameters(prefix="encoders", remove_duplicate=False))
        if not ties:
            return
        import re

        self.all_tied_weights_keys = {**self.all_tied_weights_keys, **ties}
        # save_pretrained drops a shared tensor's second name by these patterns (the first name stays)
        self._tied_weights_keys = {**(self._tied_weights_keys or {}), **{f"^{re.escape(k)}$": v for k, v in ties.items()}}

    # -- token ids ---------------------------------------------------------------------------------
    def set_modality_token_ids(
        self,
        token_ids: Mapping[str, int],
        new_num_tokens: int | Mapping[str, tuple[int, int]] | None = None,
        *,
        wrap_token_ids: Mapping[str, tuple[int, int]] | None = None,
    ) -> None:
        """Set the placeholder id of each modality (ids may lie outside the vocabulary), and optionally
        the ``(start, end)`` ids wrapped around each item's run (``wrap_token_ids=``).

        ``new_num_tokens`` (Cornstarch's second argument, e.g. ``len(tokenizer)``): grow the language
        model's embeddings to that many rows when they have fewer (new rows mean-initialised), so
        tokens just added to the tokenizer have rows. A mapping there is taken as ``wrap_token_ids``
        (mmcore's earlier positional form).
        """
        if isinstance(new_num_tokens, Mapping):
            if wrap_token_ids is not None:
                raise TokenIdError("wrap token ids given twice (second positional argument and wrap_token_ids=)")
            wrap_token_ids, new_num_tokens = new_num_tokens, None
        if new_num_tokens is not None:
            if isinstance(new_num_tokens, bool) or not isinstance(new_num_tokens, int) or new_num_tokens < 1:
                raise TokenIdError(f"new_num_tokens must be a positive vocabulary size, got {new_num_tokens!r}")
            rows = self.get_input_embeddings().weight.shape[0]
            if new_num_tokens > rows:
                from mmcore.modeling.tokens import _grow_embeddings

                _grow_embeddings(self.get_base_language_model(), list(range(rows, new_num_tokens)), new_num_tokens)
        unknown = set(token_ids) - set(self.encoders)
        if unknown:
            raise TokenIdError(f"token ids given for {sorted(unknown)}, but the encoders are {sorted(self.encoders)}")
        ids = {str(k): int(v) for k, v in token_ids.items()}
        if len(set(ids.values())) != len(ids):
            raise TokenIdError(f"each modality needs its own placeholder id, got {ids}")
        if any(v < 0 for v in ids.values()):
            raise TokenIdError(f"placeholder ids must be >= 0, got {ids}")
        self.config.modality_token_ids = {**self.config.modality_token_ids, **ids}
        if wrap_token_ids:
            self.config.modality_wrap_token_ids = {
                **self.config.modality_wrap_token_ids,
                **{str(k): [int(v[0]), int(v[1])] for k, v in wrap_token_ids.items()},
            }

    @property
    def modality_token_ids(self) -> dict[str, int]:
        return dict(self.config.modality_token_ids)

    # -- embeddings (delegated to the LLM) ---------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def get_base_language_model(self) -> PreTrainedModel:
        """The transformers model inside a possible PEFT wrapper."""
        llm = self.language_model
        return llm.get_base_model() if is_peft_model(llm) else llm

    # -- what trains ---------------------------------------------------------------------------------
    def parts(self) -> dict[str, nn.Module]:
        """Named parts: ``<encoder>.module``, ``<encoder>.projector`` and ``language_model``."""
        named: dict[str, nn.Module] = {}
        for name, encoder in self.encoders.items():
            named[f"{name}.module"] = encoder.module
            named[f"{name}.projector"] = encoder.projector
        named["language_model"] = self.language_model
        return named

    def set_trainable(self, parts: Mapping[str, bool] | None = None, /, **kwargs: bool) -> dict[str, tuple[int, int]]:
        """Choose what trains, by part: ``set_trainable({"vision.module": False, "vision.projector": True,
        "language_model": False})``. An encoder name alone covers its module and projector; ``"*"`` covers
        everything. Only ``requires_grad`` changes; ``train()``/``eval()`` keep their meaning. Returns
        `trainable_parameters()`."""
        spec = {**(parts or {}), **kwargs}
        named = self.parts()
        for key, flag in spec.items():
            if key == "*":
                targets = list(named.values())
            elif key in named:
                targets = [named[key]]
            elif key in self.encoders:
                targets = [named[f"{key}.module"], named[f"{key}.projector"]]
            else:
                raise TrainableSpecError(
                    f"unknown part {key!r}; expected '*', an encoder name or one of {sorted(named)}"
                )
            for module in targets:
                module.requires_grad_(bool(flag))
                for encoder in self.encoders.values():
                    if module is encoder.projector:  # a callback's parameters (anyres' image_newline) go with it
                        for callback in encoder.callbacks().values():
                            if isinstance(callback, nn.Module):
                                callback.requires_grad_(bool(flag))
        return self.trainable_parameters()

    def trainable_parameters(self) -> dict[str, tuple[int, int]]:
        """Part -> (trainable parameters, total parameters). Each parameter counts once, in the first
        part that holds it: a tower or projector two encoders share (an image and a video encoder)
        counts under the first, (0, 0) under the other, so the sums are the model's."""
        report, seen = {}, set()
        for key, module in self.parts().items():
            params = [p for p in module.parameters() if id(p) not in seen]
            seen.update(id(p) for p in params)
            report[key] = (sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
        return report

    # -- activation (gradient) checkpointing ---------------------------------------------------------
    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None, every_n_layers: int = 1):
        """Reached from ``activation_checkpointing_enable()`` / ``gradient_checkpointing_enable()``: HF parts
        (encoders, projectors, the LLM, also inside a PEFT wrapper) switch through HF's own mechanism; timm
        encoders through ``set_grad_checkpointing``; any other encoder by checkpointing its whole forward."""
        kwargs = {} if gradient_checkpointing_func is None else {"gradient_checkpointing_func": gradient_checkpointing_func}
        super()._set_gradient_checkpointing(enable=enable, every_n_layers=every_n_layers, **kwargs)
        for encoder in self.encoders.values():
            encoder.set_checkpointing(enable)

    # -- generation ---------------------------------------------------------------------------------------
    def prepare_inputs_for_generation(self, input_ids, *args, is_first_iteration: bool | None = False, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, *args, is_first_iteration=is_first_iteration, **kwargs
        )
        # Encoders run once, at prefill; decode steps only see the new token and the KV cache.
        if not is_first_iteration and kwargs.get("use_cache", True):
            model_inputs.pop("encoder_inputs", None)
            model_inputs.pop("modality_features", None)
            for encoder in self.encoders.values():
                for name in encoder.input_map:
                    model_inputs.pop(name, None)
        return model_inputs

    @torch.no_grad()
    def generate(self, *args: Any, return_modality_features: bool = False, **kwargs: Any) -> Any:
        """HF's ``generate``; with ``return_modality_features=True`` it returns ``(output, features)``,
        the features of this call's modalities (OmniLMM's ``return_vision_hidden_states``), to pass as
        ``modality_features=`` to a later call about the same items: its encoders then do not run."""
        if not return_modality_features:
            return super().generate(*args, **kwargs)
        given = dict(kwargs.pop("modality_features", None) or {})
        encoder_inputs = kwargs.pop("encoder_inputs", None)
        routed, rest = self.route_inputs(kwargs, encoder_inputs)
        features = {**self.encode(routed), **{m: flatten_features(f, m) for m, f in given.items()}}
        output = super().generate(*args, modality_features=features, **rest)
        return output, features

    def _validate_model_kwargs(self, model_kwargs: dict[str, Any]) -> None:
        # Encoder inputs arrive by name through **kwargs and this model's own arguments are its own;
        # the rest goes to the language model, so the language model checks them for typos (its own
        # arguments, e.g. a Qwen2-VL text model's mm_token_type_ids, pass through).
        ours = {name for encoder in self.encoders.values() for name in encoder.input_map}
        ours |= {"encoder_inputs", "cache", "modality_features"}
        rest = {k: v for k, v in model_kwargs.items() if k not in ours}
        self.get_base_language_model()._validate_model_kwargs(rest)

    # -- save / load ---------------------------------------------------------------------------------------
    def save_pretrained(
        self, save_directory: str | os.PathLike, *, allow_unrecorded_callbacks: bool = False, **kwargs: Any
    ) -> None:
        """Write one HF model directory (config.json with every part's recipe, safetensors weights).

        Atomic: written into a temporary directory beside the target and renamed into place, so a
        failure leaves no half-written directory. Saving into an existing directory replaces its
        model files (config, weights, stale shards included) and keeps the rest (tokenizer, processor). A callback config.json cannot record raises
        `UnrecordableCallbackError` naming it, unless ``allow_unrecorded_callbacks=True`` (then it must
        be passed again to ``from_pretrained(callbacks=...)``).
        """
        self.config.encoders = record_encoders(self.encoders, strict=not allow_unrecorded_callbacks)
        self.config.preprocess_llm_callback = record_llm_callback(self.preprocess_llm_callback, strict=not allow_unrecorded_callbacks)
        self.config.shared_modules = _shared_modules(self.encoders)  # parts shared after construction too
        self._declare_shared_parameters()
        if not kwargs.get("is_main_process", True):
            return
        # A symlinked target, a mount point or the working directory is updated in place (see
        # `staged_directory`); model files this save does not write again (stale shards) go.
        with staged_directory(save_directory, keep=MODEL_FILES, last=("config.json",)) as staging:
            super().save_pretrained(staging, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, torch_dtype=None, trust_remote_code=False, **kwargs):
        """Rebuild the whole model from its directory (no modules to pass unless config.json says so).

        Accepts the usual HF arguments (``dtype``/``torch_dtype``, ``device_map``, ...). Remote code is
        never trusted implicitly: callbacks recorded by import path load only with
        ``trust_remote_code=True`` (see docs/security.md).
        """
        if torch_dtype is not None:
            kwargs.setdefault("dtype", torch_dtype)
        if isinstance(pretrained_model_name_or_path, (str, os.PathLike)) and os.path.isdir(
            os.path.dirname(os.path.abspath(pretrained_model_name_or_path))
        ):
            recover(pretrained_model_name_or_path)  # a save killed mid-swap: put the directory back
        # HF builds the model through __init__ -> _build_encoders; the choice travels beside that call
        # (not as a kwarg HF would forward to the config or warn about).
        token = TRUST_REMOTE_CODE.set(bool(trust_remote_code))
        try:
            return load_checked(super().from_pretrained, pretrained_model_name_or_path, *args, **kwargs)
        finally:
            TRUST_REMOTE_CODE.reset(token)


    # -- the model zoo: transformers' own VLM classes in and out (mmcore.convert) ------------------------------
    @classmethod
    def from_hf(cls, hf_model: Any, **kwargs: Any) -> MultimodalModel:
        """The mmcore model equivalent to transformers VLM ``hf_model`` (in memory), sharing its modules:
        see `mmcore.convert.from_hf`."""
        from mmcore.convert import from_hf

        return from_hf(hf_model, **kwargs)

    @classmethod
    def from_pretrained_multimodal_model(cls, pretrained_model_id: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        """Cornstarch's name: the mmcore model converted from a transformers VLM directory or hub id
        (``return_processor=True``: also its processor); see `mmcore.convert.from_pretrained_multimodal_model`."""
        from mmcore.convert import from_pretrained_multimodal_model

        if args:
            raise ConfigError(
                "from_pretrained_multimodal_model takes the model id and keyword arguments (dtype=, device=, "
                f"trust_remote_code=, return_processor=), got {len(args)} more positional argument(s)"
            )
        return from_pretrained_multimodal_model(pretrained_model_id, **kwargs)

    def to_hf(self) -> Any:
        """The transformers model of the matching family, sharing this model's weights, or
        `~mmcore.convert.NoTransformersCounterpartError` naming the part without one; see
        `mmcore.convert.to_hf`."""
        from mmcore.convert import to_hf

        return to_hf(self)


def _shared_modules(encoders: nn.ModuleDict) -> dict[str, str]:
    """Alias path -> first path of every module (the outermost one: its children follow) or parameter
    that two encoders hold under different names."""
    modules = _aliases(encoders.named_modules(prefix="encoders", remove_duplicate=False))
    return {**modules, **_aliases(encoders.named_parameters(prefix="encoders", remove_duplicate=False), modules)}


def _aliases(named: Any, skip: Mapping[str, str] | None = None) -> dict[str, str]:
    """Alias name -> first name of every object that ``named`` (``(name, object)`` pairs, parents before
    children) holds under more than one name. Names under an alias already found, or under one of
    ``skip``, are left out: a shared module's children are shared with it."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, part in named:
        if any(name.startswith(alias + ".") for alias in (*(skip or ()), *aliases)):
            continue
        if id(part) in first:
            aliases[name] = first[id(part)]
        else:
            first[id(part)] = name
    return aliases


def _union(masks) -> torch.Tensor | None:
    """The elementwise OR of boolean masks (None for none)."""
    out = None
    for mask in masks:
        out = mask if out is None else out | mask
    return out


def _collective_device() -> torch.device:
    """Where the default process group's collectives take tensors (CUDA for NCCL, CPU for gloo)."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _one_item(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The first item of an encoder's inputs (dimension 0 of each tensor), on the CPU."""
    return {k: (v[:1].detach().cpu() if isinstance(v, torch.Tensor) and v.dim() else v) for k, v in inputs.items()}


def _to_device(inputs: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}

AutoConfig.register(MultimodalConfig.model_type, MultimodalConfig, exist_ok=True)
AutoModelForCausalLM.register(MultimodalConfig, MultimodalModel, exist_ok=True)
