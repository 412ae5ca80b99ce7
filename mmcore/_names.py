""""Did you mean" suggestions, one wording for every unknown name mmcore reports."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(name: str, choices: Iterable[str], *, n: int = 3, cutoff: float = 0.5) -> str:
    """``"; did you mean 'a' or 'b'?"`` for the choices close to ``name``, or ``""`` when none is."""
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=cutoff)
    return f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
