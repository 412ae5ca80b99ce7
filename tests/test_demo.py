"""The demo (the README's main job), shortened: it learns to caption held-out shapes and sounds far
above chance, through the real data format, training loop, save and reload."""

import pytest
from rich.console import Console

pytest.importorskip("mmcore_plugin_clip")
pytest.importorskip("mmcore_plugin_whisper")

from mmcore import demo  # noqa: E402


@pytest.fixture
def one_thread():
    """Tiny matrices gain little from a second thread, and under ``pytest -n 2`` on two cores a
    second one per worker oversubscribes the CPU (OpenMP threads then wait on each other)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_quick_demo_learns_well_above_chance(tmp_path, one_thread):
    console = Console(record=True, width=120)
    accuracy = demo.run(demo.Settings.quick(), tmp_path, console)
    chance = {"vision": 1 / (len(demo.COLORS) * len(demo.SHAPES)), "audio": 1 / len(demo.SOUNDS)}
    assert set(accuracy) == set(chance)
    for modality, value in accuracy.items():
        assert value >= max(0.5, 3 * chance[modality]), accuracy  # chance: 11 % (vision), 25 % (audio)
    text = console.export_text()
    assert "held-out exact-match captions" in text and "stage 'align'" in text and "stage 'finetune'" in text
    saved = tmp_path / "finetune" / "model"
    assert (saved / "model.safetensors").is_file() and (saved / "processor_config.json").is_file()
    lines = (tmp_path / "data" / "train.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 16 * len(demo.COLORS) * len(demo.SHAPES)  # as many clips as pictures


def test_demo_exit_status_follows_the_target(monkeypatch):
    monkeypatch.setattr(demo, "run", lambda settings, workdir, console: {"vision": 0.95, "audio": 0.89})
    assert demo.main([]) == 1
    monkeypatch.setattr(demo, "run", lambda settings, workdir, console: {"vision": 0.95, "audio": 0.9})
    assert demo.main([]) == 0
