"""mmcore-plugin-clip: the shared encoder suite (`mmcore.testing.suite`), and what is CLIP's own: the
full-size presets' architectures, LLaVA's defaults (penultimate layer, CLS dropped), the options.

Offline: every checkpoint is a tiny random model saved to a temporary directory.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import CLIPVisionModel

import mmcore
from mmcore.callbacks import SelectFeatureLayer
from mmcore.testing import check_encoder_plugin
from mmcore.testing.suite import TransformersVisionSuite


class TestClipSuite(TransformersVisionSuite):
    plugin = "clip"
    option_variants = {
        "clip": [
            {"feature_layer": -1, "drop_cls": False},
            {"feature_layer": [-1, -2]},
            {"feature_layer": None},
        ]
    }
    readme = Path(__file__).parents[1] / "README.md"


def test_tiny_preset_contract_counts_2x2_patches_with_the_cls_dropped(tmp_path):
    report = check_encoder_plugin("clip", preset="tiny", tmp_path=tmp_path, meta_presets=True)
    assert report.tokens_per_item == [4, 4]
    assert {"processor", "meta_presets", "save_load"} <= set(report.checks)
    assert report.recipe["options"] == {"feature_layer": -2, "drop_cls": True}


def test_keeping_the_cls_adds_one_token_per_image():
    factory = mmcore.get_factory("clip")
    recipe = factory.make_recipe(preset="tiny", drop_cls=False)
    assert factory.num_tokens(recipe, factory.dummy_inputs(recipe, 2)) == [5, 5]


# --- presets ------------------------------------------------------------------------------------------


def vit_params(width, mlp, layers, patch, image):
    """Parameters of a CLIP vision tower: patch conv (no bias), CLS, positions, pre-LN, layers, post-LN."""
    per_layer = 4 * (width * width + width) + 2 * width * mlp + mlp + width + 4 * width
    positions = (image // patch) ** 2 + 1
    return 3 * patch * patch * width + width + positions * width + 2 * width + layers * per_layer + 2 * width


# preset -> (parameter count of the openai checkpoint's vision tower, tokens per image after LLaVA defaults)
FULL_SIZE = {
    "vit-b-32": (87_456_000, 49),
    "vit-b-16": (85_799_424, 196),
    "vit-l-14": (303_179_776, 256),
    "vit-l-14-336": (303_507_456, 576),  # LLaVA-1.5: 24x24 patches
}


def test_the_presets_are_tiny_and_the_openai_architectures():
    assert list(mmcore.get_factory("clip").presets) == ["tiny", *FULL_SIZE]


@pytest.mark.parametrize("preset", list(FULL_SIZE))
def test_full_size_preset_builds_on_meta_with_the_real_architecture(preset):
    params, tokens = FULL_SIZE[preset]
    encoder = mmcore.build_encoder("clip", preset=preset, device="meta")
    module = encoder.module
    assert isinstance(module, CLIPVisionModel)
    c = module.config
    assert sum(p.numel() for p in module.parameters()) == params
    assert (
        vit_params(c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.patch_size, c.image_size)
        == params
    )
    assert c.hidden_act == "quick_gelu" and c.layer_norm_eps == 1e-5
    factory, recipe = mmcore.get_factory("clip"), encoder.source["recipe"]
    assert factory.num_tokens(recipe, factory.dummy_inputs(recipe, 2)) == [tokens, tokens]
    processor = recipe["processor"]
    assert processor["crop_size"] == {"height": c.image_size, "width": c.image_size}
    assert processor["size"] == {"shortest_edge": c.image_size}
    assert processor["image_mean"] == [0.48145466, 0.4578275, 0.40821073]
    assert processor["image_std"] == [0.26862954, 0.26130258, 0.27577711]


def test_tiny_preset_defaults_are_llava_style():
    encoder = mmcore.build_encoder("clip", preset="tiny")
    assert encoder.postprocess_module_callback == SelectFeatureLayer(layer=-2, drop_prefix_tokens=1)
    assert encoder.output_width == 32
    pixel_values = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        _, features = encoder.run_encoder({"pixel_values": pixel_values})
        hidden = encoder.module(pixel_values=pixel_values, output_hidden_states=True).hidden_states
    assert torch.equal(features[0], hidden[-2][:, 1:])  # penultimate layer, CLS dropped
