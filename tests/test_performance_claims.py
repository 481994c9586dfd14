"""Every figure the documentation quotes is in a results file measured on committed code.

A figure is annotated where it stands, ``1.021<!-- figure: instructions-db.json per_request[app=x].ratio -->``:
it names a file of ``benchmarks/results/`` and the key that holds it: dotted names, and ``[name=value,...]`` to pick
the one item of a list whose fields match. The figure must equal the value to the precision it is printed with
(a version or commit: the value itself, or its first parts). A ``.txt`` file takes no key: the figure must be in
it as printed. A JSON file must record ``package_modified: false``: a figure from code that was never committed
is not one anybody can reproduce. Annotated figures are checked on every page (README.md and docs/**/*.md:
the failure table quotes cancellation times). On the performance page (docs/explanation/performance.md) a
decimal number, or a whole one with a unit (%, x, s, µs, MiB), without an annotation fails too, so a new figure
cannot slip in unchecked. The annotations are HTML comments: the rendered page shows only the figure. No
benchmark runs here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from .docs_code import DOCS, pages

ROOT = Path(__file__).parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PERFORMANCE_PAGE = DOCS / "explanation" / "performance.md"
FAILURES_PAGE = DOCS / "reference" / "failures.md"

ANNOTATED = re.compile(
    r"(?P<figure>[-+]?[0-9A-Za-z][0-9A-Za-z.,]*)(?:\*\*)?<!-- figure: (?P<file>\S+)(?: (?P<key>\S+))? -->"
)
# A decimal number, or a whole one with a unit: what reads as a measurement.
FIGURE_LIKE = re.compile(r"[0-9]+\.[0-9]+|[0-9][0-9,]* ?(?:%|x\b|µs\b|ms\b|s\b|MiB\b|KiB\b|bytes\b)")
STEP = re.compile(r"(?P<name>[^.\[\]]+)(?:\[(?P<select>[^\]]*)\])?")


@dataclass(frozen=True)
class Figure:
    figure: str
    file: str
    key: str | None
    line: int

    def __str__(self) -> str:
        return f"line {self.line}: {self.figure} from {self.file} {self.key or ''}".rstrip()


def performance_section(text: str) -> str:
    text = "\n" + text
    assert "\n## Performance\n" in text, "the text has no '## Performance' section"
    return text.split("\n## Performance\n", 1)[1].split("\n## ", 1)[0]


def annotated_figures(text: str) -> list[Figure]:
    return [
        Figure(m["figure"], m["file"], m["key"], text.count("\n", 0, m.start()) + 1) for m in ANNOTATED.finditer(text)
    ]


def unannotated_figures(section: str) -> list[str]:
    """Decimal numbers, and whole ones with a unit, of the section's prose that name no results file."""
    prose = ANNOTATED.sub("", section)
    prose = re.sub(r"<!--.*?-->", "", prose, flags=re.DOTALL)
    prose = re.sub(r"```.*?```", "", prose, flags=re.DOTALL)
    prose = re.sub(r"`[^`\n]*`", "", prose)
    return FIGURE_LIKE.findall(prose)


def lookup(data: Any, key: str) -> Any:
    """The value at ``key`` (``a.b[field=value,...].c``) in parsed JSON."""
    position = 0
    for step in STEP.finditer(key):
        if step.start() != position:
            raise KeyError(f"cannot read key {key!r} at {key[position:]!r}")
        position = step.end() + (1 if key[step.end() : step.end() + 1] == "." else 0)
        if not isinstance(data, dict) or step["name"] not in data:
            raise KeyError(f"no {step['name']!r} in {key!r}")
        data = data[step["name"]]
        if step["select"] is not None:
            wanted = dict(pair.split("=", 1) for pair in step["select"].split(","))
            matches = [
                item
                for item in data
                if isinstance(item, dict) and all(str(item.get(k)) == v for k, v in wanted.items())
            ]
            if len(matches) != 1:
                raise KeyError(f"{len(matches)} items match [{step['select']}] in {key!r}, not one")
            data = matches[0]
    if position != len(key):
        raise KeyError(f"cannot read key {key!r} at {key[position:]!r}")
    return data


def package_modified(data: Any) -> list[Any]:
    """Every ``package_modified`` the file records (the git state of asgi_db_session/ when it was measured)."""
    if isinstance(data, dict):
        found = [data["package_modified"]] if "package_modified" in data else []
        return found + [value for item in data.values() for value in package_modified(item)]
    if isinstance(data, list):
        return [value for item in data for value in package_modified(item)]
    return []


def matches(figure: str, value: Any) -> bool:
    """Whether ``figure`` is ``value`` as printed: a number to the figure's own precision, a string or its start."""
    if isinstance(value, bool) or value is None:
        return False
    if isinstance(value, int | float):
        printed = figure.replace(",", "").lstrip("+")
        places = len(printed.split(".", 1)[1]) if "." in printed else 0
        try:
            return Decimal(printed) == Decimal(f"{value:.{places}f}")
        except ArithmeticError:
            return False
    text = str(value)
    return figure == text or text.startswith(figure + ".")


def problems(text: str, results: Path, *, checked_prose: str | None) -> list[str]:
    """What is wrong with a page's quoted figures, one line each. ``checked_prose``: the part of the page where
    every figure must be annotated (the performance page, whole), or None where only annotated ones are checked."""
    found: list[str] = []
    figures = annotated_figures(text)
    if checked_prose is not None:
        found += [
            f"Performance quotes {figure!r} without naming its results file"
            for figure in unannotated_figures(checked_prose)
        ]
        if not figures:
            found.append("no figure of the page names its results file")
    loaded: dict[str, Any] = {}
    for figure in figures:
        path = results / figure.file
        if not path.is_file():
            found.append(f"{figure}: no such file in {results}")
            continue
        if path.suffix == ".txt":
            if figure.figure not in path.read_text():
                found.append(f"{figure}: not in the file")
            continue
        if figure.file not in loaded:
            loaded[figure.file] = json.loads(path.read_text())
            states = package_modified(loaded[figure.file])
            if not states or any(state is not False for state in states):
                found.append(f"{figure.file}: measured on uncommitted code (package_modified: {states})")
        if figure.key is None:
            found.append(f"{figure}: a JSON file needs a key")
            continue
        try:
            value = lookup(loaded[figure.file], figure.key)
        except (KeyError, TypeError, ValueError) as exc:
            found.append(f"{figure}: {exc}")
            continue
        if not matches(figure.figure, value):
            found.append(f"{figure}: the file holds {value!r}")
    return found


@pytest.mark.parametrize("page", pages(), ids=lambda page: str(page.relative_to(ROOT)))
def test_every_figure_a_page_quotes_is_in_a_results_file_from_committed_code(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    checked_prose = text if page == PERFORMANCE_PAGE else None
    assert problems(text, RESULTS, checked_prose=checked_prose) == []


def test_the_cut_off_statement_time_is_a_measured_one() -> None:
    rows = [line for line in FAILURES_PAGE.read_text().splitlines() if line.startswith("| The request is cancelled")]
    assert len(rows) == 1
    quoted = [figure for figure in annotated_figures(rows[0]) if figure.file == "cancellations.json"]
    assert {figure.key.rsplit(".", 1)[-1] for figure in quoted if figure.key} >= {"median_seconds", "max_seconds"}


def write(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("quoted", "expected"),
    [
        ("0.94<!-- figure: r.json routes./read.ratio -->", None),
        ("0.942<!-- figure: r.json routes./read.ratio -->", None),
        ("0.943<!-- figure: r.json routes./read.ratio -->", "the file holds 0.9418"),
        ("0.95<!-- figure: r.json routes./read.ratio -->", "the file holds 0.9418"),
        ("1.02<!-- figure: r.json runs[app=a,route=/read].ratio -->x", None),
        ("1.02<!-- figure: r.json runs[app=b,route=/read].ratio -->", "0 items match"),
        ("1.10<!-- figure: r.json env.version -->", None),
        ("1.1<!-- figure: r.json env.version -->", "the file holds '1.10.0'"),
        ("0.94<!-- figure: dirty.json routes./read.ratio -->", "uncommitted code"),
        ("0.94<!-- figure: gone.json routes./read.ratio -->", "no such file"),
        ("72.40<!-- figure: soak.txt -->", None),
        ("**0.94**<!-- figure: r.json routes./read.ratio -->", None),
        ("72.41<!-- figure: soak.txt -->", "not in the file"),
        ("0.94<!-- figure: r.json routes./read.ratio --> and 1.01x", "without naming its results file"),
        ("0.94<!-- figure: r.json routes./read.ratio --> within 5%", "without naming its results file"),
        ("0.94<!-- figure: r.json routes./read.ratio --> in 2 s", "without naming its results file"),
        ("0.94<!-- figure: r.json routes./read.ratio --> 139 µs, 2x", "'139 µs'"),
        ("0.94<!-- figure: r.json routes./read.ratio --> on 32 connections", None),
    ],
)
def test_the_check_fails_on_a_figure_that_is_not_in_its_file(tmp_path: Path, quoted: str, expected: str | None) -> None:
    committed = {"git": {"commit": "abc1234", "package_modified": False}}
    data = {
        **committed,
        "routes": {"/read": {"ratio": 0.9418}},
        "runs": [{"app": "a", "route": "/read", "ratio": 1.0151}, {"app": "a", "route": "/ten", "ratio": 2.0}],
        "env": {"version": "1.10.0"},
    }
    write(tmp_path / "r.json", data)
    write(tmp_path / "dirty.json", {**data, "git": {"commit": "abc1234", "package_modified": True}})
    (tmp_path / "soak.txt").write_text("RSS after warm-up 72.40 MiB\n")
    text = f"# x\n\n## Performance\n\nSee {quoted}.\n\n## Next\n\n3.5 elsewhere\n"
    found = problems(text, tmp_path, checked_prose=performance_section(text))
    if expected is None:
        assert found == []
    else:
        assert any(expected in line for line in found), found


def test_the_check_fails_on_a_performance_page_that_names_no_file() -> None:
    text = "# Performance\n\nAhead of every peer: 1.84 against hand-written.\n"
    found = problems(text, RESULTS, checked_prose=text)
    assert "Performance quotes '1.84' without naming its results file" in found
    assert "no figure of the page names its results file" in found


def test_the_performance_page_quotes_figures() -> None:
    assert len(annotated_figures(PERFORMANCE_PAGE.read_text(encoding="utf-8"))) >= 50
