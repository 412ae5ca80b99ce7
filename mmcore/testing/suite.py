"""One pytest suite that every registered encoder and every preset of it gets for free, as timm's
``tests/test_models.py`` is parametrized over ``list_models()``.

A plugin's tests run it for the plugin's own encoders by subclassing a suite class (the class name
must start with ``Test`` for pytest to collect it)::

    from mmcore.testing.suite import EncoderSuite

    class TestImuSuite(EncoderSuite):
        plugin = "imu"                               # every encoder this plugin registers
        option_variants = {"imu": [{"window": 50}]}  # optional: option sets the contract also runs with

Every ``test_*`` method below is then parametrized over the plugin's encoders (``encoder``) or over
each encoder and each of its presets (``encoder``, ``preset``). ``plugin = None`` covers every
installed plugin's encoders. A plugin whose factory is a `mmcore.hf_vision.TransformersVisionFactory`
subclasses `TransformersVisionSuite` instead, which adds the checkpoint-loading and image-processor
tests such towers share (it saves tiny checkpoints of its own). `encoder_cases` gives the same
parameters for a plugin's own parametrized tests.

What it checks, per encoder: the contract (`check_encoder_plugin`, also with each option variant);
listing it imports no torch, transformers, timm, torchaudio or torchvision, and the spec lists the
factory's presets in order; unknown presets and options and a missing checkpoint are `ConfigError`
naming them (with a suggestion for the preset); the processor pickles (dataloader workers); the
processor's output for ``dummy_items`` trains through an assembled model (finite loss, gradients in
the projector), and the model saves and loads back with its encoder record, callbacks, token counts
and logits unchanged. Per preset: it builds on the meta device and a dry run of ``dummy_inputs``
there yields ``num_tokens`` rows of the announced width per item; the processor makes inputs of the
shapes ``dummy_inputs`` stands for (a test run times what real inputs cost). ``readme`` names a
README whose ``## Example`` python block must run.

Importing this module imports pytest (and torch, when the tests run); `mmcore.testing` itself does not.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest

from mmcore.testing.fixtures import tiny_assembled_model
from mmcore.testing.plugins import check_encoder_plugin, encoder_features

#: Modules listing an encoder must not import (a plugin's entry module registers metadata only).
HEAVY_MODULES = ("torch", "transformers", "timm", "torchaudio", "torchvision")


def encoder_names(plugin: str | None = None) -> list[str]:
    """Qualified names (``plugin:name``) of the encoders ``plugin`` registers (None: every plugin's)."""
    from mmcore.plugins import get_registry

    return [s.qualified_name for s in get_registry().list_encoders() if plugin is None or s.plugin == plugin]


def encoder_cases(plugin: str | None = None, *, presets: bool = True) -> list[Any]:
    """``pytest.param(encoder, preset)`` for each encoder of ``plugin`` and each of its presets
    (``presets=False``: ``pytest.param(encoder)`` per encoder), with readable ids; for
    ``@pytest.mark.parametrize("encoder, preset", encoder_cases("clip"))``."""
    from mmcore.plugins import get_registry

    registry = get_registry()
    if not presets:
        return [pytest.param(name, id=name) for name in encoder_names(plugin)]
    return [
        pytest.param(name, preset, id=f"{name}-{preset}")
        for name in encoder_names(plugin)
        for preset in registry.get_encoder(name).presets
    ]


def _callbacks(encoder: Any) -> tuple[Any, Any, Any]:
    return (
        encoder.preprocess_callback,
        encoder.postprocess_module_callback,
        encoder.postprocess_projector_callback,
    )


class EncoderSuite:
    """The tests every encoder plugin gets; subclass it as ``Test...`` and set `plugin` (see the
    module docstring). Each ``test_*`` method takes ``encoder`` (a qualified encoder name) and maybe
    ``preset``, ``options`` or ``tmp_path``."""

    #: the plugin whose encoders are tested; None: every installed plugin's
    plugin: ClassVar[str | None] = None
    #: the preset the tests that run real (random) weights build; the full-size ones go on the meta device
    test_preset: ClassVar[str] = "tiny"
    #: encoder name (short or qualified) -> option sets the contract check also runs with
    option_variants: ClassVar[Mapping[str, Sequence[Mapping[str, Any]]]] = {}
    #: a README whose ``## Example`` python block must run (in an empty working directory)
    readme: ClassVar[str | os.PathLike[str] | None] = None

    def pytest_generate_tests(self, metafunc: Any) -> None:
        """Parametrize each test over the plugin's encoders, their presets and option variants."""
        names = metafunc.fixturenames
        if "encoder" not in names:
            return
        if "preset" in names:
            metafunc.parametrize("encoder, preset", encoder_cases(self.plugin))
        elif "variant" in names or "options" in names:
            # ``variant``: each option set of `option_variants`; ``options``: the defaults ({}) too
            key = "variant" if "variant" in names else "options"
            defaults = [] if key == "variant" else [{}]
            cases = [
                pytest.param(name, dict(options), id=f"{name}-{options}")
                for name in encoder_names(self.plugin)
                for options in defaults + self.variants_of(name)
            ]
            metafunc.parametrize(f"encoder, {key}", cases)
        else:
            metafunc.parametrize("encoder", encoder_cases(self.plugin, presets=False))

    def variants_of(self, encoder: str) -> list[Mapping[str, Any]]:
        short = encoder.partition(":")[2]
        return list(self.option_variants.get(encoder, self.option_variants.get(short, ())))

    # -- the contract ------------------------------------------------------------------------------
    def test_contract(self, encoder: str, tmp_path: Path) -> None:
        report = check_encoder_plugin(encoder, preset=self.test_preset, tmp_path=tmp_path)
        assert report.encoder == encoder and report.checks[-1] == "save_load"
        assert report.tokens_per_item and all(n > 0 for n in report.tokens_per_item)

    def test_contract_with_option_variants(
        self, encoder: str, variant: dict[str, Any], tmp_path: Path
    ) -> None:
        report = check_encoder_plugin(encoder, preset=self.test_preset, tmp_path=tmp_path, options=variant)
        recorded = report.recipe.get("options", report.recipe)  # where the factory keeps its options
        assert all(recorded.get(k) == (list(v) if isinstance(v, tuple) else v) for k, v in variant.items()), (
            f"the recipe does not record the options {variant}: {report.recipe}"
        )

    def test_listing_imports_no_torch_and_the_spec_lists_the_factorys_presets(self, encoder: str) -> None:
        import mmcore

        code = (
            "import json, sys\n"
            "from mmcore.plugins import get_registry\n"
            f"spec = get_registry().get_encoder({encoder!r})\n"
            "print(json.dumps([spec.qualified_name, list(spec.presets), "
            f"sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY_MODULES!r})]))\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("MMCORE_")}
        out = subprocess.run(
            [sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env
        )
        name, presets, heavy = json.loads(out.stdout)
        assert heavy == [], f"listing {encoder!r} imported {heavy}"
        assert name == encoder and presets == list(mmcore.get_factory(encoder).presets)
        assert self.test_preset in presets

    # -- typed errors ------------------------------------------------------------------------------
    def test_unknown_preset_is_a_config_error_suggesting_the_nearest(self, encoder: str) -> None:
        import mmcore
        from mmcore.errors import ConfigError

        nearest = max(mmcore.get_factory(encoder).presets, key=len)
        wrong = nearest + "x"
        with pytest.raises(
            ConfigError, match=rf"unknown preset {re.escape(repr(wrong))}.*{re.escape(repr(nearest))}"
        ):
            mmcore.build_encoder(encoder, preset=wrong)

    def test_unknown_option_is_a_config_error_naming_the_accepted_ones(self, encoder: str) -> None:
        import mmcore
        from mmcore.errors import ConfigError

        accepted = ", ".join(sorted(mmcore.get_factory(encoder).options)) or "none"
        with pytest.raises(ConfigError, match=rf"unknown option\(s\) no_such_option.*{re.escape(accepted)}"):
            mmcore.build_encoder(encoder, preset=self.test_preset, no_such_option=1)

    def test_a_missing_checkpoint_is_a_config_error_naming_it(self, encoder: str, tmp_path: Path) -> None:
        import mmcore
        from mmcore.errors import ConfigError

        with pytest.raises(ConfigError, match="nowhere"):
            mmcore.build_encoder(encoder, str(tmp_path / "nowhere"), device="meta")

    # -- the processor -----------------------------------------------------------------------------
    def test_processor_pickles_for_dataloader_workers(self, encoder: str) -> None:
        import torch

        import mmcore

        factory = mmcore.get_factory(encoder)
        recipe = factory.make_recipe(preset=self.test_preset)
        items = factory.dummy_items(recipe, 3)
        if not items:
            pytest.skip(f"{encoder} has no dummy_items")
        processor = factory.processor(recipe)
        copy = pickle.loads(pickle.dumps(processor))
        expected, got = processor(items), copy(items)
        assert expected.keys() == got.keys()
        assert all(torch.equal(got[k], v) for k, v in expected.items())

    def test_processor_makes_the_inputs_dummy_inputs_stand_for(self, encoder: str, preset: str) -> None:
        """A test run times ``dummy_inputs``: they must have the shapes the processor really makes."""
        import mmcore

        factory = mmcore.get_factory(encoder)
        recipe = factory.make_recipe(preset=preset)
        items = factory.dummy_items(recipe, 2)
        if not items:
            pytest.skip(f"{encoder} has no dummy_items")
        processed, dummy = factory.processor(recipe)(items), factory.dummy_inputs(recipe, 2)
        shared = sorted(set(processed) & set(dummy))
        assert shared, f"the processor makes {sorted(processed)}, dummy_inputs {sorted(dummy)}"
        for key in shared:
            assert tuple(processed[key].shape[1:]) == tuple(dummy[key].shape[1:]), (
                f"{key}: the processor makes {tuple(processed[key].shape)}, dummy_inputs {tuple(dummy[key].shape)}"
            )

    # -- presets -----------------------------------------------------------------------------------
    def test_preset_builds_on_meta_and_a_dry_run_gives_num_tokens_rows(
        self, encoder: str, preset: str
    ) -> None:
        import torch

        import mmcore

        built = mmcore.build_encoder(encoder, preset=preset, device="meta")
        assert all(p.device.type == "meta" for p in built.module.parameters())
        factory, recipe = mmcore.get_factory(encoder), built.source["recipe"]
        assert json.loads(json.dumps(recipe)) == recipe
        assert built.output_width == factory.output_width(recipe)
        with torch.device("meta"):
            inputs = factory.dummy_inputs(recipe, batch_size=2)
            features = encoder_features(built, inputs)  # nothing is allocated
        assert [tuple(f.shape) for f in features] == [
            (n, built.output_width) for n in factory.num_tokens(recipe, inputs)
        ]

    # -- an assembled model --------------------------------------------------------------------------
    def test_processed_items_train_and_the_model_round_trips(self, encoder: str, tmp_path: Path) -> None:
        import torch

        import mmcore
        from mmcore.modeling.multimodal import MultimodalModel
        from mmcore.processing import MultimodalProcessor

        factory = mmcore.get_factory(encoder)
        torch.manual_seed(0)
        built = mmcore.build_encoder(encoder, preset=self.test_preset)
        recipe, modality = built.source["recipe"], factory.spec.modality
        items = factory.dummy_items(recipe, 2)
        if not items:
            pytest.skip(f"{encoder} has no dummy_items")
        model, tokenizer = tiny_assembled_model({modality: built})
        processor = MultimodalProcessor.from_model(model, tokenizer)
        token = processor.tokens[modality]
        batch = processor([f"a {token} b", f"{token} a b c d"], **{modality: [[items[0]], [items[1]]]})
        per_item = [
            model.encoders[modality].projector.num_output_tokens(n)
            for n in factory.num_tokens(recipe, processor.process_items({modality: items})[0][modality])
        ]
        assert (batch["input_ids"] == processor.token_ids[modality]).sum(-1).tolist() == per_item

        model.train()
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        out = model(**batch, labels=labels)
        assert torch.isfinite(out.loss)
        out.loss.backward()
        grads = [p.grad for p in model.encoders[modality].projector.parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)

        model.eval().save_pretrained(tmp_path / "model")
        record = json.loads((tmp_path / "model" / "config.json").read_text())["encoders"][modality]
        assert record["source"]["kind"] == "plugin" and record["source"]["encoder"] == encoder
        loaded = MultimodalModel.from_pretrained(tmp_path / "model").eval()
        assert type(loaded.encoders[modality].module) is type(built.module)
        assert _callbacks(loaded.encoders[modality]) == _callbacks(model.encoders[modality])
        again = MultimodalProcessor.from_model(loaded, tokenizer)(
            [f"a {token} b", f"{token} a b c d"], **{modality: [[items[0]], [items[1]]]}
        )
        assert torch.equal(again["input_ids"], batch["input_ids"])
        with torch.no_grad():
            assert torch.equal(model(**batch).logits, loaded(**batch).logits)

    def test_readme_example_runs(self, encoder: str, tmp_path: Path, monkeypatch: Any) -> None:
        if self.readme is None:
            pytest.skip("no readme set")
        text = Path(self.readme).read_text()
        found = re.search(r"## Example\n+```python\n(.*?)```", text, re.DOTALL)
        assert found, f"{self.readme} has no '## Example' python block"
        monkeypatch.chdir(tmp_path)
        exec(compile(found.group(1), f"{self.readme} example", "exec"), {})
        assert any(tmp_path.iterdir()), "the example wrote nothing"


class TransformersVisionSuite(EncoderSuite):
    """`EncoderSuite` plus what every `~mmcore.hf_vision.TransformersVisionFactory` tower shares:
    it saves tiny checkpoints (a vision-only model with an image processor unlike the presets', a
    whole model where the family has one) and checks the real loading path, the processor and the
    token counts against them."""

    #: keyword arguments of the whole model's text config (``factory.whole_model_type``)
    whole_model_text_config: ClassVar[Mapping[str, Any]] = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    #: raw (height, width) image sizes the processor resizes
    raw_sizes: ClassVar[Sequence[tuple[int, int]]] = ((10, 10), (37, 23), (20, 45), (100, 64))

    @staticmethod
    def factory(encoder: str) -> Any:
        import mmcore
        from mmcore.hf_vision import TransformersVisionFactory

        factory = mmcore.get_factory(encoder)
        assert isinstance(factory, TransformersVisionFactory), (
            f"{encoder}'s factory is not a TransformersVisionFactory"
        )
        return factory

    def vision_config(self, factory: Any) -> Any:
        """The saved checkpoints' vision config: the test preset's, narrower, at 3 x 3 patches."""
        config = factory.config_class(**factory.preset_configs[self.test_preset])
        config.update(dict(hidden_size=16, intermediate_size=32, num_attention_heads=2))
        config.image_size = 3 * config.patch_size
        return config

    def image_processor(self, factory: Any, config: Any) -> Any:
        """The family's processor at the checkpoint's size with a mean unlike the presets'."""
        processor = factory.default_processor(factory.image_size(config))
        processor.image_mean = [0.1, 0.2, 0.3]
        return processor

    def save_checkpoint(self, encoder: str, path: Path, *, with_processor: bool = True) -> Any:
        """A saved random vision-only model (and its processor); returns its state dict."""
        import torch

        factory = self.factory(encoder)
        config = self.vision_config(factory)
        torch.manual_seed(1)
        model = factory.model_class(config)
        model.save_pretrained(path)
        if with_processor:
            self.image_processor(factory, config).save_pretrained(path)
        return model.state_dict()

    def images(self, sizes: Sequence[tuple[int, int]] | None = None) -> list[Any]:
        import numpy as np

        rng = np.random.default_rng(0)
        return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in (sizes or self.raw_sizes)]

    def assert_loaded_from(self, encoder: str, built: Any, saved: Mapping[str, Any]) -> None:
        """``built`` has every weight its recipe calls for, and each is the checkpoint's (the
        factory may leave parts of the checkpoint out, as SigLIP's pooling head)."""
        import torch

        loaded = built.module.state_dict()
        with torch.device("meta"):
            expected = self.factory(encoder).build_module(built.source["recipe"]).state_dict().keys()
        assert loaded.keys() == expected, sorted(set(loaded) ^ set(expected))
        assert set(loaded) <= set(saved), sorted(set(loaded) - set(saved))
        assert all(torch.equal(v, saved[k]) for k, v in loaded.items())

    # -- the real loading path ---------------------------------------------------------------------
    def test_loads_a_saved_vision_tower_and_its_processor(self, encoder: str, tmp_path: Path) -> None:
        import mmcore

        saved = self.save_checkpoint(encoder, tmp_path)
        built = mmcore.build_encoder(encoder, str(tmp_path))
        self.assert_loaded_from(encoder, built, saved)
        recipe = built.source["recipe"]
        side = 3 * recipe["config"]["patch_size"]
        assert recipe["checkpoint"] == str(tmp_path) and recipe["preset"] is None
        assert recipe["config"]["hidden_size"] == 16 and recipe["config"]["image_size"] == side
        assert recipe["processor"]["image_mean"] == [0.1, 0.2, 0.3]  # read from the checkpoint
        processed = self.factory(encoder).processor(recipe)(self.images())
        assert processed["pixel_values"].shape == (len(self.raw_sizes), 3, side, side)

    def test_loads_the_vision_half_of_a_whole_model(self, encoder: str, tmp_path: Path) -> None:
        import torch
        from transformers import AutoConfig, AutoModel

        import mmcore

        factory = self.factory(encoder)
        if factory.whole_model_type is None:
            pytest.skip(f"{factory.family} has no whole-model type")
        vision = self.vision_config(factory)
        config = AutoConfig.for_model(
            factory.whole_model_type,
            text_config=dict(self.whole_model_text_config),
            vision_config=vision.to_dict(),
        )
        torch.manual_seed(2)
        model = AutoModel.from_config(config)
        model.save_pretrained(tmp_path)
        self.image_processor(factory, vision).save_pretrained(tmp_path)
        built = mmcore.build_encoder(encoder, str(tmp_path))
        self.assert_loaded_from(encoder, built, model.vision_model.state_dict())
        assert built.source["recipe"]["config"]["model_type"] == factory.model_type

    def test_a_checkpoint_without_a_processor_config_warns_and_uses_the_familys(
        self, encoder: str, tmp_path: Path
    ) -> None:
        factory = self.factory(encoder)
        self.save_checkpoint(encoder, tmp_path, with_processor=False)
        with pytest.warns(UserWarning, match="no readable image processor config"):
            recipe = factory.make_recipe(checkpoint=str(tmp_path))
        expected = factory.default_processor(factory.image_size(self.vision_config(factory)))
        assert recipe["processor"] == json.loads(expected.to_json_string())

    def test_a_checkpoint_on_the_meta_device_reads_no_weights(self, encoder: str, tmp_path: Path) -> None:
        import mmcore

        self.save_checkpoint(encoder, tmp_path)
        built = mmcore.build_encoder(encoder, str(tmp_path), device="meta")
        assert all(p.device.type == "meta" for p in built.module.parameters())
        assert built.module.config.hidden_size == 16

    def test_a_checkpoint_of_another_model_type_is_refused_naming_it(
        self, encoder: str, tmp_path: Path
    ) -> None:
        from transformers import BertConfig

        import mmcore
        from mmcore.errors import ConfigError

        BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
        family = self.factory(encoder).family
        with pytest.raises(ConfigError, match=f"not a {re.escape(family)} model.*'bert'"):
            mmcore.build_encoder(encoder, str(tmp_path))

    def test_assembled_model_round_trips_without_the_checkpoint_directory(
        self, encoder: str, tmp_path: Path
    ) -> None:
        import torch

        import mmcore
        from mmcore.modeling.multimodal import MultimodalModel
        from mmcore.processing import MultimodalProcessor

        checkpoint = tmp_path / "checkpoint"
        self.save_checkpoint(encoder, checkpoint)
        factory = self.factory(encoder)
        built = mmcore.build_encoder(encoder, str(checkpoint))
        modality = factory.spec.modality
        model, tokenizer = tiny_assembled_model({modality: built})
        processor = MultimodalProcessor.from_model(model, tokenizer)
        token = processor.tokens[modality]
        batch = processor([f"a {token} b", f"{token} c"], **{modality: self.images()[:2]})
        model.save_pretrained(tmp_path / "model")
        shutil.rmtree(checkpoint)  # the saved model needs only its own directory
        loaded = MultimodalModel.from_pretrained(tmp_path / "model").eval()
        vision = loaded.encoders[modality]
        assert isinstance(vision.module, factory.model_class)
        assert _callbacks(vision) == _callbacks(built)
        with torch.no_grad():
            assert torch.equal(model(**batch).logits, loaded(**batch).logits)

    # -- token counts, options, the processor --------------------------------------------------------
    def test_num_tokens_is_the_real_feature_count_for_raw_images_of_several_sizes(
        self, encoder: str, options: dict[str, Any], tmp_path: Path
    ) -> None:
        from PIL import Image

        import mmcore

        self.save_checkpoint(encoder, tmp_path)
        built = mmcore.build_encoder(encoder, str(tmp_path), **options).eval()
        factory, recipe = self.factory(encoder), built.source["recipe"]
        raw = self.images()
        processed = factory.processor(recipe)(
            [Image.fromarray(a) for a in raw[:2]] + raw[2:]
        )  # PIL and numpy
        features = encoder_features(built, processed)
        assert all(f.shape[-1] == factory.output_width(recipe) for f in features)
        assert factory.num_tokens(recipe, processed) == [f.shape[0] for f in features]
        config = factory.config_class.from_dict(recipe["config"])
        kept_prefix = factory.prefix_tokens(config) - factory.dropped_prefix_tokens(
            {**factory.options, **recipe["options"]}
        )
        assert {f.shape[0] - kept_prefix for f in features} == {9}  # 3 x 3 patches

    def test_bad_option_values_are_config_errors_saying_what_was_expected(self, encoder: str) -> None:
        from mmcore.errors import ConfigError

        factory = self.factory(encoder)
        n = factory.config_class(**factory.preset_configs[self.test_preset]).num_hidden_layers
        cases = [
            ({"feature_layer": n + 1}, rf"-{n + 1}\.\.{n}\), got {n + 1}"),
            ({"feature_layer": []}, r"got \[\]"),
            ({"feature_layer": "last"}, "'last'"),
        ]
        cases += [
            ({k: "yes"}, f"{k} must be True or False, got 'yes'")
            for k, v in factory.options.items()
            if isinstance(v, bool)
        ]
        for options, needle in cases:
            with pytest.raises(ConfigError, match=needle):
                factory.make_recipe(preset=self.test_preset, **options)

    def test_processor_refuses_what_is_not_an_image(self, encoder: str) -> None:
        import numpy as np

        from mmcore.errors import EncoderInputError

        factory = self.factory(encoder)
        processor = factory.processor(factory.make_recipe(preset=self.test_preset))
        with pytest.raises(EncoderInputError, match="item 1 must be a PIL image.*float64"):
            processor([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3))])
        with pytest.raises(EncoderInputError, match="got no images"):
            processor([])

    def test_a_single_tiny_array_is_one_channels_last_image(self, encoder: str) -> None:
        import numpy as np
        import torch

        factory = self.factory(encoder)
        recipe = factory.make_recipe(preset=self.test_preset)
        color = np.array([200, 100, 0], np.uint8)
        pixel_values = factory.processor(recipe)(np.broadcast_to(color, (3, 3, 3)).copy())["pixel_values"]
        assert pixel_values.shape == (1, *factory.dummy_inputs(recipe, 1)["pixel_values"].shape[1:])
        mean, std = np.array(recipe["processor"]["image_mean"]), np.array(recipe["processor"]["image_std"])
        expected = torch.tensor((color / 255 - mean) / std, dtype=torch.float32)
        # each channel is one colour: read as (H, W, C), never guessed as (C, H, W)
        torch.testing.assert_close(pixel_values[0].mean(dim=(1, 2)), expected, atol=1e-3, rtol=0)
        assert pixel_values[0].std(dim=(1, 2)).max() < 1e-3
