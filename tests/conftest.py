import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def tiny():
    """A fresh (model, tokenizer) pair: tiny CLIP + Whisper + Llama with modality tokens."""
    from mmcore.testing import tiny_multimodal_model

    model, tokenizer = tiny_multimodal_model()
    return model, tokenizer


@pytest.fixture
def cli(monkeypatch):
    """``cli(*args)`` runs the ``mmcore`` app in-process, with the fake plugin ``fake`` of
    ``cli_helpers`` registered; returns typer's ``Result``."""
    from cli_helpers import FakePlugin
    from typer.testing import CliRunner

    from mmcore.cli import app as cli_app
    from mmcore.testing import registered_plugin

    for var in ("MMCORE_LOAD_PLUGINS", "MMCORE_DISABLE_PLUGINS", "MMCORE_STRICT_PLUGINS", "MMCORE_DEBUG"):
        monkeypatch.delenv(var, raising=False)
    with registered_plugin(FakePlugin(), name="fake"):
        app = cli_app.build_app()
        runner = CliRunner()
        yield lambda *args: runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="session")
def demo_start(tmp_path_factory):
    """The demo's model (CLIP + Whisper presets + a width-32 Llama) and processor saved in one
    directory, and a one-file training set: ``(model_dir, data)``. Needs the clip and whisper plugins."""
    pytest.importorskip("mmcore_plugin_clip")
    pytest.importorskip("mmcore_plugin_whisper")
    import torch

    from mmcore.demo import build_model, make_dataset

    root = tmp_path_factory.mktemp("demo-start")
    torch.manual_seed(0)
    model, processor = build_model(llm_width=32)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    return root / "model", make_dataset(root / "data", 1, seed=0, name="train")
