"""The Qwen2-VL towers through the CLI: ``mmcore train`` reads a JSONL record's ``"image"`` and
``"video"`` items into the encoders that read them (each encoder's ``data_key_for`` its recipe, so a
``video=True`` tower takes videos), with a plain LLM and with a Qwen2-VL text LLM preset, which
``mmcore assemble`` gives the ``mrope`` callback (counted by ``--dry-run``, run by ``test-run``)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mmcore_plugin_qwen2vl") is None,
    reason="needs mmcore-plugin-qwen2vl installed (make test puts it on the path)",
)

QWEN2VL = ["-e", "image=qwen2_vl:preset=tiny", "-e", "video=qwen2_vl:preset=tiny",
           "--set", "encoders.video.options.video=true"]  # fmt: skip


def run(*args):
    from typer.testing import CliRunner

    from mmcore.cli import app as cli_app

    return CliRunner().invoke(cli_app.build_app(), [str(a) for a in args])


def write_data(root):
    """Three records: an image, an image and a video, a video (images of two sizes)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(root / "a.png")
    Image.fromarray(rng.integers(0, 256, (24, 16, 3), dtype=np.uint8)).save(root / "b.png")
    np.save(root / "v.npy", rng.integers(0, 256, (4, 16, 8, 3), dtype=np.uint8))

    def turns(question, answer):
        return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]

    records = [
        {"image": "a.png", "conversations": turns("<image> what is it?", "a cat")},
        {"image": "b.png", "video": "v.npy", "conversations": turns("<image> and <video>: the same?", "no , a dog")},
        {"video": "v.npy", "conversations": turns("<video> what moves?", "a bird")},
    ]  # fmt: skip
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root / "data.jsonl"


def test_media_keys_follow_the_encoders_that_read_them():
    from mmcore import MultimodalModel, build_encoder
    from mmcore.testing import tiny_llm
    from mmcore.training.data import LOADERS, media_keys_for

    model = MultimodalModel(
        {"photo": build_encoder("qwen2_vl", preset="tiny"), "clip": build_encoder("qwen2_vl", preset="tiny", video=True)},
        tiny_llm(hidden_size=64),
    )  # fmt: skip
    assert media_keys_for(model, LOADERS) == {"image": "photo", "video": "clip", "audio": "audio"}
    two_readers = MultimodalModel(
        {"a": build_encoder("qwen2_vl", preset="tiny"), "b": build_encoder("qwen2_vl", preset="tiny")},
        tiny_llm(hidden_size=64),
    )
    assert media_keys_for(two_readers, LOADERS)["image"] == "vision"  # ambiguous: the default stays


@pytest.mark.parametrize("llm", ["tiny"])
def test_train_from_jsonl_reads_images_and_videos_into_their_encoders(tmp_path, llm):
    from mmcore import MultimodalModel

    data = write_data(tmp_path)
    model_dir = tmp_path / "model"
    result = run("assemble", "--llm", llm, *QWEN2VL, "-o", model_dir)
    assert result.exit_code == 0, result.output
    result = run("train", model_dir, "--data", data, "--steps", 3, "--batch-size", 1, "--stage", "full",
                 "--lr", 1e-2, "-o", tmp_path / "run")  # fmt: skip
    assert result.exit_code == 0, result.output
    before = MultimodalModel.from_pretrained(model_dir).state_dict()
    after = MultimodalModel.from_pretrained(tmp_path / "run" / "model").state_dict()
    for part in ("encoders.image.module.", "encoders.video.module.", "encoders.image.projector.",
                 "encoders.video.projector."):  # fmt: skip
        changed = [k for k in before if k.startswith(part) and not torch.equal(before[k], after[k])]
        assert changed, f"{part} did not train: its items never reached it"
