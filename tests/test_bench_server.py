"""benchmarks/server.py: the app factory that HTTP mode runs under uvicorn."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from benchmarks.server import create_app


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
