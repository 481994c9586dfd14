"""Throughput of every app on every route: ``python benchmarks/run.py [--http] [options]``; see README.md."""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:
    # Run as a script: import the package from the repository root, and keep this folder off sys.path so
    # that its module names (apps, common, ...) cannot shadow anything.
    _here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if not p or str(Path(p).resolve()) != _here]
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.throughput import main

if __name__ == "__main__":
    sys.exit(main())
