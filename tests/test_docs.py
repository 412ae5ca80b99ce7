"""Run the code in docs/*.md, so the docs cannot drift from the API.

Convention (documented at the top of each page):
- every ```python (or ```py) block is executed, in order, in one namespace per file, like notebook cells;
- a block whose fence says ``no-run`` (```python no-run) is not executed, only compiled (syntax check);
- blocks in other languages are ignored.

``tempfile`` is pointed at pytest's ``tmp_path`` while a page runs, so ``tempfile.mkdtemp()`` in the
docs leaves nothing behind.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(DOCS.glob("*.md"))

_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_PYTHON = {"python", "py", "python3"}
_NO_RUN = "no-run"


@dataclass
class Block:
    number: int  # 1-based among the page's python blocks
    line: int  # 1-based line of the first code line
    code: str
    run: bool


def python_blocks(text: str, name: str = "<doc>") -> list[Block]:
    """The python blocks of a markdown page, in order; raises ValueError on an unclosed fence."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, indent = match["fence"], len(match["indent"])
        words = match["info"].strip().split()
        start = i + 1
        end = start
        while end < len(lines):
            closing = _FENCE.match(lines[end])
            if closing and closing["fence"].startswith(fence) and not closing["info"].strip():
                break
            end += 1
        else:
            raise ValueError(f"{name}:{i + 1}: code fence {fence}{match['info']} is never closed")
        if words and words[0].lower() in _PYTHON:
            body = [line[indent:] if line[:indent].isspace() else line for line in lines[start:end]]
            blocks.append(Block(len(blocks) + 1, start + 1, "\n".join(body) + "\n", _NO_RUN not in words[1:]))
        i = end + 1
    return blocks


def test_parser_conventions():
    text = "\n".join(
        [
            "```python", "a = 1", "```",
            "```python no-run", "b = 2", "```",
            "```bash", "echo hi", "```",
            "````python", "```", "````",
        ]
    )  # fmt: skip
    blocks = python_blocks(text)
    assert [(b.number, b.line, b.code, b.run) for b in blocks] == [
        (1, 2, "a = 1\n", True),
        (2, 5, "b = 2\n", False),
        (3, 11, "```\n", True),
    ]
    with pytest.raises(ValueError, match="never closed"):
        python_blocks("```python\nx = 1\n")


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_doc_page_runs(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    blocks = python_blocks(page.read_text(encoding="utf-8"), page.name)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"docs_{page.stem}"}
    for block in blocks:
        where = f"docs/{page.name}, python block {block.number} (line {block.line})"
        try:
            # padded so that tracebacks give the line numbers of the markdown file itself
            code = compile("\n" * (block.line - 1) + block.code, str(page), "exec")
        except SyntaxError as exc:
            pytest.fail(f"{where}: syntax error: {exc}")
        if not block.run:
            continue
        try:
            exec(code, namespace)
        except BaseException as exc:  # noqa: BLE001 - report any failure with its place in the docs
            if isinstance(exc, KeyboardInterrupt):
                raise
            pytest.fail(f"{where} raised {type(exc).__name__}: {exc}")


def test_quickstart_has_executable_blocks():
    blocks = python_blocks((DOCS / "quickstart.md").read_text(encoding="utf-8"), "quickstart.md")
    assert sum(b.run for b in blocks) >= 5, "docs/quickstart.md must have executable ```python blocks"


_LINK = re.compile(r"\]\((?P<target>[^)\s#]+\.md)(?:#[^)]*)?\)")


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_doc_links_resolve(page: Path):
    missing = [
        m["target"]
        for m in _LINK.finditer(page.read_text(encoding="utf-8"))
        if "://" not in m["target"] and not (page.parent / m["target"]).exists()
    ]
    assert not missing, f"docs/{page.name} links to missing pages: {missing}"
