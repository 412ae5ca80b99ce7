"""What every benchmark writes with ``--json PATH``: ``{"meta": {...}, "rows": [...]}``, the meta naming
the date, machine, torch version, thread count and the arguments of the run."""

from __future__ import annotations

import datetime
import json
import os
import platform
from typing import Any

import torch


def write_json(path: str | None, rows: list[dict], args: Any, **extra: Any) -> None:
    """Write ``rows`` and the run's meta to ``path`` (nothing when ``path`` is None or empty)."""
    if not path:
        return
    meta = {
        "date": datetime.date.today().isoformat(),
        "machine": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "args": vars(args),
        **extra,
    }
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
