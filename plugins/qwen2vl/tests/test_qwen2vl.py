"""mmcore-plugin-qwen2vl: the suite every encoder gets, the towers against transformers' own,
token counts per image and per video, the real loading path, errors.

Offline: every checkpoint is a tiny random model saved to a temporary directory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from mmcore_plugin_qwen2vl.modules import Qwen2VLMergerProjection, Qwen25VLMergerProjection
from mmcore_plugin_qwen2vl.presets import PRESETS
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
)

import mmcore
from mmcore.errors import ConfigError, EncoderInputError
from mmcore.testing.suite import EncoderSuite

FAMILIES = {
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLMergerProjection),
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen25VLMergerProjection),
}
TEXT = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]})  # fmt: skip


class TestQwen2VLSuite(EncoderSuite):
    plugin = "qwen2vl"
    option_variants = {
        "qwen2_vl": [{"video": True}, {"max_pixels": 16 * 16}],
        "qwen2_5_vl": [{"video": True}],
    }
    readme = Path(__file__).parents[1] / "README.md"


def hf_model(family: str):
    config_class, model_class, _ = FAMILIES[family]
    torch.manual_seed(0)
    config = config_class(
        text_config=TEXT,
        vision_config=PRESETS[family]["tiny"]["config"],
        image_token_id=60,
        video_token_id=61,
    )
    return model_class(config).eval()


def mmcore_half(hf, family: str, video: bool = False):
    """The plugin encoder around ``hf``'s tower, its projector holding ``hf``'s merger."""
    encoder = mmcore.build_encoder(family, preset="tiny", video=video, device="meta")
    visual = hf.model.visual
    for part in ("patch_embed", "rotary_pos_emb", "blocks"):
        setattr(encoder.module, part, getattr(visual, part))
    merger = FAMILIES[family][2](dim=64, context_dim=32, spatial_merge_size=2)
    merger.load_state_dict(visual.merger.state_dict())
    return encoder, merger


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("video", [False, True])
def test_tower_and_merger_give_transformers_features_per_item(family, video):
    hf = hf_model(family)
    encoder, merger = mmcore_half(hf, family, video)
    factory, recipe = mmcore.get_factory(family), encoder.source["recipe"]
    items = factory.dummy_items(recipe, 3)  # three sizes (videos: 2 and 4 frames)
    inputs = factory.processor(recipe)(items, return_tensors="pt")
    pixels, grid = (
        (inputs["pixel_values_videos"], inputs["video_grid_thw"])
        if video
        else (inputs["pixel_values"], inputs["image_grid_thw"])
    )
    with torch.no_grad():
        reference = (hf.model.get_video_features if video else hf.model.get_image_features)(
            pixels, grid
        ).pooler_output
        features = merger(encoder(**encoder.select_inputs(inputs)))
    assert [f.shape for f in features] == [r.shape for r in reference]
    assert len({f.shape[0] for f in features}) > 1  # items of different sizes, each its own count
    for ours, theirs in zip(features, reference):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    counts = factory.num_tokens(recipe, inputs)
    assert [merger.num_output_tokens(n) for n in counts] == [r.shape[0] for r in reference]
    assert counts == grid.prod(-1).tolist()


def test_token_counts_follow_each_images_size():
    factory = mmcore.get_factory("qwen2_vl")
    recipe = factory.make_recipe(preset="tiny")
    sizes = [(8, 8), (16, 24), (32, 32), (100, 60)]  # (h, w); the last is beyond max_pixels
    inputs = factory.processor(recipe)([np.zeros((h, w, 3), np.uint8) for h, w in sizes], return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 2, 2], [1, 4, 6], [1, 8, 8], [1, 10, 6]]
    assert factory.num_tokens(recipe, inputs) == [
        4,
        24,
        64,
        60,
    ]  # patches; the merger makes 1, 6, 16, 15 tokens
    assert inputs["pixel_values"].shape == (4 + 24 + 64 + 60, 3 * 2 * 4 * 4)  # one flat sequence, no padding


def test_a_video_counts_its_temporal_patches():
    factory = mmcore.get_factory("qwen2_5_vl")
    recipe = factory.make_recipe(preset="tiny", video=True)
    inputs = factory.processor(recipe)(
        [np.zeros((4, 16, 16, 3), np.uint8), np.zeros((2, 8, 16, 3), np.uint8)], return_tensors="pt"
    )
    assert inputs["video_grid_thw"].tolist() == [[2, 4, 4], [1, 2, 4]]
    assert factory.num_tokens(recipe, inputs) == [32, 8]


def test_loads_the_tower_of_a_whole_model_and_its_image_processor(tmp_path):
    hf = hf_model("qwen2_vl")
    hf.save_pretrained(tmp_path)
    Qwen2VLImageProcessor(patch_size=4, merge_size=2, min_pixels=16 * 16, max_pixels=24 * 24).save_pretrained(
        tmp_path
    )
    encoder = mmcore.build_encoder("qwen2_vl", str(tmp_path))
    recipe = encoder.source["recipe"]
    assert recipe["min_pixels"] == 256 and recipe["max_pixels"] == 576
    for name, tensor in encoder.module.state_dict().items():
        assert torch.equal(tensor, hf.model.visual.state_dict()[name]), name
    assert not any(name.startswith("merger.") for name in encoder.module.state_dict())  # the projector's
    merger = encoder.projector  # the checkpoint's own, sized to its language model
    assert merger.config.projector_type == "qwen2vl:qwen2_vl_merger" and merger.config.out_features == 64
    assert merger.projection.mlp is not None and torch.equal(
        merger.projection.mlp[0].weight, hf.model.visual.merger.mlp[0].weight
    )
    from mmcore import MultimodalModel
    from mmcore.errors import WidthMismatchError
    from mmcore.testing import tiny_llm

    model = MultimodalModel(encoders={"vision": encoder}, language_model=tiny_llm(hidden_size=64))
    assert model.encoders["vision"].projector is merger
    with pytest.raises(
        WidthMismatchError,
        match="projector outputs width 64 but the language model's embeddings have width 32",
    ):
        MultimodalModel(
            encoders={"vision": mmcore.build_encoder("qwen2_vl", str(tmp_path))}, language_model=tiny_llm()
        )
    fresh = mmcore.build_encoder(
        "qwen2_vl", str(tmp_path), projector="qwen2vl:qwen2_vl_merger"
    )  # sized to the LLM
    assert "checkpoint_merger" not in fresh.module.__dict__  # the checkpoint's merger is not kept
    assert (
        MultimodalModel(encoders={"vision": fresh}, language_model=tiny_llm())
        .encoders["vision"]
        .projector.config.out_features
        == 32
    )


def test_a_checkpoint_of_another_family_is_a_config_error(tmp_path):
    hf_model("qwen2_5_vl").config.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="qwen2_5_vl.*expected qwen2_vl"):
        mmcore.build_encoder("qwen2_vl", str(tmp_path))


def test_bad_options_and_inputs_are_typed_errors():
    with pytest.raises(ConfigError, match="min_pixels"):
        mmcore.build_encoder("qwen2_vl", preset="tiny", min_pixels=10)
    with pytest.raises(ConfigError, match="video must be True or False"):
        mmcore.build_encoder("qwen2_vl", preset="tiny", video="yes")
    encoder = mmcore.build_encoder("qwen2_vl", preset="tiny")
    with pytest.raises(EncoderInputError, match="grids cover 16 patches but pixel_values has 15 rows"):
        encoder.module(torch.zeros(15, 96), torch.tensor([[1, 4, 4]]))
    with pytest.raises(EncoderInputError, match="image_grid_thw must be"):
        mmcore.get_factory("qwen2_vl").num_tokens(
            encoder.source["recipe"], {"pixel_values": torch.zeros(4, 96)}
        )


def test_the_merger_is_the_default_projector_and_counts_four_patches_a_token():
    from mmcore import MultimodalModel
    from mmcore.testing import tiny_llm

    model = MultimodalModel(
        encoders={"vision": mmcore.build_encoder("qwen2_5_vl", preset="tiny")}, language_model=tiny_llm()
    )
    projector = model.encoders["vision"].projector
    assert projector.config.projector_type == "qwen2vl:qwen2_5_vl_merger"
    assert isinstance(projector.projection, Qwen25VLMergerProjection)
    assert projector.num_output_tokens(24) == 6


def test_image_and_video_encoders_share_one_tower_and_merger(tmp_path):
    from mmcore_plugin_qwen2vl.factory import image_and_video_encoders

    from mmcore import MultimodalModel
    from mmcore.testing import tiny_llm

    encoders = image_and_video_encoders("qwen2_5_vl", preset="tiny", text_width=32)
    image, video = encoders["image"], encoders["video"]
    assert video.module is image.module and video.projector is image.projector
    assert video.source["recipe"] == {**image.source["recipe"], "video": True}
    assert set(video.input_map) == {"pixel_values_videos", "video_grid_thw", "second_per_grid_ts"}
    model = MultimodalModel(encoders=encoders, language_model=tiny_llm())
    model.save_pretrained(tmp_path)
    loaded = MultimodalModel.from_pretrained(tmp_path)
    assert loaded.encoders["video"].module is loaded.encoders["image"].module
    with pytest.raises(ConfigError, match="needs text_width"):
        image_and_video_encoders("qwen2_vl", preset="tiny")
