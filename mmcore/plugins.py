"""Plugin discovery and loading: entry points in the group ``mmcore``, one plugin's failure isolated.

Each plugin is loaded on its own: imported, checked against the plugin-API version, registered with
pluggy, checked for unknown hooks, and its ``register_*`` hooks called into a staging list. Only a
plugin that passes every step adds its items to the `Registry`; any other is set aside with its
reason (`PluginStatus`) and a one-line `PluginWarning`, and the rest keep working.

Environment:

- ``MMCORE_LOAD_PLUGINS=a,b``: load only these entry-point plugins (empty: none, a safe mode).
- ``MMCORE_DISABLE_PLUGINS=a,b``: never load these.
- ``MMCORE_STRICT_PLUGINS=1``: raise `PluginError` instead of warning.
- ``MMCORE_PLUGIN_SLOW_S=3``: a plugin whose import takes longer than this many seconds gets one
  line on stderr naming it and how to skip it.

Plugin code (the import and every hook call) runs with ``sys.stdout`` sent to ``sys.stderr``, so a
plugin that prints cannot corrupt ``--json`` output. This is a Python-level redirect: a plugin writing
to file descriptor 1 directly (C code, ``os.write(1, ...)``) is not caught.

Two distributions with an entry point of the same name: the first found is loaded as usual; the
second is not loaded, its status says so naming both distributions, and a `PluginWarning` (strict
mode: `PluginError`) names both.

The built-in plugin (``builtin``: projectors and callbacks) is always loaded. Results are cached for
the process; `reset` forgets them (tests).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import os
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import pluggy

from mmcore import __version__, hookspecs
from mmcore.errors import InvalidSpecError, PluginError, PluginWarning
from mmcore.hookspecs import PLUGIN_API_VERSION
from mmcore.registry import CallbackSpec, EncoderSpec, ProjectorSpec, Registry

ENTRY_POINT_GROUP = "mmcore"
BUILTIN_PLUGINS = {"builtin": "mmcore.builtin.plugin"}

LOADED, DISABLED, FAILED, INCOMPATIBLE = "loaded", "disabled", "failed", "incompatible"
#: state of a second distribution whose entry point has the name of one already found (not loaded)
NAME_CLASH = "name-clash"

DEFAULT_SLOW_S = 3.0

# hook -> the spec type its `register` accepts
_REGISTER_HOOKS = {
    "register_encoders": EncoderSpec,
    "register_projectors": ProjectorSpec,
    "register_callbacks": CallbackSpec,
}


@dataclass
class PluginStatus:
    """How loading one plugin went, as data for the CLI.

    ``state`` is ``loaded``, ``disabled`` (by an environment variable), ``failed``, ``incompatible`` or
    ``name-clash`` (another distribution's entry point of that name was found first; not loaded);
    ``reason`` says why when not loaded. ``registered`` maps ``encoder``/``projector``/``callback``
    to the names this plugin added.
    """

    name: str
    state: str
    reason: str = ""
    distribution: str | None = None
    version: str | None = None
    module: str | None = None
    hooks: tuple[str, ...] = ()
    registered: dict[str, tuple[str, ...]] = field(default_factory=dict)
    load_time_s: float = 0.0


@dataclass
class _Candidate:
    name: str
    load: Callable[[], Any]
    module: str | None = None
    distribution: str | None = None
    version: str | None = None
    selectable: bool = True  # subject to MMCORE_LOAD_PLUGINS / MMCORE_DISABLE_PLUGINS


@dataclass
class _State:
    pm: pluggy.PluginManager
    registry: Registry
    statuses: dict[str, PluginStatus]


class _SetAside(Exception):
    def __init__(self, state: str, reason: str):
        super().__init__(reason)
        self.state = state
        self.reason = " ".join(reason.split())  # one line, whatever the exception said


_state: _State | None = None
# Plugin objects registered in-process by `mmcore.testing.registered_plugin`: name -> object.
_extra_plugins: dict[str, Any] = {}


def get_registry() -> Registry:
    """The registry of every loaded plugin's items (discovered once per process)."""
    return _ensure().registry


def plugin_statuses() -> list[PluginStatus]:
    """One `PluginStatus` per plugin found, loaded or not, in load order (``builtin`` first)."""
    return list(_ensure().statuses.values())


def get_plugin_manager() -> pluggy.PluginManager:
    """The pluggy manager holding the loaded plugins."""
    return _ensure().pm


def reset() -> None:
    """Forget discovered plugins; the next call discovers again (reads the environment again)."""
    global _state
    _state = None


def register_commands(app: Any) -> None:
    """Let every loaded plugin add commands to the typer ``app``; a plugin that raises is reported
    (warning, or `PluginError` in strict mode) and the others still run."""
    state = _ensure()
    for impl in state.pm.hook.register_commands.get_hookimpls():
        try:
            _call(impl, app=app)
        except Exception as exc:  # noqa: BLE001 - one plugin's bug must not break the CLI
            _report(impl.plugin_name, FAILED, f"register_commands raised {type(exc).__name__}: {exc}")


def _ensure() -> _State:
    global _state
    if _state is None:
        _state = _load_all()
    return _state


def _strict() -> bool:
    return os.environ.get("MMCORE_STRICT_PLUGINS", "").strip().lower() in ("1", "true", "yes", "on")


def _env_names(var: str) -> set[str] | None:
    value = os.environ.get(var)
    return None if value is None else {n.strip() for n in value.split(",") if n.strip()}


def _report(name: str, state: str, reason: str) -> None:
    message = f"mmcore plugin {name!r} {state}: {' '.join(reason.split())}"
    if _strict():
        raise PluginError(message + " (MMCORE_STRICT_PLUGINS is set)")
    warnings.warn(message, PluginWarning, stacklevel=3)


def _candidates() -> list[_Candidate]:
    found = [
        _Candidate(name, lambda m=module: importlib.import_module(m), module, "mmcore", __version__, False)
        for name, module in BUILTIN_PLUGINS.items()
    ]
    eps = sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)
    for ep in eps:
        dist = getattr(ep, "dist", None)
        found.append(
            _Candidate(
                ep.name,
                ep.load,
                ep.value,
                dist.metadata["Name"] if dist is not None else None,
                dist.version if dist is not None else None,
            )
        )
    found += [_Candidate(name, lambda o=obj: o, getattr(obj, "__name__", None), selectable=False)
              for name, obj in _extra_plugins.items()]  # fmt: skip
    return found


def _load_all() -> _State:
    pm = pluggy.PluginManager("mmcore")
    pm.add_hookspecs(hookspecs)
    state = _State(pm, Registry(), {})
    only, blocked = _env_names("MMCORE_LOAD_PLUGINS"), _env_names("MMCORE_DISABLE_PLUGINS") or set()
    for cand in _candidates():
        status = PluginStatus(cand.name, LOADED, "", cand.distribution, cand.version, cand.module)
        if cand.name in state.statuses:
            first = state.statuses[cand.name]
            status.state, status.reason = NAME_CLASH, (
                f"not loaded: entry point {cand.name} = {cand.module} of distribution "
                f"{_who(cand.distribution, cand.version)} has the name of entry point "
                f"{first.name} = {first.module} of distribution {_who(first.distribution, first.version)}, "
                f"which was found first ({first.state}); uninstall one of the two distributions"
            )
        elif cand.selectable and cand.name in blocked:
            status.state, status.reason = DISABLED, "listed in MMCORE_DISABLE_PLUGINS"
        elif cand.selectable and only is not None and cand.name not in only:
            status.state, status.reason = DISABLED, "not listed in MMCORE_LOAD_PLUGINS"
        else:
            started = time.perf_counter()
            try:
                _load_one(state, cand, status)
            except _SetAside as exc:
                if pm.has_plugin(cand.name):
                    pm.unregister(name=cand.name)
                status.state, status.reason, status.hooks = exc.state, exc.reason, ()
            status.load_time_s = time.perf_counter() - started
        key = cand.name if cand.name not in state.statuses else f"{cand.name} ({cand.distribution})"
        state.statuses[key] = status
        if status.state in (FAILED, INCOMPATIBLE):
            _report(cand.name, status.state, status.reason)
        elif status.state == NAME_CLASH:
            message = f"mmcore plugins clash on the entry-point name {cand.name!r}: {status.reason}"
            if _strict():
                raise PluginError(message + " (MMCORE_STRICT_PLUGINS is set)")
            warnings.warn(message, PluginWarning, stacklevel=2)
    for clash in state.registry.clashes():
        message = f"mmcore plugins clash: {clash}"
        if _strict():
            raise PluginError(message + " (MMCORE_STRICT_PLUGINS is set)")
        warnings.warn(message, PluginWarning, stacklevel=2)
    return state


def _who(distribution: str | None, version: str | None) -> str:
    if distribution is None:
        return "(unknown)"
    return f"{distribution} {version}" if version else distribution


def _slow_s() -> float:
    value = os.environ.get("MMCORE_PLUGIN_SLOW_S", "").strip()
    try:
        return float(value) if value else DEFAULT_SLOW_S
    except ValueError:
        return DEFAULT_SLOW_S


@contextlib.contextmanager
def _slow_notice(cand: _Candidate):
    """Say on stderr, once, which plugin is still importing after ``MMCORE_PLUGIN_SLOW_S`` seconds."""
    seconds = _slow_s()
    err = sys.stderr  # the real stderr, taken before plugin code may redirect anything

    def notice() -> None:
        err.write(
            f"mmcore: still loading plugin {cand.name!r} ({cand.distribution or cand.module}) after "
            f"{seconds:g} s; to skip it, set MMCORE_DISABLE_PLUGINS={cand.name}\n"
        )
        err.flush()

    timer = threading.Timer(seconds, notice)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _load_one(state: _State, cand: _Candidate, status: PluginStatus) -> None:
    try:
        with _slow_notice(cand), contextlib.redirect_stdout(sys.stderr):
            plugin = cand.load()
    except Exception as exc:  # noqa: BLE001 - isolate whatever a plugin's import does
        raise _SetAside(FAILED, f"import of {cand.module} failed: {type(exc).__name__}: {exc}") from exc
    _check_api(plugin)
    try:
        state.pm.register(plugin, name=cand.name)
    except (ValueError, pluggy.PluginValidationError) as exc:
        raise _SetAside(FAILED, f"invalid hook implementation: {exc}") from exc
    try:
        state.pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise _SetAside(FAILED, f"implements a hook mmcore does not define: {exc}") from exc
    staged = _collect(state.pm, cand.name)
    for spec in staged:
        state.registry.add(cand.name, spec)
    status.hooks = tuple(sorted(caller.name for caller in state.pm.get_hookcallers(plugin) or ()))
    status.registered = state.registry.names_by_plugin(cand.name)


def _check_api(plugin: Any) -> None:
    declared = getattr(plugin, "MMCORE_PLUGIN_API", None)
    if declared is None:
        return
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    if is_int(declared):
        low = high = declared
    elif isinstance(declared, (tuple, list)) and len(declared) == 2 and all(map(is_int, declared)):
        low, high = declared
    else:
        raise _SetAside(FAILED, f"MMCORE_PLUGIN_API must be an int or a (min, max) pair of ints, got {declared!r}")
    if not low <= PLUGIN_API_VERSION <= high:
        needed = str(low) if low == high else f"{low} to {high}"
        raise _SetAside(
            INCOMPATIBLE,
            f"written for mmcore plugin API {needed}, but mmcore {__version__} provides plugin API "
            f"{PLUGIN_API_VERSION}",
        )


def _collect(pm: pluggy.PluginManager, name: str) -> list[Any]:
    """Call the plugin's register_* hooks; return what it registered, validated, or set it aside."""
    staged: list[Any] = []
    seen: set[tuple[str, str]] = set()
    for hook_name, spec_type in _REGISTER_HOOKS.items():
        invalid: list[str] = []

        def register(spec: Any = None, /, **fields: Any) -> None:
            try:
                if spec is None:
                    spec = spec_type(**fields)
                elif fields:
                    raise InvalidSpecError(f"pass a {spec_type.__name__} or its fields as keywords, not both")
                if not isinstance(spec, spec_type):
                    raise InvalidSpecError(f"{hook_name} expects {spec_type.__name__}, got {spec!r}")
                if (spec.kind, spec.name) in seen:
                    raise InvalidSpecError(f"{spec.kind} {spec.name!r} registered twice")
            except (InvalidSpecError, TypeError) as exc:
                invalid.append(str(exc))
                raise InvalidSpecError(str(exc)) from exc
            seen.add((spec.kind, spec.name))
            staged.append(spec)

        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            if impl.plugin_name != name:
                continue
            try:
                _call(impl, register=register)
            except Exception as exc:  # noqa: BLE001 - isolate whatever a plugin's hook does
                if invalid or isinstance(exc, InvalidSpecError):
                    what = invalid[0] if invalid else exc
                    raise _SetAside(FAILED, f"{hook_name} registered an invalid item: {what}") from exc
                raise _SetAside(FAILED, f"{hook_name} raised {type(exc).__name__}: {exc}") from exc
            if invalid:  # the plugin swallowed our error: still invalid
                raise _SetAside(FAILED, f"{hook_name} registered an invalid item: {invalid[0]}")
    return staged


def _call(impl: Any, **kwargs: Any) -> Any:
    # Call one plugin's implementation alone (not the whole hook), passing only the arguments it names;
    # what it prints goes to stderr, so it cannot corrupt --json output on stdout.
    with contextlib.redirect_stdout(sys.stderr):
        return impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
