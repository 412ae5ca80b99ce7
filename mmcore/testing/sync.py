"""`count_host_syncs`: how many device-to-host synchronisations a block of code makes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

HOST_SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "item", "is_nonzero", "masked_scatter_backward")


@contextmanager
def count_host_syncs() -> Iterator[Any]:
    """Count, while active, what makes the host wait for an accelerator: the `HOST_SYNC_OPS` as they
    are dispatched, plus ``Tensor.tolist`` (on CPU it reads memory without dispatching any op; on
    CUDA it is a device-to-host copy). Yields a ``collections.Counter``: name -> calls. Works on CPU,
    so tests can hold code to "no sync" without a GPU; ``nonzero_static`` is not counted (its size is
    given, and its CUDA kernel does not sync).

    >>> with count_host_syncs() as syncs:          # doctest: +SKIP
    ...     model(**batch).loss.backward()
    >>> syncs["nonzero"], sum(syncs.values())       # doctest: +SKIP
    """
    from collections import Counter

    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    counts: Counter = Counter()

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.__name__.split(".")[0]  # "nonzero.default" -> "nonzero"
            if name in HOST_SYNC_OPS:
                counts[name] += 1
            return func(*args, **(kwargs or {}))

    class Calls(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") == "tolist":
                counts["tolist"] += 1
            return func(*args, **(kwargs or {}))

    with Ops(), Calls():
        yield counts
