"""mmcore-plugin-siglip: the contract, presets, the real loading path, save/load, token counts, errors.

Offline: every checkpoint is a tiny random model saved to a temporary directory.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    CLIPVisionConfig,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

import mmcore
from mmcore import MultimodalModel, add_modality_tokens, expand_placeholders
from mmcore.callbacks import SelectFeatureLayer
from mmcore.errors import ConfigError, EncoderInputError
from mmcore.testing import check_encoder_plugin, tiny_llm, tiny_tokenizer

VISION = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=42,
    patch_size=14,
)
# a processor unlike the presets' (mean), so a test can tell it was read from the checkpoint
PROCESSOR = dict(size={"height": 42, "width": 42}, image_mean=[0.1, 0.2, 0.3], image_std=[0.5, 0.5, 0.5])
RAW_SIZES = [(10, 10), (37, 23), (20, 45), (100, 64)]  # (height, width) of raw images
VARIANTS = [
    {},
    {"feature_layer": -2},
    {"feature_layer": [-1, -2]},
    {"feature_layer": None},
    {"keep_head": True},
]
DEFAULTS = {"feature_layer": -1, "keep_head": False}


@pytest.fixture(scope="module")
def vision_dir(tmp_path_factory):
    """A saved SiglipVisionModel with its head (3x3 patches at 42 px) and its SiglipImageProcessor."""
    path = tmp_path_factory.mktemp("siglip-vision")
    torch.manual_seed(1)
    SiglipVisionModel(SiglipVisionConfig(**VISION)).save_pretrained(path)
    SiglipImageProcessor(**PROCESSOR).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def full_dir(tmp_path_factory):
    """A saved whole SiglipModel (SiglipConfig with text and vision halves) with its image processor."""
    path = tmp_path_factory.mktemp("siglip-full")
    torch.manual_seed(2)
    text = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64
    )
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=VISION))
    model.save_pretrained(path)
    SiglipImageProcessor(**PROCESSOR).save_pretrained(path)
    return path, model


def images(sizes=RAW_SIZES):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def assemble(encoder):
    tokenizer = tiny_tokenizer()
    model = MultimodalModel(encoders={"vision": encoder}, language_model=tiny_llm(vocab_size=len(tokenizer)))
    add_modality_tokens(tokenizer, model)
    return model.eval(), tokenizer


def batch_for(model, tokenizer, counts):
    """One sample per image: some text, the image's placeholder run, more text."""
    token_id = model.config.modality_token_ids["vision"]
    text = tokenizer("a picture of a cat")["input_ids"]
    rows = [
        expand_placeholders(text[:2] + [token_id] + text[2:], {"vision": token_id}, {"vision": [n]})
        for n in counts
    ]
    return torch.tensor(rows)


def has_head(module):
    return any(name.startswith("head.") for name, _ in module.named_parameters())


def same_weights(got, expected):
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], v) for k, v in expected.items())


# --- the contract -------------------------------------------------------------------------------------


def test_contract_check_passes_for_the_tiny_preset_and_every_preset_builds_on_meta(tmp_path):
    report = check_encoder_plugin("siglip", preset="tiny", tmp_path=tmp_path, meta_presets=True)
    assert report.encoder == "siglip:siglip"
    assert (
        report.checks[-1] == "save_load" and "meta_presets" in report.checks and "processor" in report.checks
    )
    assert report.tokens_per_item == [4, 4]  # 2x2 patches, no CLS


@pytest.mark.parametrize("options", VARIANTS[1:], ids=str)
def test_contract_check_passes_for_option_variants(tmp_path, options):
    report = check_encoder_plugin("siglip", preset="tiny", tmp_path=tmp_path, options=options)
    assert report.recipe["options"] == {**DEFAULTS, **options}


def test_listing_the_plugin_imports_no_torch_or_transformers():
    code = (
        "import json, sys\n"
        "from mmcore.plugins import get_registry\n"
        "spec = get_registry().get_encoder('siglip')\n"
        "print(json.dumps([spec.plugin, list(spec.presets), "
        "sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))]))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMCORE_")}
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env)
    presets = ["tiny", "base-patch16-224", "so400m-patch14-224", "so400m-patch14-384"]
    assert json.loads(out.stdout) == ["siglip", presets, []]


# --- presets ------------------------------------------------------------------------------------------


def siglip_params(width, mlp, layers, patch, image, head):
    """Parameters of a SigLIP vision tower: patch conv (with bias), positions, layers, post-LN, and
    optionally the attention-pooling head (probe, attention in/out projections, LN, MLP)."""
    per_layer = 4 * (width * width + width) + 2 * width * mlp + mlp + width + 4 * width
    body = 3 * patch * patch * width + width + (image // patch) ** 2 * width + layers * per_layer + 2 * width
    pooling = width + 4 * (width * width + width) + 2 * width + 2 * width * mlp + mlp + width
    return body + (pooling if head else 0)


# preset -> (vision-tower parameters without / with the pooling head, tokens per image)
FULL_SIZE = {
    "base-patch16-224": (85_797_120, 92_884_224, 196),
    "so400m-patch14-224": (412_442_352, 427_680_704, 256),
    "so400m-patch14-384": (412_987_248, 428_225_600, 729),  # LLaVA-OneVision: 27x27 patches
}


@pytest.mark.parametrize("preset", list(FULL_SIZE))
@pytest.mark.parametrize("keep_head", [False, True])
def test_full_size_preset_builds_on_meta_with_the_real_architecture(preset, keep_head):
    without_head, with_head, tokens = FULL_SIZE[preset]
    encoder = mmcore.build_encoder("siglip", preset=preset, device="meta", keep_head=keep_head)
    module = encoder.module
    assert isinstance(module, SiglipVisionModel)
    assert all(p.device.type == "meta" for p in module.parameters())
    c = module.config
    count = sum(p.numel() for p in module.parameters())
    assert count == (with_head if keep_head else without_head)
    assert count == siglip_params(
        c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.patch_size, c.image_size, keep_head
    )
    assert c.hidden_act == "gelu_pytorch_tanh" and c.layer_norm_eps == 1e-6
    factory, recipe = mmcore.get_factory("siglip"), encoder.source["recipe"]
    assert factory.num_tokens(recipe, factory.dummy_inputs(recipe, 2)) == [tokens, tokens]
    processor = recipe["processor"]
    assert processor["size"] == {"height": c.image_size, "width": c.image_size}
    assert processor["image_mean"] == [0.5, 0.5, 0.5] and processor["image_std"] == [0.5, 0.5, 0.5]


def test_tiny_preset_defaults_are_llava_onevision_style():
    encoder = mmcore.build_encoder("siglip", preset="tiny")
    assert encoder.postprocess_module_callback == SelectFeatureLayer(layer=-1, drop_prefix_tokens=0)
    assert not has_head(encoder.module)
    assert encoder.output_width == 32
    pixel_values = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        _, features = encoder.run_encoder({"pixel_values": pixel_values})
        out = encoder.module(pixel_values=pixel_values, output_hidden_states=True)
    assert torch.equal(features[0], out.hidden_states[-1])  # last layer, before the final layer norm
    assert not torch.equal(features[0], out.last_hidden_state)


# --- the real loading path ----------------------------------------------------------------------------


def test_loads_a_saved_vision_tower_and_its_processor_exactly(vision_dir):
    saved = SiglipVisionModel.from_pretrained(vision_dir).state_dict()
    encoder = mmcore.build_encoder("siglip", str(vision_dir), keep_head=True)
    same_weights(encoder.module.state_dict(), saved)
    recipe = encoder.source["recipe"]
    assert recipe["checkpoint"] == str(vision_dir) and recipe["preset"] is None
    assert recipe["config"]["hidden_size"] == 16 and recipe["config"]["image_size"] == 42
    assert recipe["processor"]["image_mean"] == PROCESSOR["image_mean"]
    processed = mmcore.get_factory("siglip").processor(recipe)(images())
    assert processed["pixel_values"].shape == (len(RAW_SIZES), 3, 42, 42)


def test_by_default_a_checkpoint_loads_without_its_pooling_head(vision_dir):
    saved = SiglipVisionModel.from_pretrained(vision_dir).state_dict()
    encoder = mmcore.build_encoder("siglip", str(vision_dir))
    assert not has_head(encoder.module) and encoder.source["recipe"]["config"]["vision_use_head"] is False
    same_weights(encoder.module.state_dict(), {k: v for k, v in saved.items() if not k.startswith("head.")})


def test_loads_the_vision_half_of_a_whole_siglip_model(full_dir):
    path, model = full_dir
    encoder = mmcore.build_encoder("siglip", str(path), keep_head=True)
    same_weights(encoder.module.state_dict(), model.vision_model.state_dict())
    assert encoder.source["recipe"]["config"]["model_type"] == "siglip_vision_model"


def test_a_checkpoint_without_a_processor_config_warns_and_uses_siglip_preprocessing(tmp_path):
    SiglipVisionModel(SiglipVisionConfig(**VISION)).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="no readable image processor config"):
        recipe = mmcore.get_factory("siglip").make_recipe(checkpoint=str(tmp_path))
    assert recipe["processor"]["size"] == {"height": 42, "width": 42}
    assert recipe["processor"]["image_mean"] == [0.5, 0.5, 0.5]


def test_a_checkpoint_on_the_meta_device_reads_no_weights(vision_dir):
    encoder = mmcore.build_encoder("siglip", str(vision_dir), device="meta")
    assert all(p.device.type == "meta" for p in encoder.module.parameters())
    assert encoder.module.config.hidden_size == 16


def test_a_non_siglip_checkpoint_is_refused_naming_its_model_type(tmp_path):
    CLIPVisionConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="not a SigLIP model.*'clip_vision_model'"):
        mmcore.build_encoder("siglip", str(tmp_path))


def test_a_missing_checkpoint_is_a_config_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match="nowhere"):
        mmcore.build_encoder("siglip", str(tmp_path / "nowhere"))


# --- assembled model: save/load, token counts, processor output ---------------------------------------


def test_assembled_model_round_trips_without_the_checkpoint_directory(vision_dir, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(vision_dir, checkpoint)
    encoder = mmcore.build_encoder("siglip", str(checkpoint))
    model, tokenizer = assemble(encoder)
    pixel_values = mmcore.get_factory("siglip").processor(encoder.source["recipe"])(images()[:2])[
        "pixel_values"
    ]
    input_ids = batch_for(model, tokenizer, [9, 9])
    model.save_pretrained(tmp_path / "model")
    shutil.rmtree(checkpoint)  # the saved model needs only its own directory
    saved = json.loads((tmp_path / "model" / "config.json").read_text())["encoders"]["vision"]
    assert saved["source"]["kind"] == "plugin" and saved["source"]["encoder"] == "siglip:siglip"
    loaded = MultimodalModel.from_pretrained(tmp_path / "model").eval()
    assert isinstance(loaded.encoders["vision"].module, SiglipVisionModel)
    assert not has_head(loaded.encoders["vision"].module)
    assert loaded.encoders["vision"].postprocess_module_callback == SelectFeatureLayer(
        -1, drop_prefix_tokens=0
    )
    with torch.no_grad():
        before = model(input_ids=input_ids, pixel_values=pixel_values).logits
        after = loaded(input_ids=input_ids, pixel_values=pixel_values).logits
    assert torch.equal(before, after)


@pytest.mark.parametrize("options", VARIANTS, ids=str)
def test_num_tokens_equals_the_real_feature_count_for_several_image_sizes(vision_dir, options):
    encoder = mmcore.build_encoder("siglip", str(vision_dir), **options).eval()
    factory, recipe = mmcore.get_factory("siglip"), encoder.source["recipe"]
    raw = images()
    items = [Image.fromarray(a) for a in raw[:2]] + raw[2:]  # PIL images and numpy arrays
    processed = factory.processor(recipe)(items)
    with torch.no_grad():
        _, output = encoder.run_encoder(processed)
    features = output[0]
    assert features.shape[-1] == factory.output_width(recipe)
    assert factory.num_tokens(recipe, processed) == [features.shape[1]] * len(RAW_SIZES)
    assert features.shape[1] == 9  # 3x3 patches


def test_processor_output_runs_through_the_assembled_model_with_a_finite_loss(vision_dir):
    encoder = mmcore.build_encoder("siglip", str(vision_dir))
    factory, recipe = mmcore.get_factory("siglip"), encoder.source["recipe"]
    model, tokenizer = assemble(encoder)
    model.train()
    processed = factory.processor(recipe)(images([(30, 50), (64, 20)]))
    input_ids = batch_for(model, tokenizer, factory.num_tokens(recipe, processed))
    out = model(input_ids=input_ids, labels=input_ids.clone(), **processed)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert next(model.encoders["vision"].projector.parameters()).grad is not None


# --- errors -------------------------------------------------------------------------------------------


def test_unknown_preset_is_a_config_error_naming_it_and_suggesting_one():
    with pytest.raises(ConfigError, match=r"unknown preset 'so400m-patch14-336'.*'so400m-patch14-384'"):
        mmcore.build_encoder("siglip", preset="so400m-patch14-336")


def test_unknown_option_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match=r"unknown option\(s\) drop_cls.*feature_layer, keep_head"):
        mmcore.build_encoder("siglip", preset="tiny", drop_cls=True)


@pytest.mark.parametrize(
    "options, needle",
    [
        ({"feature_layer": 3}, r"-3\.\.2\), got 3"),
        ({"feature_layer": []}, "got \\[\\]"),
        ({"feature_layer": "last"}, "'last'"),
        ({"keep_head": 1}, "keep_head must be True or False, got 1"),
    ],
)
def test_bad_option_values_are_config_errors_saying_what_was_expected(options, needle):
    with pytest.raises(ConfigError, match=needle):
        mmcore.get_factory("siglip").make_recipe(preset="tiny", **options)


def test_processor_pickles_for_dataloader_workers():
    factory = mmcore.get_factory("siglip")
    processor = factory.processor(factory.make_recipe(preset="tiny"))
    copy = pickle.loads(pickle.dumps(processor))
    assert torch.equal(copy(images())["pixel_values"], processor(images())["pixel_values"])


def test_processor_refuses_what_is_not_an_image():
    processor = mmcore.get_factory("siglip").processor(
        mmcore.get_factory("siglip").make_recipe(preset="tiny")
    )
    with pytest.raises(EncoderInputError, match="item 1 must be a PIL image.*float64"):
        processor([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3))])
    with pytest.raises(EncoderInputError, match="got no images"):
        processor([])


def test_a_single_tiny_array_is_one_channels_last_image():
    processor = mmcore.get_factory("siglip").processor(
        mmcore.get_factory("siglip").make_recipe(preset="tiny")
    )
    color = np.array([200, 100, 0], np.uint8)
    pixel_values = processor(np.broadcast_to(color, (3, 3, 3)).copy())["pixel_values"]
    assert pixel_values.shape == (1, 3, 28, 28)
    expected = torch.tensor((color / 255 - 0.5) / 0.5, dtype=torch.float32)
    # each channel is one colour: read as (H, W, C), never guessed as (C, H, W)
    torch.testing.assert_close(pixel_values[0].mean(dim=(1, 2)), expected, atol=1e-3, rtol=0)
    assert pixel_values[0].std(dim=(1, 2)).max() < 1e-3
