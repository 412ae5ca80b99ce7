"""Atomic directory writes shared by model, processor and CLI saves."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def swap_into(source: Path, target: Path) -> None:
    """Rename ``source`` onto ``target``. A directory already at ``target`` is moved aside first, put
    back if the rename fails, and removed once the new one is in place."""
    if not (source.is_dir() and target.exists()):
        os.replace(source, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, old / target.name)
    try:
        os.replace(source, target)
    except BaseException:
        os.replace(old / target.name, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
