"""Fixtures shared by the whole suite: every engine test runs on every available adapter.

``storage_factory`` is parametrised over the built-in adapters: memory and SQLite
always, APSW when installed, PostgreSQL when ``REFLOW_TEST_POSTGRES_DSN`` names a
server (skipped with that reason otherwise; failed instead under
``REFLOW_REQUIRE_SERVERS=1``, as CI sets it).
"""

from __future__ import annotations

import importlib.util
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import FakeClock

from reflow_core import StorageAdapter
from reflow_core.storage import Clock

ADAPTERS = ["memory", "sqlite", "apsw", "postgres"]


StorageFactory = Callable[..., StorageAdapter]


def _build(
    name: str, tmp_path: Path, clock: Clock | None
) -> tuple[StorageAdapter, Callable[[], None]]:
    if name == "memory":
        from reflow_adapters.memory import MemoryStorage

        return MemoryStorage(clock=clock), lambda: None
    if name == "sqlite":
        from reflow_adapters.sqlite import SQLiteStorage

        return SQLiteStorage(tmp_path / f"{uuid.uuid4().hex}.db", clock=clock), lambda: None
    if name == "apsw":
        if importlib.util.find_spec("apsw") is None:
            pytest.skip("apsw is not installed (pip install 'reflow[apsw]')")
        from reflow_adapters.apsw import APSWStorage

        return APSWStorage(tmp_path / f"{uuid.uuid4().hex}.db", clock=clock), lambda: None
    from postgres_fixtures import drop_schema, postgres_dsn

    from reflow_adapters.postgres import PostgresStorage

    dsn = postgres_dsn()
    schema = f"reflow_t_{uuid.uuid4().hex[:12]}"
    return PostgresStorage(dsn, schema=schema, clock=clock), lambda: drop_schema(dsn, schema)


@pytest.fixture(
    params=[
        pytest.param(name, marks=[pytest.mark.postgres] if name == "postgres" else [])
        for name in ADAPTERS
    ]
)
def adapter_name(request: pytest.FixtureRequest) -> str:
    """The name of the adapter this test runs on."""
    name: str = request.param
    return name


@pytest.fixture
def storage_factory(adapter_name: str, tmp_path: Path) -> Iterator[StorageFactory]:
    """Builds fresh adapters of the parametrised kind; each gets its own empty store.

    Tests close what they open (engines do not close storages they were handed); the
    fixture drops server-side leftovers afterwards.
    """
    cleanups: list[Callable[[], None]] = []

    def make(clock: Clock | None = None) -> StorageAdapter:
        storage, cleanup = _build(adapter_name, tmp_path, clock)
        cleanups.append(cleanup)
        return storage

    yield make
    for cleanup in cleanups:
        cleanup()


@pytest.fixture
def clock() -> FakeClock:
    """A hand-moved clock starting at a fixed instant."""
    return FakeClock()
