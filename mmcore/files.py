"""Atomic directory writes shared by model, processor, CLI and checkpoint saves.

One helper, `staged_directory`: the caller writes into a staging folder beside the *real* target
(a symlinked target is resolved; the link stays and shows the new content), and on success the
staging folder replaces the target. The swap is one ``renameat2(RENAME_EXCHANGE)`` where Linux
offers it (no moment without a directory at the target path); elsewhere two renames, and a kill
between them is undone by `recover` on the next save or load. A target that cannot be renamed (a
mount point, the working directory) is updated file by file, each file renamed into place. Staging
folders are named with the writer's pid, so the next save removes those whose writer is dead.
"""

from __future__ import annotations

import ctypes
import errno
import fnmatch
import os
import re
import secrets
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from mmcore.errors import SaveError

_STAGE_RE = re.compile(r"\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)-[0-9a-f]+")
# Errors that mean "this directory cannot be renamed" (mount point, cross-device, busy, cwd on some OSes).
_NOT_RENAMEABLE = {errno.EBUSY, errno.EXDEV, errno.EINVAL, errno.EPERM, errno.EACCES}
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}


def umask() -> int:
    """The process umask (read without changing it for longer than one call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _stage_name(name: str, kind: str) -> str:
    return f".{name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _rmtree(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def recover(target: str | os.PathLike) -> None:
    """Undo a save killed mid-swap and clear staging folders whose writer is dead.

    A missing ``target`` whose previous copy sits in ``.NAME.old-<pid>-*`` beside it gets it back;
    ``.NAME.partial-<pid>-*`` / ``.NAME.old-<pid>-*`` of a dead pid are removed (never a live one's).
    """
    real = Path(os.path.realpath(target))
    parent = real.parent
    if not parent.is_dir():
        return
    olds = []
    for entry in parent.iterdir():
        match = _STAGE_RE.fullmatch(entry.name)
        if not match or match["name"] != real.name or _pid_alive(int(match["pid"])):
            continue
        if match["kind"] == "old":
            olds.append(entry)
        else:
            _rmtree(entry)
    for old in sorted(olds, key=lambda p: p.stat().st_mtime, reverse=True):
        if not real.exists():
            try:
                os.rename(old, real)
                continue
            except OSError:
                pass
        _rmtree(old)
    if real.is_dir():  # staging folders of an in-place (mount point / cwd) save live inside the target
        for entry in real.iterdir():
            match = _STAGE_RE.fullmatch(entry.name)
            if match and match["kind"] == "partial" and not _pid_alive(int(match["pid"])):
                _rmtree(entry)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux ``renameat2(RENAME_EXCHANGE)``; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, getattr(errno, "EOPNOTSUPP", errno.ENOTSUP)):
        return False  # old kernel or a filesystem without exchange: two renames instead
    raise OSError(err, os.strerror(err), str(b))


def swap_into(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Put ``source`` at ``target`` (file or directory); a directory already there is swapped out and
    removed, with no moment where ``target`` is missing (or one `recover` undoes). For a staging folder
    whose name every rank must know (checkpoints); otherwise use `staged_directory`."""
    _swap(Path(source), Path(target))


def _swap(source: Path, target: Path) -> None:
    if not (target.is_dir() and not target.is_symlink()):
        os.replace(source, target)
        return
    if _exchange(source, target):
        _rmtree(source)  # now holds the old copy
        return
    old = target.parent / _stage_name(target.name, "old")
    os.rename(target, old)
    try:
        os.rename(source, target)
    except BaseException:
        os.rename(old, target)
        raise
    _rmtree(old)  # a kill before this line: `recover` removes it (or restores it if target is gone)


def _carry(entry: Path, dest: Path) -> None:
    """Copy ``entry`` into the staging folder: links stay links, files are hard-linked where possible."""
    if entry.is_symlink():
        os.symlink(os.readlink(entry), dest)
    elif entry.is_dir():
        shutil.copytree(entry, dest, symlinks=True)
    else:
        try:
            os.link(entry, dest)
        except OSError:
            shutil.copy2(entry, dest)


def _cannot_rename(real: Path) -> bool:
    return real.is_dir() and (os.path.ismount(real) or real == Path.cwd().resolve())


def _commit_in_place(staging: Path, real: Path, replaced: Callable[[str], bool], last: Iterable[str]) -> None:
    """Move the staged entries into ``real`` one by one (each rename atomic), then drop stale ones."""
    last = set(last)
    names = sorted(os.listdir(staging), key=lambda n: n in last)
    for name in names:
        source, dest = staging / name, real / name
        try:
            _swap(source, dest)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            tmp = real / _stage_name(name, "partial")  # other filesystem: copy beside the file, then rename
            _carry(source, tmp) if source.is_symlink() else (
                shutil.copytree(source, tmp, symlinks=True) if source.is_dir() else shutil.copy2(source, tmp)
            )
            _swap(tmp, dest)
    for entry in real.iterdir():
        if entry.name not in names and replaced(entry.name) and not _STAGE_RE.fullmatch(entry.name):
            _rmtree(entry)
    _rmtree(staging)


@contextmanager
def staged_directory(
    target: str | os.PathLike, *, keep: Callable[[str], bool] | Iterable[str] | None = None, last: Iterable[str] = ()
) -> Iterator[Path]:
    """Yield an empty folder to write into; on a clean exit it becomes ``target``, atomically.

    ``keep`` says which entries of an existing target survive when the new content lacks them:
    ``None`` keeps nothing (the new directory replaces the old one whole), a callable decides by name,
    an iterable of glob patterns names the files this save *replaces* (all others are kept). Entries in
    ``last`` are moved last in a file-by-file update (config files, so a reader never sees a new config
    with old weights). An error inside the block leaves the target as it was; a full disk raises
    `SaveError`.

    >>> with staged_directory("out/model", keep=["config.json", "model*.safetensors"]) as tmp:
    ...     (tmp / "config.json").write_text("{}")
    """
    if keep is None:
        keeps: Callable[[str], bool] = lambda name: False  # noqa: E731
    elif callable(keep):
        keeps = keep
    else:
        patterns = tuple(keep)
        keeps = lambda name: not any(fnmatch.fnmatch(name, p) for p in patterns)  # noqa: E731
    real = Path(os.path.realpath(target))  # a symlinked target: write into the directory it points at
    if real.exists() and not real.is_dir():
        raise SaveError(f"cannot save into {str(target)!r}: expected a directory, found a file")
    try:
        real.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file where a parent folder should be, a read-only place, a full disk
        raise SaveError(f"cannot save into {str(target)!r}: cannot create its parent folder: {e}") from e
    recover(real)
    in_place = _cannot_rename(real)
    staging = (real if in_place else real.parent) / _stage_name(real.name, "partial")
    try:
        staging.mkdir()  # mode 0o777 & ~umask, as any mkdir
    except OSError as e:
        raise SaveError(f"cannot save into {str(target)!r}: cannot write beside it ({e})") from e
    try:
        yield staging
        if real.is_dir():
            for entry in real.iterdir():
                if keeps(entry.name) and not _STAGE_RE.fullmatch(entry.name) and not os.path.lexists(staging / entry.name):
                    _carry(entry, staging / entry.name)
        if in_place:
            _commit_in_place(staging, real, lambda n: not keeps(n), last)
            return
        try:
            _swap(staging, real)
        except OSError as e:
            if e.errno not in _NOT_RENAMEABLE:
                raise
            _commit_in_place(staging, real, lambda n: not keeps(n), last)
    except BaseException as e:
        _rmtree(staging)
        if _is_disk_full(e):
            raise SaveError(
                f"cannot save {str(target)!r}: the disk is full ({e}); the previous contents are unchanged"
            ) from e
        raise


def _is_disk_full(error: BaseException) -> bool:
    for e in (error, error.__cause__, error.__context__):
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            return True
        if e is not None and ("No space left" in str(e) or "os error 28" in str(e)):
            return True  # safetensors/torch wrap the OSError in their own exception types
    return False
