"""Type-check code a user copies from the docs, the way the user would: ``mypy --strict`` in its own project."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def assert_type_checks(project: Path, target: str = ".", *, cache_dir: Path | None = None) -> None:
    """Run ``mypy --strict`` on ``target`` inside ``project``; fail with its output.

    The cache is the project's own unless ``cache_dir`` is given: projects checked one after the other share one,
    so the libraries they import are analysed once.
    """
    cache = cache_dir or project / ".mypy_cache"
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(cache), target],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
