"""The ``mmcore`` command line: the typer app, error handling, and lazy command registration.

Commands live in modules of this package, each with ``register(app)``; `COMMAND_MODULES` names them
(``train`` is included when its module exists). Plugins add theirs through the ``register_commands``
hook. Nothing here imports torch: commands that need it import it when they run.

`main` loads plugin commands lazily: only when the command named on the line is not a built-in one.
So ``mmcore --version`` and ``mmcore --help`` import no plugin (a plugin that hangs at import cannot
hang them); the main help lists the built-in commands only.

Errors: an `~mmcore.errors.MMCoreError` or a usage error prints one line on stderr and exits with
status 2; ``--debug`` (anywhere on the line, or ``MMCORE_DEBUG=1``) shows the traceback instead.
Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any

import typer
from typer.core import TyperGroup

from mmcore import __version__
from mmcore.errors import MMCoreError

#: modules of ``mmcore.cli`` with a ``register(app)`` function, in help order; a missing one is skipped
COMMAND_MODULES = ("listing", "assemble", "testrun", "train", "convert")

USAGE_ERROR = 2
_TRUE = ("1", "true", "yes", "on")

HELP = """Assemble multimodal LLMs from registered encoders, projectors and any HF causal LM.

Examples:

  mmcore list-encoders "siglip*" --modality vision

  mmcore assemble --llm tiny --encoder vision=clip:preset=tiny -o out/tiny-clip

  mmcore assemble --llm llama3-8b --encoder vision=clip:preset=vit-l-14-336 --dry-run

  mmcore test-run out/tiny-clip --steps 3 --json

Commands added by plugins run by their name; `mmcore plugins` lists the plugins.
"""


def _debug_requested(args: list[str]) -> tuple[bool, list[str]]:
    """Take ``--debug`` out of the arguments (before any ``--``), wherever the user put it."""
    end = args.index("--") if "--" in args else len(args)
    head, tail = args[:end], args[end:]
    debug = "--debug" in head or os.environ.get("MMCORE_DEBUG", "").strip().lower() in _TRUE
    return debug, [a for a in head if a != "--debug"] + tail


def error_line(message: str) -> str:
    """One line: newlines and runs of spaces collapsed."""
    return "Error: " + " ".join(str(message).split())


class MMCoreGroup(TyperGroup):
    """The root command group: one-line errors with exit status 2, ``--debug`` for tracebacks.

    With ``lazy_plugin_commands`` set, plugins' ``register_commands`` runs the first time a command
    name is asked for that no built-in command has.
    """

    lazy_plugin_commands = False

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is None and self.lazy_plugin_commands:
            self.lazy_plugin_commands = False
            self._add_plugin_commands()
            command = super().get_command(ctx, cmd_name)
        return command

    def _add_plugin_commands(self) -> None:
        from mmcore.plugins import register_commands

        holder = typer.Typer()
        register_commands(holder)
        if not (holder.registered_commands or holder.registered_groups):
            return
        group = typer.main.get_group(holder)
        for name, command in group.commands.items():
            if name not in self.commands:  # a plugin cannot replace a built-in command
                self.add_command(command, name)

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        from typer import Abort

        try:
            from typer._click import exceptions as click_exc  # typer that vendors click
        except ImportError:  # pragma: no cover - older typer on click
            from click import exceptions as click_exc
        no_args_is_help = getattr(click_exc, "NoArgsIsHelpError", ())

        debug, args = _debug_requested(list(sys.argv[1:] if args is None else args))
        try:
            result = super().main(args=args, prog_name=prog_name or "mmcore", standalone_mode=False, **extra)
        except no_args_is_help as exc:
            text = exc.ctx.get_help()
            if text:
                typer.echo(text)
            result = 0
        except click_exc.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            return self._fail(error_line(exc.format_message()) + hint, debug, standalone_mode, exc)
        except click_exc.ClickException as exc:
            return self._fail(error_line(exc.format_message()), debug, standalone_mode, exc, exc.exit_code)
        except Abort:
            typer.echo("Aborted!", err=True)
            result = 1
        except MMCoreError as exc:
            return self._fail(error_line(str(exc)), debug, standalone_mode, exc)
        code = result if isinstance(result, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code

    @staticmethod
    def _fail(
        line: str, debug: bool, standalone_mode: bool, exc: BaseException, code: int = USAGE_ERROR
    ) -> int:
        if debug:
            traceback.print_exception(type(exc), exc, exc.__traceback__)
        typer.echo(line, err=True)
        if standalone_mode:
            sys.exit(code)
        return code


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mmcore {__version__}")
        raise typer.Exit()


def build_app(*, plugins: bool = True) -> typer.Typer:
    """A fresh ``mmcore`` app: the built-in commands and, with ``plugins``, those plugins register."""
    app = typer.Typer(
        name="mmcore",
        cls=MMCoreGroup,
        help=HELP,
        no_args_is_help=True,
        add_completion=False,
        rich_markup_mode="rich",
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )

    @app.callback()
    def _root(
        version: bool = typer.Option(
            False, "--version", callback=_version, is_eager=True, help="Print the version."
        ),
        debug: bool = typer.Option(
            False, "--debug", help="Show tracebacks for errors (anywhere on the line)."
        ),
    ) -> None:
        """Assemble multimodal LLMs from registered encoders, projectors and any HF causal LM."""

    for name in COMMAND_MODULES:
        module_name = f"{__package__}.{name}"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:  # that command is not part of this install
                continue
            raise
        module.register(app)
    if plugins:
        from mmcore.plugins import register_commands

        register_commands(app)
    return app


def main(argv: Sequence[str] | None = None) -> Any:
    """Console-script entry point: ``mmcore ...`` (and ``python -m mmcore``)."""
    command = typer.main.get_command(build_app(plugins=False))
    if isinstance(command, MMCoreGroup):
        command.lazy_plugin_commands = True
    return command.main(args=list(sys.argv[1:] if argv is None else argv), prog_name="mmcore")
