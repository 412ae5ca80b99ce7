"""mmcore-plugin-eva02: the contract, presets, OmniLMM's features, the real loading paths, tokens."""

import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

import mmcore
from mmcore.callbacks import DropPrefixTokens
from mmcore.errors import ConfigError
from mmcore.plugins import get_registry
from mmcore.testing import check_encoder_plugin, tiny_assembled_model
from mmcore.testing.suite import EncoderSuite

TINY = {"img_size": 28, "depth": 2, "embed_dim": 32, "num_heads": 2}


class Identity(torch.nn.Identity):
    """OmniLMM's stand-in for the last block (timm blocks receive rope= and mask keywords)."""

    def forward(self, x, **kwargs):
        return x


def factory():
    return mmcore.get_factory("eva02")


def recipe_of(encoder):
    return encoder.source["recipe"]


def features(encoder, pixel_values):
    with torch.no_grad():
        return encoder.eval()(**encoder.select_inputs({"pixel_values": pixel_values}))


def omnilmm_features(timm_model, pixel_values):
    """What OmniLMM computes: last block replaced by an identity, forward_features, prefix tokens dropped."""
    timm_model.blocks[-1] = Identity()
    with torch.no_grad():
        return timm_model.eval().forward_features(pixel_values)[:, timm_model.num_prefix_tokens :]


@pytest.fixture
def tiny_timm():
    torch.manual_seed(0)
    return timm.create_model(
        "eva02_tiny_patch14_224", pretrained=False, num_classes=0, dynamic_img_size=True, **TINY
    )


class TestEva02Suite(EncoderSuite):
    plugin = "eva02"
    option_variants = {"eva02": [{"final_norm": False}, {"feature_layer": -1}, {"dynamic_img_pad": True}]}
    readme = Path(__file__).parents[1] / "README.md"


def test_contract_counts_2x2_patches_with_the_class_token_dropped(tmp_path):
    report = check_encoder_plugin("eva02", preset="tiny", tmp_path=tmp_path, meta_presets=True)
    assert report.tokens_per_item == [4, 4]  # 28 px / patch 14 = 2 x 2, class token dropped
    assert {"processor", "meta_presets", "save_load"} <= set(report.checks)


def test_the_spec_names_omnilmms_tower():
    spec = get_registry().get_encoder("eva02")
    assert spec.modality == "vision" and "eva02-enormous" in spec.presets
    assert spec.default_checkpoint == "eva02_large_patch14_clip_224.merged2b"


def test_build_from_tiny_preset():
    encoder = mmcore.build_encoder("eva02", preset="tiny")
    assert type(encoder.module).__name__ == "Eva"
    assert len(encoder.module.blocks) == 1  # the last of 2 blocks pruned: features come from the penultimate
    assert encoder.input_map == {"pixel_values": "x"}
    assert encoder.postprocess_module_callback == DropPrefixTokens(1)
    assert encoder.requested_projector == "resampler"
    assert features(encoder, torch.randn(3, 3, 28, 28)).shape == (3, 4, 32)


def test_features_are_omnilmms_penultimate_block_after_the_final_norm(tiny_timm):
    encoder = mmcore.build_encoder("eva02", preset="tiny")
    encoder.module.load_state_dict(tiny_timm.state_dict(), strict=False)  # the pruned block has no place
    x = torch.randn(2, 3, 28, 42)
    assert torch.equal(features(encoder, x), omnilmm_features(tiny_timm, x))


def test_final_norm_false_and_last_layer(tiny_timm):
    x = torch.randn(2, 3, 28, 28)
    raw = mmcore.build_encoder("eva02", preset="tiny", final_norm=False)
    raw.module.load_state_dict(tiny_timm.state_dict(), strict=False)
    (expected,) = tiny_timm.eval().forward_intermediates(
        x, indices=[-2], norm=False, output_fmt="NLC", intermediates_only=True
    )
    assert torch.equal(features(raw, x), expected)
    last = mmcore.build_encoder("eva02", preset="tiny", feature_layer=-1)
    assert len(last.module.blocks) == 2


# EVA02-enormous: 64 identical blocks of width 1792, MLP 15360 (no SwiGLU), fused qkv with q/v biases.
ENORMOUS_BLOCK = (
    (1792 * 3 * 1792 + 2 * 1792) + (1792 * 1792 + 1792) + 2 * (1792 * 15360) + 15360 + 1792 + 4 * 1792
)
ENORMOUS_REST = (
    3 * 14 * 14 * 1792 + 1792 + 1792 + 257 * 1792 + 2 * 1792
)  # patch embed, cls, pos embed, final norm


def test_enormous_preset_on_meta_device_is_omnilmms_tower():
    assert ENORMOUS_BLOCK == 67_924_992
    encoder = mmcore.build_encoder("eva02", preset="eva02-enormous", device="meta")
    params = list(encoder.module.parameters())
    assert all(p.device.type == "meta" for p in params)
    assert len(encoder.module.blocks) == 63  # OmniLMM: blocks[-1] = Identity
    assert sum(p.numel() for p in params) == ENORMOUS_REST + 63 * ENORMOUS_BLOCK  # 4.28B; 4.35B with all 64
    assert encoder.output_width == 1792
    assert recipe_of(encoder)["model_name"] == "eva02_enormous_patch14_clip_224.laion2b_plus"


@pytest.mark.parametrize(
    "preset, width",
    [
        ("eva02-tiny", 192),
        ("eva02-small", 384),
        ("eva02-base", 768),
        ("eva02-large", 1024),
        ("eva02-enormous", 1792),
    ],
)
def test_full_size_presets_read_224px_images_into_256_tokens(preset, width):
    encoder = mmcore.build_encoder("eva02", preset=preset, device="meta")
    recipe = recipe_of(encoder)
    assert encoder.output_width == width
    assert recipe["data_config"]["input_size"] == [3, 224, 224]
    assert recipe["data_config"]["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])  # CLIP's
    with torch.device("meta"):
        inputs = factory().dummy_inputs(recipe, batch_size=2)
        out = encoder(**encoder.select_inputs(inputs))  # a dry run, nothing allocated
    assert out.shape == (2, 256, width)
    assert factory().num_tokens(recipe, inputs) == [256, 256]


@pytest.mark.parametrize("size", [(28, 28), (42, 28), (56, 70)])
def test_num_tokens_equals_real_feature_count(size):
    encoder = mmcore.build_encoder("eva02", preset="tiny")
    x = torch.randn(2, 3, *size)
    got = features(encoder, x).shape[1]
    assert got == (size[0] // 14) * (size[1] // 14)
    assert factory().num_tokens(recipe_of(encoder), {"pixel_values": x}) == [got, got]


@pytest.mark.parametrize("size", [(30, 45), (28, 29), (56, 56)])
def test_num_tokens_with_dynamic_padding(size):
    encoder = mmcore.build_encoder("eva02", preset="tiny", dynamic_img_pad=True)
    x = torch.randn(1, 3, *size)
    got = features(encoder, x).shape[1]
    assert got == math.ceil(size[0] / 14) * math.ceil(size[1] / 14)
    assert factory().num_tokens(recipe_of(encoder), {"pixel_values": x}) == [got]


def test_sizes_that_are_not_whole_patches_need_padding():
    encoder = mmcore.build_encoder("eva02", preset="tiny")
    with pytest.raises(ConfigError, match="dynamic_img_pad"):
        factory().num_tokens(recipe_of(encoder), {"pixel_values": torch.zeros(1, 3, 30, 28)})
    with pytest.raises(ConfigError, match="img_size"):
        mmcore.build_encoder("eva02", preset="tiny", img_size=30, device="meta")
    assert recipe_of(mmcore.build_encoder("eva02", preset="tiny", img_size=[42, 56]))["data_config"][
        "input_size"
    ] == [3, 42, 56]


def test_any_timm_vit_by_name_with_register_tokens_dropped():
    encoder = mmcore.build_encoder("eva02", preset="tiny", model_name="vit_small_patch14_reg4_dinov2.lvd142m")
    assert type(encoder.module).__name__ == "VisionTransformer"
    assert recipe_of(encoder)["num_prefix_tokens"] == 5  # class + 4 registers
    assert encoder.postprocess_module_callback == DropPrefixTokens(5)
    x = torch.randn(1, 3, 42, 42)
    assert (
        features(encoder, x).shape
        == (1, 9, 32)
        == (1, factory().num_tokens(recipe_of(encoder), {"pixel_values": x})[0], 32)
    )


def test_loads_a_timm_hub_directory(tiny_timm, tmp_path):
    timm.models.save_for_hf(tiny_timm, tmp_path / "eva", model_args=TINY, safe_serialization=True)
    encoder = mmcore.build_encoder("eva02", str(tmp_path / "eva"))
    recipe = recipe_of(encoder)
    assert recipe["model_name"] == "eva02_tiny_patch14_224" and recipe["model_kwargs"]["depth"] == 2
    x = torch.randn(2, 3, 28, 28)
    assert torch.equal(features(encoder, x), omnilmm_features(tiny_timm, x))
    rebuilt = factory().build_module(recipe)  # offline, from the recipe alone (as at load time)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in encoder.module.state_dict().items()
    }


@pytest.mark.parametrize("filename", ["weights.safetensors", "weights.pth"])
def test_loads_a_weights_file(tiny_timm, tmp_path, filename):
    path = tmp_path / filename
    state = {k: v.contiguous() for k, v in tiny_timm.state_dict().items()}
    save_file(state, path) if filename.endswith(".safetensors") else torch.save(state, path)
    encoder = mmcore.build_encoder("eva02", str(path), model_name="eva02_tiny_patch14_224", model_kwargs=TINY)
    x = torch.randn(1, 3, 28, 56)
    assert torch.equal(features(encoder, x), omnilmm_features(tiny_timm, x))


def test_weights_file_errors(tiny_timm, tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file(tiny_timm.state_dict(), path)
    with pytest.raises(ConfigError, match="needs model_name"):
        mmcore.build_encoder("eva02", str(path))
    with pytest.raises(ConfigError, match="does not fit"):
        mmcore.build_encoder(
            "eva02", str(path), model_name="eva02_tiny_patch14_224", model_kwargs={**TINY, "embed_dim": 48}
        )
    save_file({"unrelated": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(ConfigError, match="lacks 17 weights"):
        mmcore.build_encoder(
            "eva02",
            str(tmp_path / "other.safetensors"),
            model_name="eva02_tiny_patch14_224",
            model_kwargs=TINY,
        )


def test_a_tagged_timm_name_makes_its_recipe_offline():
    recipe = factory().make_recipe(checkpoint="eva02_base_patch14_224.mim_in22k")  # reads no weights
    assert recipe["model_name"] == "eva02_base_patch14_224.mim_in22k"
    assert recipe["width"] == 768 and recipe["depth"] == 12 and recipe["patch_size"] == [14, 14]


@pytest.mark.parametrize(
    "kwargs, match",
    [({"preset": "eva02-huge"}, "eva02-huge"), ({"checkpoint": "eva02_base_patch14_22"}, "eva02_base_patch14_224"),
     ({"checkpoint": "vit_base_patch16_224.nope"}, "nope"), ({"preset": "tiny", "feature_layer": 2}, "feature_layer"),
     ({"preset": "tiny", "layer": -2}, "layer"), ({"preset": "eva02-large", "model_name": "vit_base_patch16_224"}, "model_name"),
     ({"checkpoint": "eva02_base_patch14_224", "model_name": "vit_base_patch16_224"}, "model_name"),
     ({"preset": "tiny", "model_kwargs": {"num_classes": 5}}, "num_classes"),
     ({"checkpoint": "resnet18"}, "resnet18"), ({"checkpoint": "./no/such/dir"}, "no/such/dir")],
)  # fmt: skip
def test_bad_preset_checkpoint_or_option_is_a_config_error(kwargs, match):
    checkpoint = kwargs.pop("checkpoint", None)
    with pytest.raises(ConfigError, match=match):
        mmcore.build_encoder("eva02", checkpoint, device="meta", **kwargs)


def test_processor_applies_timms_eval_transforms():
    encoder = mmcore.build_encoder("eva02", preset="tiny")
    processor = factory().processor(recipe_of(encoder))
    images = [
        Image.new("RGB", (64, 48), (255, 0, 0)),
        np.zeros((20, 30), dtype=np.uint8),
        Image.new("L", (10, 90)),
    ]
    pixel_values = processor(images)["pixel_values"]
    assert pixel_values.shape == (3, 3, 28, 28)
    mean, std = torch.tensor(processor.data_config["mean"]), torch.tensor(processor.data_config["std"])
    assert torch.allclose(pixel_values[0, :, 14, 14], (torch.tensor([1.0, 0.0, 0.0]) - mean) / std, atol=1e-5)
    with pytest.raises(ConfigError, match="item 0"):
        processor(["not an image"])


def test_data_config_option_changes_the_transforms():
    wide = np.zeros((28, 280, 3), dtype=np.uint8)
    wide[:, :100] = (255, 0, 0)  # red on the left, black elsewhere
    red = lambda pixel_values: pixel_values[0, 0, 14, 0] > 0  # noqa: E731
    centered = mmcore.build_encoder("eva02", preset="tiny")
    assert not red(factory().processor(recipe_of(centered))([wide])["pixel_values"])  # the crop cut it away
    squashed = mmcore.build_encoder(
        "eva02", preset="tiny", data_config={"crop_mode": "squash", "crop_pct": 1.0}
    )
    assert recipe_of(squashed)["data_config"]["crop_mode"] == "squash"
    assert red(factory().processor(recipe_of(squashed))([wide])["pixel_values"])  # the whole image, resized
    with pytest.raises(ConfigError, match="input_size"):
        mmcore.build_encoder("eva02", preset="tiny", data_config={"input_size": [3, 56, 56]}, device="meta")


def test_processor_output_runs_through_the_assembled_model_and_saves(tmp_path):
    torch.manual_seed(0)
    encoder = mmcore.build_encoder("eva02", preset="tiny")
    model, _ = tiny_assembled_model({"vision": encoder})
    image_id = model.modality_token_ids["vision"]
    projector = model.encoders["vision"].projector
    assert projector.config.projector_type == "resampler"  # the plugin's default projector

    f, recipe = factory(), recipe_of(encoder)
    processed = f.processor(recipe)(f.dummy_items(recipe, 2))
    per_image = [projector.num_output_tokens(n) for n in f.num_tokens(recipe, processed)]
    assert per_image == [64, 64]  # the resampler's queries, whatever the encoder's 4 tokens
    input_ids = torch.tensor(
        [[1] + [image_id] * per_image[0] + [5, 6], [1, 7] + [image_id] * per_image[1] + [8]]
    )
    out = model(input_ids=input_ids, labels=input_ids, **processed)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert projector.projection.query.grad.abs().sum() > 0

    model.eval()
    model.save_pretrained(tmp_path / "model")
    loaded = mmcore.MultimodalModel.from_pretrained(tmp_path / "model").eval()
    assert len(loaded.encoders["vision"].module.blocks) == 1
    with torch.no_grad():
        before = model(input_ids=input_ids, **processed).logits
        after = loaded(input_ids=input_ids, **processed).logits
    assert torch.equal(before, after)
