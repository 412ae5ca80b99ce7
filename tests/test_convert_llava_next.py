"""LLaVA-NeXT in and out: a transformers LlavaNextForConditionalGeneration directory converts to an
mmcore model sharing its modules (equal logits and greedy generations on a left-padded batch of two
aspect ratios, the processor's ids equal), and back (LLaVA-NeXT -> mmcore -> LLaVA-NeXT bit-exact;
``mmcore export`` loads with no mmcore importable and gives equal logits)."""

from __future__ import annotations

import pytest
import torch
from llava_helpers import assert_round_trip_is_bit_exact, assert_saved_conversion_matches
from plugin_marks import needs_plugins

from mmcore.convert.testing import assert_same_outputs, assert_same_tensors, random_images

pytestmark = needs_plugins("clip", "siglip")

ATOL = 1e-5
PROMPTS = ["user: <image> what is this? assistant:", "user: describe <image> please assistant:"]
#: LlavaNextConfig fields that decide what the model computes or how its inputs are made.
CONFIG_FIELDS = (
    "image_token_index", "vision_feature_layer", "vision_feature_select_strategy", "projector_hidden_act",
    "multimodal_projector_bias", "image_grid_pinpoints", "tie_word_embeddings",
)  # fmt: skip


def images():
    return random_images(((30, 70), (64, 40)))


@pytest.fixture(scope="module", params=["clip", "siglip"])
def source(request, tmp_path_factory):
    from mmcore.convert.testing import convert_saved, tiny_llava_next

    hf, processor = tiny_llava_next(request.param)
    path = tmp_path_factory.mktemp(f"llava-next-{request.param}")
    return convert_saved(hf, processor, path, text=PROMPTS, images=images())


def test_logits_and_greedy_generations_equal_llava_next(source):
    assert_same_outputs(source["mllm"], source["hf"], source["batch"], atol=ATOL)


def test_the_conversion_holds_the_checkpoints_modules(source):
    from mmcore import MultimodalModel
    from mmcore.builtin.anyres import AnyResFlatten, AnyResPack

    hf = source["hf"]
    mllm = MultimodalModel.from_hf(hf)  # in memory
    encoder = mllm.encoders["image"]
    assert encoder.module is hf.model.vision_tower
    assert isinstance(encoder.preprocess_callback, AnyResFlatten)
    assert isinstance(encoder.postprocess_projector_callback, AnyResPack)
    assert encoder.postprocess_projector_callback.image_newline is hf.model.image_newline
    assert mllm.language_model.model is hf.model.language_model
    assert mllm.config.modality_token_ids == {"image": hf.config.image_token_index}


def test_processor_makes_the_hf_processors_batch(source):
    ours = source["processor"](PROMPTS, image=images(), padding_side="left")
    assert_same_tensors(ours, source["batch"], ("input_ids", "attention_mask", "image_sizes", "pixel_values"))


def test_saved_conversion_rebuilds_model_and_processor_with_nothing_passed(source, tmp_path):
    assert_saved_conversion_matches(source, tmp_path, PROMPTS, ATOL, image=images())


def test_llava_next_to_mmcore_to_llava_next_is_bit_exact(source, tmp_path):
    assert_round_trip_is_bit_exact(source, tmp_path, "LlavaNextForConditionalGeneration", CONFIG_FIELDS)


def test_export_loads_without_mmcore_and_gives_equal_logits(source, tmp_path):
    from mmcore.convert.testing import export_with_cli, load_without_mmcore

    out, report = export_with_cli(source["mllm"], source["processor"], tmp_path)
    assert report["architectures"] == ["LlavaNextForConditionalGeneration"]
    loaded = load_without_mmcore(out, tmp_path, image_sizes=[(30, 70), (64, 40)], texts=repr(PROMPTS))
    assert (loaded["class"], loaded["processor"]) == ("LlavaNextForConditionalGeneration", "LlavaNextProcessor")
    assert torch.equal(loaded["batch"]["input_ids"], source["batch"]["input_ids"])
    with torch.no_grad():
        expected = source["mllm"](**loaded["batch"]).logits
    torch.testing.assert_close(loaded["logits"], expected, rtol=0, atol=ATOL)
