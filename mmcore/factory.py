"""The encoder-factory contract: what an ``EncoderSpec.factory`` points to, and `build_encoder`.

A plugin registers an `~mmcore.registry.EncoderSpec` whose ``factory`` is ``"module.path:Class"``,
a subclass of `EncoderFactory`. Everything about one kind of encoder goes through a **recipe**: a
JSON-able dict that says which architecture to build (its config) and with which options. A recipe
is made once (from a hub id, a local directory or file, or a named preset) and stored in the saved
model's ``config.json``; from it the factory rebuilds the module (random weights, which the model
directory's safetensors then fill), the processor, the token count and dummy inputs, offline.

>>> import mmcore
>>> enc = mmcore.build_encoder("clip", preset="tiny")          # doctest: +SKIP
>>> enc = mmcore.build_encoder("clip:clip", "openai/clip-vit-large-patch14", feature_layer=-1)  # doctest: +SKIP

This module imports no torch at import time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from mmcore.errors import ConfigError, MMCoreError, SerializationError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from mmcore.modeling.encoder import ModalEncoderModule
    from mmcore.registry import EncoderSpec

#: ``ModalEncoderModule.source["kind"]`` of an encoder a plugin built.
PLUGIN_SOURCE = "plugin"


class EncoderFactory:
    """Base class of encoder factories. Subclass it and implement the methods marked *required*.

    Class attributes:
        presets: preset name -> one-line description. Presets build with random weights and no
            download (``tiny`` for tests; the real architectures, for meta-device dry runs).
        preset_table: preset name -> ``{"summary": one line, ...}``, the plugin's whole preset table
            (its other keys are the factory's own: a config, the checkpoint it copies); when set,
            ``presets`` is its summaries (unless the subclass sets ``presets`` itself).
        options: option name -> default value, accepted by `make_recipe` (e.g. ``feature_layer``).
    """

    presets: ClassVar[Mapping[str, str]] = {}
    preset_table: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    options: ClassVar[Mapping[str, Any]] = {}
    #: the key of a training record (JSONL) whose file paths are this encoder's items, e.g. ``"image"``;
    #: None: the encoder cannot be trained from files (see `load_item`)
    data_key: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        table = cls.__dict__.get("preset_table")
        if table is not None and "presets" not in cls.__dict__:  # what the subclass sets itself wins
            cls.presets = {name: entry["summary"] for name, entry in table.items()}

    def __init__(self, spec: EncoderSpec | None = None):
        self.spec = spec

    @property
    def name(self) -> str:
        return self.spec.qualified_name if self.spec is not None else type(self).__name__

    # -- required ----------------------------------------------------------------------------------
    def make_recipe(self, checkpoint: str | None = None, preset: str | None = None, **options: Any) -> dict[str, Any]:
        """*Required.* A JSON-able recipe for ``checkpoint`` (hub id, local dir or file; its config is
        read, its weights are not) or ``preset``, with ``options`` applied. Exactly one of
        ``checkpoint``/``preset`` is given. Unknown presets or options raise `ConfigError`."""
        raise NotImplementedError

    def build_module(self, recipe: Mapping[str, Any], checkpoint: str | None = None) -> nn.Module:
        """*Required.* The encoder module: weights from ``checkpoint`` when given, random otherwise.
        Must honour an enclosing ``torch.device("meta")`` context (dry runs build full-size models)."""
        raise NotImplementedError

    def output_width(self, recipe: Mapping[str, Any]) -> int:
        """*Required.* Width of the features the projector receives (after the default callbacks)."""
        raise NotImplementedError

    def processor(self, recipe: Mapping[str, Any]) -> Any:
        """*Required.* A callable ``processor(items) -> dict[str, Tensor]`` turning raw items (PIL images,
        waveforms, ...) into the encoder's batched inputs (first dimension: one row per item)."""
        raise NotImplementedError

    def num_tokens(self, recipe: Mapping[str, Any], inputs: Mapping[str, Any]) -> list[int]:
        """*Required.* How many feature tokens the encoder outputs for each item of processed ``inputs``
        (after the default callbacks, before the projector: a projector that changes the count, such as
        a resampler, applies its own ``num_output_tokens`` on top); must equal the real count."""
        raise NotImplementedError

    def dummy_inputs(self, recipe: Mapping[str, Any], batch_size: int = 1) -> dict[str, Any]:
        """*Required.* Processed inputs for ``batch_size`` items (random tensors), for test runs."""
        raise NotImplementedError

    # -- optional ----------------------------------------------------------------------------------
    def dummy_items(self, recipe: Mapping[str, Any], n: int = 1) -> list[Any]:
        """Raw items the processor accepts, for tests (default: none)."""
        return []

    def data_key_for(self, recipe: Mapping[str, Any]) -> str | None:
        """The training-record key whose paths are this recipe's items (`mmcore.training.data.media_keys_for`
        maps it to the encoder). Default: `data_key`; a factory whose recipes may read another kind of
        item (an image tower built with ``video=True`` reads ``"video"`` items) says so here."""
        return self.data_key

    def load_item(self, path: Any) -> Any:
        """One item read from the file at ``path`` (a `pathlib.Path`), as the processor takes it: what
        ``mmcore train`` does with each path under `data_key` in a record. Raise
        `mmcore.errors.DataFormatError` for a file that cannot be read (its message names the file).
        Default: mmcore's own reader for the data keys it knows (``image``, ``audio``, ``video``:
        `mmcore.training.data.LOADERS`)."""
        from mmcore.training.data import LOADERS

        if self.data_key in LOADERS:
            return LOADERS[self.data_key](path)
        raise NotImplementedError(f"encoder {self.name!r} reads no training files (no load_item)")

    def default_callbacks(self, recipe: Mapping[str, Any]) -> dict[str, Any]:
        """Callbacks per slot (``preprocess``, ``postprocess_module``, ``postprocess_projector``)."""
        return {}

    def additional_args(self, recipe: Mapping[str, Any]) -> Sequence[str]:
        """Inputs routed to the encoder for its callbacks, not passed to the module (`ModalEncoderModule`
        ``additional_args``; e.g. a video encoder's ``num_frames``). Default: none."""
        return ()

    def input_names(self, recipe: Mapping[str, Any]) -> Sequence[str] | Mapping[str, str] | None:
        """`ModalEncoderModule` ``input_names`` (None: read the module's forward signature)."""
        return None

    def default_projector(self, recipe: Mapping[str, Any]) -> str | None:
        """Projector type used when the user names none (None: the model's ``init_projector_type``)."""
        return None

    def checkpoint_projector(self, recipe: Mapping[str, Any], checkpoint: str, module: nn.Module) -> nn.Module | None:
        """The projector whose weights come with ``checkpoint`` (Qwen2-VL's patch merger is part of its
        vision tower), given ``module`` as `build_module` just built it from there; called after every
        build from a checkpoint (so a factory can let go of what it kept aside), used when the user names
        no projector. None (the default): the model builds one (see `default_projector`)."""
        return None

    # -- helpers for subclasses --------------------------------------------------------------------
    def check_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """``self.options`` updated by ``options``; `ConfigError` naming unknown ones, or one given
        something other than True or False where its default is a bool."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            known = ", ".join(sorted(self.options)) or "none"
            raise ConfigError(f"encoder {self.name!r}: unknown option(s) {', '.join(unknown)} (accepted: {known})")
        merged = {**self.options, **options}
        for key, default in self.options.items():
            if isinstance(default, bool) and not isinstance(merged[key], bool):
                raise ConfigError(f"encoder {self.name!r}: {key} must be True or False, got {merged[key]!r}")
        return merged

    def check_preset(self, preset: str) -> str:
        if preset not in self.presets:
            from mmcore._names import did_you_mean

            hint = did_you_mean(preset, self.presets)
            raise ConfigError(
                f"encoder {self.name!r}: unknown preset {preset!r}{hint} (presets: {', '.join(self.presets) or 'none'})"
            )
        return preset


def get_factory(name: str) -> EncoderFactory:
    """The factory of registered encoder ``name`` (``clip`` or ``plugin:clip``)."""
    from mmcore.plugins import get_registry
    from mmcore.registry import load_factory

    spec = get_registry().get_encoder(name)
    cls = load_factory(spec)
    if not (isinstance(cls, type) and issubclass(cls, EncoderFactory)):
        raise ConfigError(
            f"encoder {spec.qualified_name!r}: factory {spec.factory!r} must be an mmcore.factory.EncoderFactory "
            f"subclass, got {cls!r}"
        )
    return cls(spec)


def build_encoder(
    name: str,
    checkpoint: str | None = None,
    *,
    preset: str | None = None,
    projector: Any = None,
    callbacks: Mapping[str, Any] | None = None,
    device: str | torch.device | None = None,
    **options: Any,
) -> ModalEncoderModule:
    """A `ModalEncoderModule` for registered encoder ``name``, from ``checkpoint`` (hub id, local
    directory or file; default: the spec's ``default_checkpoint``) or from ``preset`` (random weights).

    ``options`` go to the factory (see its ``options``); ``callbacks`` override the factory's default
    callbacks per slot (``None`` removes one). ``device="meta"`` builds without allocating memory.
    """
    factory = get_factory(name)
    if checkpoint is not None and preset is not None:
        raise ConfigError(f"encoder {factory.name!r}: pass a checkpoint or a preset, not both")
    if preset is not None:
        factory.check_preset(preset)
    elif checkpoint is None:
        checkpoint = factory.spec.default_checkpoint if factory.spec is not None else None
        if checkpoint is None:
            raise ConfigError(f"encoder {factory.name!r} has no default checkpoint; pass a checkpoint or a preset")
    recipe = factory.make_recipe(checkpoint=checkpoint, preset=preset, **options)
    return encoder_from_recipe(factory, recipe, checkpoint=checkpoint, projector=projector, callbacks=callbacks, device=device)


def encoder_from_recipe(
    factory: EncoderFactory,
    recipe: Mapping[str, Any],
    *,
    checkpoint: str | None = None,
    projector: Any = None,
    callbacks: Mapping[str, Any] | None = None,
    device: str | torch.device | None = None,
) -> ModalEncoderModule:
    """Assemble the `ModalEncoderModule` for a recipe (used by `build_encoder` and at load time)."""
    from mmcore.modeling.encoder import ModalEncoderModule
    from mmcore.registry import CALLBACK_SLOTS

    slots = dict(factory.default_callbacks(recipe))
    for slot, callback in (callbacks or {}).items():
        if slot not in CALLBACK_SLOTS:
            raise ConfigError(
                f"encoder {factory.name!r}: unknown callback slot {slot!r}; expected one of {', '.join(CALLBACK_SLOTS)}"
            )
        slots[slot] = callback
    with _device(device):
        module = factory.build_module(recipe, checkpoint)
        if checkpoint is not None:
            from_checkpoint = factory.checkpoint_projector(recipe, checkpoint, module)
            projector = from_checkpoint if projector is None else projector
    source = {"kind": PLUGIN_SOURCE, "encoder": factory.name, "recipe": dict(recipe)}
    default_projector = factory.default_projector(recipe)
    if projector is None and default_projector is not None:
        projector = default_projector
    encoder = ModalEncoderModule(
        module,
        projector,
        slots.get("preprocess"),
        slots.get("postprocess_module"),
        slots.get("postprocess_projector"),
        input_names=factory.input_names(recipe),
        output_width=factory.output_width(recipe),
        additional_args=tuple(factory.additional_args(recipe)),
        source=source,
    )
    return encoder


def factory_for_source(name: str, source: Mapping[str, Any]) -> EncoderFactory:
    """The factory that built a saved encoder; `SerializationError` saying what to install if absent."""
    encoder_name = source.get("encoder", "")
    try:
        return get_factory(encoder_name)
    except MMCoreError as exc:
        plugin = encoder_name.partition(":")[0]
        raise SerializationError(
            f"encoder {name!r} was built by plugin encoder {encoder_name!r}, which is not available "
            f"(install mmcore-plugin-{plugin}?): {exc}"
        ) from exc


@contextlib.contextmanager
def _device(device: Any):
    if device is None:
        yield
        return
    import torch

    with torch.device(device):
        yield


def load_checkpoint_part(
    model_class: Any, checkpoint: str, *, prefix: str, family: str, part: str, **kwargs: Any
) -> nn.Module:
    """``model_class.from_pretrained(checkpoint)`` in the default dtype, for an encoder that is one part
    of a bigger checkpoint: the part's weights are those under ``<prefix>.`` (or ``model.<prefix>.``),
    or the checkpoint is the part saved alone; the rest is skipped. ``family`` starts the messages and
    ``part`` names the weights in them: `ConfigError` when the checkpoint cannot be read, or lacks or
    mismatches weights of the part. ``kwargs`` go to ``from_pretrained`` (e.g. ``config=``).

    >>> tower = load_checkpoint_part(WhisperAudioEncoder, "openai/whisper-small", prefix="encoder",
    ...                              family="whisper", part="encoder")   # doctest: +SKIP
    """
    import torch

    try:
        module, info = model_class.from_pretrained(
            checkpoint,
            key_mapping={rf"^(model\.)?{prefix}\.": ""},
            dtype=torch.get_default_dtype(),
            output_loading_info=True,
            **kwargs,
        )
    except OSError as exc:
        raise ConfigError(f"{family}: cannot load weights from {checkpoint!r}: {exc}") from exc
    if info["missing_keys"] or info["mismatched_keys"]:
        missing = sorted(info["missing_keys"]) + [str(k) for k in info["mismatched_keys"]]
        raise ConfigError(
            f"{family}: {checkpoint!r} is not a {family} checkpoint of this shape; it lacks or mismatches "
            f"{len(missing)} {part} weights: {', '.join(missing[:5])}"
        )
    return module
