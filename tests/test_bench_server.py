"""benchmarks/server.py: the app factory that HTTP mode runs under uvicorn."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.apps import BARE, FLOOR_SAFE_CLOSE, OURS
from benchmarks.server import create_app

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def collector_restored() -> Iterator[None]:
    enabled = gc.isenabled()
    yield
    if enabled:
        gc.enable()


@pytest.mark.usefixtures("collector_restored")
@pytest.mark.parametrize(("setting", "collecting"), [("off", False), ("on", True), (None, True)])
def test_server_gc_setting_turns_the_collector_off_only_when_asked(
    monkeypatch: pytest.MonkeyPatch, setting: str | None, collecting: bool
) -> None:
    gc.enable()
    monkeypatch.setenv("BENCH_APP", "bare")
    if setting is None:
        monkeypatch.delenv("BENCH_SERVER_GC", raising=False)
    else:
        monkeypatch.setenv("BENCH_SERVER_GC", setting)
    create_app()
    assert gc.isenabled() is collecting


@pytest.mark.usefixtures("collector_restored")
def test_server_gc_freeze_leaves_the_collector_on_with_the_start_up_out_of_its_view(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gc.enable()
    gc.unfreeze()
    monkeypatch.setenv("BENCH_APP", "bare")
    monkeypatch.setenv("BENCH_SERVER_GC", "freeze")
    try:
        create_app()
        assert gc.isenabled()
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def _modules_after_create_app(env: dict[str, str]) -> set[str]:
    """The top-level packages a fresh interpreter holds once server.py has built the app ``env`` names, beyond
    those that importing server.py brings."""
    probe = (
        "import sys; from benchmarks.server import create_app; before = {m.split('.')[0] for m in sys.modules}; "
        "create_app(); print(' '.join(sorted({m.split('.')[0] for m in sys.modules} - before)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        env={**os.environ, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return set(result.stdout.split())


def test_same_heap_imports_what_the_other_apps_builders_import() -> None:
    alone = _modules_after_create_app({"BENCH_APP": FLOOR_SAFE_CLOSE})
    together = _modules_after_create_app(
        {"BENCH_APP": FLOOR_SAFE_CLOSE, "BENCH_SAME_HEAP": f"{FLOOR_SAFE_CLOSE},{OURS}"}
    )
    assert "asgi_db_session" not in alone
    assert "asgi_db_session" in together


@pytest.mark.parametrize("key", [OURS, "asgi-db-session-commit", "asgi-db-session-unguarded", FLOOR_SAFE_CLOSE])
def test_importing_an_apps_declared_modules_brings_all_that_its_builder_imports(key: str) -> None:
    built = _modules_after_create_app({"BENCH_APP": key})
    imported = _modules_after_create_app({"BENCH_APP": BARE, "BENCH_SAME_HEAP": key})
    assert built <= imported


def test_same_heap_refuses_an_unknown_app() -> None:
    with pytest.raises(subprocess.CalledProcessError) as failed:
        _modules_after_create_app({"BENCH_APP": BARE, "BENCH_SAME_HEAP": "no-such-app"})
    assert "BENCH_SAME_HEAP names 'no-such-app'" in failed.value.stderr
