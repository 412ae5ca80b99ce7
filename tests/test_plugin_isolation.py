"""Plugins cannot take the CLI down: what they print goes to stderr, ``--version``/``--help`` import
none, a slow import is named on stderr, and two distributions sharing an entry-point name are both
reported.

Each test installs fake distributions (a module plus ``<dist>.dist-info`` with entry_points.txt) in a
temp dir and runs ``python -m mmcore`` in a subprocess with that dir on ``PYTHONPATH``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mmcore import plugins
from mmcore.errors import PluginError, PluginWarning

ENCODER_PLUGIN = """
import time
from mmcore import hookimpl
from mmcore.registry import EncoderSpec
{prelude}

@hookimpl
def register_encoders(register):
    {in_hook}
    register(EncoderSpec(name="{enc}", modality="vision", summary="s", factory="{mod}:build"))
"""


def add_dist(site: Path, dist: str, ep_name: str, module: str, prelude: str = "", in_hook: str = "pass",
             enc: str | None = None) -> None:  # fmt: skip
    source = ENCODER_PLUGIN.format(prelude=prelude, in_hook=in_hook, enc=enc or module, mod=module)
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[mmcore]\n{ep_name} = {module}\n")


def mmcore_env(site: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMCORE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(site)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update(extra)
    return env


def run_mmcore(site: Path, *args: str, timeout: float = 60, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mmcore", *args],
        env=mmcore_env(site, **extra), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_plugin_printing_at_import_and_in_a_hook_does_not_corrupt_json(tmp_path):
    add_dist(tmp_path, "mmcore-plugin-chatty", "chatty", "chatty_mod",
             prelude='print("hello from chatty import")', in_hook='print("hello from chatty hook")')  # fmt: skip
    for args in (["list-encoders", "--json"], ["plugins", "--json"]):
        result = run_mmcore(tmp_path, *args)
        assert result.returncode == 0, result.stderr
        json.loads(result.stdout)  # nothing but JSON on stdout
        assert "hello from chatty import" in result.stderr
        assert "hello from chatty hook" in result.stderr
    rows = json.loads(run_mmcore(tmp_path, "list-encoders", "--json").stdout)
    assert "chatty_mod" in json.dumps(rows)


def test_plugin_printing_does_not_corrupt_assemble_dry_run_json(tmp_path):
    add_dist(tmp_path, "mmcore-plugin-chatty", "chatty", "chatty_mod",
             prelude='print("hello from chatty import")', in_hook='print("hello from chatty hook")')  # fmt: skip
    result = run_mmcore(tmp_path, "assemble", "--llm", "tiny", "--encoder", "vision=clip:preset=tiny",
                        "--dry-run", "--json", timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    json.loads(result.stdout)
    assert "hello from chatty import" in result.stderr


@pytest.mark.parametrize("args", [["--version"], ["--help"]])
def test_version_and_help_import_no_plugin(tmp_path, args):
    add_dist(tmp_path, "mmcore-plugin-hang", "hang", "hang_mod",
             prelude='print("hang imported"); time.sleep(30)')  # fmt: skip
    result = run_mmcore(tmp_path, *args, timeout=10)
    assert result.returncode == 0, result.stderr
    assert "hang imported" not in result.stderr
    assert "mmcore" in result.stdout


def test_slow_plugin_import_is_named_on_stderr_with_how_to_skip_it(tmp_path):
    add_dist(tmp_path, "mmcore-plugin-slowpoke", "slowpoke", "slowpoke_mod", prelude="time.sleep(4)")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmcore", "list-encoders"], env=mmcore_env(tmp_path, MMCORE_PLUGIN_SLOW_S="1"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = proc.stderr.readline()  # blocks until the notice (or the end, where the test fails)
    finally:
        proc.kill()
        proc.wait()
    assert "slowpoke" in line
    assert "MMCORE_DISABLE_PLUGINS=slowpoke" in line


def test_a_fast_plugin_gets_no_slow_notice(tmp_path):
    add_dist(tmp_path, "mmcore-plugin-quick", "quick", "quick_mod")
    result = run_mmcore(tmp_path, "list-encoders", "--json")
    assert result.returncode == 0, result.stderr
    assert "MMCORE_DISABLE_PLUGINS" not in result.stderr


def two_clips(site: Path) -> None:
    add_dist(site, "mmcore-plugin-clip-a", "clipclash", "clip_a_mod")
    add_dist(site, "mmcore-plugin-clip-b", "clipclash", "clip_b_mod")


def test_two_distributions_with_one_entry_point_name_are_both_reported(tmp_path):
    two_clips(tmp_path)
    result = run_mmcore(tmp_path, "plugins", "--json")
    assert result.returncode == 0, result.stderr
    rows = [r for r in json.loads(result.stdout) if r["name"] == "clipclash"]
    assert {r["distribution"] for r in rows} == {"mmcore-plugin-clip-a", "mmcore-plugin-clip-b"}
    loaded = [r for r in rows if r["state"] == "loaded"]
    clashed = [r for r in rows if r["state"] == "name-clash"]
    assert len(loaded) == 1 and len(clashed) == 1
    reason = clashed[0]["reason"]
    assert "not loaded" in reason
    assert "mmcore-plugin-clip-a" in reason and "mmcore-plugin-clip-b" in reason
    assert "clip_a_mod" in reason and "clip_b_mod" in reason
    # the warning on stderr names both distributions too
    warning = " ".join(result.stderr.split())
    assert "mmcore-plugin-clip-a" in warning and "mmcore-plugin-clip-b" in warning


@pytest.fixture
def clash_site(tmp_path, monkeypatch):
    for var in ("MMCORE_LOAD_PLUGINS", "MMCORE_DISABLE_PLUGINS", "MMCORE_STRICT_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    two_clips(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins.reset()
    yield tmp_path
    for module in ("clip_a_mod", "clip_b_mod"):
        sys.modules.pop(module, None)
    plugins.reset()


def test_name_clash_warning_names_both_distributions_and_entry_points(clash_site):
    with pytest.warns(PluginWarning) as caught:
        statuses = [s for s in plugins.plugin_statuses() if s.name == "clipclash"]
    text = " ".join(str(w.message) for w in caught)
    for needle in ("mmcore-plugin-clip-a", "mmcore-plugin-clip-b", "clip_a_mod", "clip_b_mod"):
        assert needle in text
    assert sorted(s.state for s in statuses) == ["loaded", "name-clash"]


def test_name_clash_in_strict_mode_is_an_error(clash_site, monkeypatch):
    monkeypatch.setenv("MMCORE_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="mmcore-plugin-clip-a.*mmcore-plugin-clip-b|mmcore-plugin-clip-b.*mmcore-plugin-clip-a"):
        plugins.plugin_statuses()
