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


def _version_1_database(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file as Reflow 1.x left it: schema version 1, a run still running under a
    version-1 lease (lease id and heartbeat only), a pending run, a step and an event."""
    first = sql.migrations()[:1]
    with monkeypatch.context() as patch:
        patch.setattr(sql, "migrations", lambda: first)
        conn = _connect(path)
        # Migration 1 itself, not schema.sql (which is the current schema).
        assert migrate.migrate(conn, now=0, use_schema=False) == 1
    assert "lease_ms" not in str(conn.execute("PRAGMA table_info(reflow_runs)"))
    try:
        columns = "id, workflow, input, status, lease_id, heartbeat_at, attempt, created_at"
        conn.execute(
            f"INSERT INTO reflow_runs ({columns}, updated_at) VALUES "
            "('old', 'wf', '{\"n\":1}', 'running', 'v1-lease', 10000, 1, 1, 9000), "
            "('new', 'wf', '{\"n\":2}', 'pending', NULL, NULL, 0, 2, 2)"
        )
        conn.execute(
            "INSERT INTO reflow_steps (id, run_id, name, status, output, attempts, "
            "created_at, updated_at) VALUES ('old:a', 'old', 'a', 'completed', '[1]', 1, 5, 5)"
        )
        conn.execute(
            "INSERT INTO reflow_events (run_id, name, payload, delivered_at) "
            "VALUES ('old', 'go', '\"hi\"', 6)"
        )
    finally:
        conn.close()


def test_a_version_1_database_with_a_running_run_migrates_and_stays_claimable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "v1.db"
    _version_1_database(path, monkeypatch)
    now = [39_999]

    async def scenario() -> None:
        storage = SQLiteStorage(path, clock=lambda: now[0])
        await storage.initialize()
        old = await storage.get_run("old")
        assert old is not None
        # The 1.x lease becomes a 30 s lease (1.x's default) from its last heartbeat.
        assert (old.status, old.lease_ms, old.lease_expires_at) == ("running", 30_000, 40_000)
        assert (old.claimed_at, old.heartbeat_at, old.holder) == (10_000, 10_000, None)
        assert (old.attempt, old.recoveries, old.input) == (1, 0, {"n": 1})
        new = await storage.get_run("new")
        assert new is not None and new.recoveries == 0
        assert (new.claimed_at, new.lease_ms, new.lease_expires_at, new.holder) == (None,) * 4
        steps = await storage.get_step_results("old")
        assert [(s.name, s.output) for s in steps] == [("a", [1])]
        # Not expired yet: the older running run is left alone, the pending one is taken.
        first = await storage.claim_next_run(["wf"], lease_ms=1_000)
        assert first is not None and first.run.id == "new"
        assert await storage.claim_next_run(["wf"], lease_ms=1_000) is None
        now[0] = 40_000
        taken = await storage.claim_next_run(["wf"], lease_ms=1_000)
        assert taken is not None and taken.run.id == "old"
        assert (taken.run.attempt, taken.run.recoveries) == (2, 1)
        assert (taken.run.lease_ms, taken.run.lease_expires_at) == (1_000, 41_000)
        assert not await storage.heartbeat_run("old", "v1-lease")
        # Written-once steps and keyed delivery work on the migrated file too.
        assert not await storage.save_step_result(steps[0], taken.lease_id)
        assert await storage.deliver_event("old", "go", "again", key="k")
        assert await storage.deliver_event("old", "go", "again", key="k")
        assert (await storage.take_event("old", "go")) is not None  # the 1.x event
        assert (await storage.take_event("old", "go")) is not None  # the keyed one, once
        assert (await storage.take_event("old", "go")) is None
        await storage.close()

    asyncio.run(scenario())
    conn = _connect(path)
    try:
        rows = conn.execute("SELECT version FROM reflow_schema_version ORDER BY version")
        assert [v for (v,) in rows] == [m.version for m in sql.migrations()]
    finally:
        conn.close()
