"""The authoring kit: the contract check in mmcore.testing, and the guide's example plugin really works."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmcore import hookimpl, hookspecs
from mmcore.factory import EncoderFactory
from mmcore.registry import EncoderSpec
from mmcore.testing import ContractError, check_encoder_plugin, registered_plugin, tiny_clip_vision
from mmcore.testing.suite import EncoderSuite, encoder_cases

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "writing-plugins.md"
EXAMPLE = ROOT / "docs" / "examples" / "mmcore-plugin-imu"
EXAMPLE_FILES = ["pyproject.toml", "mmcore_plugin_imu/__init__.py", "mmcore_plugin_imu/factory.py", "tests/test_imu.py"]


# --- the guide --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_guide_shows_every_file_of_the_example_plugin_verbatim(name):
    assert (EXAMPLE / name).read_text().rstrip("\n") in GUIDE.read_text()


def test_guide_lists_every_hook_with_its_signature_and_docstring():
    guide = GUIDE.read_text()
    hooks = [(n, f) for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(f, "mmcore_spec")]
    assert len(hooks) == 4
    for name, fn in hooks:
        assert f"### `{name}{inspect.signature(fn)}`" in guide, name
        assert inspect.cleandoc(fn.__doc__) in guide, name


def test_example_plugin_installs_from_a_temp_dir_and_its_tests_pass(tmp_path):
    """The real path: pip builds and installs the example (entry point and all) into a fresh
    directory, and the example's own tests find it through importlib.metadata."""
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(site), str(EXAMPLE)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    assert (site / "mmcore_plugin_imu-0.1.0.dist-info" / "entry_points.txt").read_text().count("imu = mmcore_plugin_imu")
    env = {**os.environ, "PYTHONPATH": str(site), "MMCORE_STRICT_PLUGINS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", str(EXAMPLE / "tests")],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "14 passed, 1 skipped" in run.stdout  # the shared suite (12 + the readme it has none of) and its own 2

    # A third party's modality trains from JSONL with `mmcore train`: the plugin's data_key / load_item.
    import json

    import numpy as np

    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    records = []
    for i in range(4):
        np.save(data / f"clip{i}.npy", rng.standard_normal((150 + 30 * i, 6)).astype(np.float32))
        records.append({"id": str(i), "imu": f"clip{i}.npy", "conversations": [
            {"from": "human", "value": "<imu>\nwhat is the wearer doing?"}, {"from": "gpt", "value": "walking"}]})
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    def mmcore(*args):
        return subprocess.run([sys.executable, "-m", "mmcore", *map(str, args)], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=300)  # fmt: skip

    done = mmcore("assemble", "--llm", "tiny", "-e", "imu=imu:preset=tiny", "-o", tmp_path / "model")
    assert done.returncode == 0, done.stderr[-3000:]
    done = mmcore("train", tmp_path / "model", "--data", data / "train.jsonl", "--stage", "align", "--steps", "2",
                  "-b", "2", "-o", tmp_path / "run")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "model" / "config.json").is_file()
    (data / "clip3.npy").write_text("not an array")
    done = mmcore("train", tmp_path / "model", "--data", data / "train.jsonl", "--check-data", "-o", tmp_path / "r2")
    assert done.returncode == 2 and "clip3.npy: expected an .npy array" in done.stderr, done.stderr[-2000:]


# --- the contract check -----------------------------------------------------------------------------


class GoodVision(EncoderFactory):
    """A CLIP tower whose CLS token stays: (28/14)^2 + 1 = 5 tokens per image."""

    presets = {"tiny": "test"}

    def make_recipe(self, checkpoint=None, preset=None, **options):
        self.check_options(options)
        return {"hidden": 24}

    def build_module(self, recipe, checkpoint=None):
        return tiny_clip_vision(hidden_size=recipe["hidden"])

    def output_width(self, recipe):
        return recipe["hidden"]

    def processor(self, recipe):
        return lambda items: {"pixel_values": torch.stack([torch.as_tensor(i, dtype=torch.float32) for i in items])}

    def num_tokens(self, recipe, inputs):
        return [5] * inputs["pixel_values"].shape[0]

    def dummy_inputs(self, recipe, batch_size=1):
        return {"pixel_values": torch.randn(batch_size, 3, 28, 28)}

    def dummy_items(self, recipe, n=1):
        return [torch.rand(3, 28, 28) for _ in range(n)]


class MiscountingVision(GoodVision):
    def num_tokens(self, recipe, inputs):  # forgets the CLS token
        return [4] * inputs["pixel_values"].shape[0]


class WrongWidthVision(GoodVision):
    def output_width(self, recipe):
        return 32


class UnserialisableRecipe(GoodVision):
    def make_recipe(self, checkpoint=None, preset=None, **options):
        return {"hidden": 24, "dtype": torch.float32}


class NotAFactory:
    pass


def _plugin(factory: type, presets=("tiny",)):
    class Plugin:
        @hookimpl
        def register_encoders(self, register):
            register(EncoderSpec(name="toy", modality="vision", summary="toy", factory=f"{__name__}:{factory.__name__}", presets=presets))

    return Plugin()


def test_contract_check_passes_a_good_plugin_and_reports_what_it_checked(tmp_path):
    with registered_plugin(_plugin(GoodVision)):
        report = check_encoder_plugin("toy", tmp_path=tmp_path)
    assert report.encoder == "test:toy"
    assert report.tokens_per_item == [5, 5] and report.output_width == 24
    assert report.checks == ["spec", "factory", "build", "dummy_inputs", "num_tokens", "processor", "save_load"]
    assert list(tmp_path.iterdir()) == [tmp_path / "toy-contract-model"]


@pytest.mark.parametrize(
    "factory, presets, check, needle",
    [
        (MiscountingVision, ("tiny",), "num_tokens", "num_tokens says [4, 4] but the encoder produced [5, 5]"),
        (WrongWidthVision, ("tiny",), "output", "expected features (tokens, 32) per item, got (5, 24)"),
        (UnserialisableRecipe, ("tiny",), "recipe", "not JSON-able"),
        (NotAFactory, ("tiny",), "factory", "EncoderFactory subclass"),
        (GoodVision, ("tiny", "huge"), "presets", "spec lists ['huge', 'tiny'] but the factory has ['tiny']"),
    ],
)
def test_contract_check_names_the_failing_check(factory, presets, check, needle):
    with registered_plugin(_plugin(factory, presets)), pytest.raises(ContractError) as info:
        check_encoder_plugin("toy")
    assert f"encoder 'toy', check {check!r}" in str(info.value)
    assert needle in str(info.value)


# --- the shared suite (mmcore.testing.suite) ----------------------------------------------------------


class DummyAtTheTableSize(GoodVision):
    """DINOv2's slip: dummy inputs at the position table's size, while the processor makes 28 px."""

    def dummy_inputs(self, recipe, batch_size=1):
        return {"pixel_values": torch.randn(batch_size, 3, 56, 56)}


def test_the_suite_is_parametrized_over_a_plugins_encoders_and_presets_and_passes_a_good_one(tmp_path):
    with registered_plugin(_plugin(GoodVision)):
        assert [case.values for case in encoder_cases("test")] == [("test:toy", "tiny")]
        assert [case.values for case in encoder_cases("test", presets=False)] == [("test:toy",)]
        assert encoder_cases("no-such-plugin") == []
        suite = EncoderSuite()
        suite.test_processor_makes_the_inputs_dummy_inputs_stand_for("test:toy", "tiny")
        suite.test_preset_builds_on_meta_and_a_dry_run_gives_num_tokens_rows("test:toy", "tiny")
        suite.test_processed_items_train_and_the_model_round_trips("test:toy", tmp_path)


def test_the_suite_fails_dummy_inputs_of_another_size_than_the_processors():
    with registered_plugin(_plugin(DummyAtTheTableSize)), pytest.raises(AssertionError) as info:
        EncoderSuite().test_processor_makes_the_inputs_dummy_inputs_stand_for("test:toy", "tiny")
    assert "pixel_values: the processor makes (2, 3, 28, 28), dummy_inputs (2, 3, 56, 56)" in str(info.value)


def test_the_suite_fails_a_miscounting_encoder_in_the_dry_run():
    with registered_plugin(_plugin(MiscountingVision)), pytest.raises(AssertionError, match=r"\(5, 24\)"):
        EncoderSuite().test_preset_builds_on_meta_and_a_dry_run_gives_num_tokens_rows("test:toy", "tiny")


class ImageFilesVision(GoodVision):
    data_key = "image"  # mmcore reads these files itself: no load_item of its own


def test_a_factory_whose_data_key_mmcore_knows_reads_its_files_with_mmcores_loader(tmp_path):
    from PIL import Image

    from mmcore.factory import get_factory

    Image.new("L", (5, 4), 200).save(tmp_path / "grey.png")
    with registered_plugin(_plugin(ImageFilesVision)):
        image = get_factory("toy").load_item(tmp_path / "grey.png")
    assert image.mode == "RGB" and image.size == (5, 4)
    with registered_plugin(_plugin(GoodVision)), pytest.raises(NotImplementedError, match="reads no training files"):
        get_factory("toy").load_item(tmp_path / "grey.png")


def test_a_preset_table_gives_the_presets_and_the_class_own_presets_win():
    from mmcore.hf_vision import TransformersVisionFactory

    table = {"tiny": {"summary": "2 layers", "config": {"hidden_size": 32}, "checkpoint": None},
             "base": {"summary": "12 layers", "config": {"hidden_size": 768}, "checkpoint": "org/base"}}  # fmt: skip

    class FromTable(EncoderFactory):
        preset_table = table

    class Explicit(EncoderFactory):
        preset_table = table
        presets = {"tiny": "mine"}

    class Vision(TransformersVisionFactory):
        preset_table = table

    assert FromTable.presets == {"tiny": "2 layers", "base": "12 layers"}
    assert Explicit.presets == {"tiny": "mine"}  # set by the class itself: kept
    assert Vision.presets == FromTable.presets
    assert Vision.preset_configs == {"tiny": {"hidden_size": 32}, "base": {"hidden_size": 768}}
    assert EncoderFactory.presets == {}  # the base is untouched
