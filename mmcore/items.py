"""What the modality processors share: one call's items as a list, each made ready by the processor."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mmcore.errors import EncoderInputError


def each_item(
    items: Any, single: tuple[type, ...], ready: Callable[[Any, int], Any], where: str, noun: str
) -> list:
    """``ready(item, index)`` for each of ``items`` (a sequence, or one item of a ``single`` type);
    `EncoderInputError` from ``where`` when there is no item (``noun``: what the items are)."""
    if isinstance(items, single):
        items = [items]
    made = [ready(item, i) for i, item in enumerate(items)]
    if not made:
        raise EncoderInputError(f"{where}: got no {noun}")
    return made
