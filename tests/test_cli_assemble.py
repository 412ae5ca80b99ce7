"""``mmcore assemble``: the ``--encoder`` / ``--set`` grammar and the TOML assembly file, the dry run's
parameter counts, projector precedence, a local LLM directory, and its one-line errors (exit 2)."""

from __future__ import annotations

import json

import plugin_marks
import pytest
from cli_helpers import assert_one_line_error, needs_plugins

from mmcore.cli.spec import parse_encoder_flag, parse_set_flag, spec_from_dict
from mmcore.errors import ConfigError


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


def test_existing_output_dir_exits_2_and_is_left_alone(cli, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    line = assert_one_line_error(
        cli("assemble", "--llm", "tiny", "-e", "vision=toyvision:preset=tiny", "-o", out)
    )
    assert "already exists" in line and "--overwrite" in line
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


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
    ],
)
def test_bad_assemble_input_exits_2_with_one_line(cli, args, needles):
    assert_one_line_error(cli(*args), *needles)


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


@plugin_marks.needs_plugins("clip", "eva02")
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

    def assemble(out, *flags):
        result = cli(
            "assemble", "--llm", llm_dir, "-e", "vision=clip:preset=tiny", "-o", out, *flags, "--json"
        )
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    assert assemble(tmp_path / "real", "--dtype", "bf16")["random_weights"] is False
    model = MultimodalModel.from_pretrained(tmp_path / "real")
    loaded = model.get_base_language_model().state_dict()[key]
    assert loaded.dtype == torch.bfloat16 and torch.equal(loaded, saved.to(torch.bfloat16))
    assert model.config.text_config.model_type == "qwen2"

    assert assemble(tmp_path / "random", "--random-init")["random_weights"] is True
    random = MultimodalModel.from_pretrained(tmp_path / "random").get_base_language_model().state_dict()[key]
    assert random.shape == saved.shape and not torch.equal(random, saved)


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
