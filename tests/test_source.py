"""Rules for the package's source text that no linter checks."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import asgi_db_session

PACKAGE = Path(asgi_db_session.__file__).parent

# A figure of a measurement: "~6k instructions", "5% more CPU", "120 µs", "3x faster", "10,000 requests/s".
FIGURE = re.compile(
    r"~\s*\d|\d\s*%|\d[\d,.]*\s*k?\s*(?:instructions|µs|us|ms|ns|x faster|x slower|requests/s|req/s)\b",
    re.IGNORECASE,
)


def _comment_and_docstring_text(source: str) -> list[tuple[int, str]]:
    """Comments and string literals that stand as statements (docstrings), with their line numbers."""
    found: list[tuple[int, str]] = []
    previous = tokenize.NEWLINE
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        docstring = token.type == tokenize.STRING and previous in (tokenize.NEWLINE, tokenize.INDENT, tokenize.NL)
        if token.type == tokenize.COMMENT or docstring:
            found.append((token.start[0], token.string))
        if token.type not in (tokenize.COMMENT, tokenize.NL):
            previous = token.type
    return found


def test_no_benchmark_figures_in_comments() -> None:
    """Figures go stale in code: they belong in benchmarks/README.md, which the code may point to."""
    figures = [
        f"{path.name}:{line}: {text.strip()}"
        for path in sorted(PACKAGE.glob("*.py"))
        for line, text in _comment_and_docstring_text(path.read_text(encoding="utf-8"))
        if FIGURE.search(text)
    ]
    assert figures == []


def test_the_figure_finder_finds_one() -> None:
    source = 'x = "5%"  # costs ~6k instructions per statement\ndef f():\n    """Twice as fast."""\n'
    texts = [text for _, text in _comment_and_docstring_text(source) if FIGURE.search(text)]
    assert texts == ["# costs ~6k instructions per statement"]


def _imports_from(tree: ast.AST, module: str) -> set[str]:
    return {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module == module
        for alias in node.names
    }


def _calls_method(tree: ast.AST, *methods: str) -> bool:
    return any(
        isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in methods
        for node in ast.walk(tree)
    )


def test_the_scope_lifecycle_is_written_once() -> None:
    """Entering and leaving a scope (the ContextVar set and reset, the state ended, the session finished) is
    _context.py's, used by every scope; the middleware alone spells it out, for its per-request path."""
    finishing: set[str] = set()
    setting: set[str] = set()
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if "finish" in _imports_from(tree, "_session"):
            finishing.add(path.stem)
        if "scope_var" in _imports_from(tree, "_context") and _calls_method(tree, "set", "reset"):
            setting.add(path.stem)
    assert finishing == {"_context", "middleware"}
    assert setting == {"middleware"}
