"""benchmarks/instructions.py and http_instructions.py: each repeat of a child or a server starts in a memory layout
of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from benchmarks.instructions import Job, child_env, layout_env, layout_size, layout_types


def started_with(env: dict[str, str], name: str = "LAYOUT_PAD") -> str:
    """How many objects of a layout's start-up (strings: LAYOUT_PAD, classes: LAYOUT_TYPES) a new Python process
    finds, started with ``env`` over this one's environment."""
    probe = f"import sys; print(len(getattr(sys.modules.get('sitecustomize'), {name!r}, ())))"
    result = subprocess.run(
        [sys.executable, "-c", probe], env={**os.environ, **env}, capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


def test_the_first_run_starts_as_it_is(tmp_path: Path) -> None:
    assert layout_size(0) == 0
    assert layout_types(0) == 0
    assert layout_env(0, tmp_path) == {}
    assert list(tmp_path.iterdir()) == []


# The strings move where objects land; each class takes a type version tag, so the app's classes take other tags
# than in run 0.
@pytest.mark.parametrize(("name", "count"), [("LAYOUT_PAD", layout_size), ("LAYOUT_TYPES", layout_types)])
@pytest.mark.parametrize("repeat", [1, 2])
def test_each_later_run_makes_at_start_up_a_number_of_strings_and_classes_of_its_own(
    tmp_path: Path, repeat: int, name: str, count: Callable[[int], int]
) -> None:
    env = layout_env(repeat, tmp_path)
    assert started_with(env, name) == str(count(repeat))
    assert count(repeat) not in {count(other) for other in range(3) if other != repeat}


def test_a_pythonpath_already_set_is_kept_after_the_layouts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", "/somewhere/else")
    folder, inherited = layout_env(1, tmp_path)["PYTHONPATH"].split(os.pathsep, 1)
    assert inherited == "/somewhere/else"
    assert (Path(folder) / "sitecustomize.py").is_file()


def test_a_layout_written_again_leaves_only_its_module(tmp_path: Path) -> None:
    first = layout_env(2, tmp_path)
    assert layout_env(2, tmp_path) == first
    assert [path.name for path in (tmp_path / "layout-2").iterdir()] == ["sitecustomize.py"]
    assert started_with(first) == str(layout_size(2))


@pytest.mark.parametrize("repeat", [0, 1, 2])
def test_an_in_process_child_starts_in_its_repeats_layout(tmp_path: Path, repeat: int) -> None:
    env = child_env(Job("asgi-db-session", "/read", 100, repeat), tmp_path)
    assert env["PYTHONHASHSEED"] == "0"
    assert started_with(env) == str(layout_size(repeat))
