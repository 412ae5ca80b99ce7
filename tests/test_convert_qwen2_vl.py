"""Qwen2-VL and Qwen2.5-VL in and out: a transformers directory converts to an mmcore model sharing its
modules (an image and a video encoder on one tower, the merger as the projector, M-RoPE through the
``mrope`` preprocess_llm callback), with equal logits and greedy generations on a left-padded batch of
two (images of two sizes and a short video), the processor's batch equal to ``Qwen2VLProcessor``'s;
and back (HF -> mmcore -> HF bit-exact; ``mmcore export`` loads with no mmcore importable and gives
equal logits)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from plugin_marks import needs_plugins

from mmcore.convert.testing import (
    assert_bit_exact,
    assert_same_outputs,
    assert_same_tensors,
    random_images,
    save_and_load,
)

pytestmark = needs_plugins("qwen2vl")

ATOL = 1e-5
IMAGE, VIDEO = "<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>"
PROMPTS = [f"user: {IMAGE} what is this? assistant:", f"user: compare {IMAGE} with {VIDEO} please assistant:"]
IMAGE_SIZES = [(16, 24), (28, 20)]  # (h, w): resized to 16x24 and 32x16, 6 and 8 tokens (8 px per token)
#: config fields that decide what the model computes or how its inputs are made
CONFIG_FIELDS = ("image_token_id", "video_token_id", "tie_word_embeddings")


def images():
    return random_images(IMAGE_SIZES)


def video():
    return np.random.default_rng(1).integers(
        0, 256, (4, 16, 16, 3), dtype=np.uint8
    )  # 2 x 4 x 4 patches: 8 tokens


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def source(request, tmp_path_factory):
    from mmcore.convert.testing import convert_saved, tiny_qwen2_vl

    hf, processor = tiny_qwen2_vl(request.param)
    path = tmp_path_factory.mktemp(request.param)
    return {"family": request.param,
            **convert_saved(hf, processor, path, text=PROMPTS, images=images(), videos=[video()])}  # fmt: skip


def test_the_batch_has_left_padding_two_image_sizes_and_a_video(source):
    batch = source["batch"]
    assert batch["image_grid_thw"].tolist() == [[1, 4, 6], [1, 8, 4]]
    assert batch["video_grid_thw"].tolist() == [[2, 4, 4]]
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][:, -1].all()  # row 0 is left-padded


def test_logits_and_greedy_generations_equal_transformers(source):
    assert_same_outputs(source["mllm"], source["hf"], source["batch"], atol=ATOL)


@torch.no_grad()
def test_without_the_3d_positions_the_logits_differ(source):
    """The test above would catch M-RoPE missing: 1-D positions change the logits."""
    mllm, batch = source["mllm"], source["batch"]
    callback, mllm.preprocess_llm_callback = mllm.preprocess_llm_callback, None
    try:
        plain = mllm(**batch).logits
    finally:
        mllm.preprocess_llm_callback = callback
    assert (plain - source["hf"](**batch).logits).abs().max() > 1e-3


def test_the_conversion_holds_the_checkpoints_modules(source):
    from mmcore import MultimodalModel
    from mmcore.builtin.mrope import MRope

    hf = source["hf"]
    mllm = MultimodalModel.from_hf(hf)  # in memory
    image, video = mllm.encoders["image"], mllm.encoders["video"]
    assert image.module is video.module and image.projector is video.projector  # one tower, as transformers'
    assert image.module.blocks is hf.model.visual.blocks
    assert image.projector.projection.mlp is hf.model.visual.merger.mlp
    assert mllm.language_model.model is hf.model.language_model and mllm.language_model.lm_head is hf.lm_head
    assert (
        isinstance(mllm.preprocess_llm_callback, MRope)
        and mllm.preprocess_llm_callback.family == source["family"]
    )
    assert mllm.config.modality_token_ids == {
        "image": hf.config.image_token_id,
        "video": hf.config.video_token_id,
    }


def test_processor_makes_the_hf_processors_batch(source):
    ours = source["processor"](PROMPTS, image=images(), video=[video()], padding_side="left")
    keys = (
        "input_ids",
        "attention_mask",
        "image_grid_thw",
        "video_grid_thw",
        "pixel_values",
        "pixel_values_videos",
    )
    assert_same_tensors(ours, source["batch"], keys)


@torch.no_grad()
def test_the_processor_needs_the_checkpoints_tokenizer(source):
    from mmcore.convert import qwen2_vl
    from mmcore.errors import TokenIdError
    from mmcore.testing import tiny_tokenizer

    with pytest.raises(TokenIdError, match="is not a token of this tokenizer"):
        qwen2_vl.processor_from_hf(source["mllm"], tiny_tokenizer())


def test_saved_conversion_rebuilds_model_and_processor_bit_exact(source, tmp_path):
    mllm, processor = save_and_load(source["mllm"], source["processor"], tmp_path)
    assert mllm.encoders["image"].module is mllm.encoders["video"].module  # saved once, shared again
    assert_bit_exact(mllm, source["mllm"])
    batch = processor(PROMPTS, image=images(), video=[video()], padding_side="left")
    assert torch.equal(batch["input_ids"], source["batch"]["input_ids"])
    assert torch.equal(mllm(**batch).logits, source["mllm"](**source["batch"]).logits)


def test_to_mmcore_and_back_is_bit_exact(source, tmp_path):
    from mmcore import MultimodalModel

    hf = source["hf"]
    back = MultimodalModel.from_hf(hf).to_hf()
    assert type(back) is type(hf) and back.model.visual.blocks is hf.model.visual.blocks
    source["mllm"].save_pretrained(tmp_path / "mmcore")
    again = MultimodalModel.from_pretrained(tmp_path / "mmcore").to_hf()
    assert_bit_exact(again, hf, CONFIG_FIELDS)
    for field in ("rope_parameters", "hidden_size", "num_hidden_layers", "vocab_size"):
        assert getattr(again.config.text_config, field) == getattr(hf.config.text_config, field), field
    vision, expected_vision = again.config.vision_config.to_dict(), hf.config.vision_config.to_dict()
    assert {k: v for k, v in vision.items() if k != "dtype"} == {
        k: v for k, v in expected_vision.items() if k != "dtype"
    }


def test_export_loads_without_mmcore_and_gives_equal_logits(source, tmp_path):
    from mmcore.convert.testing import export_with_cli, load_without_mmcore

    out, report = export_with_cli(source["mllm"], source["processor"], tmp_path)
    architecture = type(source["hf"]).__name__
    assert report["architectures"] == [architecture]
    texts = (
        "[t.replace('<|image_pad|>', token) for t in "
        + repr([PROMPTS[0], PROMPTS[0].replace("this", "that")])
        + "]"
    )
    loaded = load_without_mmcore(out, tmp_path, image_sizes=IMAGE_SIZES, texts=texts)
    assert loaded["class"] == architecture and loaded["processor"] == type(source["hf_processor"]).__name__
    with torch.no_grad():
        expected = source["hf"](**loaded["batch"]).logits
        ours = source["mllm"](**{k: v for k, v in loaded["batch"].items() if k != "mm_token_type_ids"}).logits
    torch.testing.assert_close(loaded["logits"], expected, rtol=0, atol=ATOL)
    torch.testing.assert_close(ours, expected, rtol=0, atol=ATOL)


def test_an_mmcore_model_of_another_shape_names_what_has_no_qwen2_vl_counterpart():
    import mmcore
    from mmcore import MultimodalModel
    from mmcore.convert import NoTransformersCounterpartError
    from mmcore.testing import tiny_llm

    mllm = MultimodalModel(
        encoders={"vision": mmcore.build_encoder("qwen2_vl", preset="tiny")}, language_model=tiny_llm()
    )
    with pytest.raises(NoTransformersCounterpartError, match="3-D rotary positions"):
        mllm.to_hf()


def test_test_run_takes_the_converted_directory(source, tmp_path):
    """``mmcore test-run`` runs the video encoder's dummy inputs through its renamed arguments
    (pixel_values_videos -> the tower's pixel_values) and trains and generates with M-RoPE."""
    from typer.testing import CliRunner

    from mmcore.cli import app as cli_app

    source["mllm"].save_pretrained(tmp_path)
    source["processor"].save_pretrained(tmp_path)
    result = CliRunner().invoke(cli_app.build_app(), ["test-run", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
