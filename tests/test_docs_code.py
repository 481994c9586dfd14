"""Nothing in the docs can rot: every code block of README.md and docs/**/*.md is checked.

The convention (which comment before a fence means what) is in tests/docs_code.py's docstring. Here: every
fence names a known language, every ```python block type-checks with ``mypy --strict`` (one mypy run for the
blocks of all pages, one more for each page whose blocks are files of one project, sharing a cache), blocks
marked syntax-only at least parse, and every test a ``<!-- check: run ... -->`` marker names exists and reads
its page's blocks.
"""

from __future__ import annotations

import ast
import re
import shutil
import tomllib
from collections import defaultdict
from pathlib import Path

import pytest

from .docs_code import LANGUAGES, ROOT, Block, DocsFormatError, blocks, pages
from .typecheck import assert_type_checks


def all_blocks() -> list[Block]:
    return [block for page in pages() for block in blocks(page)]


def test_every_block_names_a_language_the_convention_knows() -> None:
    unknown = [f"{block.where}: ```{block.language}" for block in all_blocks() if block.language not in LANGUAGES]
    assert unknown == []


def test_the_pages_have_python_blocks_and_a_run_marker() -> None:
    # The checker has something to check: it cannot pass by finding no block at all.
    python = [block for block in all_blocks() if block.language == "python"]
    assert len(python) >= 20
    assert any(block.run_by for block in python)


def test_markers_name_tests_that_exist_and_read_the_page() -> None:
    problems = []
    for block in all_blocks():
        if block.run_by is None:
            continue
        path, _, name = block.run_by.partition("::")
        test_file = ROOT / path
        if not (path.startswith("tests/") and test_file.is_file() and name):
            problems.append(f"{block.where}: {block.run_by} is not tests/...py::test_name of an existing file")
            continue
        source = test_file.read_text(encoding="utf-8")
        defined = {
            node.name for node in ast.parse(source).body if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        }
        if name not in defined:
            problems.append(f"{block.where}: {path} has no test {name}")
        if "blocks_run_by(" not in source or block.page.name not in source:
            problems.append(f"{block.where}: {path} does not read {block.page.name}'s blocks with blocks_run_by()")
    assert problems == []


def test_syntax_only_blocks_parse() -> None:
    for block in all_blocks():
        if block.syntax_only is not None:
            assert block.language == "python", f"{block.where}: only ```python blocks are marked syntax-only"
            ast.parse(block.code, filename=block.where)


def test_included_files_exist_and_are_type_checked_by_the_project() -> None:
    checked = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]["files"]
    for block in all_blocks():
        if block.included is not None:
            assert (ROOT / block.included).is_file(), f"{block.where}: no such file {block.included}"
            top = block.included.split("/", 1)[0]
            assert top in checked, f"{block.where}: {block.included} is not in [tool.mypy] files"


def slug(block: Block) -> str:
    relative = block.page.relative_to(ROOT).with_suffix("")
    return re.sub(r"\W", "_", str(relative)).lower() + f"_line{block.line}"


def test_every_python_block_type_checks(tmp_path: Path) -> None:
    """Unmarked and run-marked ```python blocks, as modules of a user's project beside ``myapp`` (the notes app)."""
    projects: dict[str, dict[str, Block]] = defaultdict(dict)
    for block in all_blocks():
        if block.language != "python" or block.syntax_only is not None or block.included is not None:
            continue
        if block.file_name is None:
            projects["pages"][f"{slug(block)}.py"] = block
        else:
            files = projects[slug(block).rsplit("_line", 1)[0]]
            assert block.file_name not in files, f"{block.where}: a second {block.file_name} on its page"
            files[block.file_name] = block
    cache = tmp_path / "mypy-cache"
    for name, files in sorted(projects.items()):
        project = tmp_path / name
        shutil.copytree(ROOT / "examples" / "notes", project / "myapp", ignore=shutil.ignore_patterns("__pycache__"))
        for file_name, block in files.items():
            (project / file_name).parent.mkdir(parents=True, exist_ok=True)
            (project / file_name).write_text(block.code, encoding="utf-8")
        try:
            assert_type_checks(project, cache_dir=cache)
        except AssertionError as failed:
            raise AssertionError(on_the_pages(str(failed), files)) from None


def on_the_pages(output: str, files: dict[str, Block]) -> str:
    """mypy's ``file.py:12: error`` lines as ``docs/page.md:40: error``: where to fix it."""

    def page_line(match: re.Match[str]) -> str:
        block = files.get(match["file"])
        if block is None:
            return match[0]
        return f"{block.where.rsplit(':', 1)[0]}:{block.line + int(match['line'])}:"

    return re.sub(r"^(?P<file>[\w/]+\.py):(?P<line>\d+):", page_line, output, flags=re.MULTILINE)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("```\nprint()\n```\n", "a fence without its language"),
        ("  ```python\nprint()\n  ```\n", "an indented fence"),
        ("```python\nprint()\n", "never closed"),
        ("<!-- check: run -->\n```python\nprint()\n```\n", "a check marker it cannot read"),
        ("<!-- check: syntax -->\n```python\nprint()\n```\n", "a check marker it cannot read"),
        ("<!-- check: syntax, why -->\n\n```python\nprint()\n```\n", "not right before a fence"),
    ],
)
def test_the_checker_refuses_what_it_cannot_check(tmp_path: Path, text: str, error: str) -> None:
    page = tmp_path / "page.md"
    page.write_text(text, encoding="utf-8")
    with pytest.raises(DocsFormatError, match=error):
        blocks(page)


def test_the_checker_reads_markers_and_file_names(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    text = (
        "<!-- check: run tests/test_x.py::test_y -->\n```python\n# app.py\nx = 1\n```\n\n"
        "<!-- check: syntax, another library -->\n```python\nfrom other import thing\n```\n\n"
        "```bash\necho hi\n```\n\n"
        "```python\n--8<--\nexamples/alembic/env.py\n--8<--\n```\n\n"
        '```python\n--8<-- "examples/notes/app.py"\n```\n'
    )
    page.write_text(text, encoding="utf-8")
    run, syntax, shell, included, included_one_line = blocks(page)
    assert (run.run_by, run.syntax_only, run.file_name, run.line) == ("tests/test_x.py::test_y", None, "app.py", 2)
    assert (syntax.run_by, syntax.syntax_only, syntax.file_name) == (None, "another library", None)
    assert (shell.language, shell.code, shell.run_by) == ("bash", "echo hi\n", None)
    assert (included.included, run.included) == ("examples/alembic/env.py", None)
    assert included_one_line.included == "examples/notes/app.py"
