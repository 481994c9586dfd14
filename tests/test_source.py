"""Rules for the package's source text that no linter checks."""

from __future__ import annotations

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
