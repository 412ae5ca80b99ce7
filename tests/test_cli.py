"""The ``mmcore`` command line: listings (table and JSON), plugins, assemble (flags, TOML, dry run),
test-run, the round trip to `MultimodalModel.from_pretrained`, and one-line errors with exit 2.

Listings and error paths use a fake plugin registered in-process (`registered_plugin`); the round
trip and the full-size dry run use the real ``clip``/``whisper`` plugins and are skipped where those
are not installed.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap

import pytest
import typer
from typer.testing import CliRunner

from mmcore import hookimpl
from mmcore.cli import app as cli_app
from mmcore.cli.spec import parse_encoder_flag, parse_set_flag, spec_from_dict
from mmcore.errors import ConfigError
from mmcore.registry import CallbackSpec, EncoderSpec, ProjectorSpec
from mmcore.testing import registered_plugin

HEAVY = ("torch", "transformers", "timm")
needs_plugins = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("mmcore_plugin_clip", "mmcore_plugin_whisper")),
    reason="needs mmcore-plugin-clip and mmcore-plugin-whisper installed (make test puts them on the path)",
)


class FakePlugin:
    """Registers metadata only (factories are never imported by listings) and one command."""

    @hookimpl
    def register_encoders(self, register):
        register(
            EncoderSpec(
                name="toyvision",
                modality="vision",
                summary="toy vision",
                factory="toy_mod:Factory",
                default_checkpoint="org/toy-ckpt",
                presets=("tiny", "big"),
            )
        )
        register(
            EncoderSpec(name="toyaudio", modality="audio", summary="toy audio", factory="toy_mod:Factory")
        )

    @hookimpl
    def register_projectors(self, register):
        register(ProjectorSpec(name="toyproj", summary="toy projector", factory="toy_mod:proj"))

    @hookimpl
    def register_callbacks(self, register):
        register(
            CallbackSpec(
                name="toypool", slots=("postprocess_projector",), summary="toy pool", factory="toy_mod:cb"
            )
        )

    @hookimpl
    def register_commands(self, app):
        @app.command("toy-hello")
        def toy_hello() -> None:
            """Say hello from the fake plugin."""
            typer.echo("hello from toy")


@pytest.fixture
def cli(monkeypatch):
    """``cli(*args)`` runs the app (with the fake plugin ``fake`` registered) in-process."""
    for var in ("MMCORE_LOAD_PLUGINS", "MMCORE_DISABLE_PLUGINS", "MMCORE_STRICT_PLUGINS", "MMCORE_DEBUG"):
        monkeypatch.delenv(var, raising=False)
    with registered_plugin(FakePlugin(), name="fake"):
        app = cli_app.build_app()
        runner = CliRunner()
        yield lambda *args: runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), lines
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# --- listings -----------------------------------------------------------------------------------------


def test_list_encoders_json_and_table_show_the_installed_plugins(cli):
    result = cli("list-encoders", "--json")
    assert result.exit_code == 0, result.output
    rows = {r["qualified_name"]: r for r in json.loads(result.stdout)}
    assert rows["fake:toyvision"] == {
        "name": "toyvision",
        "qualified_name": "fake:toyvision",
        "modality": "vision",
        "plugin": "fake",
        "default_checkpoint": "org/toy-ckpt",
        "presets": ["tiny", "big"],
        "tags": [],
        "summary": "toy vision",
    }
    table = cli("list-encoders")
    assert table.exit_code == 0
    for column in ("name", "modality", "plugin", "default", "presets"):
        assert column in table.stdout
    assert "toyvision" in table.stdout and "toyaudio" in table.stdout and "org/toy-ckpt" in table.stdout


def test_list_encoders_filters_by_wildcard_and_modality(cli):
    names = lambda *args: [r["name"] for r in json.loads(cli("list-encoders", *args, "--json").stdout)]  # noqa: E731
    assert names("toy*", "--modality", "audio") == ["toyaudio"]
    assert names("fake:toyv*") == ["toyvision"]
    assert names("nothing-matches*") == []
    assert "no encoders match" in cli("list-encoders", "nothing-matches*").stdout


def test_list_projectors_and_callbacks_include_builtin_and_plugin_items(cli):
    projectors = {r["qualified_name"]: r for r in json.loads(cli("list-projectors", "--json").stdout)}
    assert {"builtin:linear", "builtin:mlp", "builtin:mlpNx_act", "builtin:resampler", "fake:toyproj"} <= set(
        projectors
    )
    assert projectors["builtin:mlpNx_act"]["pattern"] == r"mlp(\d+)x_(\w+)"
    callbacks = json.loads(cli("list-callbacks", "--slot", "postprocess_projector", "--json").stdout)
    # only that slot's: the fake plugin's, and those of installed plugins (whisper's trim_padding)
    assert "fake:toypool" in [c["qualified_name"] for c in callbacks]
    assert all(c["slots"] == ["postprocess_projector"] for c in callbacks)
    table = cli("list-callbacks")
    assert table.exit_code == 0 and "select_feature_layer" in table.stdout and "toypool" in table.stdout
    assert "toyproj" in cli("list-projectors").stdout


def test_list_llms_lists_the_presets(cli):
    rows = {r["name"]: r for r in json.loads(cli("list-llms", "--json").stdout)}
    assert {"tiny", "tiny-qwen2", "llama3-8b", "qwen2-0.5b", "qwen2-7b", "mistral-7b", "vicuna-7b"} <= set(
        rows
    )
    assert rows["tiny"]["tokenizer"] == "tiny" and rows["llama3-8b"]["tokenizer"] is None
    assert "llama3-8b" in cli("list-llms").stdout


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


def test_listing_imports_no_torch_transformers_or_timm():
    code = textwrap.dedent(f"""
        import io, json, sys
        from contextlib import redirect_stdout
        from mmcore.cli.app import main
        outputs = {{}}
        for args in (["list-encoders", "--json"], ["list-projectors", "--json"], ["list-callbacks", "--json"],
                     ["plugins", "--all", "--json"], ["list-llms", "--json"], ["list-encoders"], ["--help"]):
            buffer = io.StringIO()
            with redirect_stdout(buffer):
                try:
                    main(args)
                except SystemExit as exc:
                    assert exc.code in (0, None), (args, exc.code)
            outputs[" ".join(args)] = buffer.getvalue()
        json.loads(outputs["list-encoders --json"])
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})))
        """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


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


# --- bad input: exit 2, one line ------------------------------------------------------------------------


def test_unknown_encoder_exits_2_with_a_suggestion(cli):
    line = assert_one_line_error(
        cli("assemble", "--llm", "tiny", "-e", "vision=toyvison:preset=tiny", "--dry-run")
    )
    assert "encoders.vision.encoder" in line and "'toyvision'" in line and "did you mean" in line


@pytest.mark.parametrize(
    "value", ["vision", "=toyvision", "vision=", "vision=:preset=tiny", "vision=toyvision:preset="]
)
def test_malformed_encoder_flag_exits_2(cli, value):
    assert_one_line_error(cli("assemble", "--llm", "tiny", "--encoder", value, "--dry-run"), "--encoder")


def test_bad_toml_key_exits_2_naming_the_key(cli, tmp_path):
    spec = tmp_path / "model.toml"
    spec.write_text('[llm]\nsource = "tiny"\n[encoders.vision]\nencoder = "toyvision"\nprojecter = "mlp"\n')
    line = assert_one_line_error(cli("assemble", spec, "--dry-run"))
    assert "model.toml: encoders.vision.projecter: unknown key; did you mean 'projector'?" in line
    spec.write_text('[llm\nsource = "tiny"\n')
    assert_one_line_error(cli("assemble", spec, "--dry-run"), "model.toml", "not valid TOML")
    assert_one_line_error(
        cli("assemble", tmp_path / "missing.toml", "--dry-run"), "missing.toml", "does not exist"
    )


def test_missing_directory_exits_2(cli, tmp_path):
    assert_one_line_error(cli("test-run", tmp_path / "no-such-model"), "no-such-model", "no such directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(cli("test-run", empty, "--device", "cpu"), "no config.json")
    line = assert_one_line_error(
        cli("assemble", "--llm", "./no-such-llm-dir", "-e", "vision=toyvision:preset=tiny", "--dry-run")
    )
    assert "llm.source" in line and "not a directory" in line


def test_existing_output_dir_exits_2_and_is_left_alone(cli, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    line = assert_one_line_error(
        cli("assemble", "--llm", "tiny", "-e", "vision=toyvision:preset=tiny", "-o", out)
    )
    assert "already exists" in line and "--overwrite" in line
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_device_cuda_without_a_gpu_exits_2(cli, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    spec = tmp_path / "model.toml"
    spec.write_text('[llm]\nsource = "tiny"\n[encoders.vision]\nencoder = "toyvision"\npreset = "tiny"\n')
    assert_one_line_error(cli("test-run", spec, "--device", "cuda"), "--device cuda", "no CUDA device")
    assert_one_line_error(cli("test-run", spec, "--device", "tpu"), "--device")


def test_test_run_of_a_model_without_plugin_encoders_exits_2(cli, tmp_path):
    from mmcore.testing import tiny_multimodal_model

    model, tokenizer = tiny_multimodal_model()  # transformers encoders, no plugin recipe
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    assert_one_line_error(cli("test-run", tmp_path / "m", "--device", "cpu"), "not built by a plugin")


@pytest.mark.parametrize(
    "args, needles",
    [
        (["assemble", "-e", "vision=toyvision:preset=tiny", "--dry-run"], ["llm.source", "missing"]),
        (["assemble", "--llm", "tiny", "--dry-run"], ["encoders", "no encoders"]),
        (["assemble", "--llm", "tiny", "-e", "vision=toyvision:preset=tiny"], ["--output"]),
        (["assemble", "--llm", "tiny", "-e", "vision=toyvision", "--set", "nokey", "--dry-run"], ["--set"]),
        (
            ["assemble", "--llm", "tiny", "-e", "vision=toyvision", "--set", "model.wrapp=true", "--dry-run"],
            ["model.wrapp", "did you mean 'wrap'"],
        ),
        (
            ["assemble", "--llm", "tiny", "-e", "vision=toyvision", "--set", "model.wrap=3", "--dry-run"],
            ["model.wrap", "true or false"],
        ),
        (
            ["assemble", "--llm", "tiny", "-e", "vision=toyvision", "-p", "vision=mlpp", "--dry-run"],
            ["encoders.vision.projector", "unknown projector"],
        ),
        (
            [
                "assemble",
                "--llm",
                "tiny",
                "-e",
                "vision=toyvision",
                "--set",
                "encoders.vision.callbacks.preprocess=toypool",
                "--dry-run",
            ],
            ["callbacks.preprocess", "postprocess_projector"],
        ),
        (["assemble", "--llm", "tiny", "-e", "bad-name=toyvision", "--dry-run"], ["encoders.bad-name"]),
        (["assemble", "--llm", "tiny", "-e", "vision=toyvision", "--dtype", "fp8", "--dry-run"], ["--dtype"]),
        (["assemble", "--llm", "llama3b", "-e", "vision=toyvision", "--dry-run"], ["llm.source"]),
        (["test-run", "x.toml", "--train", "lora"], ["--train"]),
        (["list-encoders", "--bogus"], ["--bogus"]),
        (["no-such-command"], ["no-such-command"]),
        (["plugins", "info", "fak"], ["unknown plugin 'fak'", "did you mean 'fake'"]),
    ],
)
def test_bad_input_exits_2_with_one_line(cli, args, needles):
    assert_one_line_error(cli(*args), *needles)


def test_debug_shows_the_traceback(cli):
    result = cli("plugins", "info", "nope", "--debug")
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and "UnknownNameError" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("Error: unknown plugin 'nope'")


# --- the spec -------------------------------------------------------------------------------------------


def test_encoder_flag_grammar():
    qualified = frozenset({"clip:clip"})
    assert parse_encoder_flag("vision=clip:openai/clip-vit-large-patch14") == (
        "vision",
        {"encoder": "clip", "checkpoint": "openai/clip-vit-large-patch14"},
    )
    assert parse_encoder_flag("audio=whisper:preset=large-v3") == (
        "audio",
        {"encoder": "whisper", "preset": "large-v3"},
    )
    assert parse_encoder_flag("vision=clip:clip:preset=tiny", qualified) == (
        "vision",
        {"encoder": "clip:clip", "preset": "tiny"},
    )
    assert parse_encoder_flag("vision=clip:clip", qualified) == ("vision", {"encoder": "clip:clip"})
    assert parse_encoder_flag("vision=clip") == ("vision", {"encoder": "clip"})
    assert parse_encoder_flag("v=clip:/models/my-clip") == (
        "v",
        {"encoder": "clip", "checkpoint": "/models/my-clip"},
    )


def test_set_flag_reads_toml_values():
    raw: dict = {}
    for assignment in (
        "encoders.vision.options.feature_layer=-1",
        "model.wrap=true",
        "llm.source=org/name",
        "encoders.vision.projector_options={num_queries = 8}",
        "encoders.vision.options.tag=plain text",
    ):
        parse_set_flag(raw, assignment)
    assert raw == {
        "encoders": {
            "vision": {
                "options": {"feature_layer": -1, "tag": "plain text"},
                "projector_options": {"num_queries": 8},
            }
        },
        "model": {"wrap": True},
        "llm": {"source": "org/name"},
    }
    with pytest.raises(ConfigError, match="not a table"):
        parse_set_flag(raw, "model.wrap.x=1")


def test_spec_validation_and_round_trip_through_its_dict():
    raw = {
        "llm": {"source": "tiny", "tokenizer": "tiny"},
        "encoders": {
            "vision": {
                "encoder": "clip",
                "preset": "tiny",
                "projector": "resampler",
                "projector_options": {"num_queries": 4},
                "options": {"feature_layer": -1},
                "callbacks": {
                    "postprocess_module": {"name": "drop_prefix_tokens", "num_tokens": 1},
                    "preprocess": False,
                },
            },
            "audio": {"encoder": "whisper", "checkpoint": "openai/whisper-tiny"},
        },
        "model": {"wrap": True},
    }
    spec = spec_from_dict(raw, "x.toml")
    assert spec.encoders["vision"].callbacks == {
        "postprocess_module": {"name": "drop_prefix_tokens", "params": {"num_tokens": 1}},
        "preprocess": None,
    }
    assert spec.model.projector is None and spec.model.wrap is True
    again = spec_from_dict(spec.to_dict(), "x.toml")
    assert again.to_dict() == spec.to_dict()
    for bad, message in [
        ({**raw, "extra": {}}, "x.toml: extra: unknown key"),
        (
            {**raw, "encoders": {"vision": {"encoder": "clip", "preset": "tiny", "checkpoint": "a"}}},
            "checkpoint or preset, not both",
        ),
        (
            {**raw, "encoders": {"vision": {"encoder": "clip", "projector_options": {"num_querys": 2}}}},
            "encoders.vision.projector_options.num_querys: unknown key; did you mean 'num_queries'?",
        ),
        (
            {**raw, "encoders": {"vision": {"encoder": "clip", "callbacks": {"middle": "x"}}}},
            "encoders.vision.callbacks.middle",
        ),
        ({**raw, "encoders": {"vision": {"preset": "tiny"}}}, "encoders.vision.encoder: missing"),
        ({**raw, "llm": {"source": 3}}, "llm.source: expected a string, got 3"),
    ]:
        with pytest.raises(ConfigError) as info:
            spec_from_dict(bad, "x.toml")
        assert message in str(info.value)


# --- LLM presets and the dry run ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, params",
    # Published parameter counts of the released models these presets copy.
    [
        ("llama3-8b", 8_030_261_248),
        ("qwen2-0.5b", 494_032_768),
        ("qwen2-7b", 7_615_616_512),
        ("mistral-7b", 7_241_732_096),
        ("vicuna-7b", 6_738_415_616),
    ],
)
def test_llm_presets_have_the_released_models_parameter_counts(name, params):
    import torch
    from transformers import AutoModelForCausalLM

    from mmcore.presets import get_llm_preset

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(get_llm_preset(name).build_config())
    assert sum(p.numel() for p in model.parameters()) == params


def clip_vision_params(
    hidden: int, layers: int, intermediate: int, image: int, patch: int, channels: int = 3
) -> int:
    """CLIPVisionModel by hand: patch conv (no bias), CLS, positions, pre-LN, layers, post-LN."""
    positions = (image // patch) ** 2 + 1
    embeddings = channels * patch * patch * hidden + hidden + positions * hidden
    layer = (
        4 * (hidden * hidden + hidden)
        + 2 * 2 * hidden
        + (hidden * intermediate + intermediate)
        + (intermediate * hidden + hidden)
    )
    return embeddings + 2 * hidden + layers * layer + 2 * hidden


def llama_params(
    vocab: int, hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int
) -> dict[str, int]:
    head_dim = hidden // heads
    attention = 2 * hidden * hidden + 2 * hidden * kv_heads * head_dim  # q, o and k, v; no biases
    layer = attention + 3 * hidden * intermediate + 2 * hidden  # gate/up/down, two RMSNorms
    lora = 16 * ((hidden + hidden) * 2 + 2 * (hidden + kv_heads * head_dim) + 3 * (hidden + intermediate))
    return {
        "embeddings": vocab * hidden,
        "lm_head": vocab * hidden,
        "layers": layers * layer + hidden,
        "lora": layers * lora,
    }


@needs_plugins
def test_dry_run_of_clip_vit_l_336_and_llama3_8b_matches_a_hand_count(cli):
    result = cli(
        "assemble", "--llm", "llama3-8b", "-e", "vision=clip:preset=vit-l-14-336", "--dry-run", "--json"
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    parts = {p["part"]: p["params"] for p in report["parts"]}
    vision = clip_vision_params(hidden=1024, layers=24, intermediate=4096, image=336, patch=14)
    projector = (1024 * 4096 + 4096) + (4096 * 4096 + 4096)  # mlp2x_gelu: 1024 -> 4096 -> 4096
    llm = llama_params(vocab=128256, hidden=4096, layers=32, intermediate=14336, heads=32, kv_heads=8)
    assert parts == {
        "vision.module": vision,
        "vision.projector": projector,
        "language_model.embeddings": llm["embeddings"],
        "language_model.lm_head": llm["lm_head"],
        "language_model.layers": llm["layers"],
    }
    total = vision + projector + llm["embeddings"] + llm["lm_head"] + llm["layers"]
    assert total == 303_507_456 + 20_979_712 + 8_030_261_248
    assert report["total_params"] == total and report["bf16_bytes"] == 2 * total
    assert report["lora_params"] == llm["lora"]
    stages = {s["stage"]: s for s in report["stages"]}
    assert stages["align"]["trainable"] == projector
    assert (
        stages["lora"]["trainable"] == projector + llm["lora"]
        and stages["lora"]["params"] == total + llm["lora"]
    )
    assert stages["finetune"]["trainable"] == total - vision and stages["full"]["trainable"] == total
    for s in stages.values():
        assert s["memory_bytes"] == 2 * s["params"] + 14 * s["trainable"]
    table = cli("assemble", "--llm", "llama3-8b", "-e", "vision=clip:preset=vit-l-14-336", "--dry-run")
    assert table.exit_code == 0 and f"{total:,}" in table.stdout and "lora" in table.stdout


@pytest.mark.skipif(
    importlib.util.find_spec("mmcore_plugin_eva02") is None, reason="needs mmcore-plugin-eva02"
)
@needs_plugins
def test_projector_precedence_encoder_then_model_then_plugin_default(cli):
    def projectors(*args):
        result = cli(
            "assemble",
            "--llm",
            "tiny",
            "-e",
            "a=eva02:preset=tiny",
            "-e",
            "b=clip:preset=tiny",
            *args,
            "--dry-run",
            "--json",
        )
        assert result.exit_code == 0, result.output
        return {p["part"]: p["type"] for p in json.loads(result.stdout)["parts"] if "type" in p}

    # eva02's plugin asks for a resampler; others get mlp2x_gelu
    assert projectors() == {"a.projector": "resampler", "b.projector": "mlp2x_gelu"}
    assert projectors("-p", "linear") == {"a.projector": "linear", "b.projector": "linear"}
    assert projectors("-p", "linear", "-p", "b=mlp3x_silu") == {
        "a.projector": "linear",
        "b.projector": "mlp3x_silu",
    }


# --- assemble -> test-run -> from_pretrained ----------------------------------------------------------


@needs_plugins
def test_assemble_test_run_from_pretrained_round_trip(cli, tmp_path):
    import torch

    from mmcore import MultimodalModel
    from mmcore.processing import MultimodalProcessor

    out = tmp_path / "models" / "tiny"
    result = cli(
        "assemble",
        "--llm",
        "tiny",
        "-e",
        "vision=clip:preset=tiny",
        "-e",
        "audio=whisper:preset=tiny",
        "-p",
        "audio=resampler",
        "--set",
        "encoders.audio.projector_options.num_queries=3",
        "-o",
        out,
        "--json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["random_weights"] is True
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "processor_config.json",
        "mmcore_assembly.json",
    } <= set(report["files"])
    assert [p.name for p in out.parent.iterdir()] == ["tiny"]  # no staging directory left behind

    model = MultimodalModel.from_pretrained(out)
    assert sorted(model.encoders) == ["audio", "vision"]
    assert model.encoders["audio"].projector.config.num_queries == 3
    assert sum(p.numel() for p in model.parameters()) == report["total_params"]
    processor = MultimodalProcessor.from_pretrained(out, model)
    assert processor.token_ids == model.modality_token_ids == report["modality_token_ids"]

    run = cli(
        "test-run", out, "--device", "cpu", "--steps", "1", "--generate", "3", "--batch-size", "2", "--json"
    )
    assert run.exit_code == 0, run.output
    tr = json.loads(run.stdout)
    assert tr["ok"] and tr["processor"] and tr["device"] == "cpu" and tr["dtype"] == "float32"
    parts = {p["name"]: p for p in tr["parts"]}
    assert parts["audio"]["output_shape"] == [2, 3, 32] and parts["audio"]["num_tokens_ok"]
    assert parts["vision"]["tokens_per_item"] == [4, 4] and parts["vision"]["num_tokens_ok"]
    assert parts["language_model"]["output_shape"] == [
        2,
        tr["sequence_length"],
        model.config.text_config.vocab_size,
    ]
    assert parts["vision"]["trainable"] == sum(
        p.numel() for p in model.encoders["vision"].projector.parameters()
    )
    assert parts["language_model"]["trainable"] == 0 and parts["language_model"]["grads_finite"] is None
    assert tr["train"]["loss_finite"] and tr["train"]["grads_finite"] and len(tr["train"]["losses"]) == 1
    assert tr["train"]["step_ms"] > 0 and tr["train"]["peak_memory_bytes"] > 0
    assert tr["peak_memory_bytes"] == max(
        tr["train"]["peak_memory_bytes"], tr["generate"]["peak_memory_bytes"]
    )
    assert tr["generate"]["output_shape"] == [2, tr["sequence_length"] + 3]
    assert tr["generate"]["prefill_tokens_per_s"] > 0 and tr["generate"]["decode_tokens_per_s"] > 0

    table = cli("test-run", out, "--device", "cpu", "--steps", "1", "--generate", "2", "--train", "full")
    assert table.exit_code == 0, table.output
    assert "ms/token" in table.stdout and "OK" in table.stdout

    again = cli(
        "assemble", "--llm", "tiny", "-e", "vision=clip:preset=tiny", "-o", out, "--overwrite", "--json"
    )
    assert again.exit_code == 0, again.output
    assert list(MultimodalModel.from_pretrained(out).encoders) == ["vision"]
    assert torch.is_grad_enabled()  # test-run's no_grad sections do not leak


@needs_plugins
def test_assemble_loads_a_local_llm_directory_or_only_its_config_with_random_init(cli, tmp_path):
    import torch

    from mmcore import MultimodalModel
    from mmcore.testing import tiny_llm, tiny_tokenizer

    llm_dir = tmp_path / "llm"
    llm = tiny_llm("qwen2", seed=3)
    llm.save_pretrained(llm_dir)
    tiny_tokenizer().save_pretrained(llm_dir)
    key = "model.layers.0.mlp.down_proj.weight"
    saved = llm.state_dict()[key]

    result = cli(
        "assemble",
        "--llm",
        llm_dir,
        "-e",
        "vision=clip:preset=tiny",
        "-o",
        tmp_path / "real",
        "--dtype",
        "bf16",
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["random_weights"] is False
    model = MultimodalModel.from_pretrained(tmp_path / "real")
    loaded = model.get_base_language_model().state_dict()[key]
    assert loaded.dtype == torch.bfloat16 and torch.equal(loaded, saved.to(torch.bfloat16))
    assert model.config.text_config.model_type == "qwen2"

    result = cli(
        "assemble",
        "--llm",
        llm_dir,
        "-e",
        "vision=clip:preset=tiny",
        "-o",
        tmp_path / "random",
        "--random-init",
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["random_weights"] is True
    random = MultimodalModel.from_pretrained(tmp_path / "random").get_base_language_model().state_dict()[key]
    assert random.shape == saved.shape and not torch.equal(random, saved)


@needs_plugins
def test_test_run_of_a_toml_spec_assembles_in_memory(cli, tmp_path):
    spec = tmp_path / "model.toml"
    spec.write_text(
        textwrap.dedent("""
        [llm]
        source = "tiny-qwen2"

        [encoders.vision]
        encoder = "clip"
        preset = "tiny"
        options = { feature_layer = -1, drop_cls = false }

        [model]
        projector = "linear"
        wrap = true
        """)
    )
    result = cli(
        "test-run",
        spec,
        "--device",
        "cpu",
        "--steps",
        "1",
        "--generate",
        "0",
        "--train",
        "finetune",
        "--json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["kind"] == "spec" and report["generate"] is None
    vision = report["parts"][0]
    assert vision["projector"] == "linear" and vision["tokens_per_item"] == [5, 5]  # 4 patches + CLS
    assert report["parts"][1]["trainable"] == report["parts"][1]["params"] > 0  # finetune trains the LLM
    assert list(tmp_path.iterdir()) == [spec]  # nothing written


@needs_plugins
def test_a_failed_save_leaves_no_directory_behind(cli, tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerFast

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", fail)
    out = tmp_path / "model"
    result = cli("assemble", "--llm", "tiny", "-e", "vision=clip:preset=tiny", "-o", out)
    assert result.exit_code != 0 and isinstance(result.exception, RuntimeError)
    assert list(tmp_path.iterdir()) == []


@needs_plugins
def test_full_size_llm_preset_needs_a_tokenizer_outside_dry_runs(cli, tmp_path):
    line = assert_one_line_error(
        cli("assemble", "--llm", "qwen2-0.5b", "-e", "vision=clip:preset=tiny", "-o", tmp_path / "m")
    )
    assert "llm.tokenizer" in line and "--tokenizer" in line and "--dry-run" in line
    assert not (tmp_path / "m").exists()


def test_console_script_points_at_main():
    from importlib.metadata import entry_points

    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("mmcore") == "mmcore.cli.app:main"
