"""``mmcore plugins`` and ``mmcore plugins info``: each plugin's state, what it registered, and why one
failed or is disabled."""

from __future__ import annotations

import json

import pytest
from cli_helpers import assert_one_line_error, needs_plugins
from typer.testing import CliRunner

from mmcore import hookimpl
from mmcore.cli import app as cli_app
from mmcore.testing import registered_plugin


def test_plugins_lists_status_and_info_shows_one(cli):
    rows = {r["name"]: r for r in json.loads(cli("plugins", "--json").stdout)}
    assert "builtin" not in rows and rows["fake"]["state"] == "loaded"
    assert rows["fake"]["registered"]["encoder"] == ["toyaudio", "toyvision"]
    assert "register_commands" in rows["fake"]["hooks"]
    everything = {r["name"]: r for r in json.loads(cli("plugins", "--all", "--json").stdout)}
    assert everything["builtin"]["distribution"] == "mmcore" and everything["builtin"]["builtin"] is True
    info = json.loads(cli("plugins", "info", "builtin", "--json").stdout)
    assert info["state"] == "loaded" and "mlp" in info["registered"]["projector"]
    assert info["module"] == "mmcore.builtin.plugin" and info["load_time_s"] >= 0
    table = cli("plugins", "info", "fake")
    assert table.exit_code == 0 and "toyvision" in table.stdout and "loaded" in table.stdout
    assert "fake" in cli("plugins").stdout


def test_plugins_shows_a_failed_plugin_with_its_reason(monkeypatch):
    class Broken:
        @hookimpl
        def register_encoders(self, register):
            raise RuntimeError("boom at registration")

    with pytest.warns(Warning), registered_plugin(Broken(), name="broken"):
        result = CliRunner().invoke(cli_app.build_app(), ["plugins", "--json"])
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["broken"]["state"] == "failed" and "boom at registration" in rows["broken"]["reason"]


@needs_plugins
def test_plugins_shows_a_disabled_plugin_and_its_encoders_disappear(monkeypatch):
    from mmcore import plugins

    monkeypatch.setenv("MMCORE_DISABLE_PLUGINS", "whisper")
    plugins.reset()
    try:
        app = cli_app.build_app()
        rows = {r["name"]: r for r in json.loads(CliRunner().invoke(app, ["plugins", "--json"]).stdout)}
        encoders = json.loads(CliRunner().invoke(app, ["list-encoders", "--json"]).stdout)
        info = CliRunner().invoke(app, ["plugins", "info", "whisper"])
    finally:
        plugins.reset()
    assert rows["whisper"]["state"] == "disabled" and "MMCORE_DISABLE_PLUGINS" in rows["whisper"]["reason"]
    assert rows["whisper"]["distribution"] == "mmcore-plugin-whisper" and rows["clip"]["state"] == "loaded"
    assert "whisper" not in {e["name"] for e in encoders} and "clip" in {e["name"] for e in encoders}
    assert info.exit_code == 0 and "disabled" in info.stdout


def test_plugins_info_of_an_unknown_plugin_exits_2_with_a_suggestion(cli):
    assert_one_line_error(cli("plugins", "info", "fak"), "unknown plugin 'fak'", "did you mean 'fake'")
