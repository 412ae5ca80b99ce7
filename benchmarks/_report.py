"""What every benchmark writes with ``--json PATH``: ``{"meta": {...}, "rows": [...]}``, the meta naming
the date, machine, torch version, thread count and the arguments of the run; the interleaved
timing every benchmark measures with; and the GPUs' peak bf16 FLOP/s that model FLOPs utilisation
(MFU) is measured against."""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from collections.abc import Callable
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


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, per GPU


def peak_bf16_flops(device: str) -> tuple[str, float | None]:
    """The CUDA device's name and its dense bf16 peak (None for a GPU not in `PEAK_BF16_FLOPS`)."""
    name = torch.cuda.get_device_name(torch.device(device))
    return name, next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def interleaved(
    fns: dict[Any, Callable[[], Any]], device: str = "cpu", warmup: int = 1, repeats: int = 3
) -> dict[Any, list[float]]:
    """Each function's times over ``repeats`` rounds of all of them in turn (after ``warmup`` rounds),
    so that a busy spell on a shared machine hits every one alike; CUDA is synchronised around each."""
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[Any, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return times
