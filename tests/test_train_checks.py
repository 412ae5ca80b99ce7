"""``mmcore train`` fails before the first step, not after the last: the output directory and every
data line are checked first; runs never mix; non-finite steps stop (or are skipped) with the step and
samples named; a failed final save says where the last checkpoint is; 16-bit PNGs keep their grey."""

import errno
import json

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from mmcore.errors import DataError, NonFiniteError, SaveError
from mmcore.testing import tiny_multimodal_model
from mmcore.training import TrainConfig, train
from mmcore.training.data import DataFormatError, check_data, load_image


def invoke(*args):
    from mmcore.cli.app import build_app

    return CliRunner().invoke(build_app(), [str(a) for a in args])


def train_args(model_dir, data, out, *extra):
    return ["train", model_dir, "--data", data, "-o", out, "--batch-size", "2", "--steps", "1",
            "--no-progress", "--device", "cpu", *extra]  # fmt: skip


def test_output_that_is_a_file_fails_before_training(tmp_path, demo_start):
    model_dir, data = demo_start
    target = tmp_path / "out.txt"
    target.write_text("not a directory")
    result = invoke(*train_args(model_dir, data, target))
    assert result.exit_code == 2, result.output
    assert "expected a directory" in result.stderr and "training" not in result.stderr
    assert target.read_text() == "not a directory"


def test_bad_data_lines_are_listed_with_file_and_line_before_training(tmp_path, demo_start):
    model_dir, data = demo_start
    good = json.loads(data.read_text().splitlines()[0])
    image = str(data.parent / good["image"])
    bad = tmp_path / "bad.jsonl"
    lines = [
        json.dumps({**good, "image": image}),  # 1: fine
        '{"id": "x", "conversations": [',  # 2: not JSON
        json.dumps({**good, "image": 123}),  # 3: not a path
        json.dumps({"id": "s", "image": image, "conversations": ["<image> hi", "a circle"]}),  # 4: string turns
        json.dumps({**good, "image": "nowhere.png"}),  # 5: missing file
        json.dumps({**good, "image": [image, image]}),  # 6: one <image> marker, two items
    ]
    bad.write_text("\n".join(lines) + "\n")
    result = invoke(*train_args(model_dir, bad, tmp_path / "run"))
    assert result.exit_code == 2, result.output
    listed = [line for line in result.stderr.splitlines() if line.startswith(f"{bad}:")]
    assert [line.split(":")[1] for line in listed] == ["2", "3", "4", "5", "6"], result.stderr
    assert "not valid JSON" in listed[0] and "file path" in listed[1] and "turn 0" in listed[2]
    assert "missing image" in listed[3] and "2 items" in listed[4]
    assert "Traceback" not in result.output and "training" not in result.stderr
    assert not (tmp_path / "run").exists()
    with pytest.raises(DataError):
        from mmcore.cli.train import _check_data

        _check_data(bad, None)


def test_undecodable_image_is_a_problem_of_its_line(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    line = {"id": "b", "image": "broken.png", "conversations": [{"from": "human", "value": "<image>"},
                                                                    {"from": "gpt", "value": "x"}]}  # fmt: skip
    (tmp_path / "d.jsonl").write_text(json.dumps(line) + "\n")
    (problem,) = check_data(tmp_path / "d.jsonl")
    assert problem.startswith(f"{tmp_path / 'd.jsonl'}:1:") and "cannot read image" in problem


def test_check_data_only_checks(tmp_path, demo_start):
    model_dir, data = demo_start
    result = invoke(*train_args(model_dir, data, tmp_path / "run"), "--check-data")
    assert result.exit_code == 0, result.output
    assert "ok" in result.stdout and not (tmp_path / "run").exists()


def test_no_resume_into_an_older_run_is_refused_unless_overwrite(tmp_path, demo_start):
    model_dir, data = demo_start
    out = tmp_path / "run"
    assert invoke(*train_args(model_dir, data, out, "--save-every", "1")).exit_code == 0
    old = sorted((out / "checkpoints").glob("step-*"))
    assert old and (out / "model").is_dir()
    refused = invoke(*train_args(model_dir, data, out, "--no-resume"))
    assert refused.exit_code == 2 and "--overwrite" in refused.stderr and "older run" in refused.stderr
    assert sorted((out / "checkpoints").glob("step-*")) == old
    (old[0] / "marker").write_text("old run")
    fresh = invoke(*train_args(model_dir, data, out, "--no-resume", "--overwrite"))
    assert fresh.exit_code == 0, fresh.output
    assert not (out / "checkpoints").exists() and (out / "model").is_dir()
    assert invoke(*train_args(model_dir, data, out, "--save-every", "1", "--overwrite")).exit_code == 0
    again = invoke(*train_args(model_dir, data, out, "--overwrite"))  # --overwrite alone starts afresh too
    assert again.exit_code == 0 and "resumed from" not in again.output
    assert not (out / "checkpoints").exists()


class NaNSamples(torch.utils.data.Dataset):
    """Token-only samples with ids (the ids are what a non-finite error names)."""

    def __init__(self, n=4):
        self.records = [{"id": f"s{i}"} for i in range(n)]

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        return torch.tensor([1, 2, 3, 4])

    def collate(self, samples):
        ids = torch.stack(samples)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _poisoned(model):
    """The language model's embeddings give NaN: every loss is NaN."""
    embeddings = model.language_model.get_input_embeddings()
    embeddings.register_forward_hook(lambda module, args, out: out * float("nan"))
    return model


def test_non_finite_loss_stops_naming_the_step_and_samples_and_saves_nothing(tmp_path):
    model, _ = tiny_multimodal_model()
    _poisoned(model)
    data = NaNSamples()
    config = TrainConfig(output_dir=str(tmp_path), stage="finetune", max_steps=2, batch_size=2, lr=1e-2,
                         progress=False, device="cpu")  # fmt: skip
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(NonFiniteError) as caught:
        train(model, data, data.collate, config, console=Console(quiet=True))
    assert caught.value.step == 1 and "step 1" in str(caught.value)
    assert len(caught.value.samples) == 2 and all(s in str(caught.value) for s in map(repr, caught.value.samples))
    assert not (tmp_path / "model").exists()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_skip_nonfinite_skips_and_counts(tmp_path):
    model, _ = tiny_multimodal_model()
    _poisoned(model)
    data = NaNSamples()
    config = TrainConfig(output_dir=str(tmp_path), stage="finetune", max_steps=2, batch_size=2, lr=1e-2,
                         progress=False, device="cpu", skip_nonfinite=True)  # fmt: skip
    console = Console(record=True, width=200)
    result = train(model, data, data.collate, config, console=console)
    assert result.skipped == [1, 2]
    assert "2 step(s) skipped" in console.export_text()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_waveform_stops_the_cli_with_exit_2(tmp_path, demo_start):
    from mmcore.demo import make_dataset

    model_dir, _ = demo_start
    data = make_dataset(tmp_path / "data", 1, seed=0, name="train")
    records = [json.loads(line) for line in data.read_text().splitlines()]
    audio = [r for r in records if "audio" in r][:2]
    data.write_text("".join(json.dumps(r) + "\n" for r in audio))
    import mmcore.training.data as data_module

    real = data_module.load_audio

    def nan_audio(path):
        waveform, rate = real(path)
        return waveform * float("nan"), rate

    from unittest import mock

    with mock.patch.dict(data_module.LOADERS, {"audio": nan_audio}):
        result = invoke(*train_args(model_dir, data, tmp_path / "run"))
    assert result.exit_code == 2, result.output
    assert "step 1" in result.stderr and all(r["id"] in result.stderr for r in audio)
    assert not (tmp_path / "run" / "model").exists()


def test_16_bit_png_decodes_to_mid_grey(tmp_path):
    import numpy as np
    from PIL import Image

    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    pixels = np.asarray(load_image(tmp_path / "grey16.png"))
    assert pixels.shape == (8, 8, 3) and np.all(np.abs(pixels.astype(int) - 128) <= 1)


def test_decompression_bomb_and_undecodable_audio_are_one_typed_line(tmp_path, monkeypatch):
    from PIL import Image

    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    with pytest.raises(DataFormatError, match="too large"):
        load_image(tmp_path / "big.png")

    import builtins

    from mmcore.training.data import load_audio

    (tmp_path / "clip.mp3").write_bytes(b"ID3 not audio")
    real_import = builtins.__import__

    def no_torchaudio(name, *args, **kwargs):
        if name == "torchaudio":
            raise ImportError("torchcodec is required")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchaudio)
    with pytest.raises(DataFormatError, match="torchcodec") as caught:
        load_audio(tmp_path / "clip.mp3")
    assert "\n" not in str(caught.value)


def test_failed_final_save_names_the_last_checkpoint(tmp_path, monkeypatch):
    from mmcore.training import loop

    model, _ = tiny_multimodal_model()
    data = NaNSamples()
    config = TrainConfig(output_dir=str(tmp_path), stage="align", max_steps=2, batch_size=2, save_every=1,
                         progress=False, device="cpu")  # fmt: skip

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(loop, "save_model", full_disk)
    with pytest.raises(SaveError) as caught:
        train(model, data, data.collate, config, console=Console(quiet=True))
    last = tmp_path / "checkpoints" / "step-0000002"
    assert str(last) in str(caught.value) and "No space left" in str(caught.value)
    assert (last / "trainer_state.json").is_file()


def test_train_help_lists_every_config_option_with_its_help():
    """The options come from TrainConfig's field metadata: each flag is listed with its help line, and
    the command-line defaults build the dataclass's own defaults."""
    import dataclasses

    from mmcore.cli.app import build_app
    from mmcore.training.config import TrainConfig as Config
    from mmcore.training.config import cli_options, config_from_cli

    result = CliRunner().invoke(build_app(), ["train", "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0
    options = cli_options()
    assert {o.name for o in options} == {f.name for f in dataclasses.fields(Config)} - {"save_final"}
    for opt in options:
        assert opt.help and opt.help in result.stdout, opt.name
        for flag in opt.flags:
            for name in flag.split("/"):
                assert name in result.stdout, name
    for flag in ("--data", "--train-on", "--media", "--check-data", "--overwrite", "--trust-remote-code"):
        assert flag in result.stdout
    defaults = config_from_cli({o.name: o.default for o in options})
    assert defaults == Config(output_dir="mmcore-train")
    assert config_from_cli({**{o.name: o.default for o in options}, "max_grad_norm": 0.0}).max_grad_norm is None


def test_resuming_into_a_finished_model_without_checkpoints_is_refused(tmp_path, demo_start):
    """The default --resume into an OUTPUT whose model/ has no checkpoint beside it would overwrite that
    model with a fresh run's: one line, exit 2, naming --overwrite and -o; the model stays as it was."""
    model_dir, data = demo_start
    out = tmp_path / "run"
    assert invoke(*train_args(model_dir, data, out)).exit_code == 0  # no --save-every: no checkpoints
    weights = {p.name: p.read_bytes() for p in (out / "model").iterdir() if p.is_file()}
    refused = invoke(*train_args(model_dir, data, out))
    assert refused.exit_code == 2, refused.output
    line = refused.stderr.strip()
    assert "\n" not in line and "finished model" in line and "--overwrite" in line and "-o" in line
    assert {p.name: p.read_bytes() for p in (out / "model").iterdir() if p.is_file()} == weights
    replaced = invoke(*train_args(model_dir, data, out, "--overwrite"))
    assert replaced.exit_code == 0, replaced.output


def test_output_that_is_a_broken_link_or_holds_a_file_named_checkpoints_is_one_line(tmp_path, demo_start):
    model_dir, data = demo_start
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "gone")
    result = invoke(*train_args(model_dir, data, link))
    assert result.exit_code == 2 and "does not exist" in result.stderr and "Traceback" not in result.output
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("not a directory")
    result = invoke(*train_args(model_dir, data, out, "--save-every", "1"))
    assert result.exit_code == 2 and "not a directory" in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize("how", ["oserror", "dcp"])
def test_a_checkpoint_that_cannot_be_written_is_a_save_error_naming_the_last_one(tmp_path, monkeypatch, how):
    """A full disk at a checkpoint: a SaveError (the CLI's one line, exit 2) naming the step and the
    last checkpoint left, whether the OSError comes bare or collected by torch.distributed.checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    model, _ = tiny_multimodal_model()
    data = NaNSamples()
    config = TrainConfig(output_dir=str(tmp_path), stage="align", max_steps=3, batch_size=2, save_every=1,
                         progress=False, device="cpu")  # fmt: skip
    real_save, calls = dcp.save, []

    def fills_up(*args, **kwargs):
        calls.append(1)
        if len(calls) < 2:
            return real_save(*args, **kwargs)
        error = OSError(errno.ENOSPC, "No space left on device")
        if how == "oserror":
            raise error
        raise CheckpointException("failed", {0: (error, None)})

    monkeypatch.setattr(dcp, "save", fills_up)
    with pytest.raises(SaveError) as caught:
        train(model, data, data.collate, config, console=Console(quiet=True))
    message = str(caught.value)
    assert "step 2" in message and "No space left" in message
    assert str(tmp_path / "checkpoints" / "step-0000001") in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000001"]
