"""Build the model an `AssemblySpec` describes: for real (assemble, test-run ASSEMBLY) or on the meta device
(``assemble --dry-run``). Errors name the spec key they come from.

>>> from mmcore.cli.spec import spec_from_dict
>>> spec = spec_from_dict({"llm": {"source": "tiny"},
...                         "encoders": {"vision": {"encoder": "clip", "preset": "tiny"}}})
>>> built = build_from_spec(spec)            # doctest: +SKIP
>>> built.model, built.tokenizer             # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from mmcore.cli.spec import DEFAULT_PROJECTOR, AssemblySpec, EncoderEntry, looks_like_path, resolve_names
from mmcore.errors import ConfigError, MMCoreError
from mmcore.presets import LLM_PRESETS, TINY_TOKENIZER

Step = Callable[[str], None]


@dataclass
class Built:
    """What `build_from_spec` returns."""

    model: Any
    tokenizer: Any = None
    processor: Any = None
    #: whether every weight is random (presets, or random_init)
    random_weights: bool = True
    notes: list[str] = field(default_factory=list)
    #: the ``preprocess_llm`` callback the language model gets (its name), None: none
    llm_callback: str | None = None


def build_from_spec(spec: AssemblySpec, *, meta: bool = False, step: Step | None = None) -> Built:
    """Build the model (and, unless ``meta``, its tokenizer with the modality tokens and its processor).

    ``meta=True`` builds every part on the meta device (no memory, no weights, no tokenizer): for
    counting parameters of full-size combinations instantly. ``step(description)`` is called before
    each stage (progress display).
    """
    from mmcore.modeling.multimodal import MultimodalModel

    step = step or (lambda _: None)
    resolve_names(spec)
    step(f"language model {spec.llm.source}")
    llm, llm_random = _build_llm(spec, meta)
    width = llm.get_input_embeddings().embedding_dim
    encoders = {}
    random_weights = llm_random
    for name, entry in spec.encoders.items():
        step(f"encoder {name}: {entry.encoder}")
        encoders[name], enc_random = _build_encoder(spec, entry, width, meta)
        random_weights = random_weights and enc_random
    step("model")
    with _on_meta(meta):  # every encoder comes with its projector (see _build_encoder)
        model = MultimodalModel(encoders, llm)
    built = Built(model, random_weights=random_weights)
    from mmcore.builtin.mrope import mrope_encoders, mrope_for

    # A Qwen2-VL text model reads 3-D positions of the Qwen2-VL towers' tokens: the mrope callback.
    with _key(spec, "llm.source"):
        mrope = mrope_encoders(model)
    if mrope is not None:
        built.llm_callback = "mrope"
        kinds = ", ".join(f"{kind} = encoders.{mrope[kind]}" for kind in ("image", "video") if mrope[kind])
        built.notes.append(f"preprocess_llm callback: mrope ({mrope['family']} 3-D positions; {kinds})")
    if meta:
        return built
    step("tokenizer and modality tokens")
    from mmcore.modeling.tokens import add_modality_tokens

    built.tokenizer = load_tokenizer(spec)
    add_modality_tokens(built.tokenizer, model, wrap=spec.model.wrap)
    if mrope is not None:  # with the placeholder ids the tokenizer now has
        model.preprocess_llm_callback = mrope_for(model)
    built.processor = make_processor(model, built.tokenizer)
    if built.processor is None:
        built.notes.append(
            "mmcore.processing is not available: the directory holds the tokenizer but no processor"
        )
    return built


@contextlib.contextmanager
def _key(spec: AssemblySpec, path: str, loading: str | None = None) -> Iterator[None]:
    """Prefix an error raised while building one part with the spec key it comes from (and, for
    loading errors, with what was being loaded)."""
    try:
        yield
    except MMCoreError as exc:
        if str(exc).startswith(f"{spec.origin}: "):
            raise
        message = f"{spec.origin}: {path}: {exc}"
        try:
            keyed = type(exc)(message)
        except TypeError:  # a subclass with its own constructor
            keyed = ConfigError(message)
        raise keyed from exc
    except (OSError, ValueError) as exc:  # hub/file loading: missing repo, offline, bad config
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        what = f"cannot load {loading!r}: " if loading else ""
        raise ConfigError(f"{spec.origin}: {path}: {what}{first}") from exc


def _on_meta(meta: bool) -> Any:
    """``torch.device("meta")`` as a context (parameters created inside allocate nothing), or a no-op."""
    if not meta:
        return contextlib.nullcontext()
    import torch

    return torch.device("meta")


def _build_llm(spec: AssemblySpec, meta: bool) -> tuple[Any, bool]:
    from transformers import AutoConfig, AutoModelForCausalLM

    from mmcore.builtin import register_text_lm

    source = spec.llm.source
    with _key(spec, "llm.source", loading=source):
        if source in LLM_PRESETS:
            config, random = LLM_PRESETS[source].build_config(), True
        else:
            config = AutoConfig.from_pretrained(_path_or_id(source), trust_remote_code=False)
            random = meta or spec.model.random_init
        register_text_lm(config.model_type)  # mmcore's Qwen2-VL text causal LMs
        if not random:
            return AutoModelForCausalLM.from_pretrained(_path_or_id(source), config=config, trust_remote_code=False), False
        with _on_meta(meta):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=False), random


def _path_or_id(source: str) -> str:
    if looks_like_path(source):
        from pathlib import Path

        return str(Path(source).expanduser())
    return source


def _build_encoder(spec: AssemblySpec, entry: EncoderEntry, width: int, meta: bool) -> tuple[Any, bool]:
    from mmcore.factory import build_encoder, encoder_from_recipe, get_factory
    from mmcore.modeling.projector import MultimodalProjector, MultimodalProjectorConfig

    path = f"encoders.{entry.name}"
    with _key(spec, f"{path}.encoder"):
        factory = get_factory(entry.encoder)
    with _key(spec, f"{path}.callbacks"):
        callbacks = {slot: _callback(cb) for slot, cb in entry.callbacks.items()}
    with _key(spec, f"{path}.options"):
        factory.check_options(entry.options)
    if entry.preset is not None:
        with _key(spec, f"{path}.preset"):
            factory.check_preset(entry.preset)
    device = "meta" if meta else None
    random_weights = entry.preset is not None or spec.model.random_init or meta
    source_key = f"{path}.preset" if entry.preset is not None else f"{path}.checkpoint"
    with _key(spec, source_key, loading=entry.checkpoint):
        if random_weights and entry.preset is None:
            # Read the checkpoint's config only: random weights, nothing but the config downloaded.
            checkpoint = entry.checkpoint or (factory.spec.default_checkpoint if factory.spec else None)
            if checkpoint is None:
                raise ConfigError(
                    f"encoder {factory.name!r} has no default checkpoint; give a checkpoint or a preset"
                )
            recipe = factory.make_recipe(checkpoint=checkpoint, **entry.options)
            encoder = encoder_from_recipe(factory, recipe, callbacks=callbacks, device=device)
        else:
            encoder = build_encoder(
                entry.encoder,
                entry.checkpoint,
                preset=entry.preset,
                callbacks=callbacks,
                device=device,
                **entry.options,
            )
    # The user's choice (this encoder's, then the model-wide one) beats the plugin's default projector.
    recipe = encoder.source["recipe"] if encoder.source else {}
    projector_type = (
        entry.projector or spec.model.projector or factory.default_projector(recipe) or DEFAULT_PROJECTOR
    )
    options = {"activation": spec.model.activation, **entry.projector_options}
    key = f"{path}.projector" if entry.projector is not None else "model.projector"
    if entry.projector_options:
        key = f"{path}.projector_options"
    with _key(spec, key), _on_meta(meta):
        encoder.projector = MultimodalProjector(
            MultimodalProjectorConfig(
                projector_type=projector_type, in_features=encoder.output_width, out_features=width, **options
            )
        )
    return encoder, random_weights


def _callback(record: dict[str, Any] | None) -> Any:
    if record is None:
        return None
    from mmcore.plugins import get_registry
    from mmcore.registry import load_factory

    factory = load_factory(get_registry().get_callback(record["name"]))
    try:
        return factory(**record["params"])
    except TypeError as exc:
        raise ConfigError(f"callback {record['name']!r}: {exc}") from exc


def load_tokenizer(spec: AssemblySpec) -> Any:
    """The tokenizer the spec names (``llm.tokenizer``, else the LLM source's, else the preset's)."""
    name = spec.llm.tokenizer
    key = "llm.tokenizer"
    if name is None:
        preset = LLM_PRESETS.get(spec.llm.source)
        if preset is not None and preset.tokenizer is None:
            raise ConfigError(
                f"{spec.origin}: llm.tokenizer: LLM preset {preset.name!r} has no tokenizer offline; pass "
                f"--tokenizer with the matching model's hub id or directory, or --tokenizer {TINY_TOKENIZER} "
                "for a shape-and-speed test with meaningless text (or use --dry-run, which needs none)"
            )
        name = preset.tokenizer if preset is not None else spec.llm.source
        key = "llm.source"
    if name == TINY_TOKENIZER:
        from mmcore.testing import tiny_tokenizer

        return tiny_tokenizer()
    from transformers import AutoTokenizer

    with _key(spec, key, loading=name):
        return AutoTokenizer.from_pretrained(_path_or_id(name), trust_remote_code=False)


def make_processor(model: Any, tokenizer: Any) -> Any:
    """``MultimodalProcessor.from_model(model, tokenizer)``, or None where `mmcore.processing` is absent."""
    try:
        from mmcore.processing import MultimodalProcessor
    except ModuleNotFoundError as exc:
        if exc.name == "mmcore.processing":
            return None
        raise
    return MultimodalProcessor.from_model(model, tokenizer)
