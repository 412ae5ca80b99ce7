"""mmcore.hf_vision.TransformersVisionFactory, subclassed for a tower no plugin covers: DINOv2.

The subclass below is all a third-party plugin would write; everything else (recipes, checkpoint
reading, processor, token counts, callbacks, save/load) comes from the base class. Offline: every
checkpoint is a tiny random model saved to a temporary directory.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from plugin_helpers import registered_encoders, tiny_spec
from transformers import BitImageProcessor, CLIPVisionConfig, Dinov2Config, Dinov2Model

import mmcore
from mmcore.callbacks import DropPrefixTokens, SelectFeatureLayer
from mmcore.errors import ConfigError
from mmcore.hf_vision import RECIPE_VERSION, TransformersVisionFactory
from mmcore.testing import check_encoder_plugin, tiny_llm, tiny_tokenizer

VISION = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=42, patch_size=14)
# a processor unlike the default one (size, mean), so a test can tell it was read from the checkpoint
PROCESSOR = dict(
    size={"shortest_edge": 42}, crop_size={"height": 42, "width": 42}, image_mean=[0.1, 0.2, 0.3]
)
RAW_SIZES = [(10, 10), (37, 23), (20, 45), (100, 64)]  # (height, width) of raw images


class Dinov2Factory(TransformersVisionFactory):
    """DINOv2 (no whole-model variant), its CLS token kept unless ``drop_cls``."""

    model_class, config_class, image_processor_class = Dinov2Model, Dinov2Config, BitImageProcessor
    model_type = "dinov2"
    family = "DINOv2"
    presets = {"tiny": "2 layers, width 32, 28 px, patch 14 (4 patches + CLS)"}
    preset_configs = {
        "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=14)
    }
    options = {"feature_layer": -1, "drop_cls": False}

    def prefix_tokens(self, config):
        return 1

    def dropped_prefix_tokens(self, options):
        return 1 if options["drop_cls"] else 0

    def default_processor(self, image_size):
        return BitImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        )


@pytest.fixture(scope="module", autouse=True)
def dinov2_plugin():
    spec = tiny_spec(__name__, "dinov2", "vision", "DINOv2 (test)", "Dinov2Factory")
    with registered_encoders("hfvtest", spec) as registry:
        yield registry


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    """A saved Dinov2Model (3x3 patches at 42 px) with its BitImageProcessor."""
    path = tmp_path_factory.mktemp("dinov2")
    torch.manual_seed(1)
    Dinov2Model(Dinov2Config(**VISION)).save_pretrained(path)
    BitImageProcessor(**PROCESSOR).save_pretrained(path)
    return path


def images(sizes=RAW_SIZES):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def test_contract_check_passes_for_the_subclass(tmp_path):
    report = check_encoder_plugin("dinov2", preset="tiny", tmp_path=tmp_path, meta_presets=True)
    assert report.checks[-1] == "save_load" and "processor" in report.checks
    assert report.tokens_per_item == [5, 5]  # 2x2 patches + CLS
    assert report.recipe["version"] == RECIPE_VERSION
    assert report.recipe["config"]["model_type"] == "dinov2"
    assert report.recipe["processor"]["crop_size"] == {"height": 28, "width": 28}


@pytest.mark.parametrize(
    "options, callback, tokens",
    [
        ({}, SelectFeatureLayer(-1, drop_prefix_tokens=0), 10),
        ({"drop_cls": True}, SelectFeatureLayer(-1, drop_prefix_tokens=1), 9),
        ({"feature_layer": None}, None, 10),
        ({"feature_layer": None, "drop_cls": True}, DropPrefixTokens(1), 9),
        ({"feature_layer": [-1, 0], "drop_cls": True}, SelectFeatureLayer([-1, 0], drop_prefix_tokens=1), 9),
    ],
    ids=str,
)
def test_num_tokens_equals_the_real_feature_count_for_processed_images(dinov2_dir, options, callback, tokens):
    encoder = mmcore.build_encoder("dinov2", str(dinov2_dir), **options).eval()
    assert encoder.postprocess_module_callback == callback
    factory, recipe = mmcore.get_factory("dinov2"), encoder.source["recipe"]
    raw = images()
    processed = factory.processor(recipe)([Image.fromarray(a) for a in raw[:2]] + raw[2:])
    assert processed["pixel_values"].shape == (len(RAW_SIZES), 3, 42, 42)
    with torch.no_grad():
        _, output = encoder.run_encoder(processed)
    assert output[0].shape[-1] == factory.output_width(recipe)
    assert factory.num_tokens(recipe, processed) == [output[0].shape[1]] * len(RAW_SIZES)
    assert output[0].shape[1] == tokens  # 3x3 patches (+ CLS)


def test_a_saved_checkpoint_loads_exactly_and_the_assembled_model_round_trips_without_it(
    dinov2_dir, tmp_path
):
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(dinov2_dir, checkpoint)
    encoder = mmcore.build_encoder("dinov2", str(checkpoint))
    saved = Dinov2Model.from_pretrained(checkpoint).state_dict()
    loaded = encoder.module.state_dict()
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], v) for k, v in saved.items())
    recipe = encoder.source["recipe"]
    assert recipe["checkpoint"] == str(checkpoint) and recipe["processor"]["image_mean"] == [0.1, 0.2, 0.3]

    tokenizer = tiny_tokenizer()
    model = mmcore.MultimodalModel({"vision": encoder}, language_model=tiny_llm(vocab_size=len(tokenizer)))
    token_id = mmcore.add_modality_tokens(tokenizer, model)["vision"]
    processed = mmcore.get_factory("dinov2").processor(recipe)(images()[:2])
    input_ids = torch.tensor([[1] + [token_id] * 10 + [5, 6]] * 2)
    model.eval().save_pretrained(tmp_path / "model")
    shutil.rmtree(checkpoint)  # the saved model needs only its own directory
    reloaded = mmcore.MultimodalModel.from_pretrained(tmp_path / "model").eval()
    assert isinstance(reloaded.encoders["vision"].module, Dinov2Model)
    with torch.no_grad():
        before = model(input_ids=input_ids, **processed).logits
        after = reloaded(input_ids=input_ids, **processed).logits
    assert torch.equal(before, after)


def test_a_checkpoint_on_the_meta_device_reads_no_weights(dinov2_dir):
    encoder = mmcore.build_encoder("dinov2", str(dinov2_dir), device="meta")
    assert all(p.device.type == "meta" for p in encoder.module.parameters())
    assert encoder.module.config.hidden_size == 16


def test_a_checkpoint_without_a_processor_config_warns_and_uses_the_default_processor(tmp_path):
    Dinov2Model(Dinov2Config(**VISION)).save_pretrained(tmp_path)
    with pytest.warns(
        UserWarning, match="no readable image processor config.*using DINOv2 preprocessing at 42 px"
    ):
        recipe = mmcore.get_factory("dinov2").make_recipe(checkpoint=str(tmp_path))
    assert recipe["processor"]["crop_size"] == {"height": 42, "width": 42}


def test_a_checkpoint_of_another_model_type_is_refused_naming_the_one_expected(tmp_path):
    CLIPVisionConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(
        ConfigError,
        match="not a DINOv2 model: expected config.json model_type 'dinov2', got 'clip_vision_model'",
    ):
        mmcore.build_encoder("dinov2", str(tmp_path))


@pytest.mark.parametrize(
    "options, needle",
    [
        ({"drop_cls": 1}, "drop_cls must be True or False, got 1"),
        ({"feature_layer": 3}, r"-3\.\.2\), got 3"),
        ({"keep_head": True}, r"unknown option\(s\) keep_head.*drop_cls, feature_layer"),
    ],
)
def test_bad_options_are_config_errors_saying_what_was_expected(options, needle):
    with pytest.raises(ConfigError, match=needle):
        mmcore.get_factory("dinov2").make_recipe(preset="tiny", **options)


def test_dummy_inputs_follow_the_processor_not_the_position_table(tmp_path):
    """DINOv2 checkpoints keep a 518 px position table but crop images to 224 px: a test run's dummy
    inputs, and so its token counts, are those of processed images (16 x 16 patches + CLS), not 37 x 37."""
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=518,
                             patch_size=14)).save_pretrained(tmp_path)  # fmt: skip
    BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}).save_pretrained(tmp_path)
    factory = mmcore.get_factory("dinov2")
    recipe = factory.make_recipe(checkpoint=str(tmp_path))
    dummy = factory.dummy_inputs(recipe, batch_size=2)
    assert dummy["pixel_values"].shape == (2, 3, 224, 224)
    assert factory.num_tokens(recipe, dummy) == [16 * 16 + 1] * 2
    processed = factory.processor(recipe)(images()[:1])
    assert processed["pixel_values"].shape[-2:] == dummy["pixel_values"].shape[-2:]


def test_a_family_sets_its_image_size_where_the_config_holds_a_position_table():
    class Dinov2At224(Dinov2Factory):
        preset_configs = {"tiny": dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=518,
                                       patch_size=14)}  # fmt: skip

        def image_size(self, config):
            return 224

    factory = Dinov2At224("dinov2")
    recipe = factory.make_recipe(preset="tiny")
    assert recipe["processor"]["crop_size"] == {"height": 224, "width": 224}
    assert factory.dummy_inputs(recipe)["pixel_values"].shape[-2:] == (224, 224)
