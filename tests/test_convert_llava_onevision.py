"""LLaVA-OneVision in and out: a transformers LlavaOnevisionForConditionalGeneration directory converts to
an mmcore model of two encoders (images: anyres with OneVision's downscaling; videos: frames pooled
2x2) over one shared tower, projector and newline. Equal logits and greedy generations on a
left-padded batch of two with images of two aspect ratios and a video each (the processor's ids
equal); the video features equal transformers' ``get_video_features``; OneVision -> mmcore ->
OneVision bit-exact through the saved directory (shared parts saved once, shared again at load);
``mmcore export`` loads with no mmcore importable and gives equal logits."""

from __future__ import annotations

import json

import pytest
import torch
from llava_helpers import assert_round_trip_is_bit_exact, assert_saved_conversion_matches
from plugin_marks import needs_plugins

from mmcore.convert.testing import assert_same_outputs, assert_same_tensors, random_images

pytestmark = needs_plugins("clip", "siglip")

ATOL = 1e-5
PROMPTS = [
    "user: <image> and <video> what is this? assistant:",
    "user: <video> then <image> please assistant:",
]
IMAGE_SIZES = ((30, 70), (64, 60))  # the second one's grid is downscaled (anyres_max_2)
#: LlavaOnevisionConfig fields that decide what the model computes or how its inputs are made.
CONFIG_FIELDS = (
    "image_token_index", "video_token_index", "vision_feature_layer", "vision_feature_select_strategy",
    "projector_hidden_act", "multimodal_projector_bias", "image_grid_pinpoints", "vision_aspect_ratio",
    "tie_word_embeddings",
)  # fmt: skip


def images():
    return random_images(IMAGE_SIZES)


def videos():
    from mmcore.convert.testing import random_video

    return [random_video(3, 50, 40, seed=1), random_video(3, 30, 60, seed=2)]


@pytest.fixture(scope="module", params=["siglip", "clip"])
def source(request, tmp_path_factory):
    from mmcore.convert.testing import convert_saved, tiny_llava_onevision

    hf, processor = tiny_llava_onevision(request.param)
    path = tmp_path_factory.mktemp(f"llava-onevision-{request.param}")
    return convert_saved(hf, processor, path, text=PROMPTS, images=images(), videos=videos())


@torch.no_grad()
def test_logits_and_greedy_generations_equal_llava_onevision(source):
    hf, mllm = source["hf"], source["mllm"]
    assert_same_outputs(mllm, hf, source["batch"], atol=ATOL)
    images_only = dict(source["hf_processor"](text=["<image> hi", "a <image>"], images=images(), return_tensors="pt",
                                               padding=True))  # fmt: skip
    torch.testing.assert_close(mllm(**images_only).logits, hf(**images_only).logits, rtol=0, atol=ATOL)


@torch.no_grad()
def test_video_and_image_features_equal_transformers(source):
    hf, mllm, batch = source["hf"], source["mllm"], source["batch"]
    ours = mllm.encoders["video"](pixel_values=batch["pixel_values_videos"])
    theirs = hf.get_video_features(batch["pixel_values_videos"]).pooler_output
    assert [v.shape for v in ours] == [t.shape for t in theirs]
    torch.testing.assert_close(torch.stack(ours), theirs, rtol=0, atol=ATOL)
    image = mllm.encoders["image"](
        pixel_values=batch["pixel_values"],
        image_sizes=batch["image_sizes"],
        batch_num_images=batch["batch_num_images"],
    )
    expected = hf.get_image_features(batch["pixel_values"], batch["image_sizes"],
                                     batch_num_images=batch["batch_num_images"]).pooler_output  # fmt: skip
    for got, want in zip(image, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    # OneVision's downscaling is exercised: the near-square image has fewer tokens than NeXT's layout gives
    pack = mllm.encoders["image"].postprocess_projector_callback
    from mmcore.builtin.anyres import AnyResTokenCount

    next_count = AnyResTokenCount(pack.grid_pinpoints, pack.image_size, pack.patch_size).count(IMAGE_SIZES[1])
    assert image[1].shape[0] == pack.token_count().count(IMAGE_SIZES[1]) < next_count


def test_the_conversion_shares_one_tower_projector_and_newline(source):
    from mmcore import MultimodalModel
    from mmcore.builtin.anyres import AnyResPack
    from mmcore.builtin.video import VideoFrames, VideoPool

    hf = source["hf"]
    mllm = MultimodalModel.from_hf(hf)  # in memory
    image, video = mllm.encoders["image"], mllm.encoders["video"]
    assert image.module is video.module is hf.model.vision_tower
    assert image.projector is video.projector
    assert isinstance(image.postprocess_projector_callback, AnyResPack)
    assert image.postprocess_projector_callback.max_patches == 2  # anyres_max_2
    assert isinstance(video.preprocess_callback, VideoFrames) and isinstance(
        video.postprocess_projector_callback, VideoPool
    )
    assert video.postprocess_projector_callback.image_newline is hf.model.image_newline
    assert image.postprocess_projector_callback.image_newline is hf.model.image_newline
    assert mllm.config.modality_token_ids == {
        "image": hf.config.image_token_index,
        "video": hf.config.video_token_index,
    }
    assert mllm.config.shared_modules["encoders.video.module"] == "encoders.image.module"


def test_processor_makes_the_hf_processors_batch(source):
    ours = source["processor"](PROMPTS, image=images(), video=videos(), padding_side="left")
    keys = ("input_ids", "attention_mask", "image_sizes", "pixel_values", "pixel_values_videos")
    assert_same_tensors(ours, source["batch"], keys)


def test_saved_conversion_rebuilds_shared_parts_and_processor(source, tmp_path):
    from safetensors import safe_open

    mllm = assert_saved_conversion_matches(source, tmp_path, PROMPTS, ATOL, image=images(), video=videos())
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert not [k for k in keys if k.startswith("encoders.video.")]  # shared parts are saved once
    image, video = mllm.encoders["image"], mllm.encoders["video"]
    assert video.module is image.module and video.projector is image.projector
    assert (
        video.postprocess_projector_callback.image_newline
        is image.postprocess_projector_callback.image_newline
    )


def test_llava_onevision_to_mmcore_to_llava_onevision_is_bit_exact(source, tmp_path):
    assert_round_trip_is_bit_exact(source, tmp_path, "LlavaOnevisionForConditionalGeneration", CONFIG_FIELDS)


def test_a_video_encoder_with_its_own_tower_has_no_onevision_counterpart(source):
    import copy

    from mmcore import MultimodalModel
    from mmcore.convert import NoTransformersCounterpartError

    mllm = MultimodalModel.from_hf(source["hf"])
    mllm.encoders["video"].module = copy.deepcopy(mllm.encoders["video"].module)
    with pytest.raises(NoTransformersCounterpartError, match="its own"):
        mllm.to_hf()


def test_export_loads_without_mmcore_and_gives_equal_logits(source, tmp_path):
    from mmcore.convert.testing import export_with_cli, load_without_mmcore

    out, report = export_with_cli(source["mllm"], source["processor"], tmp_path)
    assert report["architectures"] == ["LlavaOnevisionForConditionalGeneration"]
    loaded = load_without_mmcore(
        out, tmp_path, image_sizes=list(IMAGE_SIZES), texts=repr(PROMPTS).replace("<video>", "")
    )
    assert (loaded["class"], loaded["processor"]) == (
        "LlavaOnevisionForConditionalGeneration",
        "LlavaOnevisionProcessor",
    )
    with torch.no_grad():
        expected = source["mllm"](**loaded["batch"]).logits
    torch.testing.assert_close(loaded["logits"], expected, rtol=0, atol=ATOL)
    from transformers import AutoProcessor

    exported = AutoProcessor.from_pretrained(out)  # its video half makes the source's video inputs
    exported.tokenizer.padding_side = "left"
    batch = exported(text=PROMPTS, images=images(), videos=videos(), return_tensors="pt", padding=True)
    for key in ("input_ids", "pixel_values_videos"):
        assert torch.equal(batch[key], source["batch"][key]), key


def test_real_size_config_converts_on_the_meta_device(tmp_path):
    from transformers import LlavaOnevisionConfig

    from mmcore.convert import convert_pretrained

    LlavaOnevisionConfig().save_pretrained(
        tmp_path
    )  # llava-onevision-qwen2-7b's shapes: SigLIP 384 px, anyres_max_9
    converted = convert_pretrained(tmp_path, device="meta")
    mllm = converted.model
    assert converted.family == "llava_onevision" and all(p.is_meta for p in mllm.parameters())
    assert mllm.encoders["image"].postprocess_projector_callback.max_patches == 9
    assert mllm.encoders["video"].postprocess_projector_callback.tokens_per_frame() == 14 * 14
    assert mllm.encoders["video"].module is mllm.encoders["image"].module
    assert mllm.to_hf().config.vision_aspect_ratio == "anyres_max_9"


def test_convert_dry_run_counts_the_shared_tower_once(source):
    from typer.testing import CliRunner

    from mmcore.cli import app as cli_app

    result = CliRunner().invoke(cli_app.build_app(), ["convert", str(source["path"]), "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    parts = {p["part"]: p for p in report["parts"]}
    assert parts["video.module"] == {"part": "video.module", "type": "shared with image.module", "params": 0}
    newline = (
        source["mllm"].encoders["image"].postprocess_projector_callback.image_newline
    )  # a callback's, no part
    assert report["total_params"] == sum(p.numel() for p in source["mllm"].parameters()) - newline.numel()
