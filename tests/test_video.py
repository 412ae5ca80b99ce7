"""Video as items of frames for image towers: ``build_encoder("clip" | "siglip", video=True)`` runs every
frame through the tower and pools each frame's grid (the built-in ``video_frames`` / ``video_pool``
callbacks); the processor takes a ``(frames, H, W, 3)`` array or a tuple of frames and counts each
video's tokens exactly (videos of different lengths in one batch); the pooling is transformers'
LLaVA-OneVision ``apply_pooling``; the encoder keeps the plugin contract and saves/loads; ``mmcore
train``'s JSONL takes ``"video"`` items (a ``.npy`` array or a directory of frames)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from plugin_marks import needs_plugins

pytestmark = needs_plugins("clip", "siglip")


def videos():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (3, 50, 40, 3), dtype=np.uint8)  # one array
    frames = tuple(rng.integers(0, 256, (30, 60, 3), dtype=np.uint8) for _ in range(2))  # a tuple of frames
    return [array, frames]


def video_model(plugin: str = "clip"):
    from mmcore import MultimodalModel, build_encoder
    from mmcore.processing import MultimodalProcessor
    from mmcore.testing import tiny_llm, tiny_tokenizer

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    mllm = MultimodalModel(
        encoders={"video": build_encoder(plugin, preset="tiny", video=True)},
        language_model=tiny_llm(vocab_size=len(tokenizer)),
        init_projector_type="mlp2x_gelu",
    ).eval()
    return mllm, MultimodalProcessor.from_model(mllm, tokenizer)


@pytest.mark.parametrize("plugin", ["clip", "siglip"])
@torch.no_grad()
def test_each_video_costs_its_frames_and_counts_are_exact(plugin):
    from mmcore.builtin.video import VideoFrames, VideoPool

    mllm, processor = video_model(plugin)
    encoder = mllm.encoders["video"]
    assert isinstance(encoder.preprocess_callback, VideoFrames)
    assert isinstance(encoder.postprocess_projector_callback, VideoPool)
    batch = processor(["<video> what happens?", "and <video>"], video=videos(), padding_side="left")
    assert batch["pixel_values"].shape[:2] == (2, 3) and batch["num_frames"].tolist() == [3, 2]
    features = encoder(pixel_values=batch["pixel_values"], num_frames=batch["num_frames"])
    per_frame = encoder.postprocess_projector_callback.tokens_per_frame()
    assert [f.shape[0] for f in features] == [3 * per_frame, 2 * per_frame]
    placeholders = (batch["input_ids"] == processor.token_ids["video"]).sum(1).tolist()
    assert placeholders == [3 * per_frame, 2 * per_frame]
    # the padded frame of the shorter video changes nothing: each video alone gives its own features
    for i, video in enumerate(videos()):
        alone = processor(["<video>"], video=[video])
        (single,) = encoder(pixel_values=alone["pixel_values"], num_frames=alone["num_frames"])
        torch.testing.assert_close(single, features[i], rtol=0, atol=1e-6)
    assert mllm(**batch).logits.shape[:2] == batch["input_ids"].shape


@pytest.mark.parametrize("side", [3, 4, 27])
def test_video_pool_is_llava_onevisions_apply_pooling(side):
    from types import SimpleNamespace

    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    from mmcore.builtin.video import VideoPool

    pool = VideoPool(image_size=side * 14, patch_size=14)
    features = torch.randn(5, side * side, 8)
    shell = SimpleNamespace(
        config=SimpleNamespace(vision_config=SimpleNamespace(image_size=side * 14, patch_size=14))
    )
    expected = LlavaOnevisionModel.apply_pooling(shell, features)
    assert torch.equal(pool.pool(features), expected)
    assert expected.shape[1] == pool.tokens_per_frame() == math.ceil(side / 2) ** 2
    assert VideoPool(384, 14).tokens_per_frame() == 14 * 14  # OneVision's SigLIP: 27x27 patches at 384 px
    average = VideoPool(side * 14, 14, mode="average").pool(features)
    assert average.shape == expected.shape and not torch.equal(average, expected)


def test_video_encoder_keeps_the_contract(tmp_path):
    from mmcore.testing import check_encoder_plugin

    check_encoder_plugin("clip", options={"video": True}, tmp_path=tmp_path)


@torch.no_grad()
def test_video_model_saves_and_loads_with_its_processor(tmp_path):
    from mmcore import MultimodalModel
    from mmcore.processing import MultimodalProcessor

    mllm, processor = video_model()
    mllm.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    recipe = json.loads((tmp_path / "config.json").read_text())["encoders"]["video"]["source"]["recipe"]
    assert recipe["options"]["video"] is True and recipe["options"]["video_stride"] == 2
    loaded = MultimodalModel.from_pretrained(tmp_path).eval()
    again = MultimodalProcessor.from_pretrained(tmp_path)
    batch = processor(["<video> hi", "a <video>"], video=videos(), padding_side="left")
    batch2 = again(["<video> hi", "a <video>"], video=videos(), padding_side="left")
    assert torch.equal(batch["input_ids"], batch2["input_ids"])
    assert torch.equal(loaded(**batch2).logits, mllm(**batch).logits)


def test_image_recipes_stay_as_they_were_and_bad_options_are_typed():
    from mmcore import build_encoder
    from mmcore.errors import ConfigError

    image = build_encoder("clip", preset="tiny")
    assert "video" not in image.source["recipe"]["options"] and image.additional_args == ()
    with pytest.raises(ConfigError, match="drop_cls=True"):
        build_encoder("clip", preset="tiny", video=True, drop_cls=False)
    with pytest.raises(ConfigError, match="video_stride needs video=True"):
        build_encoder("clip", preset="tiny", video_stride=2)
    with pytest.raises(ConfigError, match="video_stride must be a positive int"):
        build_encoder("clip", preset="tiny", video=True, video_stride=0)


def test_processor_rejects_what_is_not_a_video():
    from mmcore.errors import EncoderInputError

    _, processor = video_model()
    with pytest.raises(EncoderInputError, match=r"video 0 must be a \(frames, H, W, 3\) uint8 array"):
        processor(["<video>"], video=[np.zeros((2, 8, 8, 3), dtype=np.float32)])
    with pytest.raises(EncoderInputError, match="frame 1 must be a PIL image"):
        processor(["<video>"], video=[(np.zeros((8, 8, 3), dtype=np.uint8), "frame")])


def test_load_video_reads_arrays_and_frame_directories(tmp_path):
    from PIL import Image

    from mmcore.errors import DataFormatError
    from mmcore.training.data import LOADERS

    array = videos()[0]
    np.save(tmp_path / "clip.npy", array)
    assert np.array_equal(LOADERS["video"](tmp_path / "clip.npy"), array)
    (tmp_path / "frames").mkdir()
    for i, frame in enumerate(array):
        Image.fromarray(frame).save(tmp_path / "frames" / f"{i:03d}.png")
    frames = LOADERS["video"](tmp_path / "frames")
    assert isinstance(frames, tuple) and [np.asarray(f).tolist() for f in frames] == array.tolist()
    (tmp_path / "clip.mp4").write_bytes(b"not decoded")
    with pytest.raises(DataFormatError, match="decord, torchvision.io.read_video or PyAV"):
        LOADERS["video"](tmp_path / "clip.mp4")
    np.save(tmp_path / "bad.npy", np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(DataFormatError, match=r"expected a \(frames, H, W, 3\) uint8 array"):
        LOADERS["video"](tmp_path / "bad.npy")


def test_jsonl_video_items_train_a_step(tmp_path):
    from PIL import Image

    from mmcore.training import ConversationDataset, MultimodalCollator
    from mmcore.training.data import check_data, registered_loaders

    array = videos()[0]
    np.save(tmp_path / "a.npy", array)
    (tmp_path / "b").mkdir()
    for i, frame in enumerate(array[:2]):
        Image.fromarray(frame).save(tmp_path / "b" / f"{i}.jpg")
    records = [
        {"id": "a", "video": "a.npy", "conversations": [{"from": "human", "value": "<video>\nwhat?"}, {"from": "gpt", "value": "a"}]},
        {"id": "b", "video": "b", "conversations": [{"from": "human", "value": "<video> and?"}, {"from": "gpt", "value": "b"}]},
    ]  # fmt: skip
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    loaders = registered_loaders()
    assert check_data(data, loaders=loaders) == []
    dataset = ConversationDataset(data, loaders=loaders)
    mllm, processor = video_model()
    dataset.check_modalities(processor.modalities)
    batch = MultimodalCollator(processor)([dataset[0], dataset[1]])
    assert batch["num_frames"].tolist() == [3, 2]
    mllm.train()
    loss = mllm(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and mllm.encoders["video"].projector.projection[0].weight.grad is not None


@torch.no_grad()
def test_a_batch_of_videos_only_runs_on_a_model_with_an_image_encoder_too():
    from mmcore import MultimodalModel, build_encoder
    from mmcore.processing import MultimodalProcessor
    from mmcore.testing import tiny_llm, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    mllm = MultimodalModel(
        encoders={
            "vision": build_encoder("clip", preset="tiny"),
            "video": build_encoder("clip", preset="tiny", video=True),
        },
        language_model=tiny_llm(vocab_size=len(tokenizer)),
    ).eval()
    processor = MultimodalProcessor.from_model(mllm, tokenizer)
    batch = processor(["<video> hi"], video=videos()[:1])  # both encoders take pixel_values: nested
    assert set(batch["encoder_inputs"]) == {"video"} and "pixel_values" not in batch
    assert mllm(**batch).logits.shape[:2] == batch["input_ids"].shape


def test_cli_assembles_a_video_encoder_and_trains_it_from_jsonl(tmp_path):
    from typer.testing import CliRunner

    from mmcore.cli import app as cli_app

    def run(*args):
        return CliRunner().invoke(cli_app.build_app(), [str(a) for a in args])

    model_dir = tmp_path / "model"
    result = run("assemble", "--llm", "tiny", "-e", "video=clip:preset=tiny", "--set", "encoders.video.options.video=true",
                 "-o", model_dir)  # fmt: skip
    assert result.exit_code == 0, result.output
    recipe = json.loads((model_dir / "config.json").read_text())["encoders"]["video"]["source"]["recipe"]
    assert recipe["options"]["video"] is True
    np.save(tmp_path / "a.npy", videos()[0])
    record = {
        "video": "a.npy",
        "conversations": [{"from": "human", "value": "<video> what?"}, {"from": "gpt", "value": "a"}],
    }
    (tmp_path / "data.jsonl").write_text(json.dumps(record) + "\n")
    result = run("train", model_dir, "--data", tmp_path / "data.jsonl", "--steps", 1, "--batch-size", 1,
                 "-o", tmp_path / "run")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert any((tmp_path / "run").iterdir())  # the run wrote its model / checkpoint


@torch.no_grad()
def test_an_image_and_a_video_encoder_can_share_one_tower_through_save_and_load(tmp_path):
    from safetensors import safe_open

    from mmcore import MultimodalModel, build_encoder
    from mmcore.testing import tiny_llm, tiny_tokenizer

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    image, video = build_encoder("clip", preset="tiny"), build_encoder("clip", preset="tiny", video=True)
    video.module = image.module  # one tower for both, as LLaVA-OneVision
    mllm = MultimodalModel(
        encoders={"vision": image, "video": video}, language_model=tiny_llm(vocab_size=len(tokenizer))
    ).eval()
    video.projector = image.projector
    mllm.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert not [k for k in f.keys() if k.startswith("encoders.video.")]
    loaded = MultimodalModel.from_pretrained(tmp_path).eval()
    assert loaded.encoders["video"].module is loaded.encoders["vision"].module
    assert loaded.encoders["video"].projector is loaded.encoders["vision"].projector
    pixels = torch.randn(1, 2, 3, 28, 28)
    torch.testing.assert_close(loaded.encoders["video"](pixel_values=pixels)[0], mllm.encoders["video"](pixel_values=pixels)[0],
                               rtol=0, atol=0)  # fmt: skip
