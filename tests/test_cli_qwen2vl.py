"""The Qwen2-VL towers through the CLI: ``mmcore train`` reads a JSONL record's ``"image"`` and
``"video"`` items into the encoders that read them (each encoder's ``data_key_for`` its recipe, so a
``video=True`` tower takes videos), with a plain LLM and with a Qwen2-VL text LLM preset, which
``mmcore assemble`` gives the ``mrope`` callback (counted by ``--dry-run``, run by ``test-run``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from plugin_marks import needs_plugins

pytestmark = needs_plugins("qwen2vl")

QWEN2VL = ["-e", "image=qwen2_vl:preset=tiny", "-e", "video=qwen2_vl:preset=tiny",
           "--set", "encoders.video.options.video=true"]  # fmt: skip


def write_data(root):
    """Six records, two of each kind: an image, an image and a video, a video (images of two sizes)."""
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
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records * 2))
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


@pytest.mark.parametrize(
    "llm, options",
    [("tiny", []), ("tiny-qwen2-vl", []), ("tiny-qwen2.5-vl", ["--pack-to", 256])],
    ids=["llama", "qwen2-vl-mrope", "qwen2.5-vl-mrope-packed"],
)
def test_train_from_jsonl_reads_images_and_videos_into_their_encoders(
    cli, tmp_path, monkeypatch, llm, options
):
    from mmcore import MultimodalModel
    from mmcore.builtin.mrope import MRope

    packed_rows = []  # the samples per row of each packed batch the callback positioned
    positions = MRope._packed_rope_index

    def spy(self, ids, rows, *grids):
        packed_rows.append(rows)
        return positions(self, ids, rows, *grids)

    monkeypatch.setattr(MRope, "_packed_rope_index", spy)

    data = write_data(tmp_path)
    model_dir = tmp_path / "model"
    encoders = [e.replace("qwen2_vl:", "qwen2_5_vl:") for e in QWEN2VL] if "2.5" in llm else QWEN2VL
    result = cli("assemble", "--llm", llm, *encoders, "-o", model_dir)
    assert result.exit_code == 0, result.output
    result = cli("train", model_dir, "--data", data, "--steps", 3, "--batch-size", 2, "--stage", "full",
                 "--lr", 1e-2, "-o", tmp_path / "run", *options)  # fmt: skip
    assert result.exit_code == 0, result.output
    before = MultimodalModel.from_pretrained(model_dir).state_dict()
    trained = MultimodalModel.from_pretrained(tmp_path / "run" / "model")
    assert isinstance(trained.preprocess_llm_callback, MRope) == (llm != "tiny")
    assert bool(packed_rows) == bool(options) and all(len(r) == 2 for rows in packed_rows for r in rows)
    after = trained.state_dict()
    for part in ("encoders.image.module.", "encoders.video.module.", "encoders.image.projector.",
                 "encoders.video.projector."):  # fmt: skip
        changed = [k for k in before if k.startswith(part) and not torch.equal(before[k], after[k])]
        assert changed, f"{part} did not train: its items never reached it"


def test_assemble_gives_a_qwen2_vl_text_llm_the_mrope_callback_and_dry_run_counts_it(cli, tmp_path):
    from mmcore import MultimodalModel
    from mmcore.builtin.mrope import MRope

    real = ["-e", "image=qwen2_vl:preset=qwen2-vl-7b", "-e", "video=qwen2_vl:preset=qwen2-vl-7b",
            "--set", "encoders.video.options.video=true"]  # fmt: skip
    result = cli("assemble", "--llm", "qwen2-vl-7b", *real, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["preprocess_llm_callback"] == "mrope"
    assert any("mrope" in note for note in report["notes"])
    assert report["llm_params"] == 7_615_616_512  # Qwen2-VL-7B's language model, lm_head untied
    # another LLM keeps what it had: no callback (the towers' tokens take its 1-D positions)
    result = cli("assemble", "--llm", "qwen2-7b", *real, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["preprocess_llm_callback"] is None
    result = cli("assemble", "--llm", "tiny-qwen2-vl", *QWEN2VL, "-o", tmp_path / "model", "--json")
    assert result.exit_code == 0, result.output
    ids = json.loads(result.output)["modality_token_ids"]
    callback = MultimodalModel.from_pretrained(tmp_path / "model").preprocess_llm_callback
    assert isinstance(callback, MRope) and callback.family == "qwen2_vl"
    assert (callback.image_token_id, callback.video_token_id) == (ids["image"], ids["video"])


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_test_run_of_an_assembly_file_runs_the_mrope_callback(cli, tmp_path, monkeypatch, family):
    from mmcore.builtin.mrope import MRope

    llm = "tiny-qwen2-vl" if family == "qwen2_vl" else "tiny-qwen2.5-vl"
    (tmp_path / "model.toml").write_text(f"""
[llm]
source = "{llm}"

[encoders.image]
encoder = "{family}"
preset = "tiny"

[encoders.video]
encoder = "{family}"
preset = "tiny"
options = {{ video = true }}
""")
    seen = []  # the positions each call gives the language model
    call = MRope.__call__
    monkeypatch.setattr(MRope, "__call__", lambda self, **kw: seen.append(out := call(self, **kw)) or out)
    result = cli("test-run", tmp_path / "model.toml", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["ok"] is True
    prefill = [out["position_ids"] for out in seen if out is not None]
    assert prefill and all(p.dim() == 3 and p.shape[0] == 4 for p in prefill)
    # the vision tokens' 3-D positions differ from the text ones: the grids reached the callback
    assert any((p[1:] != p[:1]).any() for p in prefill)


def test_an_image_only_model_exports_with_its_mrope_ids_checked(cli, tmp_path):
    from mmcore import MultimodalModel
    from mmcore.errors import ConfigError

    result = cli("assemble", "--llm", "tiny-qwen2-vl", "-e", "image=qwen2_vl:preset=tiny", "-o", tmp_path / "model")
    assert result.exit_code == 0, result.output
    model = MultimodalModel.from_pretrained(tmp_path / "model")
    assert type(model.to_hf()).__name__ == "Qwen2VLForConditionalGeneration"
    model.preprocess_llm_callback.image_token_id += 1  # the callback's image id is not the model's
    with pytest.raises(ConfigError, match="mrope's token ids"):
        model.to_hf()
