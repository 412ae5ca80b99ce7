"""Bad model directories: each is a typed `CheckpointError` from the API and one line, exit 2, from the CLI."""

import json
import os
import re

import pytest
import torch
from typer.testing import CliRunner

from mmcore.cli import app as cli_app
from mmcore.errors import CheckpointError
from mmcore.modeling.multimodal import MultimodalModel


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from mmcore.testing import tiny_multimodal_model

    model, tokenizer = tiny_multimodal_model()
    path = tmp_path_factory.mktemp("base") / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _copy(saved, tmp_path):
    import shutil

    target = tmp_path / "model"
    shutil.copytree(saved, target)
    return target


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ.get("MMCORE_EVIL_MARK", "/nonexistent/x"),))


def _truncate(d):
    p = d / "model.safetensors"
    os.truncate(p, p.stat().st_size // 2)


def _header_too_large(d):
    p = d / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[:8] = (2**40).to_bytes(8, "little")
    p.write_bytes(bytes(data))


def _truncate_config(d):
    text = (d / "config.json").read_text()
    (d / "config.json").write_text(text[: len(text) // 2])


def _pickle(d):
    (d / "model.safetensors").unlink()
    torch.save({"x": _Evil()}, d / "pytorch_model.bin")


def _sizes(d):
    config = json.loads((d / "config.json").read_text())
    config["text_config"]["intermediate_size"] += 8
    (d / "config.json").write_text(json.dumps(config))


CASES = {
    "truncated-safetensors": (_truncate, "safetensors"),
    "corrupt-header": (_header_too_large, "header too large"),
    "truncated-config": (_truncate_config, "config.json"),
    "malicious-pickle": (_pickle, "pytorch_model.bin"),
    "size-mismatch": (_sizes, r"do not match config.json \(language_model\..*mlp.*: .*size mismatch"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_model_directory_is_a_typed_error_and_one_line_exit_2(saved, tmp_path, case, monkeypatch, capfd):
    corrupt, needle = CASES[case]
    d = _copy(saved, tmp_path)
    mark = tmp_path / "ran"
    monkeypatch.setenv("MMCORE_EVIL_MARK", str(mark))
    corrupt(d)
    with pytest.raises(CheckpointError, match=needle):
        MultimodalModel.from_pretrained(d)
    result = CliRunner().invoke(cli_app.build_app(), ["test-run", str(d), "--device", "cpu"])
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ") and re.search(needle, lines[0]), lines[0]
    assert "LOAD REPORT" not in capfd.readouterr().err  # transformers' table is held back on a failed load
    assert not mark.exists()  # the pickle's payload never ran


def test_a_load_that_works_still_shows_transformers_report(saved, tmp_path):
    import logging

    from safetensors.torch import load_file, save_file

    d = _copy(saved, tmp_path)
    weights = load_file(d / "model.safetensors")
    weights["encoders.vision.leftover.weight"] = torch.zeros(2)
    save_file(weights, d / "model.safetensors", metadata={"format": "pt"})
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        MultimodalModel.from_pretrained(d)
    finally:
        logger.removeHandler(handler)
    assert any("LOAD REPORT" in m and "encoders.vision.leftover.weight" in m for m in seen), seen


def test_truncated_processor_config_is_a_typed_error_naming_the_file(tmp_path):
    from mmcore.processing import MultimodalProcessor
    from mmcore.testing import tiny_multimodal_model

    model, _ = tiny_multimodal_model()
    (tmp_path / "processor_config.json").write_text('{"processor_class": "MultimodalPro')
    with pytest.raises(CheckpointError, match="processor_config.json"):
        MultimodalProcessor.from_pretrained(tmp_path, model)


def test_training_forward_with_placeholders_but_no_inputs_is_a_typed_error():
    import torch

    from mmcore.errors import EncoderInputError
    from mmcore.testing import tiny_multimodal_model

    mllm, tokenizer = tiny_multimodal_model()
    image = mllm.config.modality_token_ids["vision"]
    input_ids = torch.tensor([[tokenizer.bos_token_id] + [image] * 4 + [11, 12]])
    mllm.train()
    with pytest.raises(EncoderInputError, match=r"vision: input_ids hold 4 vision placeholder tokens but no vision inputs"):
        mllm(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=input_ids)
    # with the images, it trains; evaluation and generation without images keep HF's behaviour
    out = mllm(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=input_ids,
               pixel_values=torch.randn(1, 3, 28, 28))  # fmt: skip
    assert torch.isfinite(out.loss)
    mllm.eval()
    with torch.no_grad():
        assert torch.isfinite(mllm(input_ids=input_ids, labels=input_ids).loss)
