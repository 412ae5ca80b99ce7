"""Listing commands: encoders, projectors, callbacks, LLM presets and plugins.

They read the plugin registry's metadata only: no torch, transformers or timm is imported.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any, Optional

import typer

from mmcore.cli.output import print_json, print_table
from mmcore.errors import UnknownNameError

JSON_HELP = "Print JSON (for scripts) instead of a table."


def _registry() -> Any:
    from mmcore.plugins import get_registry

    return get_registry()


def list_encoders(
    pattern: Optional[str] = typer.Argument(
        None, help="Wildcard on the name, e.g. 'eva02*' ('plugin:*' with a colon)."
    ),
    modality: Optional[str] = typer.Option(
        None, "--modality", "-m", help="Only this modality: vision, audio, ..."
    ),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """List registered encoders.

    Examples:

      mmcore list-encoders

      mmcore list-encoders "siglip*" --modality vision --json
    """
    specs = _registry().list_encoders(pattern, modality)
    rows = [
        {
            "name": s.name,
            "qualified_name": s.qualified_name,
            "modality": s.modality,
            "plugin": s.plugin,
            "default_checkpoint": s.default_checkpoint,
            "presets": list(s.presets),
            "tags": list(s.tags),
            "summary": s.summary,
        }
        for s in specs
    ]
    _print_rows(
        rows,
        as_json,
        "Encoders",
        ["name", "modality", "plugin", "default checkpoint", "presets", "summary"],
        lambda r: [
            r["name"],
            r["modality"],
            r["plugin"],
            r["default_checkpoint"],
            ", ".join(r["presets"]) or None,
            r["summary"],
        ],
        empty=_empty_caption("encoders", pattern, modality),
    )


def list_projectors(
    pattern: Optional[str] = typer.Argument(None, help="Wildcard on the name, e.g. 'mlp*'."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """List registered projector types.

    Names matching a pattern entry (e.g. mlp2x_gelu for mlpNx_act) are accepted too.

    Examples:

      mmcore list-projectors

      mmcore list-projectors --json
    """
    rows = [
        {"name": s.name, "qualified_name": s.qualified_name, "plugin": s.plugin, "pattern": s.pattern,
         "tags": list(s.tags), "summary": s.summary}
        for s in _registry().list_projectors(pattern)
    ]  # fmt: skip
    _print_rows(
        rows,
        as_json,
        "Projectors",
        ["name", "plugin", "pattern", "summary"],
        lambda r: [r["name"], r["plugin"], r["pattern"], r["summary"]],
        empty=_empty_caption("projectors", pattern),
    )


def list_callbacks(
    pattern: Optional[str] = typer.Argument(None, help="Wildcard on the name."),
    slot: Optional[str] = typer.Option(
        None,
        "--slot",
        help="Only callbacks for this slot: preprocess, postprocess_module, postprocess_projector (an encoder's) or preprocess_llm (the model's).",
    ),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """List registered encoder callbacks.

    Examples:

      mmcore list-callbacks

      mmcore list-callbacks --slot postprocess_module --json
    """
    rows = [
        {
            "name": s.name,
            "qualified_name": s.qualified_name,
            "plugin": s.plugin,
            "slots": list(s.slots),
            "summary": s.summary,
        }
        for s in _registry().list_callbacks(pattern, slot)
    ]
    _print_rows(
        rows,
        as_json,
        "Callbacks",
        ["name", "slots", "plugin", "summary"],
        lambda r: [r["name"], ", ".join(r["slots"]), r["plugin"], r["summary"]],
        empty=_empty_caption("callbacks", pattern, slot),
    )


def list_llms(as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """List LLM presets: configs built in code, usable with --llm with no download.

    Only the tiny presets have a tokenizer offline; the full-size ones serve --dry-run, or need
    --tokenizer for a real assembly.

    Examples:

      mmcore list-llms

      mmcore assemble --llm llama3-8b --encoder vision=clip:preset=vit-l-14-336 --dry-run
    """
    from mmcore.presets import LLM_PRESETS

    rows = [
        {"name": p.name, "model_type": p.model_type, "tokenizer": p.tokenizer, "summary": p.summary,
         "config": dict(p.config)}
        for p in LLM_PRESETS.values()
    ]  # fmt: skip
    _print_rows(
        rows,
        as_json,
        "LLM presets",
        ["name", "model type", "layers", "width", "vocab", "tokenizer", "summary"],
        lambda r: [
            r["name"],
            r["model_type"],
            r["config"].get("num_hidden_layers"),
            r["config"].get("hidden_size"),
            r["config"].get("vocab_size"),
            r["tokenizer"] or "--tokenizer",
            r["summary"],
        ],
    )


def _print_rows(
    rows: list[dict[str, Any]],
    as_json: bool,
    title: str,
    columns: list[str],
    cells: Callable[[dict[str, Any]], list[Any]],
    *,
    empty: str | None = None,
) -> None:
    """A listing's ``rows`` as JSON (``as_json``), else as a table of each row's ``cells``, captioned
    ``empty`` when there are none."""
    if as_json:
        print_json(rows)
        return
    print_table(title, columns, [cells(r) for r in rows], caption=None if rows else empty)


def _empty_caption(kind: str, *filters: Any) -> str:
    given = [f for f in filters if f]
    return f"no {kind} match {' '.join(map(repr, given))}" if given else f"no {kind} registered"


# -- plugins ---------------------------------------------------------------------------------------

plugins_app = typer.Typer(invoke_without_command=True, no_args_is_help=False)


def _status_dict(status: Any) -> dict[str, Any]:
    from mmcore.plugins import BUILTIN_PLUGINS

    return {
        "name": status.name,
        "state": status.state,
        "reason": status.reason or None,
        "distribution": status.distribution,
        "version": status.version,
        "module": status.module,
        "hooks": list(status.hooks),
        "registered": {kind: list(names) for kind, names in status.registered.items()},
        "load_time_s": round(status.load_time_s, 6),
        "builtin": status.name in BUILTIN_PLUGINS,
    }


@plugins_app.callback()
def plugins(
    ctx: typer.Context,
    show_all: bool = typer.Option(False, "--all", "-a", help="Also list the built-in plugin."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """List installed plugins: loaded, disabled, failed or incompatible (with the reason).

    Examples:

      mmcore plugins

      mmcore plugins --all --json

      mmcore plugins info clip
    """
    if ctx.invoked_subcommand is not None:
        return
    from mmcore.plugins import plugin_statuses

    rows = [_status_dict(s) for s in plugin_statuses()]
    if not show_all:
        rows = [r for r in rows if not r["builtin"]]
    _print_rows(
        rows,
        as_json,
        "Plugins",
        ["name", "state", "distribution", "version", "registered", "load ms", "reason"],
        lambda r: [
            r["name"],
            r["state"],
            r["distribution"],
            r["version"],
            _registered_summary(r["registered"]),
            f"{r['load_time_s'] * 1e3:.1f}",
            r["reason"],
        ],
        empty="no plugins installed (--all shows the built-in one)",
    )
    if as_json:
        return
    from mmcore.cli.output import console

    for clash in _registry().clashes():
        console().print(f"clash: {clash}")


def _registered_summary(registered: dict[str, list[str]]) -> str | None:
    parts = [
        f"{len(names)} {kind}{'s' if len(names) != 1 else ''}" for kind, names in registered.items() if names
    ]
    return ", ".join(parts) or None


@plugins_app.command("info")
def plugin_info(
    name: str = typer.Argument(..., help="Plugin name (as in `mmcore plugins --all`)."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Show one plugin: status and reason, distribution and version, module, hooks, what it registered.

    Examples:

      mmcore plugins info clip

      mmcore plugins info builtin --json
    """
    from mmcore.plugins import plugin_statuses

    statuses = {s.name: s for s in plugin_statuses()}
    if name not in statuses:
        close = difflib.get_close_matches(name, list(statuses), n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise UnknownNameError(f"unknown plugin {name!r}{hint} (plugins: {', '.join(statuses)})")
    info = _status_dict(statuses[name])
    if as_json:
        print_json(info)
        return
    rows = [
        ["state", info["state"]],
        ["reason", info["reason"]],
        ["distribution", info["distribution"]],
        ["version", info["version"]],
        ["module", info["module"]],
        ["hooks", ", ".join(info["hooks"]) or None],
        *[[f"{kind}s", ", ".join(names) or None] for kind, names in info["registered"].items()],
        ["load time", f"{info['load_time_s'] * 1e3:.1f} ms"],
    ]
    print_table(f"Plugin {name}", ["field", "value"], rows)


def register(app: typer.Typer) -> None:
    """Add the listing commands to ``app``."""
    app.command("list-encoders")(list_encoders)
    app.command("list-projectors")(list_projectors)
    app.command("list-callbacks")(list_callbacks)
    app.command("list-llms")(list_llms)
    app.add_typer(plugins_app, name="plugins")
