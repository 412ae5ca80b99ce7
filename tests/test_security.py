"""Loading a model directory imports no code that an installed plugin did not register, unless asked."""

import json
import sys
import warnings

import pytest

from mmcore import hookimpl
from mmcore.callbacks import Callback, SelectFeatureLayer
from mmcore.errors import UntrustedCodeError
from mmcore.modeling.multimodal import MultimodalModel
from mmcore.plugins import PluginWarning
from mmcore.registry import CallbackSpec
from mmcore.testing import registered_plugin, tiny_multimodal_model

EVIL = '''
import pathlib
pathlib.Path(__file__).with_name("ran.marker").write_text("ran")

def cb(inputs, output):
    return output
'''


@pytest.fixture
def evil_dir(tmp_path, monkeypatch):
    model, _ = tiny_multimodal_model()
    model.save_pretrained(tmp_path / "m")
    config_path = tmp_path / "m" / "config.json"
    config = json.loads(config_path.read_text())
    name = next(iter(config["encoders"]))
    config["encoders"][name].setdefault("callbacks", {})["preprocess"] = {"import": "evilmod_mmcore_test:cb"}
    config_path.write_text(json.dumps(config))
    (tmp_path / "m" / "evilmod_mmcore_test.py").write_text(EVIL)
    monkeypatch.syspath_prepend(str(tmp_path / "m"))
    yield tmp_path / "m"
    sys.modules.pop("evilmod_mmcore_test", None)


def test_import_path_callback_is_refused_without_trust(evil_dir):
    with pytest.raises(UntrustedCodeError, match=r"evilmod_mmcore_test:cb.*trust_remote_code=True.*--trust-remote-code"):
        MultimodalModel.from_pretrained(evil_dir)
    assert "evilmod_mmcore_test" not in sys.modules
    assert not (evil_dir / "ran.marker").exists()


def test_import_path_callback_loads_with_trust(evil_dir):
    loaded = MultimodalModel.from_pretrained(evil_dir, trust_remote_code=True)
    assert (evil_dir / "ran.marker").exists()
    assert any(e.preprocess_callback is sys.modules["evilmod_mmcore_test"].cb for e in loaded.encoders.values())


# --- callbacks are recorded as plugin:name; a later plugin reusing a name shadows nothing ---------


class ToyScale(Callback):
    """A plugin's callback (registered by `_Toy` below)."""

    name = "toy_scale"
    slot = "postprocess_projector"

    def __init__(self, factor: float = 1.0):
        self.factor = factor

    def params(self):
        return {"factor": self.factor}

    def __call__(self, inputs, output):
        return output


class NotToBuild:
    def __init__(self, **params):
        raise AssertionError("a clashing plugin's callback was built for a record naming another plugin's")


def _plugin_registering(name: str, factory: str, slot: str):
    class Plugin:
        @hookimpl
        def register_callbacks(self, register):
            register(CallbackSpec(name=name, slots=(slot,), summary="test", factory=f"{__name__}:{factory}"))

    return Plugin()


def _callback_record(directory, slot):
    config = json.loads((directory / "config.json").read_text())
    return config, config["encoders"]["vision"]["callbacks"][slot]


def test_builtin_callback_is_recorded_with_its_plugin(tmp_path):
    model, _ = tiny_multimodal_model()
    model.save_pretrained(tmp_path / "m")
    assert _callback_record(tmp_path / "m", "postprocess_module")[1]["name"] == "builtin:select_feature_layer"


def test_a_plugin_reusing_a_builtin_callback_name_breaks_no_saved_directory(tmp_path):
    model, _ = tiny_multimodal_model()
    model.save_pretrained(tmp_path / "new")
    model.save_pretrained(tmp_path / "old")  # as saved before names were qualified: the bare name
    config, record = _callback_record(tmp_path / "old", "postprocess_module")
    record["name"] = "select_feature_layer"
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    clashing = _plugin_registering("select_feature_layer", "NotToBuild", "postprocess_module")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginWarning)  # the clash itself is reported (tests/test_plugins.py)
        with registered_plugin(clashing, name="other") as registry:
            assert {s.plugin for s in registry.items("callback") if s.name == "select_feature_layer"} == {"builtin", "other"}
            for directory in ("new", "old"):
                loaded = MultimodalModel.from_pretrained(tmp_path / directory)
                callback = loaded.encoders["vision"].postprocess_module_callback
                assert type(callback) is SelectFeatureLayer
                assert callback == model.encoders["vision"].postprocess_module_callback
            loaded.save_pretrained(tmp_path / "again")  # under the clash: still the built-in, qualified
            assert _callback_record(tmp_path / "again", "postprocess_module")[1]["name"] == "builtin:select_feature_layer"


def test_a_plugin_callback_is_recorded_qualified_and_survives_a_later_clash(tmp_path):
    with registered_plugin(_plugin_registering("toy_scale", "ToyScale", "postprocess_projector"), name="toyplugin"):
        model, _ = tiny_multimodal_model()
        model.encoders["vision"].postprocess_projector_callback = ToyScale(factor=0.5)
        model.save_pretrained(tmp_path / "m")
        assert _callback_record(tmp_path / "m", "postprocess_projector")[1] == {
            "name": "toyplugin:toy_scale",
            "params": {"factor": 0.5},
        }
        impostor = _plugin_registering("toy_scale", "NotToBuild", "postprocess_projector")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PluginWarning)
            with registered_plugin(impostor, name="impostor"):
                loaded = MultimodalModel.from_pretrained(tmp_path / "m")
    assert loaded.encoders["vision"].postprocess_projector_callback == ToyScale(factor=0.5)


# --- transformers' own loaders: never asked on stdin, never run a tokenizer's auto_map code -------

EVIL_TOKENIZER = '''
import pathlib
pathlib.Path(__file__).with_name("tokenizer_ran.marker").write_text("ran")
from transformers import PreTrainedTokenizerFast as EvilTokenizer
'''


@pytest.fixture
def auto_map_dir(tmp_path):
    """An assembled model directory (model, processor, tokenizer) whose tokenizer names code to run."""
    import importlib.util
    import subprocess

    if importlib.util.find_spec("mmcore_plugin_clip") is None:
        pytest.skip("needs mmcore-plugin-clip")
    directory = tmp_path / "m"
    subprocess.run(
        [sys.executable, "-m", "mmcore", "assemble", "--llm", "tiny", "-e", "vision=clip:preset=tiny", "-o", str(directory)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "EvilTokenizer"
    config["auto_map"] = {"AutoTokenizer": ["evil_tokenizer.EvilTokenizer", "evil_tokenizer.EvilTokenizer"]}
    config_path.write_text(json.dumps(config))
    (directory / "evil_tokenizer.py").write_text(EVIL_TOKENIZER)
    return directory


def test_test_run_answering_yes_on_stdin_runs_no_tokenizer_code(auto_map_dir):
    import subprocess

    # HF asks "Do you wish to run the custom code? [y/N]" on stdin when trust_remote_code is left
    # unset; mmcore always passes it, so the "y" is never read and nothing is imported.
    result = subprocess.run(
        [sys.executable, "-m", "mmcore", "test-run", str(auto_map_dir), "--steps", "1", "--generate", "0"],
        input="y\ny\n", capture_output=True, text=True, timeout=300, cwd=auto_map_dir,
    )  # fmt: skip
    assert not (auto_map_dir / "tokenizer_ran.marker").exists()
    assert result.returncode == 2, result.stderr
    assert "[y/N]" not in result.stdout + result.stderr
    assert "trust_remote_code" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_processor_from_pretrained_refuses_a_tokenizer_naming_code(auto_map_dir):
    from mmcore.processing import MultimodalProcessor

    model = MultimodalModel.from_pretrained(auto_map_dir)
    with pytest.raises(UntrustedCodeError, match="trust_remote_code=True"):
        MultimodalProcessor.from_pretrained(auto_map_dir, model)
    assert not (auto_map_dir / "tokenizer_ran.marker").exists()
