"""What the SQLite adapters add beyond the conformance kit: group commit, processes,
durability, driver-error translation, pragmas and query plans.

Both adapters share ``reflow_adapters.sqlite_common``, so most tests run against both;
``test_apsw.py`` holds what is specific to APSW. The full contract is the conformance
kit's job and is not repeated here.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest

from reflow_adapters.apsw import APSWStorage
from reflow_adapters.sqlite import SQLiteStorage
from reflow_adapters.sqlite.plugin import make_storage
from reflow_adapters.sqlite_common import SQLiteStorageBase, sql, worker
from reflow_adapters.sqlite_common.driver import Connection
from reflow_core import (
    ConfigError,
    Recurrence,
    RunFilter,
    RunStatus,
    Schedule,
    SerializationError,
    StepResult,
    StepStatus,
    StorageError,
    WorkflowRun,
    open_storage,
)

T = TypeVar("T")
ADAPTERS = [pytest.param(SQLiteStorage, id="sqlite"), pytest.param(APSWStorage, id="apsw")]


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one coroutine on a fresh event loop (the project does not use pytest-asyncio)."""
    return asyncio.run(coro)


def make_run(run_id: str, created_at: int = 1, **fields: Any) -> WorkflowRun:
    return WorkflowRun(
        id=run_id,
        workflow="wf",
        input={"n": run_id},
        status=RunStatus.PENDING,
        created_at=created_at,
        updated_at=created_at,
        **fields,
    )


def make_step(run_id: str, name: str, step_id: str | None = None) -> StepResult:
    return StepResult(
        id=step_id or f"{run_id}:{name}",
        run_id=run_id,
        name=name,
        status=StepStatus.COMPLETED,
        output={"step": name, "values": [1, 2.5, None]},
        created_at=2,
        updated_at=2,
    )


# -- construction, URLs, pragmas ------------------------------------------------------


@pytest.mark.parametrize("cls", ADAPTERS)
def test_constructor_does_no_io_and_url_follows_sqlalchemy(
    cls: type[SQLiteStorageBase], tmp_path: Path
) -> None:
    path = tmp_path / "never.db"
    storage = cls(path)
    assert not path.exists()
    assert storage.url == f"{cls.scheme}:///{path}"  # absolute path: four slashes
    assert cls("relative.db").url == f"{cls.scheme}:///relative.db"
    assert cls().url is None
    with pytest.raises(ConfigError, match="synchronous"):
        cls(path, synchronous="SOMETIMES")


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///relative.db", "relative.db"),
        ("sqlite:////abs/path.db", "/abs/path.db"),
        ("sqlite://", ":memory:"),
        ("sqlite:///:memory:", ":memory:"),
        ("sqlite:///with%20space.db", "with space.db"),
    ],
)
def test_factory_parses_urls(url: str, path: str) -> None:
    assert make_storage(url)._path == path  # the adapter's own test may look inside


def test_factory_takes_options_from_url_and_keywords() -> None:
    storage = make_storage("sqlite:///x.db?synchronous=normal&busy_timeout_ms=10")
    assert (storage._synchronous, storage._busy_timeout_ms) == ("NORMAL", 10)
    storage = make_storage(path="y.db", busy_timeout_ms="20")  # CLI options arrive as text
    assert (storage.url, storage._busy_timeout_ms) == ("sqlite:///y.db", 20)


@pytest.mark.parametrize(
    "url", ["sqlite://host/x.db", "sqlite:///", "postgresql:///x", "sqlite:///x.db?color=red"]
)
def test_factory_rejects_bad_urls(url: str) -> None:
    with pytest.raises(ConfigError):
        make_storage(url)


def test_open_storage_resolves_a_sqlite_url(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 'x.db'}")
    assert isinstance(storage, SQLiteStorage)
    assert storage.url == f"sqlite:///{tmp_path / 'x.db'}"


@pytest.mark.parametrize("cls", ADAPTERS)
def test_initialize_sets_durable_pragmas(cls: type[SQLiteStorageBase], tmp_path: Path) -> None:
    def pragmas(conn: Connection) -> list[Any]:
        names = ["journal_mode", "synchronous", "foreign_keys", "busy_timeout"]
        return [conn.execute(f"PRAGMA {name}")[0][0] for name in names]

    async def scenario() -> list[Any]:
        storage = cls(tmp_path / "p.db", busy_timeout_ms=1234)
        await storage.initialize()
        try:
            return await storage._call("probe", pragmas)
        finally:
            await storage.close()

    assert run(scenario()) == ["wal", 2, 1, 1234]  # synchronous 2 == FULL


# -- group commit -----------------------------------------------------------------------


@pytest.mark.parametrize("cls", ADAPTERS)
def test_concurrent_writes_are_grouped_and_all_durable(
    cls: type[SQLiteStorageBase], tmp_path: Path
) -> None:
    path = tmp_path / "g.db"

    async def write() -> dict[str, int]:
        storage = cls(path)
        await storage.initialize()
        await asyncio.gather(*(storage.create_run(make_run(f"r{i:03}")) for i in range(50)))
        await asyncio.gather(
            *(storage.save_step_result(make_step(f"r{i:03}", "s")) for i in range(50))
        )
        stats = storage.group_commit_stats()
        await storage.close()
        return stats

    async def read() -> tuple[int, int]:
        storage = cls(path)
        await storage.initialize()
        runs = await storage.list_runs(RunFilter(limit=1000))
        steps = [await storage.get_step_results(r.id) for r in runs]
        await storage.close()
        return len(runs), sum(len(s) for s in steps)

    stats = run(write())
    assert stats["writes"] == 100
    assert stats["batches"] < 100, "concurrent writes must share commits"
    assert run(read()) == (50, 50)


class _Gate:
    """Holds the writer thread inside a job until released, so later jobs queue up."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def job(self, conn: Connection) -> None:
        self.entered.set()
        assert self.release.wait(timeout=30)


@pytest.mark.parametrize("cls", ADAPTERS)
def test_failing_op_fails_alone_in_its_batch(cls: type[SQLiteStorageBase], tmp_path: Path) -> None:
    async def scenario() -> None:
        storage = cls(tmp_path / "b.db")
        await storage.initialize()
        await storage.create_run(make_run("r"))
        await storage.save_step_result(make_step("r", "taken"))
        await storage.update_run_status("r", RunStatus.FAILED)
        gate = _Gate()
        blocker = asyncio.ensure_future(storage._call("gate", gate.job))
        await asyncio.to_thread(gate.entered.wait)
        # All of these queue behind the gate, so the writer drains them as one batch.
        calls = [storage.save_step_result(make_step("r", f"ok{i}")) for i in range(5)]
        calls.insert(2, storage.save_step_result(make_step("r", "taken", step_id="other")))
        calls.append(storage.requeue_run("r"))  # a two-statement op in the same batch
        tasks = [asyncio.ensure_future(c) for c in calls]
        await asyncio.sleep(0)  # let every task submit its job
        gate.release.set()
        await blocker
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert results[:2] + results[3:] == [True] * 6
        error = results[2]
        assert isinstance(error, StorageError)
        assert "UNIQUE" in str(error)
        assert isinstance(error.__cause__, cls.driver.errors)
        assert storage.group_commit_stats()["largest_batch"] >= len(calls)
        await storage.close()
        storage = cls(tmp_path / "b.db")
        await storage.initialize()
        names = sorted(s.name for s in await storage.get_step_results("r"))
        assert names == ["ok0", "ok1", "ok2", "ok3", "ok4", "taken"]
        await storage.close()

    run(scenario())


# -- processes ------------------------------------------------------------------------


def _claim_all(
    cls: type[SQLiteStorageBase], path: str, barrier: Any, results: Any
) -> None:  # pragma: no cover - runs in a child process
    async def claim() -> list[str]:
        storage = cls(path)
        await storage.initialize()
        claimed: list[str] = []
        await asyncio.to_thread(barrier.wait)
        while (got := await storage.claim_next_run(["wf"])) is not None:
            claimed.append(got.run.id)
        await storage.close()
        return claimed

    results.put(asyncio.run(claim()))


@pytest.mark.parametrize("cls", ADAPTERS)
def test_processes_racing_claims_get_each_run_exactly_once(
    cls: type[SQLiteStorageBase], tmp_path: Path
) -> None:
    path = tmp_path / "race.db"

    async def seed() -> None:
        storage = cls(path)
        await storage.initialize()
        await asyncio.gather(*(storage.create_run(make_run(f"r{i:03}", i)) for i in range(120)))
        await storage.close()

    run(seed())
    ctx = multiprocessing.get_context("spawn")
    workers = 3
    barrier = ctx.Barrier(workers)
    results = ctx.Queue()
    processes = [
        ctx.Process(target=_claim_all, args=(cls, str(path), barrier, results))
        for _ in range(workers)
    ]
    for process in processes:
        process.start()
    claimed = [results.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    results.close()
    results.join_thread()
    everything = [run_id for batch in claimed for run_id in batch]
    assert sorted(everything) == [f"r{i:03}" for i in range(120)]


# -- durability and errors -------------------------------------------------------------


@pytest.mark.parametrize("cls", ADAPTERS)
def test_state_survives_close_and_reopen(cls: type[SQLiteStorageBase], tmp_path: Path) -> None:
    schedule = Schedule(
        key="nightly",
        workflow="wf",
        input={"x": 1},
        recurrence=Recurrence(every_ms=1000),
        next_run_at=5,
        created_at=1,
        updated_at=1,
    )

    async def write() -> WorkflowRun:
        storage = cls(tmp_path / "d.db")
        await storage.initialize()
        await storage.create_run(make_run("r", idempotency_key="k"))
        claimed = await storage.claim_next_run(["wf"])
        assert claimed is not None
        await storage.save_step_result(make_step("r", "a"), claimed.lease_id)
        await storage.deliver_event("r", "go", {"p": [1]})
        await storage.upsert_schedule(schedule)
        await storage.close()
        return claimed.run

    async def read() -> tuple[Any, ...]:
        storage = cls(tmp_path / "d.db")
        await storage.initialize()
        state = (
            await storage.get_run("r"),
            await storage.get_step_results("r"),
            await storage.take_event("r", "go"),
            await storage.list_schedules(),
        )
        await storage.close()
        return state

    claimed_run = run(write())
    stored_run, steps, event, schedules = run(read())
    assert stored_run == claimed_run
    assert steps == [make_step("r", "a")]
    assert event is not None and event.payload == {"p": [1]}
    assert schedules == [schedule]


@pytest.mark.parametrize("cls", ADAPTERS)
def test_corrupt_file_is_a_storage_error_with_driver_cause(
    cls: type[SQLiteStorageBase], tmp_path: Path
) -> None:
    path = tmp_path / "corrupt.db"
    path.write_bytes(b"this is not a database" * 100)

    async def scenario() -> None:
        storage = cls(path)
        with pytest.raises(StorageError, match="initialize") as caught:
            await storage.initialize()
        assert isinstance(caught.value.__cause__, cls.driver.errors)
        await storage.close()
        await storage.close()

    run(scenario())


@pytest.mark.parametrize("cls", ADAPTERS)
def test_lifecycle_errors_are_storage_errors(cls: type[SQLiteStorageBase]) -> None:
    async def scenario() -> None:
        storage = cls()
        with pytest.raises(StorageError, match="not initialized"):
            await storage.get_run("r")
        await storage.initialize()
        await storage.create_run(make_run("r"))  # :memory: works, one connection
        assert (await storage.get_run("r")) == make_run("r")
        await storage.close()
        await storage.close()
        with pytest.raises(StorageError, match="closed"):
            await storage.get_run("r")
        with pytest.raises(StorageError, match="closed"):
            await storage.initialize()

    run(scenario())


@pytest.mark.parametrize("cls", ADAPTERS)
def test_unpersistable_value_writes_nothing(cls: type[SQLiteStorageBase]) -> None:
    async def scenario() -> None:
        storage = cls()
        await storage.initialize()
        with pytest.raises(SerializationError):
            await storage.create_run(msgspec.structs.replace(make_run("r"), input=float("nan")))
        assert await storage.list_runs(RunFilter()) == []
        await storage.close()

    run(scenario())


@pytest.mark.parametrize("cls", ADAPTERS)
def test_step_of_missing_run_violates_foreign_key(cls: type[SQLiteStorageBase]) -> None:
    async def scenario() -> None:
        storage = cls()
        await storage.initialize()
        with pytest.raises(StorageError, match="FOREIGN KEY"):
            await storage.save_step_result(make_step("ghost", "a"))
        await storage.close()

    run(scenario())


@pytest.mark.parametrize("cls", ADAPTERS)
def test_busy_database_is_retried_then_reported(
    cls: type[SQLiteStorageBase], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker, "_BUSY_BACKOFF_S", 0.0)
    path = tmp_path / "busy.db"

    async def scenario() -> None:
        storage = cls(path, busy_timeout_ms=0)
        await storage.initialize()
        locker = cls.driver.connect(str(path))
        locker.execute("BEGIN IMMEDIATE")  # another writer holds the lock throughout
        try:
            with pytest.raises(StorageError) as caught:
                await storage.create_run(make_run("r"))
            assert cls.driver.is_busy(caught.value.__cause__)  # type: ignore[arg-type]
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert (await storage.create_run(make_run("r"))).created
        await storage.close()

    run(scenario())


def test_retry_busy_retries_only_busy_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker, "_BUSY_BACKOFF_S", 0.0)
    driver = SQLiteStorage.driver
    attempts: list[int] = []

    def flaky() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise sqlite3.OperationalError("database is locked")
        return "ok"

    assert worker.retry_busy(driver, flaky) == "ok"
    assert len(attempts) == 3

    def broken() -> None:
        attempts.append(1)
        raise sqlite3.OperationalError("no such table: x")

    attempts.clear()
    with pytest.raises(Exception, match="no such table"):
        worker.retry_busy(driver, broken)
    assert len(attempts) == 1


# -- queries ---------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ADAPTERS)
def test_hot_queries_are_served_by_indexes(cls: type[SQLiteStorageBase]) -> None:
    from reflow_adapters.sqlite_common import migrate

    conn = cls.driver.connect(":memory:")
    try:
        migrate.migrate(conn, now=0)
        params = {
            "workflow_names": '["wf"]',
            "stale_before": 1,
            "now": 1,
            "lease_id": "l",
            "status": "pending",
            "workflow": "wf",
            "before": 5,
            "before_id": None,
            "limit": 10,
            "run_id": "r",
            "event_name": "e",
        }
        queries = sql.queries()
        for name in ["claim_next_run", "take_event", "next_due_schedule"] + [
            n for n in queries if n.startswith("list_runs")
        ]:
            plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + queries[name], params)]
            scans = [step for step in plan if step.startswith("SCAN reflow_")]
            assert not scans, f"{name} scans a table: {plan}"
            # The claim sorts only its three candidates (and the due sleepers).
            sorts = any("TEMP B-TREE" in step for step in plan)
            assert not sorts or name == "claim_next_run", f"{name} sorts: {plan}"
    finally:
        conn.close()
