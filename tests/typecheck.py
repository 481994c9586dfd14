"""Type-check code a user copies from the docs, the way the user would: ``mypy --strict`` in its own project."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def assert_type_checks(project: Path, target: str = ".") -> None:
    """Run ``mypy --strict`` on ``target`` inside ``project`` (a cache of its own there); fail with its output."""
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(project / ".mypy_cache"), target],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
