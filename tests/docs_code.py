"""The code blocks of README.md and docs/**/*.md, and the convention that keeps each one checked.

Every fenced block names its language: ```python, ```bash or ```console for commands, ```text for output and
drawings, ```ini / ```toml for configuration files. The checker (tests/test_docs_code.py) holds every
```python block to one of three rules, chosen by an HTML comment on the line right before the fence:

- No comment: the block is a complete module, type-checked with ``mypy --strict`` (all such blocks in one mypy
  run). It may import the package with every extra, pytest, httpx and asgi-lifespan, and ``myapp``: the notes
  app of examples/notes (``myapp.models.Note``, ``myapp.repositories``, ``myapp.services``, ``myapp.app``). A
  block whose first line is ``# name.py`` is that file of its page's project: its page's other named blocks can
  import it (``from app import app``), and each page with named blocks is type-checked as a project of its own.
- ``<!-- check: run tests/path/test_x.py::test_name -->``: a test runs the block (and, for ```python, it is
  type-checked as above too). The test finds it with ``blocks_run_by(page, "tests/path/test_x.py::test_name")``;
  the checker fails when the named test does not exist. A block that needs a server or a database says so in
  the page's text; its test runs it against the test server (TEST_DATABASE_URL).
- ``<!-- check: syntax, WHY -->``: parsed only, for code that cannot run here, such as another library's idiom
  shown beside ours on a "Coming from" page. WHY is required and says what the code is.

A block that is only a snippet include, ``--8<--`` / ``examples/alembic/env.py`` / ``--8<--`` on three lines
(or ``--8<-- "examples/alembic/env.py"`` on one, which ruff format may rewrite; pymdownx.snippets puts the
file there when the site is built), shows a file of this repository as it is: the checker requires the file to
be one the project's own ``mypy --strict`` checks (pyproject.toml's ``[tool.mypy] files``), and checks nothing
more.

A block that is only part of a module (a line to add to an app, say) is written as the whole small module
instead: readers copy blocks, and a complete one is what they can paste. ``ruff format`` formats the ```python
blocks of Markdown files too (``ruff format --check .`` in ./dev test fails on one it would change).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"

LANGUAGES = frozenset({"python", "bash", "console", "text", "ini", "toml"})
FENCE = re.compile(r"^```(?P<language>\S*)[ \t]*$")
MARKER = re.compile(r"^<!-- check: (?:run (?P<test>\S+)|syntax, (?P<why>\S.*?)) -->$")
FILE_LINE = re.compile(r"# (?P<name>[\w/]+\.py)")
# pymdownx.snippets' two forms. Prefer the block form: ruff format formats the ```python blocks of Markdown files
# too and may rewrite the one-line form (as Python: "--8 < --"...") but leaves the block form, not Python, alone.
SNIPPET = re.compile(r'--8<-- "(?P<line>[^"\n]+)"\n|--8<--\n(?P<block>[^\n]+)\n--8<--\n')


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    run_by: str | None  # the test that runs it
    syntax_only: str | None  # why it is parsed only

    @property
    def where(self) -> str:
        return f"{shown(self.page)}:{self.line}"

    @property
    def included(self) -> str | None:
        """The repository file the block shows, when it is a snippet include and nothing else."""
        match = SNIPPET.fullmatch(self.code)
        return (match["line"] or match["block"]) if match else None

    @property
    def file_name(self) -> str | None:
        """``name.py`` when the block's first line is ``# name.py``: that file of its page's project."""
        first = self.code.splitlines()[0] if self.code else ""
        match = FILE_LINE.fullmatch(first)
        return match["name"] if match else None


def shown(page: Path) -> str:
    return str(page.relative_to(ROOT)) if page.is_relative_to(ROOT) else str(page)


class DocsFormatError(ValueError):
    """A page whose fences or markers the checker cannot read."""


def pages() -> list[Path]:
    """README.md and every Markdown page of the site."""
    return [README, *sorted(DOCS.rglob("*.md"))]


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of ``page`` (fences at the start of a line, as Markdown lists them in this project)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    index = 0
    while index < len(lines):
        stripped = lines[index].lstrip()
        if not stripped.startswith("```"):
            if stripped.startswith("<!-- check:"):
                if MARKER.match(lines[index]) is None:
                    raise DocsFormatError(f"{shown(page)}:{index + 1}: a check marker it cannot read")
                if index + 1 == len(lines) or not lines[index + 1].startswith("```"):
                    raise DocsFormatError(f"{shown(page)}:{index + 1}: a check marker not right before a fence")
            index += 1
            continue
        if stripped != lines[index]:
            raise DocsFormatError(f"{shown(page)}:{index + 1}: an indented fence; start it at column 0")
        opening = FENCE.match(lines[index])
        if opening is None or opening["language"] == "":
            raise DocsFormatError(f"{shown(page)}:{index + 1}: a fence without its language")
        end = index + 1
        while end < len(lines) and lines[end] != "```":
            end += 1
        if end == len(lines):
            raise DocsFormatError(f"{shown(page)}:{index + 1}: a block that is never closed")
        marker = MARKER.match(lines[index - 1]) if index > 0 else None
        found.append(
            Block(
                page=page,
                line=index + 1,
                language=opening["language"],
                code="\n".join(lines[index + 1 : end]) + "\n",
                run_by=marker["test"] if marker else None,
                syntax_only=marker["why"] if marker else None,
            )
        )
        index = end + 1
    return found


def blocks_run_by(page: Path, test: str) -> list[Block]:
    """The blocks of ``page`` marked ``<!-- check: run TEST -->`` for this test, in page order."""
    found = [block for block in blocks(page) if block.run_by == test]
    assert found, f"{shown(page)} has no block marked <!-- check: run {test} -->"
    return found
