"""``mmcore test-run``: the round trip assemble -> test-run -> `MultimodalModel.from_pretrained`, a TOML
assembly file run in memory, its one-line errors (exit 2), its generation batch and its tokens/item column."""

from __future__ import annotations

import json
import textwrap
import warnings

import torch
from cli_helpers import assert_one_line_error, needs_plugins

from mmcore.cli.testrun import _generate, _text_batch, _Timer, tokens_cell
from mmcore.processing import MultimodalProcessor
from mmcore.testing import tiny_assembled_model, tiny_multimodal_model


def plugin_model():
    """CLIP (4 tokens an image) + Whisper + a tiny LLM, built by the plugins (test-run's own case)."""
    import mmcore

    return tiny_assembled_model(
        {
            "vision": mmcore.build_encoder("clip", preset="tiny"),
            "audio": mmcore.build_encoder("whisper", preset="tiny"),
        }
    )


@needs_plugins
def test_the_generation_batch_is_the_training_rows_left_padded_by_the_processor():
    mllm, tokenizer = plugin_model()
    counts = {"vision": [4, 4], "audio": [10, 7]}  # the second row is three tokens shorter
    train, prompts = _text_batch(mllm, tokenizer, None, counts, 2, torch.device("cpu"))
    width = train["input_ids"].shape[1]
    assert train["attention_mask"].tolist() == [[1] * width, [1] * (width - 3) + [0] * 3]
    assert (train["labels"][1, -3:] == -100).all()
    assert prompts["attention_mask"].tolist() == [[1] * width, [0] * 3 + [1] * (width - 3)]
    for row in range(2):
        assert (
            prompts["input_ids"][row][prompts["attention_mask"][row].bool()].tolist()
            == train["input_ids"][row][train["attention_mask"][row].bool()].tolist()
        )


@needs_plugins
def test_generation_runs_from_the_left_padded_prompts_without_padding_warnings():
    mllm, tokenizer = plugin_model()
    token = mllm.config.modality_token_ids["vision"]
    bos = tokenizer.bos_token_id
    rows = [[bos] + [token] * 4 + [11, 12, 13], [bos] + [token] * 4 + [11]]  # two tokens shorter
    prompts = MultimodalProcessor.from_model(mllm, tokenizer).pad(rows, padding_side="left")
    inputs = {"vision": {"pixel_values": torch.randn(2, 3, 28, 28)}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = _generate(mllm, prompts, inputs, tokenizer, 3, _Timer(torch.device("cpu")))
    assert report["output_shape"] == [2, len(rows[0]) + 3]
    assert not [w for w in caught if "padding" in str(w.message).lower()]


def test_tokens_column_shows_every_item_when_counts_differ():
    assert tokens_cell([4, 4]) == "4"
    assert tokens_cell([150, 300, 75]) == "150, 300, 75"
    assert tokens_cell([150, 300], [150, 299]) == "150, 300 (plugin says 150, 299)"
    assert tokens_cell(None) is None


def test_missing_directory_exits_2(cli, tmp_path):
    assert_one_line_error(cli("test-run", tmp_path / "no-such-model"), "no-such-model", "no such directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(cli("test-run", empty, "--device", "cpu"), "no config.json")
    line = assert_one_line_error(
        cli("assemble", "--llm", "./no-such-llm-dir", "-e", "vision=toyvision:preset=tiny", "--dry-run")
    )
    assert "llm.source" in line and "not a directory" in line


def test_device_cuda_without_a_gpu_exits_2(cli, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    spec = tmp_path / "model.toml"
    spec.write_text('[llm]\nsource = "tiny"\n[encoders.vision]\nencoder = "toyvision"\npreset = "tiny"\n')
    assert_one_line_error(cli("test-run", spec, "--device", "cuda"), "--device cuda", "no CUDA device")
    assert_one_line_error(cli("test-run", spec, "--device", "tpu"), "--device")


def test_test_run_of_a_model_without_plugin_encoders_exits_2(cli, tmp_path):
    model, tokenizer = tiny_multimodal_model()  # transformers encoders, no plugin recipe
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    assert_one_line_error(cli("test-run", tmp_path / "m", "--device", "cpu"), "not built by a plugin")


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


def test_an_unknown_training_stage_exits_2_with_one_line(cli):
    assert_one_line_error(cli("test-run", "x.toml", "--train", "lora"), "--train")
