"""The README is the front door: short, in the order a user reads it, and pointing at every page of the site.

Its code blocks are checked with the site's (tests/test_docs_code.py); the Quickstart runs in
tests/system/test_package.py.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"
PYPROJECT = README.parent / "pyproject.toml"


def section(title: str) -> str:
    text = README.read_text()
    assert f"\n## {title}\n" in text
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_the_readme_starts_with_what_a_user_needs() -> None:
    headings = re.findall(r"^## (.+)$", README.read_text(), flags=re.MULTILINE)
    assert headings == ["Installation", "Quickstart", "Documentation", "Supported versions", "Contributing"]


def test_the_readme_is_short() -> None:
    # Everything else is a page of the site (docs/), linked from the Documentation section.
    assert len(README.read_text().splitlines()) <= 200


def test_the_readme_links_every_page_of_the_site_and_nothing_missing() -> None:
    links = re.findall(r"\]\((docs/[^)#]+\.md)(?:#[^)]*)?\)", section("Documentation"))
    missing = [link for link in links if not (README.parent / link).is_file()]
    assert missing == []
    pages = sorted(str(path.relative_to(README.parent)) for path in (README.parent / "docs").rglob("*.md"))
    # The home page shows the README's own top; a new page needs a link in the Documentation section.
    unlinked = [page for page in pages if page not in links and page != "docs/index.md"]
    assert unlinked == [], "add a link to each of these in the README's Documentation section"


def test_the_contributor_commands_are_the_ones_ci_runs() -> None:
    block = re.search(r"```bash\n(.*?)```", section("Contributing"), flags=re.DOTALL)
    assert block is not None
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    assert commands == ["./dev demo", "./dev test", "./dev docs"]
    assert ci_runs("./dev test")
    assert ci_runs("./dev docs build")


def ci_runs(command: str) -> bool:
    """Whether a line of .ci/run runs ``command``: maybe indented, after environment assignments or under nice,
    maybe with more arguments, its output sent to a file, or its status kept (``|| status=$?``)."""
    pattern = rf"\s*(?:[A-Z_]+=\S+ )*(?:nice -n \d+ )?{re.escape(command)}(?: .*)?"
    lines = (README.parent / ".ci" / "run").read_text().splitlines()
    return any(re.fullmatch(pattern, line) for line in lines)


def test_the_installation_names_only_extras_that_exist() -> None:
    extras = set(tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"])
    named = re.findall(r"asgi-db-session\[([a-z,]+)\]", section("Installation"))
    assert {"sqlite", "fastapi"} <= {extra for group in named for extra in group.split(",")} <= extras


def test_the_supported_versions_are_pyprojects_bounds_and_ci_runs_both_ends() -> None:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    extras = project["optional-dependencies"]
    bounds: dict[str, str] = {}
    for dep in project["dependencies"] + extras["sqlite"] + extras["fastapi"]:
        match = re.fullmatch(r"([a-z-]+)(?:\[\w+\])?>=([\d.]+)", dep)
        assert match is not None, dep
        bounds[match[1]] = match[2]
    text = " ".join(section("Supported versions").split())
    shown = {name.lower(): version for name, version in re.findall(r"([A-Za-z-]+) ([\d.]+)\+", text)}
    assert shown == bounds
    named = [c.rsplit(" ", 1)[1] for c in project["classifiers"] if re.fullmatch(r".*Python :: 3\.\d+", c)]
    pythons = sorted(named, key=lambda version: int(version.split(".")[1]))
    assert project["requires-python"] == f">={pythons[0]}"
    assert f"Python {pythons[0]} to {pythons[-1]}" in text
    for command in ("./dev test", "./dev oldest", "./dev newest"):
        assert ci_runs(command), command
