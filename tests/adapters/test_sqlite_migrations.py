"""The SQLite schema: migrations equal the fresh schema, apply once, and fail cleanly."""

from __future__ import annotations

import asyncio
import multiprocessing
import re
from pathlib import Path
from typing import Any

import pytest

from reflow_adapters.sqlite import SQLiteStorage
from reflow_adapters.sqlite_common import migrate, sql
from reflow_adapters.sqlite_common.driver import Connection
from reflow_core import StorageError


def _connect(path: Path | str = ":memory:") -> Connection:
    return SQLiteStorage.driver.connect(str(path))


def _normalise(ddl: str) -> str:
    ddl = re.sub(r"\s+", " ", ddl).strip().lower()
    ddl = re.sub(r"\s*([(),])\s*", r"\1", ddl)
    return ddl.replace("if not exists ", "")


def _schema(conn: Connection) -> dict[str, Any]:
    """Everything that defines the schema: normalised DDL plus what PRAGMAs report."""
    rows = conn.execute(
        "SELECT type, name, tbl_name, sql FROM sqlite_master "
        "WHERE name NOT LIKE 'sqlite_%' ORDER BY type, name"
    )
    shape: dict[str, Any] = {"ddl": [(t, n, tb, _normalise(s or "")) for t, n, tb, s in rows]}
    for _, name, _, _ in rows:
        shape[f"columns {name}"] = conn.execute(f"PRAGMA table_xinfo({name})")
        shape[f"indexes {name}"] = conn.execute(f"PRAGMA index_list({name})")
        shape[f"foreign keys {name}"] = conn.execute(f"PRAGMA foreign_key_list({name})")
    return shape


def test_all_migrations_in_order_equal_the_fresh_schema() -> None:
    fresh, migrated = _connect(), _connect()
    try:
        assert migrate.migrate(fresh, now=0, use_schema=True) == len(sql.migrations())
        migrate.migrate(migrated, now=0, use_schema=False)
        assert _schema(fresh) == _schema(migrated)
        versions = "SELECT version, name FROM reflow_schema_version ORDER BY version"
        assert fresh.execute(versions) == migrated.execute(versions)
        assert [v for v, _ in fresh.execute(versions)] == [m.version for m in sql.migrations()]
    finally:
        fresh.close()
        migrated.close()


def test_every_named_query_prepares_against_the_schema() -> None:
    conn = _connect()
    try:
        migrate.migrate(conn, now=0)
        for name, query in sql.queries().items():
            assert len(sql.split_statements(query + ";")) == 1, f"{name}: one statement"
            params = dict.fromkeys(re.findall(r":(\w+)", query))
            conn.execute("EXPLAIN " + query, params)  # prepares; fails on any typo
    finally:
        conn.close()


def test_query_file_rejects_a_repeated_name() -> None:
    with pytest.raises(ValueError, match="twice"):
        sql.parse_queries("-- name: a\nSELECT 1\n-- name: a\nSELECT 2\n")


def test_initialize_is_idempotent(tmp_path: Path) -> None:
    async def scenario() -> None:
        storage = SQLiteStorage(tmp_path / "i.db")
        await storage.initialize()
        await storage.initialize()
        await storage.close()
        again = SQLiteStorage(tmp_path / "i.db")
        await again.initialize()
        await again.close()

    asyncio.run(scenario())
    conn = _connect(tmp_path / "i.db")
    try:
        rows = conn.execute("SELECT version FROM reflow_schema_version")
        assert [v for (v,) in rows] == [m.version for m in sql.migrations()]
    finally:
        conn.close()


def _initialize(path: str, barrier: Any) -> None:  # pragma: no cover - child process
    async def start() -> None:
        storage = SQLiteStorage(path)
        await asyncio.to_thread(barrier.wait)
        await storage.initialize()
        await storage.close()

    asyncio.run(start())


def test_processes_initialising_one_file_at_once_migrate_it_once(tmp_path: Path) -> None:
    path = tmp_path / "together.db"
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(3)
    processes = [ctx.Process(target=_initialize, args=(str(path), barrier)) for _ in range(3)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    conn = _connect(path)
    try:
        rows = conn.execute("SELECT version FROM reflow_schema_version")
        assert [v for (v,) in rows] == [m.version for m in sql.migrations()]
    finally:
        conn.close()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    conn = _connect(tmp_path / "new.db")
    migrate.migrate(conn, now=0)
    conn.execute(
        "INSERT INTO reflow_schema_version (version, name, applied_at) VALUES (999, 'x', 0)"
    )
    conn.close()

    async def scenario() -> None:
        storage = SQLiteStorage(tmp_path / "new.db")
        with pytest.raises(StorageError, match="schema version 999"):
            await storage.initialize()
        await storage.close()

    asyncio.run(scenario())


def test_a_failing_migration_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = _connect(tmp_path / "old.db")
    migrate.migrate(conn, now=0)
    before = _schema(conn)
    conn.close()
    broken = sql.Migration(
        len(sql.migrations()) + 1,
        "broken",
        "CREATE TABLE reflow_half_done (x INTEGER);\nSELECT * FROM no_such_table;\n",
    )
    shipped = sql.migrations()
    monkeypatch.setattr(sql, "migrations", lambda: (*shipped, broken))

    async def scenario() -> None:
        storage = SQLiteStorage(tmp_path / "old.db")
        with pytest.raises(StorageError, match="no_such_table") as caught:
            await storage.initialize()
        assert caught.value.__cause__ is not None
        await storage.close()

    asyncio.run(scenario())
    conn = _connect(tmp_path / "old.db")
    try:
        assert _schema(conn) == before
    finally:
        conn.close()
