"""Output helpers shared by the commands: JSON for scripts, rich tables for people, human numbers.

rich is imported only when a table is printed, so ``--json`` output stays as cheap as ``json``.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any


def print_json(data: Any) -> None:
    """``data`` as indented JSON on stdout (one document)."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def console(stderr: bool = False) -> Any:
    """A rich console on stdout (tables) or stderr (progress, notes)."""
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=False)


def print_table(
    title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]], *, caption: str | None = None
) -> None:
    """A rich table on stdout; ``None`` cells print as ``-``."""
    from rich.table import Table

    table = Table(title=title, caption=caption, title_justify="left", caption_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*("-" if cell is None else str(cell) for cell in row))
    console().print(table)


def human_count(n: int | float | None) -> str:
    """``8030261248`` -> ``8.03B``; small numbers as they are."""
    if n is None:
        return "-"
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n)) if float(n).is_integer() else f"{n:.2f}"


def human_bytes(n: int | float | None) -> str:
    """Bytes in binary units: ``16 * 2**30`` -> ``16.00 GiB``."""
    if n is None:
        return "-"
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


@contextlib.contextmanager
def library_progress_bars() -> Iterator[None]:
    """transformers' and the hub's progress bars (loading, saving, downloading) only when stderr is a
    terminal: in a log or a pipe they are noise around the one line an error prints."""
    if sys.stderr.isatty():
        yield
        return
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()
