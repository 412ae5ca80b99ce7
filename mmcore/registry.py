"""What plugins register: encoder, projector and callback specs, and the registry that names them.

A spec is metadata plus a lazy factory path ``"module.path:attr"``; nothing heavy is imported until
`load_factory` is called. The `Registry` remembers which plugin provided each item:

- a bare name (``clip``) resolves when exactly one plugin registered it;
- ``plugin:name`` (``builtin:mlp``) always resolves;
- two plugins registering one name is a recorded clash (`Registry.clashes`), never an overwrite;
- an unknown name raises `UnknownNameError` with "did you mean" suggestions.

>>> reg = Registry()
>>> _ = reg.add("demo", EncoderSpec(name="clip", modality="vision", summary="CLIP", factory="x.y:build"))
>>> reg.get_encoder("demo:clip").plugin
'demo'
>>> [s.name for s in reg.list_encoders("cl*")]
['clip']
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
import re
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from mmcore._names import did_you_mean
from mmcore.errors import AmbiguousNameError, FactoryImportError, InvalidSpecError, UnknownNameError

CALLBACK_SLOTS = ("preprocess", "postprocess_module", "postprocess_projector")  # an encoder's
# the model's own: sees the language model's inputs after the merge (Cornstarch's preprocess_llm_callback)
MODEL_CALLBACK_SLOTS = ("preprocess_llm",)

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_FACTORY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def _check_name(kind: str, name: Any) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidSpecError(
            f"{kind} name must be an identifier-like string such as 'clip' or 'eva02-base' "
            f"(letters, digits, '_', '-', '.'; no ':'), got {name!r}"
        )


def _check_str(kind: str, name: str, field_name: str, value: Any, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, str) or not value.strip():
        raise InvalidSpecError(f"{kind} {name!r}: {field_name} must be a non-empty string, got {value!r}")


def _check_factory(kind: str, name: str, factory: Any) -> None:
    if not isinstance(factory, str) or not _FACTORY.match(factory):
        raise InvalidSpecError(
            f"{kind} {name!r}: factory must be an import path 'module.path:attr', got {factory!r}"
        )


def _check_str_tuple(kind: str, name: str, field_name: str, value: Any) -> None:
    if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
        raise InvalidSpecError(f"{kind} {name!r}: {field_name} must be a tuple of strings, got {value!r}")


@dataclass(frozen=True)
class EncoderSpec:
    """A modality encoder a plugin provides.

    ``factory`` is ``"module.path:attr"``, imported only by `load_factory`. ``presets`` name
    configurations the factory can build with random weights (offline); ``default_checkpoint`` is
    an HF id or path used when none is given. ``plugin`` is filled in by the registry.
    """

    kind: ClassVar[str] = "encoder"

    name: str
    modality: str
    summary: str
    factory: str
    default_checkpoint: str | None = None
    presets: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    plugin: str | None = None

    def __post_init__(self) -> None:
        _check_name(self.kind, self.name)
        _check_str(self.kind, self.name, "modality", self.modality)
        _check_str(self.kind, self.name, "summary", self.summary)
        _check_factory(self.kind, self.name, self.factory)
        _check_str(self.kind, self.name, "default_checkpoint", self.default_checkpoint, optional=True)
        _check_str_tuple(self.kind, self.name, "presets", self.presets)
        _check_str_tuple(self.kind, self.name, "tags", self.tags)

    @property
    def qualified_name(self) -> str:
        return f"{self.plugin}:{self.name}"


@dataclass(frozen=True)
class ProjectorSpec:
    """A projector type a plugin provides.

    ``pattern`` (optional regular expression) makes this entry also answer to every name it fully
    matches, e.g. ``mlp(\\d+)x_(\\w+)`` for LLaVA's ``mlp2x_gelu``; an exact name always wins.
    """

    kind: ClassVar[str] = "projector"

    name: str
    summary: str
    factory: str
    pattern: str | None = None
    tags: tuple[str, ...] = ()
    plugin: str | None = None

    def __post_init__(self) -> None:
        _check_name(self.kind, self.name)
        _check_str(self.kind, self.name, "summary", self.summary)
        _check_factory(self.kind, self.name, self.factory)
        _check_str_tuple(self.kind, self.name, "tags", self.tags)
        if self.pattern is not None:
            _check_str(self.kind, self.name, "pattern", self.pattern)
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise InvalidSpecError(
                    f"{self.kind} {self.name!r}: pattern is not a regular expression ({exc}): {self.pattern!r}"
                ) from exc

    def matches(self, name: str) -> bool:
        return name == self.name or (self.pattern is not None and re.fullmatch(self.pattern, name) is not None)

    @property
    def qualified_name(self) -> str:
        return f"{self.plugin}:{self.name}"


@dataclass(frozen=True)
class CallbackSpec:
    """An encoder callback a plugin provides; ``slots`` are the callback slots it fits."""

    kind: ClassVar[str] = "callback"

    name: str
    slots: tuple[str, ...]
    summary: str
    factory: str
    plugin: str | None = None

    def __post_init__(self) -> None:
        _check_name(self.kind, self.name)
        _check_str_tuple(self.kind, self.name, "slots", self.slots)
        bad = [s for s in self.slots if s not in CALLBACK_SLOTS + MODEL_CALLBACK_SLOTS]
        if not self.slots or bad:
            raise InvalidSpecError(
                f"{self.kind} {self.name!r}: slots must be a non-empty tuple of "
                f"{', '.join(CALLBACK_SLOTS + MODEL_CALLBACK_SLOTS)}; "
                f"got {self.slots!r}"
            )
        _check_str(self.kind, self.name, "summary", self.summary)
        _check_factory(self.kind, self.name, self.factory)

    @property
    def qualified_name(self) -> str:
        return f"{self.plugin}:{self.name}"


Spec = EncoderSpec | ProjectorSpec | CallbackSpec
SPEC_TYPES: dict[str, type] = {cls.kind: cls for cls in (EncoderSpec, ProjectorSpec, CallbackSpec)}


def load_factory(spec: Spec) -> Callable[..., Any]:
    """Import and return ``spec.factory``; `FactoryImportError` naming the item and plugin if impossible."""
    module_name, _, attr_path = spec.factory.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr_path.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise FactoryImportError(
            f"{spec.kind} {spec.qualified_name!r}: cannot import factory {spec.factory!r}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    return obj


@dataclass(frozen=True)
class Clash:
    """One name registered by several plugins (of one kind); only ``plugin:name`` reaches each."""

    kind: str
    name: str
    plugins: tuple[str, ...]

    def __str__(self) -> str:
        options = " or ".join(f"'{p}:{self.name}'" for p in self.plugins)
        return f"{self.kind} {self.name!r} is registered by plugins {', '.join(self.plugins)}; use {options}"


class Registry:
    """Every registered encoder, projector and callback, keyed by ``(plugin, name)`` per kind."""

    def __init__(self) -> None:
        self._items: dict[str, dict[tuple[str, str], Any]] = {kind: {} for kind in SPEC_TYPES}

    def __repr__(self) -> str:
        counts = ", ".join(f"{len(items)} {kind}s" for kind, items in self._items.items())
        return f"Registry({counts})"

    def add(self, plugin: str, spec: Spec) -> Spec:
        """Record ``spec`` as provided by ``plugin``; return the stored copy (with ``plugin`` set)."""
        if not isinstance(spec, tuple(SPEC_TYPES.values())):
            raise InvalidSpecError(
                f"plugin {plugin!r}: expected an EncoderSpec, ProjectorSpec or CallbackSpec, got {spec!r}"
            )
        items = self._items[spec.kind]
        if (plugin, spec.name) in items:
            raise InvalidSpecError(f"plugin {plugin!r} registered {spec.kind} {spec.name!r} twice")
        stored = dataclasses.replace(spec, plugin=plugin)
        items[(plugin, spec.name)] = stored
        return stored

    def clashes(self) -> list[Clash]:
        """Names registered by more than one plugin, per kind."""
        out = []
        for kind, items in self._items.items():
            by_name: dict[str, list[str]] = {}
            for plugin, name in items:
                by_name.setdefault(name, []).append(plugin)
            out += [Clash(kind, n, tuple(sorted(ps))) for n, ps in sorted(by_name.items()) if len(ps) > 1]
        return out

    def items(self, kind: str) -> list[Spec]:
        """All specs of one kind (``encoder``, ``projector``, ``callback``), sorted by name then plugin."""
        return sorted(self._items[kind].values(), key=lambda s: (s.name, s.plugin))

    def get(self, kind: str, name: str) -> Spec:
        """Resolve ``name`` or ``plugin:name`` to one spec of ``kind``."""
        items = self._items[kind]
        plugin, sep, bare = name.rpartition(":")
        candidates = [s for (p, _), s in items.items() if (not sep or p == plugin) and s.name == bare]
        if not candidates and kind == "projector":
            candidates = [s for (p, _), s in items.items() if (not sep or p == plugin) and s.matches(bare)]
        if len(candidates) == 1:
            return candidates[0]
        if candidates:
            plugins = sorted(s.plugin for s in candidates)
            raise AmbiguousNameError(
                f"{kind} {bare!r} is registered by plugins {', '.join(plugins)}; "
                f"say which: {' or '.join(f'{p}:{bare}' for p in plugins)}"
            )
        known = sorted({s.name for s in items.values()} | {s.qualified_name for s in items.values()})
        hint = did_you_mean(name, known, cutoff=0.6)
        listed = ", ".join(sorted({s.name for s in items.values()})) or "none"
        raise UnknownNameError(f"unknown {kind} {name!r}{hint} (registered: {listed})")

    def get_encoder(self, name: str) -> EncoderSpec:
        return self.get("encoder", name)

    def get_projector(self, name: str) -> ProjectorSpec:
        return self.get("projector", name)

    def get_callback(self, name: str) -> CallbackSpec:
        return self.get("callback", name)

    def list_encoders(self, pattern: str | None = None, modality: str | None = None) -> list[EncoderSpec]:
        """Encoders whose name (or ``plugin:name``, when ``pattern`` has a ':') matches the fnmatch
        ``pattern`` (``"eva02*"``), optionally of one ``modality``."""
        return [
            s
            for s in self.items("encoder")
            if (modality is None or s.modality == modality)
            and (pattern is None or fnmatch.fnmatchcase(s.qualified_name if ":" in pattern else s.name, pattern))
        ]

    def list_projectors(self, pattern: str | None = None) -> list[ProjectorSpec]:
        return [s for s in self.items("projector") if pattern is None or fnmatch.fnmatchcase(s.name, pattern)]

    def list_callbacks(self, pattern: str | None = None, slot: str | None = None) -> list[CallbackSpec]:
        return [
            s
            for s in self.items("callback")
            if (pattern is None or fnmatch.fnmatchcase(s.name, pattern)) and (slot is None or slot in s.slots)
        ]

    def names_by_plugin(self, plugin: str) -> dict[str, tuple[str, ...]]:
        """What ``plugin`` registered: ``{"encoder": (...), "projector": (...), "callback": (...)}``."""
        return {kind: tuple(sorted(n for p, n in items if p == plugin)) for kind, items in self._items.items()}
