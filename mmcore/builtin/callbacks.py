"""Built-in encoder callbacks, and how any callback is recorded in / rebuilt from config.json.

A callback runs in one of three slots of a `ModalEncoderModule`:

- ``preprocess``:          ``callback(inputs) -> inputs``
- ``postprocess_module``:  ``callback(inputs, output) -> output``   (output as the encoder returns it)
- ``postprocess_projector``: ``callback(inputs, output) -> output``

Callbacks that subclass `Callback` carry a name and their parameters and so survive a save/load.
A module-level function or class is recorded by its import path. Anything else (a lambda, a local
function) cannot be recorded: `save_pretrained` says so, naming it.
"""

from __future__ import annotations

import importlib
from typing import Any, ClassVar

from mmcore.errors import ConfigError, UnrecordableCallbackError, UntrustedCodeError
from mmcore.registry import CALLBACK_SLOTS

SLOTS = CALLBACK_SLOTS  # an encoder's callback slots, in the order they run


class Callback:
    """Base of named, parameterised callbacks. Subclasses set `name` and `slot` and implement `__call__`;
    a plugin registers them (``CallbackSpec``) so that a saved model finds them again by name.

    ``module_kwargs`` are extra keyword arguments the encoder must receive for this callback to work
    (e.g. ``output_hidden_states=True`` for a feature-layer selection); `ModalEncoderModule` adds them.
    """

    name: ClassVar[str]
    slot: ClassVar[str]
    module_kwargs: ClassVar[dict[str, Any]] = {}

    def params(self) -> dict[str, Any]:
        return {}

    def output_width(self, width: int) -> int:
        """The feature width after this callback, for an encoder whose output is ``width`` wide (a
        ``postprocess_module`` callback that concatenates layers widens it); the projector is sized by it."""
        return width

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.params() == other.params()  # type: ignore[attr-defined]

    __hash__ = None  # type: ignore[assignment]


class SelectFeatureLayer(Callback):
    """Use hidden state ``layer`` of the encoder (LLaVA: -2, the penultimate) instead of its last output.

    ``drop_prefix_tokens`` removes that many leading tokens (1 drops CLIP's CLS token). A list of layers
    concatenates them along the feature axis.
    """

    name = "select_feature_layer"
    slot = "postprocess_module"
    module_kwargs = {"output_hidden_states": True}

    def __init__(self, layer: int | list[int] = -2, drop_prefix_tokens: int = 0):
        if not isinstance(layer, (int, list)) or isinstance(layer, bool):
            raise ConfigError(f"select_feature_layer: layer must be an int or a list of ints, got {layer!r}")
        if not isinstance(drop_prefix_tokens, int) or drop_prefix_tokens < 0:
            raise ConfigError(f"select_feature_layer: drop_prefix_tokens must be an int >= 0, got {drop_prefix_tokens!r}")
        self.layer = layer
        self.drop_prefix_tokens = drop_prefix_tokens

    def params(self) -> dict[str, Any]:
        return {"layer": self.layer, "drop_prefix_tokens": self.drop_prefix_tokens}

    def output_width(self, width: int) -> int:
        return width * len(self.layer) if isinstance(self.layer, list) else width

    def __call__(self, inputs: dict, output: Any) -> tuple:
        hidden_states = getattr(output, "hidden_states", None)
        if hidden_states is None:
            raise ConfigError(
                "select_feature_layer: the encoder returned no hidden_states; it needs an HF-style encoder "
                f"that accepts output_hidden_states=True, got output of type {type(output).__name__}"
            )
        layers = [self.layer] if isinstance(self.layer, int) else self.layer
        import torch

        features = torch.cat([hidden_states[i][:, self.drop_prefix_tokens :] for i in layers], dim=-1)
        return (features,)


class DropPrefixTokens(Callback):
    """Drop the first ``num_tokens`` tokens of the encoder output (CLS or register tokens)."""

    name = "drop_prefix_tokens"
    slot = "postprocess_module"

    def __init__(self, num_tokens: int = 1):
        if not isinstance(num_tokens, int) or num_tokens < 0:
            raise ConfigError(f"drop_prefix_tokens: num_tokens must be an int >= 0, got {num_tokens!r}")
        self.num_tokens = num_tokens

    def params(self) -> dict[str, Any]:
        return {"num_tokens": self.num_tokens}

    def __call__(self, inputs: dict, output: Any) -> tuple:
        from mmcore.modeling.encoder import first_output

        return (first_output(output)[:, self.num_tokens :],)


def record_callback(callback: Any, where: str) -> dict[str, Any]:
    """JSON-able record of a callback; `UnrecordableCallbackError` naming ``where`` if impossible."""
    if isinstance(callback, Callback):
        return {"name": _qualified_callback_name(callback), "params": callback.params()}
    module = getattr(callback, "__module__", None)
    qualname = getattr(callback, "__qualname__", None)
    if module and qualname and "<" not in qualname and module != "__main__":
        try:
            if _import_path(f"{module}:{qualname}") is callback:
                return {"import": f"{module}:{qualname}"}
        except (ImportError, AttributeError):
            pass
    raise UnrecordableCallbackError(
        f"{where}: {getattr(callback, '__qualname__', None) or repr(callback)} cannot be recorded in config.json (lambdas, local functions and "
        "objects without an import path cannot); use an mmcore.callbacks.Callback subclass or a module-level "
        "function, or save with allow_unrecorded_callbacks=True and pass it again to from_pretrained(callbacks=...)"
    )


def build_callback(record: dict[str, Any], where: str, *, trust_remote_code: bool = False) -> Any:
    """Rebuild a callback from `record_callback`'s output.

    A record by import path runs arbitrary code (the module may ship inside the model directory), so it
    is imported only with ``trust_remote_code=True``; otherwise `UntrustedCodeError` names it.
    """
    if "name" in record:
        # Named callbacks resolve through the plugin registry (built-in ones come from the
        # `builtin` plugin), so a plugin's callback rebuilds like a built-in one.
        from mmcore.errors import MMCoreError
        from mmcore.plugins import get_registry
        from mmcore.registry import load_factory

        try:
            factory = load_factory(_resolve_callback(get_registry(), record["name"]))
        except MMCoreError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
        return factory(**record.get("params", {}))
    if "import" in record:
        if not trust_remote_code:
            raise UntrustedCodeError(
                f"{where}: callback {record['import']!r} is recorded by import path; importing it runs code "
                "that no installed plugin registered. Pass trust_remote_code=True (CLI: --trust-remote-code) "
                "if you trust this model directory"
            )
        try:
            return _import_path(record["import"])
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"{where}: cannot import callback {record['import']!r}: {exc}") from exc
    raise ConfigError(f"{where}: callback record needs 'name' or 'import', got {record!r}")


def _qualified_callback_name(callback: Callback) -> str:
    """``plugin:name`` of the registered callback ``callback`` is an instance of, so a later plugin
    registering the same bare name cannot make the saved directory ambiguous. A `Callback` subclass
    that no plugin registered keeps its bare name (loading it then needs its plugin installed)."""
    from mmcore.errors import MMCoreError
    from mmcore.plugins import get_registry
    from mmcore.registry import load_factory

    if ":" in callback.name:
        return callback.name
    specs = [s for s in get_registry().items("callback") if s.name == callback.name]
    for spec in specs:
        try:
            factory = load_factory(spec)
        except MMCoreError:
            continue
        if factory is type(callback) or (isinstance(factory, type) and isinstance(callback, factory)):
            return spec.qualified_name
    return specs[0].qualified_name if len(specs) == 1 else callback.name


def _resolve_callback(registry: Any, name: str) -> Any:
    """The spec a recorded callback name means. ``plugin:name`` always resolves to that plugin's. A bare
    name (directories saved before names were qualified) that several plugins now register means the
    built-in one when there is one: those directories could only have been saved with it."""
    from mmcore.errors import AmbiguousNameError

    try:
        return registry.get_callback(name)
    except AmbiguousNameError:
        if ":" not in name:
            for spec in registry.items("callback"):
                if spec.name == name and spec.plugin == "builtin":
                    return spec
        raise


def _import_path(path: str) -> Any:
    module_name, _, qualname = path.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj
