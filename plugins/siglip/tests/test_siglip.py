"""mmcore-plugin-siglip: the shared encoder suite (`mmcore.testing.suite`), and what is SigLIP's own:
the full-size presets' architectures (with and without the pooling head), LLaVA-OneVision's defaults
(last layer before the final layer norm, no head), loading a checkpoint's head or leaving it out.

Offline: every checkpoint is a tiny random model saved to a temporary directory.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import SiglipVisionModel

import mmcore
from mmcore.callbacks import SelectFeatureLayer
from mmcore.testing import check_encoder_plugin, tiny_assembled_model
from mmcore.testing.suite import TransformersVisionSuite


class TestSiglipSuite(TransformersVisionSuite):
    plugin = "siglip"
    option_variants = {
        "siglip": [
            {"feature_layer": -2},
            {"feature_layer": [-1, -2]},
            {"feature_layer": None},
            {"keep_head": True},
        ]
    }
    readme = Path(__file__).parents[1] / "README.md"


def has_head(module):
    return any(name.startswith("head.") for name, _ in module.named_parameters())


def test_tiny_preset_contract_counts_2x2_patches(tmp_path):
    report = check_encoder_plugin("siglip", preset="tiny", tmp_path=tmp_path, meta_presets=True)
    assert report.tokens_per_item == [4, 4]  # no CLS
    assert {"processor", "meta_presets", "save_load"} <= set(report.checks)
    assert report.recipe["options"] == {"feature_layer": -1, "keep_head": False}


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


def test_the_presets_are_tiny_and_the_google_architectures():
    assert list(mmcore.get_factory("siglip").presets) == ["tiny", *FULL_SIZE]


@pytest.mark.parametrize("preset", list(FULL_SIZE))
@pytest.mark.parametrize("keep_head", [False, True])
def test_full_size_preset_builds_on_meta_with_the_real_architecture(preset, keep_head):
    without_head, with_head, tokens = FULL_SIZE[preset]
    encoder = mmcore.build_encoder("siglip", preset=preset, device="meta", keep_head=keep_head)
    module = encoder.module
    assert isinstance(module, SiglipVisionModel)
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


# --- the pooling head ---------------------------------------------------------------------------------


@pytest.fixture
def saved_tower(tmp_path):
    """A tiny SiglipVisionModel saved with its pooling head; (path, state dict)."""
    return tmp_path, TestSiglipSuite().save_checkpoint("siglip", tmp_path)


def test_keep_head_loads_the_checkpoints_head_too(saved_tower):
    path, saved = saved_tower
    encoder = mmcore.build_encoder("siglip", str(path), keep_head=True)
    assert has_head(encoder.module)
    loaded = encoder.module.state_dict()
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], v) for k, v in saved.items())


def test_by_default_a_checkpoint_loads_without_its_pooling_head(saved_tower, tmp_path):
    path, saved = saved_tower
    encoder = mmcore.build_encoder("siglip", str(path))
    assert not has_head(encoder.module) and encoder.source["recipe"]["config"]["vision_use_head"] is False
    assert encoder.module.state_dict().keys() == {k for k in saved if not k.startswith("head.")}
    model, _ = tiny_assembled_model({"vision": encoder})
    model.save_pretrained(tmp_path / "model")
    loaded = mmcore.MultimodalModel.from_pretrained(tmp_path / "model")
    assert not has_head(loaded.encoders["vision"].module)
