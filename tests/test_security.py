"""Loading a model directory imports no code that an installed plugin did not register, unless asked."""

import json
import sys

import pytest

from mmcore.errors import UntrustedCodeError
from mmcore.modeling.multimodal import MultimodalModel
from mmcore.testing import tiny_multimodal_model

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
