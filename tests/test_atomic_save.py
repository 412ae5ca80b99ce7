"""Saving keeps data whatever happens: symlinks, mount points, the working directory, kills, a full disk."""

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mmcore.files as files
from mmcore.errors import SaveError
from mmcore.modeling.multimodal import MultimodalModel


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_symlinked_target_keeps_the_link_and_updates_the_real_directory(tiny, tmp_path):
    model, _ = tiny
    real = tmp_path / "real"
    real.mkdir()
    (real / "notes.txt").write_text("mine")
    link = tmp_path / "link"
    link.symlink_to(real)

    model.save_pretrained(link)

    assert link.is_symlink() and os.readlink(link) == str(real)
    assert (real / "config.json").is_file() and (real / "notes.txt").read_text() == "mine"
    assert _same_weights(MultimodalModel.from_pretrained(real), model)


def test_symlinked_file_and_folder_inside_the_target_stay_symlinks(tiny, tmp_path):
    model, _ = tiny
    outside = tmp_path / "outside"
    (outside / "assets").mkdir(parents=True)
    (outside / "assets" / "a.txt").write_text("a")
    (outside / "vocab.txt").write_text("v")
    target = tmp_path / "model"
    model.save_pretrained(target)
    (target / "assets").symlink_to(outside / "assets")
    (target / "vocab.txt").symlink_to(outside / "vocab.txt")

    model.save_pretrained(target)

    for name, dest in (("assets", outside / "assets"), ("vocab.txt", outside / "vocab.txt")):
        assert (target / name).is_symlink(), name
        assert os.readlink(target / name) == str(dest)


def test_save_into_the_working_directory_keeps_it(tiny, tmp_path, monkeypatch):
    model, _ = tiny
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale").mkdir()
    (target / "model-00009-of-00009.safetensors").write_text("stale shard")
    inode = target.stat().st_ino
    monkeypatch.chdir(target)

    model.save_pretrained(".")

    assert Path.cwd() == target and target.stat().st_ino == inode  # the very same directory
    assert (target / "stale").is_dir()  # not a model file: kept
    assert not (target / "model-00009-of-00009.safetensors").exists()  # a stale shard: removed
    assert not [p for p in target.iterdir() if p.name.startswith(".")]
    assert _same_weights(MultimodalModel.from_pretrained(target), model)


def test_saved_directory_gets_the_umask_permissions(tiny, tmp_path):
    model, _ = tiny
    old = os.umask(0o022)
    try:
        model.save_pretrained(tmp_path / "model")
    finally:
        os.umask(old)
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o755


def test_stale_staging_of_a_dead_writer_is_removed_and_a_live_ones_kept(tiny, tmp_path):
    model, _ = tiny
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead_dir = tmp_path / f".model.partial-{_dead_pid()}-0a0a0a0a"
        live_dir = tmp_path / f".model.partial-{live.pid}-0b0b0b0b"
        for d in (dead_dir, live_dir):
            d.mkdir()
            (d / "model.safetensors").write_bytes(b"x" * 1000)

        model.save_pretrained(tmp_path / "model")

        assert not dead_dir.exists()
        assert live_dir.is_dir()
    finally:
        live.kill()
        live.wait()


def test_a_target_lost_between_two_renames_is_recovered_on_load(tiny, tmp_path):
    model, _ = tiny
    target = tmp_path / "model"
    model.save_pretrained(target)
    # what a kill between "move the old copy aside" and "move the new one in" leaves
    os.rename(target, tmp_path / f".model.old-{_dead_pid()}-0c0c0c0c")
    (tmp_path / f".model.partial-{_dead_pid()}-0d0d0d0d").mkdir()

    loaded = MultimodalModel.from_pretrained(target)

    assert _same_weights(loaded, model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_target_that_cannot_be_renamed_is_updated_file_by_file(tiny, tmp_path, monkeypatch):
    """A mount point: renaming the directory itself fails with EBUSY."""
    model, _ = tiny
    target = tmp_path / "model"
    model.save_pretrained(target)
    (target / "tokenizer.json").write_text("{}")
    real_rename, real_replace = os.rename, os.replace

    def busy(rename):
        def wrapped(src, dst, *args, **kwargs):
            if Path(src) == target or Path(dst) == target:
                raise OSError(errno.EBUSY, "Device or resource busy", str(target))
            return rename(src, dst, *args, **kwargs)

        return wrapped

    monkeypatch.setattr(files, "_exchange", lambda a, b: (_ for _ in ()).throw(OSError(errno.EBUSY, "busy")), raising=False)
    monkeypatch.setattr(os, "rename", busy(real_rename))
    monkeypatch.setattr(os, "replace", busy(real_replace))
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    inode = target.stat().st_ino

    model.save_pretrained(target)

    assert target.stat().st_ino == inode
    assert (target / "tokenizer.json").read_text() == "{}"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert _same_weights(MultimodalModel.from_pretrained(target), model)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_sigkill_at_random_moments_never_loses_the_model(tiny, tmp_path):
    model, _ = tiny
    target = tmp_path / "model"
    model.save_pretrained(target)
    rng = random.Random(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a forked child must not wait on the parent's thread pool
    try:
        for _ in range(20):
            pid = os.fork()  # the writer: the model already built, so a kill lands in a save, not in imports
            if pid == 0:
                try:
                    # tqdm's write lock is shared with the parent (a multiprocessing semaphore): a child
                    # killed while holding it would deadlock the parent's next progress bar
                    import threading

                    from tqdm import tqdm
                    from transformers.utils import logging as hf_logging

                    tqdm.set_lock(threading.RLock())
                    hf_logging.disable_progress_bar()
                    while True:
                        model.save_pretrained(target)
                finally:
                    os._exit(1)
            time.sleep(rng.uniform(0.0, 0.3))
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            # what the next reader finds: the model, whole (from_pretrained recovers a half-done swap)
            assert _same_weights(MultimodalModel.from_pretrained(target), model)
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(target)  # the next save clears what the killed writers left
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


@pytest.fixture
def small_tmpfs(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        pytest.skip("cannot run mount")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_save_that_does_not_fit_raises_and_keeps_the_previous_directory(tiny, small_tmpfs):
    model, _ = tiny
    target = small_tmpfs / "model"
    model.save_pretrained(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    stat = os.statvfs(small_tmpfs)
    free = stat.f_bavail * stat.f_frsize
    (small_tmpfs / "filler").write_bytes(b"\0" * max(free - 64 * 1024, 0))  # room for less than one copy
    with torch.no_grad():
        next(model.parameters()).add_(1.0)

    with pytest.raises(SaveError, match="disk is full"):
        model.save_pretrained(target)

    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in small_tmpfs.iterdir()) == ["filler", "model"]


def test_a_parent_that_is_a_file_is_a_save_error_not_an_oserror(tiny, tmp_path):
    model, _ = tiny
    (tmp_path / "taken").write_text("a file where a folder should be")
    with pytest.raises(SaveError, match="taken.*cannot create its parent folder"):
        model.save_pretrained(tmp_path / "taken" / "model")
    assert (tmp_path / "taken").read_text() == "a file where a folder should be"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_parent_is_a_save_error(tiny, tmp_path):
    model, _ = tiny
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    try:
        with pytest.raises(SaveError, match="cannot write beside it"):
            model.save_pretrained(tmp_path / "ro" / "model")
    finally:
        (tmp_path / "ro").chmod(0o700)


def test_assemble_into_a_path_under_a_file_is_one_line_exit_2(tmp_path):
    import importlib.util

    if importlib.util.find_spec("mmcore_plugin_clip") is None:
        pytest.skip("needs mmcore-plugin-clip")
    (tmp_path / "taken").write_text("x")
    result = subprocess.run(
        [sys.executable, "-m", "mmcore", "assemble", "--llm", "tiny", "-e", "vision=clip:preset=tiny",
         "-o", str(tmp_path / "taken" / "out")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "taken" in result.stderr
