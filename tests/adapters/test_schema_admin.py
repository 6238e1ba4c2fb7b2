"""Schema administration without migrating (``reflow_core.migrations.MigratableStorage``)
on the SQLite, APSW and PostgreSQL adapters.

Each adapter must read its version creating nothing, open a store without altering it,
and print a migration script that, applied by hand (``sqlite3``, ``psycopg``), gives a
store the adapter accepts as current and works on. "Issues no DDL" is checked, not
assumed: on SQLite every statement the adapter's connections run is recorded (a driver
wrapping the real one), on PostgreSQL an event trigger aborts any DDL from the store's
connections (named ``reflow:<schema>``). Each test first shows its guard does catch the
adapter's own migration where that matters.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import re
import sqlite3
import uuid
from collections.abc import Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest
from psycopg import sql

from reflow_adapters.sqlite_common import SQLiteStorageBase
from reflow_adapters.sqlite_common import sql as sqlite_sql
from reflow_adapters.sqlite_common.driver import Connection, Driver, Params, Row
from reflow_core import ConfigError, StorageError
from reflow_core.migrations import (
    MigratableStorage,
    SchemaNotCurrentError,
    SchemaStatus,
    open_without_migrating,
)
from reflow_core.storage import StorageAdapter
from reflow_core.types import RunStatus, WorkflowRun

T = TypeVar("T")

_DDL = re.compile(r"^\s*(CREATE|DROP|ALTER)\b|\bINTO\s+reflow_schema_version\b", re.IGNORECASE)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def make_run(run_id: str) -> WorkflowRun:
    return WorkflowRun(
        id=run_id, workflow="wf", input={"n": 1}, status=RunStatus.PENDING,
        created_at=1, updated_at=1,
    )  # fmt: skip


class Store(abc.ABC):
    """One store location (a file path, a PostgreSQL schema) of one adapter kind."""

    name: str
    latest: int

    @abc.abstractmethod
    def make(self) -> Any:
        """A new adapter instance on this location (no I/O yet)."""

    @abc.abstractmethod
    def apply(self, script: str) -> None:
        """Run a migration script by hand, with the database's own client."""

    @abc.abstractmethod
    def exists(self) -> bool:
        """Whether the container (file, schema) exists."""

    @abc.abstractmethod
    def no_ddl(self) -> contextlib.AbstractContextManager[None]:
        """Fail the test if the adapter's connections issue DDL inside the block."""


# -- SQLite and APSW ------------------------------------------------------------------


class _RecordingConnection:
    def __init__(self, inner: Connection, seen: list[str]) -> None:
        self._inner, self._seen = inner, seen

    def execute(self, sql: str, params: Params | None = None) -> list[Row]:
        self._seen.append(sql)
        return self._inner.execute(sql, params)

    def changes(self) -> int:
        return self._inner.changes()

    def in_transaction(self) -> bool:
        return self._inner.in_transaction()

    def close(self) -> None:
        self._inner.close()


class _RecordingDriver:
    """The adapter's real driver, noting every statement its connections run."""

    def __init__(self, inner: Driver) -> None:
        self._inner = inner
        self.name = inner.name
        self.errors = inner.errors
        self.seen: list[str] = []

    def connect(self, path: str) -> Connection:
        return _RecordingConnection(self._inner.connect(path), self.seen)

    def is_busy(self, exc: BaseException) -> bool:
        return self._inner.is_busy(exc)

    def is_full(self, exc: BaseException) -> bool:
        return self._inner.is_full(exc)

    def library_version(self) -> Sequence[int]:
        return self._inner.library_version()


class SQLiteStore(Store):
    def __init__(self, name: str, cls: type[SQLiteStorageBase], path: Path) -> None:
        self.name, self.path = name, path
        self.driver = _RecordingDriver(cls.driver)
        self.cls = type(f"Recorded{cls.__name__}", (cls,), {"driver": self.driver})
        self.latest = len(sqlite_sql.migrations())

    def make(self) -> Any:
        return self.cls(self.path)

    def apply(self, script: str) -> None:
        with contextlib.closing(sqlite3.connect(self.path, isolation_level=None)) as conn:
            conn.executescript(script)

    def exists(self) -> bool:
        return self.path.exists()

    def cookie(self) -> int:
        """SQLite's schema cookie: any schema change increments it."""
        with contextlib.closing(sqlite3.connect(self.path)) as conn:
            return int(conn.execute("PRAGMA schema_version").fetchone()[0])

    @contextlib.contextmanager
    def no_ddl(self) -> Iterator[None]:
        start = len(self.driver.seen)
        yield
        ddl = [s for s in self.driver.seen[start:] if _DDL.search(s)]
        assert not ddl, f"{self.name} issued DDL: {ddl}"


# -- PostgreSQL -----------------------------------------------------------------------


class PostgresStore(Store):
    def __init__(self, dsn: str, schema: str) -> None:
        from reflow_adapters.postgres import PostgresStorage
        from reflow_adapters.postgres.sql import migrations

        self.name, self.dsn, self.schema = "postgres", dsn, schema
        self.cls = PostgresStorage
        self.latest = len(migrations())

    def make(self) -> Any:
        return self.cls(self.dsn, schema=self.schema)

    def apply(self, script: str) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(script.encode())

    def exists(self) -> bool:
        with psycopg.connect(self.dsn) as conn:
            found = conn.execute(
                "SELECT 1 FROM pg_namespace WHERE nspname = %s", (self.schema,)
            ).fetchone()
            return found is not None

    @contextlib.contextmanager
    def no_ddl(self) -> Iterator[None]:
        # An event trigger aborting DDL from this store's connections only (the adapter
        # names them reflow:<schema>), so other tests on the server are unaffected.
        name = f"reflow_no_ddl_{uuid.uuid4().hex[:10]}"
        body = (
            "BEGIN IF current_setting('application_name') = 'reflow:" + self.schema + "' "
            "THEN RAISE EXCEPTION 'DDL % issued for schema " + self.schema + "', tg_tag; "
            "END IF; END"
        )
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL(
                    "CREATE FUNCTION public.{}() RETURNS event_trigger LANGUAGE plpgsql AS {}"
                ).format(sql.Identifier(name), sql.Literal(body))
            )
            conn.execute(
                sql.SQL("CREATE EVENT TRIGGER {} ON ddl_command_start EXECUTE FUNCTION public.{}()")
                .format(sql.Identifier(name), sql.Identifier(name))
            )  # fmt: skip
        try:
            yield
        finally:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP EVENT TRIGGER {}").format(sql.Identifier(name)))
                conn.execute(sql.SQL("DROP FUNCTION public.{}()").format(sql.Identifier(name)))


@pytest.fixture(params=["sqlite", "apsw", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A location where no store exists yet, of the parametrised adapter."""
    if request.param == "sqlite":
        from reflow_adapters.sqlite import SQLiteStorage

        yield SQLiteStore("sqlite", SQLiteStorage, tmp_path / "reflow.db")
    elif request.param == "apsw":
        pytest.importorskip("apsw", reason="apsw is not installed (pip install 'reflow[apsw]')")
        from reflow_adapters.apsw import APSWStorage

        yield SQLiteStore("apsw", APSWStorage, tmp_path / "reflow.db")
    else:
        from postgres_fixtures import drop_schema, postgres_dsn

        dsn = postgres_dsn()
        schema = f"reflow_t_{uuid.uuid4().hex[:12]}"
        try:
            yield PostgresStore(dsn, schema)
        finally:
            drop_schema(dsn, schema)


async def _status(storage: Any) -> SchemaStatus:
    try:
        status: SchemaStatus = await storage.schema_status()
        return status
    finally:
        await storage.close()


async def _smoke(storage: StorageAdapter) -> None:
    """The contract works on the store: a run is created, claimed and read back."""
    run_id = f"run-{uuid.uuid4().hex[:8]}"
    created = await storage.create_run(make_run(run_id))
    assert created.created
    claimed = await storage.claim_next_run(["wf"], lease_ms=60_000)
    assert claimed is not None and claimed.run.id == run_id
    got = await storage.get_run(run_id)
    assert got is not None and got.status == RunStatus.RUNNING


def _by_hand_up_to(store: Store, version: int) -> None:
    """Apply the full script by hand, cut after ``version`` (as an older Reflow would)."""
    script = store.make().migration_sql(0)
    cut = f"-- migration {version + 1:04d}_"
    if cut in script:
        script = script.split(cut)[0] + "COMMIT;\n"
    store.apply(script)


# -- tests ----------------------------------------------------------------------------


def test_the_adapters_implement_the_protocol(store: Store) -> None:
    assert isinstance(store.make(), MigratableStorage)


def test_a_missing_store_reads_as_absent_and_is_never_created(store: Store) -> None:
    async def scenario() -> None:
        with store.no_ddl():
            status = await _status(store.make())
            assert (status.current, status.latest, status.exists) == (0, store.latest, False)
            assert [m.version for m in status.pending] == list(range(1, store.latest + 1))
            assert not status.up_to_date
            storage = store.make()
            try:
                if isinstance(store, SQLiteStore):
                    # Opening would create an empty file: refused, saying what to do.
                    with pytest.raises(StorageError, match=r"does not exist.*reflow db migrate"):
                        await storage.connect()
                else:
                    await storage.connect()  # a pool, and nothing in the database
                with pytest.raises(SchemaNotCurrentError, match="does not exist"):
                    await open_without_migrating(storage)
            finally:
                await storage.close()
        assert not store.exists()

    run(scenario())


def test_a_store_made_by_initialize_is_current(store: Store) -> None:
    async def scenario() -> None:
        storage = store.make()
        try:
            await storage.initialize()
            status = await storage.schema_status()
        finally:
            await storage.close()
        assert status.up_to_date and status.exists
        assert (status.current, status.latest, status.pending) == (store.latest, store.latest, ())
        assert not status.too_new

    run(scenario())


def test_the_script_applied_by_hand_gives_a_current_working_store(store: Store) -> None:
    async def scenario() -> None:
        script = store.make().migration_sql()
        assert script.count("-- migration ") == store.latest
        store.apply(script)
        storage = store.make()
        try:
            with store.no_ddl():
                status = await open_without_migrating(storage)
                assert status is not None and status.up_to_date
                await _smoke(storage)
                await storage.connect()  # idempotent
                assert (await storage.schema_status()).current == store.latest
        finally:
            await storage.close()
        # Nothing is left for initialize() to do.
        assert store.make().migration_sql(store.latest) == ""

    run(scenario())


def test_an_older_store_is_read_refused_and_left_as_it_was(store: Store) -> None:
    async def scenario() -> None:
        _by_hand_up_to(store, 1)
        cookie = store.cookie() if isinstance(store, SQLiteStore) else None
        storage = store.make()
        try:
            with store.no_ddl():
                status = await storage.schema_status()
                assert (status.current, status.exists) == (1, True)
                assert [m.version for m in status.pending] == list(range(2, store.latest + 1))
                with pytest.raises(SchemaNotCurrentError, match="is at schema version 1"):
                    await open_without_migrating(storage)
                await storage.connect()  # opens, but migrates nothing
                assert (await storage.schema_status()).current == 1
        finally:
            await storage.close()
        if isinstance(store, SQLiteStore):
            assert store.cookie() == cookie
        # The rest of the script, by hand, brings it up to date.
        store.apply(store.make().migration_sql(1))
        assert (await _status(store.make())).up_to_date

    run(scenario())


def test_initialize_after_connect_still_migrates(store: Store) -> None:
    async def scenario() -> None:
        _by_hand_up_to(store, 1)
        storage = store.make()
        try:
            await storage.connect()
            assert (await storage.schema_status()).current == 1
            await storage.initialize()
            assert (await storage.schema_status()).up_to_date
            await _smoke(storage)
        finally:
            await storage.close()

    run(scenario())


def test_the_guard_catches_the_adapters_own_migration(store: Store) -> None:
    """Without this, a guard that sees nothing would pass every test above."""

    async def scenario() -> None:
        storage = store.make()
        try:
            if isinstance(store, SQLiteStore):
                with pytest.raises(AssertionError, match="issued DDL"), store.no_ddl():
                    await storage.initialize()
            else:
                with store.no_ddl(), pytest.raises(StorageError, match="DDL"):
                    await storage.initialize()
        finally:
            await storage.close()

    run(scenario())


def test_migration_sql_refuses_a_bad_version(store: Store) -> None:
    storage = store.make()
    for bad in (-1, True, "2", 1.0):
        with pytest.raises(ConfigError, match="from_version"):
            storage.migration_sql(bad)
    assert storage.migration_sql(store.latest + 5) == ""


# -- SQLite only ----------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["sqlite", "apsw"])
def test_a_private_memory_database_is_current_and_opens(scheme: str) -> None:
    from reflow_core.registry import open_storage

    if scheme == "apsw":
        pytest.importorskip("apsw")

    async def scenario() -> None:
        storage = open_storage(f"{scheme}://")
        try:
            assert isinstance(storage, MigratableStorage)
            status = await open_without_migrating(storage)
            assert status is not None and status.up_to_date
            await _smoke(storage)
        finally:
            await storage.close()

    run(scenario())


def test_a_file_that_is_not_a_database_is_a_storage_error(tmp_path: Path) -> None:
    from reflow_adapters.sqlite import SQLiteStorage

    path = tmp_path / "notes.txt"
    path.write_bytes(b"not a database, just some text that is long enough " * 40)
    before = path.read_bytes()

    async def scenario() -> None:
        storage = SQLiteStorage(path)
        try:
            with pytest.raises(StorageError, match="schema_status"):
                await storage.schema_status()
            with pytest.raises(StorageError):
                await storage.connect()
        finally:
            await storage.close()

    run(scenario())
    assert path.read_bytes() == before
