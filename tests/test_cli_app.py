"""The ``mmcore`` app itself: help with examples for every command, plugin commands, optional command
modules, ``python -m mmcore`` and the console script, and the one-line errors of any command."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import typer
from cli_helpers import assert_one_line_error

from mmcore.cli import app as cli_app


def test_plugin_commands_appear_in_help_and_run(cli):
    help_text = cli("--help").stdout
    assert "toy-hello" in help_text
    for command in ("list-encoders", "list-projectors", "list-callbacks", "plugins", "assemble", "test-run"):
        assert command in help_text
    assert cli("toy-hello").stdout.strip() == "hello from toy"


def test_every_command_has_help_with_examples(cli):
    for command in (
        ["list-encoders"],
        ["list-projectors"],
        ["list-callbacks"],
        ["list-llms"],
        ["plugins"],
        ["plugins", "info"],
        ["assemble"],
        ["test-run"],
    ):
        result = cli(*command, "--help")
        assert result.exit_code == 0, (command, result.output)
        assert "Examples" in result.stdout and "mmcore " in result.stdout, command


def commands_of(app) -> set[str]:
    return set(typer.main.get_command(app).commands)


def test_command_modules_are_optional_but_their_import_errors_are_not(monkeypatch):
    assert "train" in cli_app.COMMAND_MODULES
    if importlib.util.find_spec("mmcore.cli.train") is not None:
        assert "train" in commands_of(cli_app.build_app(plugins=False))
    monkeypatch.setattr(cli_app, "COMMAND_MODULES", ("listing", "no_such_command_module"))
    assert commands_of(cli_app.build_app(plugins=False)) == {
        "list-encoders",
        "list-projectors",
        "list-callbacks",
        "list-llms",
        "plugins",
    }

    real_import = cli_app.importlib.import_module

    def import_module(name):
        if name == "mmcore.cli.listing":  # the module exists but something it imports does not
            raise ModuleNotFoundError("No module named 'somedep'", name="somedep")
        return real_import(name)

    monkeypatch.setattr(cli_app.importlib, "import_module", import_module)
    with pytest.raises(ModuleNotFoundError, match="somedep"):
        cli_app.build_app(plugins=False)


def test_python_m_mmcore_runs_the_cli():
    out = subprocess.run(
        [sys.executable, "-m", "mmcore", "list-projectors", "--json"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "resampler" in {r["name"] for r in json.loads(out.stdout)}
    bad = subprocess.run(
        [sys.executable, "-m", "mmcore", "list-encoders", "--modalty", "x"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--modality" in bad.stderr


def test_debug_shows_the_traceback(cli):
    result = cli("plugins", "info", "nope", "--debug")
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and "UnknownNameError" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("Error: unknown plugin 'nope'")


def test_console_script_points_at_main():
    from importlib.metadata import entry_points

    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("mmcore") == "mmcore.cli.app:main"


@pytest.mark.parametrize(
    "args, needles", [(["list-encoders", "--bogus"], ["--bogus"]), (["no-such-command"], ["no-such-command"])]
)
def test_an_unknown_option_or_command_exits_2_with_one_line(cli, args, needles):
    assert_one_line_error(cli(*args), *needles)
