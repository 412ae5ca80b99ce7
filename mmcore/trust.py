"""transformers' refusal to run a checkpoint's own code, as mmcore's typed `UntrustedCodeError`.

mmcore passes an explicit ``trust_remote_code`` to every transformers ``from_pretrained`` (so
transformers never asks on stdin). When that is False and the files name code (``auto_map``),
transformers raises a ValueError that does not say how to opt in; this says it, naming the flag.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from mmcore.errors import UntrustedCodeError

_REFUSAL = "contains custom code which must be executed"


@contextmanager
def refusing_remote_code(where: str) -> Iterator[None]:
    """Turn transformers' "contains custom code" ValueError raised inside the block into an
    `UntrustedCodeError` that names ``where`` and the opt-in; any other error passes unchanged."""
    try:
        yield
    except ValueError as exc:
        if _REFUSAL not in str(exc):
            raise
        raise UntrustedCodeError(
            f"{where}: its files name code to import (auto_map), which was not run; pass "
            "trust_remote_code=True (CLI: --trust-remote-code) if you trust this directory"
        ) from exc
