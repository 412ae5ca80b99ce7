"""The assembly spec: which LLM, which encoders (with projector and callbacks), and model options.

One spec, two spellings: a TOML file (``mmcore assemble model.toml``) or command-line flags
(``--llm``, ``--encoder``, ``--projector``, ``--set``); flags are applied on top of a file. Both go
through one validator whose errors name the key path (``encoders.vision.projecter: unknown key;
did you mean 'projector'?``). The format is documented in ``docs/cli.md``::

    [llm]
    source = "tiny"                 # an LLM preset (mmcore list-llms), a hub id or a local directory
    tokenizer = "tiny"              # optional: hub id, directory, or "tiny"

    [encoders.vision]               # the modality name; its placeholder token is <vision>
    encoder = "clip"                # a registered encoder (mmcore list-encoders)
    preset = "tiny"                 # or: checkpoint = "openai/clip-vit-large-patch14"
    projector = "mlp2x_gelu"        # optional, else [model] projector, else the encoder's default
    projector_options = { bias = true }
    options = { feature_layer = -2 }
    callbacks = { postprocess_module = { name = "select_feature_layer", layer = -1 } }

    [model]
    projector = "mlp2x_gelu"        # optional: every encoder's; default: the encoder's own, else mlp2x_gelu
    activation = "gelu"
    wrap = false                    # add <vision_start>/<vision_end> around each item
    random_init = false             # read configs only; no weights are loaded

Imports no torch.
"""

from __future__ import annotations

import copy
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmcore._names import did_you_mean
from mmcore.errors import ConfigError, MMCoreError
from mmcore.registry import CALLBACK_SLOTS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

#: ``MultimodalProjectorConfig`` fields a spec may set per encoder, with their types.
PROJECTOR_OPTIONS: dict[str, tuple[type, ...]] = {
    "activation": (str,),
    "bias": (bool,),
    "num_queries": (int,),
    "num_heads": (int,),
    "initializer_range": (float, int),
}

_SECTIONS = ("llm", "encoders", "model")
_LLM_KEYS: dict[str, tuple[type, ...]] = {"source": (str,), "tokenizer": (str,)}
_MODEL_KEYS: dict[str, tuple[type, ...]] = {
    "projector": (str,),
    "activation": (str,),
    "wrap": (bool,),
    "random_init": (bool,),
}
_ENCODER_KEYS: dict[str, tuple[type, ...]] = {
    "encoder": (str,),
    "checkpoint": (str,),
    "preset": (str,),
    "projector": (str,),
    "projector_options": (dict,),
    "options": (dict,),
    "callbacks": (dict,),
}
DEFAULT_PROJECTOR = "mlp2x_gelu"
_MODALITY = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_TYPE_NAMES = {str: "a string", bool: "true or false", int: "an integer", float: "a number", dict: "a table"}
ENCODER_FLAG_FORMAT = "NAME=ENCODER[:CHECKPOINT | :preset=PRESET]"


@dataclass
class EncoderEntry:
    """One ``[encoders.<name>]`` table."""

    name: str
    encoder: str
    checkpoint: str | None = None
    preset: str | None = None
    projector: str | None = None
    projector_options: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    #: slot -> ``{"name": ..., "params": {...}}``, or None to remove the encoder's default callback
    callbacks: dict[str, dict[str, Any] | None] = field(default_factory=dict)


@dataclass
class LLMEntry:
    """The ``[llm]`` table."""

    source: str
    tokenizer: str | None = None


@dataclass
class ModelOptions:
    """The ``[model]`` table."""

    #: projector of every encoder that names none (None: the encoder's default, else DEFAULT_PROJECTOR)
    projector: str | None = None
    activation: str = "gelu"
    wrap: bool = False
    random_init: bool = False


@dataclass
class AssemblySpec:
    """A validated spec (see the module docstring for the format)."""

    llm: LLMEntry
    encoders: dict[str, EncoderEntry]
    model: ModelOptions = field(default_factory=ModelOptions)
    #: where it came from, for error messages ("model.toml", "command line")
    origin: str = "command line"

    def to_dict(self) -> dict[str, Any]:
        """The spec in its TOML shape (JSON-able), with defaults filled in and empty keys left out."""
        encoders = {}
        for name, e in self.encoders.items():
            table: dict[str, Any] = {"encoder": e.encoder}
            for key in ("checkpoint", "preset", "projector"):
                if getattr(e, key) is not None:
                    table[key] = getattr(e, key)
            for key in ("projector_options", "options"):
                if getattr(e, key):
                    table[key] = dict(getattr(e, key))
            if e.callbacks:
                table["callbacks"] = {
                    slot: (False if cb is None else {"name": cb["name"], **cb["params"]})
                    for slot, cb in e.callbacks.items()
                }
            encoders[name] = table
        llm = {"source": self.llm.source} | ({"tokenizer": self.llm.tokenizer} if self.llm.tokenizer else {})
        model = {k: getattr(self.model, k) for k in _MODEL_KEYS if getattr(self.model, k) is not None}
        return {"llm": llm, "encoders": encoders, "model": model}


# -- reading ---------------------------------------------------------------------------------------


def read_spec_file(path: str | Path) -> dict[str, Any]:
    """The raw tables of a TOML assembly file; `ConfigError` if it is missing or not valid TOML."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"assembly file {str(path)!r} does not exist" if not path.exists() else f"{str(path)!r} is not a file"
        )
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path.name}: not valid TOML: {exc}") from exc


def parse_encoder_flag(value: str, encoder_names: frozenset[str] = frozenset()) -> tuple[str, dict[str, Any]]:
    """``vision=clip:openai/clip-vit-large-patch14`` -> ``("vision", {"encoder": "clip", "checkpoint": ..})``.

    ``ENCODER`` may be plugin-qualified (``clip:clip``) when that resolves to a registered encoder
    (``encoder_names`` holds the qualified names); ``preset=NAME`` selects a preset instead of a
    checkpoint; nothing after the encoder means its default checkpoint.
    """
    name, sep, rest = value.partition("=")
    name, rest = name.strip(), rest.strip()
    if not sep or not name or not rest or not rest.split(":")[0]:
        raise ConfigError(
            f"--encoder {value!r}: expected {ENCODER_FLAG_FORMAT}, "
            "e.g. vision=clip:openai/clip-vit-large-patch14 "
            "or audio=whisper:preset=tiny"
        )
    parts = rest.split(":")
    if len(parts) >= 2 and f"{parts[0]}:{parts[1]}" in encoder_names:
        encoder, source = f"{parts[0]}:{parts[1]}", ":".join(parts[2:])
    else:
        encoder, source = parts[0], ":".join(parts[1:])
    table: dict[str, Any] = {"encoder": encoder}
    if source.startswith("preset="):
        preset = source[len("preset=") :]
        if not preset:
            raise ConfigError(
                f"--encoder {value!r}: 'preset=' needs a preset name, e.g. {name}={encoder}:preset=tiny"
            )
        table["preset"] = preset
    elif source:
        table["checkpoint"] = source
    return name, table


def parse_set_flag(raw: dict[str, Any], assignment: str) -> None:
    """Apply ``--set encoders.vision.options.feature_layer=-1`` to the raw spec tables (in place).

    The value is read as a TOML value (``-1``, ``true``, ``"x"``, ``{a = 1}``); anything that is not
    valid TOML is taken as a plain string."""
    key, sep, text = assignment.partition("=")
    path = [k.strip() for k in key.split(".")]
    if not sep or not all(path):
        raise ConfigError(
            f"--set {assignment!r}: expected KEY.PATH=VALUE, e.g. encoders.vision.options.feature_layer=-1 "
            "or model.wrap=true"
        )
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    table = raw
    for depth, part in enumerate(path[:-1]):
        nxt = table.setdefault(part, {})
        if not isinstance(nxt, dict):
            where = ".".join(path[: depth + 1])
            raise ConfigError(f"--set {assignment!r}: {where} is {nxt!r}, not a table")
        table = nxt
    table[path[-1]] = value


def merge_tables(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` applied over ``base``, table by table (a copy)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_tables(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# -- validating ------------------------------------------------------------------------------------


def _fail(origin: str, path: str, problem: str) -> ConfigError:
    return ConfigError(f"{origin}: {path}: {problem}")


def _unknown_key(origin: str, path: str, key: str, allowed: Any) -> ConfigError:
    hint = did_you_mean(key, allowed, n=1, cutoff=0.6)
    return _fail(origin, path, f"unknown key{hint} (expected one of {', '.join(sorted(allowed))})")


def _check_table(origin: str, path: str, table: Any, schema: dict[str, tuple[type, ...]]) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise _fail(origin, path, f"expected a table, got {table!r}")
    for key, value in table.items():
        key_path = f"{path}.{key}" if path else key
        if key not in schema:
            raise _unknown_key(origin, key_path, key, schema)
        _check_type(origin, key_path, value, schema[key])
    return table


def _check_type(origin: str, path: str, value: Any, types: tuple[type, ...]) -> None:
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        expected = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
        raise _fail(origin, path, f"expected {expected}, got {value!r}")


def spec_from_dict(raw: dict[str, Any], origin: str = "command line") -> AssemblySpec:
    """Validate raw tables (from TOML and/or flags) into an `AssemblySpec`; `ConfigError` naming the key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: expected tables [llm], [encoders.<name>] and [model], got {raw!r}")
    for key in raw:
        if key not in _SECTIONS:
            raise _unknown_key(origin, key, key, _SECTIONS)
    llm_raw = _check_table(origin, "llm", raw.get("llm", {}), _LLM_KEYS)
    if not llm_raw.get("source", "").strip():
        raise _fail(
            origin,
            "llm.source",
            "missing: say which language model (a preset such as 'tiny', a hub id or a directory; --llm)",
        )
    model = ModelOptions(**_check_table(origin, "model", raw.get("model", {}), _MODEL_KEYS))
    encoders_raw = raw.get("encoders", {})
    if not isinstance(encoders_raw, dict):
        raise _fail(origin, "encoders", f"expected tables [encoders.<name>], got {encoders_raw!r}")
    if not encoders_raw:
        raise _fail(
            origin,
            "encoders",
            f"no encoders: add at least one [encoders.<name>] table (--encoder {ENCODER_FLAG_FORMAT})",
        )
    encoders = {name: _encoder_entry(origin, name, table) for name, table in encoders_raw.items()}
    return AssemblySpec(
        LLMEntry(llm_raw["source"].strip(), llm_raw.get("tokenizer")), encoders, model, origin
    )


def _encoder_entry(origin: str, name: str, table: Any) -> EncoderEntry:
    path = f"encoders.{name}"
    if not _MODALITY.match(name):
        raise _fail(
            origin,
            path,
            "the name must start with a letter and hold only letters, digits and '_' "
            "(it names the <name> token)",
        )
    table = _check_table(origin, path, table, _ENCODER_KEYS)
    if not table.get("encoder"):
        raise _fail(origin, f"{path}.encoder", "missing: say which registered encoder (mmcore list-encoders)")
    if "checkpoint" in table and "preset" in table:
        raise _fail(origin, path, "give checkpoint or preset, not both")
    projector_options = dict(table.get("projector_options", {}))
    for key, value in projector_options.items():
        if key not in PROJECTOR_OPTIONS:
            raise _unknown_key(origin, f"{path}.projector_options.{key}", key, PROJECTOR_OPTIONS)
        _check_type(origin, f"{path}.projector_options.{key}", value, PROJECTOR_OPTIONS[key])
    callbacks: dict[str, dict[str, Any] | None] = {}
    for slot, value in table.get("callbacks", {}).items():
        slot_path = f"{path}.callbacks.{slot}"
        if slot not in CALLBACK_SLOTS:
            raise _unknown_key(origin, slot_path, slot, CALLBACK_SLOTS)
        if value is False or value == "none":
            callbacks[slot] = None
        elif isinstance(value, str) and value:
            callbacks[slot] = {"name": value, "params": {}}
        elif isinstance(value, dict) and isinstance(value.get("name"), str):
            params = {k: v for k, v in value.items() if k != "name"}
            callbacks[slot] = {"name": value["name"], "params": params}
        else:
            raise _fail(
                origin, slot_path,
                "expected a callback name, a table { name = \"...\", <param> = ... }, or false to remove it; "
                f"got {value!r}",
            )  # fmt: skip
    return EncoderEntry(
        name=name,
        encoder=table["encoder"],
        checkpoint=table.get("checkpoint"),
        preset=table.get("preset"),
        projector=table.get("projector"),
        projector_options=projector_options,
        options=dict(table.get("options", {})),
        callbacks=callbacks,
    )


def resolve_names(spec: AssemblySpec) -> None:
    """Check every registered name in the spec (encoders, projectors, callbacks and their slots)
    against the plugin registry, without importing any factory; `ConfigError` naming the key."""
    from mmcore.plugins import get_registry
    from mmcore.presets import LLM_PRESETS

    registry = get_registry()
    origin = spec.origin
    projector_keys = [("model.projector", spec.model.projector)] if spec.model.projector is not None else []
    for name, entry in spec.encoders.items():
        path = f"encoders.{name}"
        try:
            registry.get_encoder(entry.encoder)
        except MMCoreError as exc:
            raise _fail(origin, f"{path}.encoder", str(exc)) from exc
        if entry.projector is not None:
            projector_keys.append((f"{path}.projector", entry.projector))
        for slot, callback in entry.callbacks.items():
            if callback is None:
                continue
            try:
                cb_spec = registry.get_callback(callback["name"])
            except MMCoreError as exc:
                raise _fail(origin, f"{path}.callbacks.{slot}", str(exc)) from exc
            if slot not in cb_spec.slots:
                raise _fail(
                    origin, f"{path}.callbacks.{slot}",
                    f"callback {callback['name']!r} fits slot(s) {', '.join(cb_spec.slots)}, not {slot}",
                )  # fmt: skip
    for key, projector in projector_keys:
        try:
            registry.get_projector(projector)
        except MMCoreError as exc:
            raise _fail(origin, key, str(exc)) from exc
    source = spec.llm.source
    if source not in LLM_PRESETS and looks_like_path(source) and not Path(source).expanduser().is_dir():
        raise _fail(
            origin,
            "llm.source",
            f"{source!r} is not a directory (and not an LLM preset: {', '.join(LLM_PRESETS)})",
        )


def looks_like_path(text: str) -> bool:
    """A source written as a path (``./x``, ``/x``, ``~/x``, ``..``) rather than a hub id or preset name."""
    return text.startswith((".", "/", "~")) or "\\" in text or Path(text).exists()
