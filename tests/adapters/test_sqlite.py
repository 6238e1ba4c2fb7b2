"""What the SQLite adapters add beyond the conformance kit: group commit, processes,
durability, driver-error translation, pragmas and query plans; and contract 2.0 on a
real file (leases judged by the store's clock, write-once checkpoints, event delivery).

Both adapters share ``reflow_adapters.sqlite_common``, so most tests run against both;
``test_apsw.py`` holds what is specific to APSW. The full contract is the conformance
kit's job and is not repeated here.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import re
import sqlite3
import sys
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
    ConsumeResult,
    ErrorInfo,
    LeaseHolder,
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
from reflow_core.schedule import next_fire_time

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
        while (got := await storage.claim_next_run(["wf"], lease_ms=60_000)) is not None:
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
        claimed = await storage.claim_next_run(
            ["wf"], lease_ms=60_000, holder=LeaseHolder(worker="w", host="h", pid=1)
        )
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
    assert stored_run.holder == LeaseHolder(worker="w", host="h", pid=1)
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
            "now": 1,
            "lease_id": "l",
            "lease_ms": 1000,
            "holder": None,
            "key": "k",
            "id": "s",
            "name": "n",
            "status": "pending",
            "workflow": "wf",
            "before": 5,
            "before_id": None,
            "limit": 10,
            "run_id": "r",
            "event_name": "e",
            "completed": 1,
            "failed": 1,
            "cancelled": 1,
        }
        queries = sql.queries()
        hot = ["claim_candidates", "claim_candidates_many", "claim_run", "purge_runs"]
        hot += ["take_event", "next_due_schedule", "heartbeat_run"]
        hot += ["insert_event", "event_key_seen", "may_consume", "save_step_result"]
        for name in hot + [n for n in queries if n.startswith("list_runs")]:
            # Parameters the base set does not name (values to write) are bound as NULL.
            bound = {**dict.fromkeys(re.findall(r":(\w+)", queries[name])), **params}
            plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + queries[name], bound)]
            scans = [step for step in plan if step.startswith("SCAN reflow_")]
            assert not scans, f"{name} scans a table: {plan}"
            # A claim sorts only one workflow's expired leases and due sleepers; a purge
            # only the at most 3 x limit oldest rows its three partial indexes give.
            sorts = any("TEMP B-TREE" in step for step in plan)
            sorting = ("claim_candidates", "claim_candidates_many", "purge_runs")
            assert not sorts or name in sorting, f"{name} sorts: {plan}"
            if name == "claim_candidates":
                # Each kind of candidate is found by range within the one workflow, so
                # runs of other workflows are never read.
                for index in (
                    "reflow_runs_claim (workflow=? AND status=?)",
                    "reflow_runs_lease (workflow=? AND lease_expires_at<?)",
                    "reflow_runs_wake (workflow=? AND wake_at<?)",
                ):
                    assert any(index in p for p in plan), plan
            if name == "list_runs_by_workflow_and_status":
                assert any("reflow_runs_claim (workflow=? AND status=? AND" in p for p in plan)
            if name == "purge_runs":
                for status in ("completed", "failed", "cancelled"):
                    assert any(f"reflow_runs_{status} (updated_at<?)" in p for p in plan)
    finally:
        conn.close()


# -- contract 2.0 on a real file ---------------------------------------------------------


class ManualClock:
    """The store's clock, moved by hand: nothing here sleeps."""

    def __init__(self, now: int = 1_000_000) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


HOLDER_A = LeaseHolder(worker="engine-a", host="host-a", pid=101)
HOLDER_B = LeaseHolder(worker="engine-b", host="host-b", pid=202)
LEASE_FIELDS = ("claimed_at", "lease_ms", "lease_expires_at", "holder")


async def _open(cls: type[SQLiteStorageBase], path: Path, clock: ManualClock) -> SQLiteStorageBase:
    storage = cls(path, clock=clock)
    await storage.initialize()
    return storage


async def _stored(storage: SQLiteStorageBase, run_id: str) -> WorkflowRun:
    stored = await storage.get_run(run_id)
    assert stored is not None
    return stored


async def _buffered(storage: SQLiteStorageBase, run_id: str) -> list[Any]:
    """Payloads buffered for a run, read straight from the table (oldest first)."""

    def read(conn: Connection) -> list[Any]:
        rows = conn.execute(
            "SELECT payload FROM reflow_events WHERE run_id = :run_id ORDER BY seq",
            {"run_id": run_id},
        )
        return [msgspec.json.decode(row[0]) for row in rows]

    return await storage._call("probe", read)


@pytest.mark.parametrize("cls", ADAPTERS)
def test_store_clock_decides_when_a_lease_expires(
    cls: type[SQLiteStorageBase], tmp_path: Path
) -> None:
    clock = ManualClock(1_000_000)

    async def scenario() -> None:
        storage = await _open(cls, tmp_path / "c.db", clock)
        assert await storage.now() == 1_000_000
        clock.now = 1_000_005
        assert await storage.now() == 1_000_005
        await storage.create_run(make_run("r"))
        first = await storage.claim_next_run(["wf"], lease_ms=100, holder=HOLDER_A)
        assert first is not None
        expected = {
            "status": RunStatus.RUNNING,
            "claimed_at": 1_000_005,
            "heartbeat_at": 1_000_005,
            "lease_ms": 100,
            "lease_expires_at": 1_000_105,
            "holder": HOLDER_A,
            "attempt": 1,
            "recoveries": 0,
        }
        for run_ in (first.run, await _stored(storage, "r")):
            assert {k: getattr(run_, k) for k in expected} == expected
        # One millisecond before expiry, by the store's clock, nobody may take it, however
        # short a lease the claimer itself uses.
        clock.now = 1_000_104
        assert await storage.claim_next_run(["wf"], lease_ms=1, holder=HOLDER_B) is None
        clock.now = 1_000_105  # lease_expires_at <= now: expired
        second = await storage.claim_next_run(["wf"], lease_ms=5_000, holder=HOLDER_B)
        assert second is not None and second.run.id == "r"
        assert second.lease_id != first.lease_id
        assert (second.run.attempt, second.run.recoveries) == (2, 1)
        assert (second.run.claimed_at, second.run.lease_expires_at) == (1_000_105, 1_005_105)
        assert second.run.holder == HOLDER_B
        assert not await storage.heartbeat_run("r", first.lease_id)  # lost for good
        assert await storage.heartbeat_run("r", second.lease_id)
        await storage.close()

    run(scenario())


@pytest.mark.parametrize("cls", ADAPTERS)
def test_mixed_lease_lengths_each_expire_by_their_own(
    cls: type[SQLiteStorageBase], tmp_path: Path
) -> None:
    clock = ManualClock(0)

    async def scenario() -> None:
        storage = await _open(cls, tmp_path / "m.db", clock)
        await storage.create_run(make_run("long", 1))
        await storage.create_run(make_run("short", 2))
        long_claim = await storage.claim_next_run(["wf"], lease_ms=60_000, holder=HOLDER_A)
        short_claim = await storage.claim_next_run(["wf"], lease_ms=1_000, holder=HOLDER_B)
        assert long_claim is not None and long_claim.run.id == "long"
        assert short_claim is not None and short_claim.run.id == "short"
        clock.now = 1_000
        # A claimer configured with a 1 s lease takes the expired 1 s lease, but not the
        # older run whose holder was granted 60 s (under 1.x it would have taken that one).
        taken = await storage.claim_next_run(["wf"], lease_ms=1_000)
        assert taken is not None and taken.run.id == "short"
        assert await storage.claim_next_run(["wf"], lease_ms=1_000) is None
        assert await storage.update_claimed_run_status("short", taken.lease_id, RunStatus.COMPLETED)
        clock.now = 59_999
        assert await storage.heartbeat_run("long", long_claim.lease_id)
        assert (await _stored(storage, "long")).lease_expires_at == 119_999
        clock.now = 119_998
        assert await storage.claim_next_run(["wf"], lease_ms=1) is None
        clock.now = 119_999
        late = await storage.claim_next_run(["wf"], lease_ms=1)
        assert late is not None and late.run.id == "long" and late.run.recoveries == 1
        await storage.close()

    run(scenario())


@pytest.mark.parametrize("cls", ADAPTERS)
def test_heartbeat_extends_by_the_stored_lease_length(
    cls: type[SQLiteStorageBase], tmp_path: Path
) -> None:
    clock = ManualClock(10_000)

    async def scenario() -> None:
        storage = await _open(cls, tmp_path / "h.db", clock)
        await storage.create_run(make_run("r", 5))
        claimed = await storage.claim_next_run(["wf"], lease_ms=1_000, holder=HOLDER_A)
        assert claimed is not None
        updated_at = claimed.run.updated_at
        clock.now = 10_900
        assert await storage.heartbeat_run("r", claimed.lease_id)
        stored = await _stored(storage, "r")
        assert (stored.heartbeat_at, stored.lease_expires_at) == (10_900, 11_900)
        assert (stored.claimed_at, stored.lease_ms, stored.holder) == (10_000, 1_000, HOLDER_A)
        assert stored.updated_at == updated_at
        clock.now = 11_500  # past the first expiry (11_000), before the renewed one
        assert await storage.claim_next_run(["wf"], lease_ms=60_000) is None
        clock.now = 12_000  # expired, but not reclaimed yet: renewing is allowed
        assert await storage.heartbeat_run("r", claimed.lease_id)
        assert (await _stored(storage, "r")).lease_expires_at == 13_000
        clock.now = 13_000
        retaken = await storage.claim_next_run(["wf"], lease_ms=60_000)
        assert retaken is not None and retaken.run.recoveries == 1
        await storage.close()

    run(scenario())


@pytest.mark.parametrize("cls", ADAPTERS)
def test_recoveries_count_only_takeovers_and_requeue_resets_them(
    cls: type[SQLiteStorageBase], tmp_path: Path
) -> None:
    clock = ManualClock(0)

    async def scenario() -> None:
        storage = await _open(cls, tmp_path / "r.db", clock)
        await storage.create_run(make_run("r"))
        seen: list[tuple[int, int]] = []
        for _ in range(3):  # a first claim, then two takeovers of expired leases
            claimed = await storage.claim_next_run(["wf"], lease_ms=10)
            assert claimed is not None
            seen.append((claimed.run.attempt, claimed.run.recoveries))
            clock.now += 10
        assert seen == [(1, 0), (2, 1), (3, 2)]
        # Claims of a pending or woken run are not recoveries.
        assert await storage.sleep_run("r", claimed.lease_id, wake_at=clock.now + 5)
        clock.now += 5
        woken = await storage.claim_next_run(["wf"], lease_ms=10)
        assert woken is not None and (woken.run.attempt, woken.run.recoveries) == (4, 2)
        assert await storage.update_claimed_run_status(
            "r", woken.lease_id, RunStatus.FAILED, error=ErrorInfo(type="E", message="m")
        )
        assert (await _stored(storage, "r")).recoveries == 2  # kept until an operator resumes
        assert await storage.requeue_run("r")
        stored = await _stored(storage, "r")
        assert (stored.status, stored.recoveries, stored.attempt) == (RunStatus.PENDING, 0, 4)
        again = await storage.claim_next_run(["wf"], lease_ms=10)
        assert again is not None and (again.run.attempt, again.run.recoveries) == (5, 0)
        await storage.close()

    run(scenario())


async def _exit_running(storage: SQLiteStorageBase, how: str, lease_id: str) -> RunStatus:
    """Move the claimed run "r" out of running one way; the status it should land in."""
    if how == "sleep":
        assert await storage.sleep_run("r", lease_id, wake_at=10**12)
        return RunStatus.SLEEPING
    if how == "wait":
        assert await storage.wait_run("r", lease_id, "go", wake_at=None)
        return RunStatus.WAITING
    if how == "wait-buffered":
        assert await storage.deliver_event("r", "go", 1)
        assert await storage.wait_run("r", lease_id, "go", wake_at=None)
        return RunStatus.PENDING
    if how == "cancel":
        assert await storage.update_run_status("r", RunStatus.CANCELLED)
        return RunStatus.CANCELLED
    status = RunStatus(how)
    assert await storage.update_claimed_run_status("r", lease_id, status, output=1)
    return status


@pytest.mark.parametrize("cls", ADAPTERS)
@pytest.mark.parametrize(
    "how", ["sleep", "wait", "wait-buffered", "cancel", "pending", "completed", "failed"]
)
def test_every_exit_from_running_clears_the_lease_fields(
    cls: type[SQLiteStorageBase], how: str, tmp_path: Path
) -> None:
    clock = ManualClock(500)

    async def scenario() -> None:
        storage = await _open(cls, tmp_path / "x.db", clock)
        await storage.create_run(make_run("r"))
        claimed = await storage.claim_next_run(["wf"], lease_ms=1_000, holder=HOLDER_A)
        assert claimed is not None
        clock.now = 700
        assert await storage.heartbeat_run("r", claimed.lease_id)
        clock.now = 800
        status = await _exit_running(storage, how, claimed.lease_id)
        stored = await _stored(storage, "r")
        assert stored.status == status
        assert {k: getattr(stored, k) for k in LEASE_FIELDS} == dict.fromkeys(LEASE_FIELDS)
        assert stored.heartbeat_at == 700  # the last sign of life is kept
        assert not await storage.heartbeat_run("r", claimed.lease_id)  # lease id gone too
        await storage.close()

    run(scenario())


@pytest.mark.parametrize("cls", ADAPTERS)
def test_staying_running_keeps_the_lease_and_a_leaseless_running_run_is_claimable(
    cls: type[SQLiteStorageBase], tmp_path: Path
) -> None:
    clock = ManualClock(500)

    async def scenario() -> None:
        storage = await _open(cls, tmp_path / "k.db", clock)
        await storage.create_run(make_run("r"))
        claimed = await storage.claim_next_run(["wf"], lease_ms=1_000, holder=HOLDER_A)
        assert claimed is not None
        clock.now = 600
        assert await storage.update_claimed_run_status("r", claimed.lease_id, RunStatus.RUNNING)
        stored = await _stored(storage, "r")
        assert (stored.claimed_at, stored.lease_ms, stored.lease_expires_at) == (500, 1_000, 1_500)
        assert stored.holder == HOLDER_A
        # Set to running without a lease, nobody holds the run and nobody can renew it:
        # it must be claimable at once rather than stuck forever.
        assert await storage.update_run_status("r", RunStatus.RUNNING)
        stored = await _stored(storage, "r")
        assert (stored.claimed_at, stored.lease_ms, stored.holder) == (None, None, None)
        assert not await storage.heartbeat_run("r", claimed.lease_id)
        taken = await storage.claim_next_run(["wf"], lease_ms=1_000, holder=HOLDER_B)
        assert taken is not None and taken.run.holder == HOLDER_B
        await storage.close()

    run(scenario())


@pytest.mark.parametrize("cls", ADAPTERS)
def test_holder_is_stored_with_the_claim_and_read_back(
    cls: type[SQLiteStorageBase], tmp_path: Path
) -> None:
    clock = ManualClock(0)
    path = tmp_path / "holder.db"

    async def scenario() -> None:
        storage = await _open(cls, path, clock)
        await storage.create_run(make_run("a", 1))
        await storage.create_run(make_run("b", 2))
        with_holder = await storage.claim_next_run(["wf"], lease_ms=50, holder=HOLDER_A)
        without = await storage.claim_next_run(["wf"], lease_ms=50)
        assert with_holder is not None and without is not None
        assert (await _stored(storage, "a")).holder == HOLDER_A
        assert (await _stored(storage, "b")).holder is None
        running = await storage.list_runs(RunFilter(status=RunStatus.RUNNING))
        assert {r.id: r.holder for r in running} == {"a": HOLDER_A, "b": None}
        await storage.close()
        # Another handle (and the other driver) reads the same holder from the file.
        other_cls = APSWStorage if cls is SQLiteStorage else SQLiteStorage
        other = await _open(other_cls, path, clock)
        assert (await _stored(other, "a")) == with_holder.run
        await other.close()

    run(scenario())


@pytest.mark.parametrize("cls", ADAPTERS)
def test_claim_rejects_a_bad_lease_length(cls: type[SQLiteStorageBase]) -> None:
    async def scenario() -> None:
        storage = cls()
        await storage.initialize()
        for bad in (-1, 1.5, True):
            with pytest.raises(ValueError, match="lease_ms"):
                await storage.claim_next_run(["wf"], lease_ms=bad)  # type: ignore[arg-type]
        await storage.close()

    run(scenario())


def _step(status: StepStatus, output: Any, run_id: str = "r", name: str = "a") -> StepResult:
    return StepResult(
        id=f"{run_id}:{name}",
        run_id=run_id,
        name=name,
        status=status,
        output=output,
        created_at=2,
        updated_at=3,
    )


@pytest.mark.parametrize("cls", ADAPTERS)
@pytest.mark.parametrize(
    "final", [StepStatus.COMPLETED, StepStatus.COMPLETED_EARLY, StepStatus.SKIPPED]
)
def test_a_final_step_row_is_written_once(
    cls: type[SQLiteStorageBase], final: StepStatus, tmp_path: Path
) -> None:
    async def scenario() -> None:
        storage = await _open(cls, tmp_path / "w.db", ManualClock(0))
        await storage.create_run(make_run("r"))
        claimed = await storage.claim_next_run(["wf"], lease_ms=1_000)
        assert claimed is not None
        # Non-final rows may be rewritten, with or without the lease.
        assert await storage.save_step_result(_step(StepStatus.RUNNING, None), claimed.lease_id)
        assert await storage.save_step_result(_step(StepStatus.FAILED, "boom"))
        first = _step(final, {"first": True})
        assert await storage.save_step_result(first, claimed.lease_id)
        for status in StepStatus:
            late = msgspec.structs.replace(_step(status, {"second": True}), updated_at=99)
            assert not await storage.save_step_result(late, claimed.lease_id), status
            assert not await storage.save_step_result(late), status
        assert not await storage.save_step_result(first, "some-other-lease")
        assert await storage.get_step_results("r") == [first]
        # An id clash is still an error, final row or not.
        with pytest.raises(StorageError, match="UNIQUE"):
            await storage.save_step_result(
                msgspec.structs.replace(first, id="another-id"), claimed.lease_id
            )
        await storage.close()

    run(scenario())


@pytest.mark.parametrize("cls", ADAPTERS)
def test_consume_event_refuses_over_a_final_row_and_consumes_nothing(
    cls: type[SQLiteStorageBase], tmp_path: Path
) -> None:
    async def scenario() -> None:
        storage = await _open(cls, tmp_path / "e.db", ManualClock(0))
        await storage.create_run(make_run("r"))
        claimed = await storage.claim_next_run(["wf"], lease_ms=1_000)
        assert claimed is not None
        assert await storage.deliver_event("r", "go", {"n": 1})
        waiting = _step(StepStatus.WAITING, None, name="wait-go")
        # A waiting row does not stop the consume: the event becomes its checkpoint.
        assert await storage.save_step_result(waiting, claimed.lease_id)
        checkpoint = _step(StepStatus.COMPLETED, None, name="wait-go")
        got = await storage.consume_event("go", checkpoint, claimed.lease_id)
        assert got.held and got.event is not None and got.event.payload == {"n": 1}
        stored = await storage.get_step_results("r")
        assert stored == [msgspec.structs.replace(checkpoint, output={"n": 1})]
        # The row is final now: a second consume for it is refused and leaves the event.
        assert await storage.deliver_event("r", "go", {"n": 2})
        assert await storage.consume_event("go", checkpoint, claimed.lease_id) == ConsumeResult(
            held=False
        )
        assert await _buffered(storage, "r") == [{"n": 2}]
        assert await storage.get_step_results("r") == stored
        # A checkpoint with no final row still consumes, with the same lease.
        other = _step(StepStatus.COMPLETED, None, name="wait-again")
        got = await storage.consume_event("go", other, claimed.lease_id)
        assert got.event is not None and got.event.payload == {"n": 2}
        assert await _buffered(storage, "r") == []
        await storage.close()

    run(scenario())


@pytest.mark.parametrize("cls", ADAPTERS)
@pytest.mark.parametrize("ending", ["completed", "failed", "cancelled"])
def test_deliver_event_to_an_ended_run_stores_nothing(
    cls: type[SQLiteStorageBase], ending: str, tmp_path: Path
) -> None:
    async def scenario() -> None:
        storage = await _open(cls, tmp_path / "d.db", ManualClock(0))
        assert not await storage.deliver_event("ghost", "go", 1)
        await storage.create_run(make_run("r"))
        claimed = await storage.claim_next_run(["wf"], lease_ms=1_000)
        assert claimed is not None
        assert await storage.update_claimed_run_status("r", claimed.lease_id, RunStatus(ending))
        assert not await storage.deliver_event("r", "go", 1)
        assert not await storage.deliver_event("r", "go", 2, key="k")
        assert await _buffered(storage, "r") == []
        if ending != "completed":
            # Once resumed the run can receive again, and the refused key was not spent.
            assert await storage.requeue_run("r")
            assert await storage.deliver_event("r", "go", 3, key="k")
            assert await _buffered(storage, "r") == [3]
        await storage.close()

    run(scenario())


@pytest.mark.parametrize("cls", ADAPTERS)
def test_deliver_event_with_a_repeated_key_delivers_once(
    cls: type[SQLiteStorageBase], tmp_path: Path
) -> None:
    async def scenario() -> None:
        storage = await _open(cls, tmp_path / "k.db", ManualClock(0))
        await storage.create_run(make_run("r", 1))
        await storage.create_run(make_run("s", 2))
        claimed = await storage.claim_next_run(["wf"], lease_ms=1_000)
        assert claimed is not None and claimed.run.id == "r"
        assert await storage.wait_run("r", claimed.lease_id, "go", wake_at=None)
        assert await storage.deliver_event("r", "go", "first", key="k1")
        assert (await _stored(storage, "r")).status == RunStatus.PENDING  # woken
        assert await storage.deliver_event("r", "go", "retry", key="k1")  # True, not stored
        assert await _buffered(storage, "r") == ["first"]
        assert await storage.deliver_event("s", "go", "other run", key="k1")  # keys are per run
        assert await storage.deliver_event("r", "go", "no key")
        assert await storage.deliver_event("r", "go", "no key")  # no key: no dedupe
        assert await _buffered(storage, "r") == ["first", "no key", "no key"]
        # Consumed since: the key still counts as delivered.
        again = await storage.claim_next_run(["wf"], lease_ms=1_000)
        assert again is not None and again.run.id == "r"
        event = await storage.consume_event("go", _step(StepStatus.COMPLETED, None), again.lease_id)
        assert event.event is not None and event.event.payload == "first"
        assert await storage.deliver_event("r", "go", "late retry", key="k1")
        assert await _buffered(storage, "r") == ["no key", "no key"]
        assert await storage.deliver_event("r", "go", "new", key="k2")
        # A retry after the run ended still answers True: that delivery did land.
        assert await storage.update_claimed_run_status("r", again.lease_id, RunStatus.COMPLETED)
        assert await storage.deliver_event("r", "go", "after the end", key="k2")
        assert not await storage.deliver_event("r", "go", "after the end", key="k3")
        assert await _buffered(storage, "r") == ["no key", "no key", "new"]

        def delete_run(conn: Connection) -> list[Any]:
            conn.execute("DELETE FROM reflow_runs WHERE id = 'r'")
            return conn.execute("SELECT run_id, key FROM reflow_event_keys ORDER BY run_id")

        assert await storage._call("probe", delete_run) == [("s", "k1")]  # cascaded
        assert not await storage.deliver_event("r", "go", "gone", key="k1")
        await storage.close()

    run(scenario())


@pytest.mark.parametrize("cls", ADAPTERS)
def test_schedules_are_due_by_the_store_clock(cls: type[SQLiteStorageBase], tmp_path: Path) -> None:
    clock = ManualClock(4_999)
    recurrence = Recurrence(every_ms=1_000)
    schedule = Schedule(
        key="tick",
        workflow="wf",
        input=None,
        recurrence=recurrence,
        next_run_at=5_000,
        created_at=1,
        updated_at=1,
    )

    async def scenario() -> None:
        storage = await _open(cls, tmp_path / "s.db", clock)
        await storage.upsert_schedule(schedule)
        assert await storage.claim_due_schedule(["wf"]) is None
        clock.now = 5_000
        claimed = await storage.claim_due_schedule(["wf"])
        assert claimed is not None and claimed.slot == 5_000
        assert claimed.schedule.next_run_at == next_fire_time(recurrence, 5_000, 5_000)
        assert claimed.schedule.updated_at == 5_000
        assert await storage.claim_due_schedule(["wf"]) is None
        clock.now = 8_500  # several occurrences missed: advanced from the store's now
        late = await storage.claim_due_schedule(["wf"])
        assert late is not None and late.slot == claimed.schedule.next_run_at
        assert late.schedule.next_run_at == next_fire_time(recurrence, late.slot, 8_500)
        assert late.schedule.next_run_at > 8_500
        await storage.close()

    run(scenario())


# -- cross-process wake-ups (PRAGMA data_version watch) ---------------------------------


def _create_one(cls: type[SQLiteStorageBase], path: str, run_id: str) -> None:
    async def create() -> None:
        storage = cls(path)
        await storage.initialize()
        await storage.create_run(make_run(run_id))
        await storage.close()

    asyncio.run(create())


@pytest.mark.parametrize("file_events", [True, False], ids=["file-events", "polling"])
@pytest.mark.parametrize("cls", ADAPTERS)
def test_a_commit_in_another_process_wakes_the_listener(
    cls: type[SQLiteStorageBase], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, file_events: bool
) -> None:
    """On Linux the watch blocks on inotify events for the WAL; where they are not
    available it polls ``data_version``: either way a commit elsewhere wakes it."""
    from reflow_adapters.sqlite_common import notify

    opened: list[object] = []
    real_open = notify._WalEvents.open

    def open_events(database: str, wake_fd: int) -> object:
        events = real_open(database, wake_fd) if file_events else None
        opened.append(events)
        return events

    monkeypatch.setattr(notify._WalEvents, "open", staticmethod(open_events))
    path = str(tmp_path / "watch.db")

    async def main() -> None:
        storage = cls(path, watch_ms=2)
        await storage.initialize()
        woken = asyncio.Event()
        listener = asyncio.create_task(storage.listen_for_work(woken.set))
        # The watch starts from the number it reads first; nothing committed since.
        await asyncio.sleep(0)
        assert not woken.is_set()
        process = multiprocessing.get_context("spawn").Process(
            target=_create_one, args=(cls, path, "from-elsewhere")
        )
        process.start()
        await asyncio.wait_for(woken.wait(), timeout=60)
        await asyncio.to_thread(process.join, 60)
        assert process.exitcode == 0
        claimed = await storage.claim_next_run(["wf"], lease_ms=60_000)
        assert claimed is not None and claimed.run.id == "from-elsewhere"
        listener.cancel()
        with pytest.raises(asyncio.CancelledError):
            await listener
        # Cancelling ends the watch thread, not just the task.
        assert not [t for t in threading.enumerate() if t.name == "reflow-sqlite-watch"]
        await storage.close()

    run(main())
    assert opened, "the watch never started"
    if file_events and sys.platform.startswith("linux"):
        assert all(events is not None for events in opened), "inotify was not used"


@pytest.mark.parametrize("cls", ADAPTERS)
def test_the_watch_wakes_for_new_work_only(cls: type[SQLiteStorageBase], tmp_path: Path) -> None:
    """Reads, heartbeats, step saves and completions through another handle wake no one;
    creating a run there does."""
    path = tmp_path / "watch.db"

    async def main() -> None:
        listening, writing = cls(path, watch_ms=1), cls(path)
        await listening.initialize()
        await writing.initialize()
        await writing.create_run(make_run("busy"))
        claimed = await writing.claim_next_run(["wf"], lease_ms=60_000)
        assert claimed is not None
        pokes: list[int] = []
        woken = asyncio.Event()

        def on_work() -> None:
            pokes.append(1)
            woken.set()

        listener = asyncio.create_task(listening.listen_for_work(on_work))
        # Proving that nothing happens takes waiting: 20 rounds of commits that bring no
        # new work, each followed by two watch periods.
        for index in range(20):
            await writing.get_run("busy")
            await writing.list_runs(RunFilter(limit=5))
            assert await writing.heartbeat_run("busy", claimed.lease_id)
            step = StepResult(
                id=f"busy/s{index}",
                run_id="busy",
                name=f"s{index}",
                status=StepStatus.COMPLETED,
                output=index,
                attempts=1,
                created_at=1,
                updated_at=1,
            )
            assert await writing.save_step_result(step, claimed.lease_id)
            await asyncio.to_thread(threading.Event().wait, 0.002)
        assert await writing.update_claimed_run_status(
            "busy", claimed.lease_id, RunStatus.COMPLETED
        )
        await asyncio.to_thread(threading.Event().wait, 0.002)
        assert pokes == []
        await writing.create_run(make_run("new work", 2))
        await asyncio.wait_for(woken.wait(), timeout=30)
        listener.cancel()
        with pytest.raises(asyncio.CancelledError):
            await listener
        await listening.close()
        await writing.close()

    run(main())


def test_watch_ms_is_checked_and_read_from_the_url(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="watch_ms"):
        SQLiteStorage(tmp_path / "x.db", watch_ms=0)
    storage = make_storage(f"sqlite:///{tmp_path / 'x.db'}?watch_ms=7")
    assert storage._watch_ms == 7


# -- contract 2.1 on a real file: batch claims and purges --------------------------------


@pytest.mark.parametrize("cls", ADAPTERS)
def test_purge_removes_every_row_of_the_run_from_every_table(
    cls: type[SQLiteStorageBase], tmp_path: Path
) -> None:
    """Checked in the file itself, not through the contract's reads: no step, event or
    event-key row of a purged run is left behind (the cascade really ran)."""
    path = tmp_path / "purge.db"

    async def main() -> None:
        storage = cls(path, clock=lambda: 1_000)
        await storage.initialize()
        for index, status in enumerate(("completed", "pending")):
            run_id = f"r{index}"
            await storage.create_run(make_run(run_id, index, idempotency_key=f"k{index}"))
            claimed = await storage.claim_next_run(["wf"], lease_ms=60_000)
            assert claimed is not None and claimed.run.id == run_id
            step = StepResult(
                id=f"{run_id}/s",
                run_id=run_id,
                name="s",
                status=StepStatus.COMPLETED,
                output=1,
                attempts=1,
                created_at=1,
                updated_at=1,
            )
            assert await storage.save_step_result(step, claimed.lease_id)
            assert await storage.deliver_event(run_id, "ev", "payload", key="key")
            if status == "completed":
                assert await storage.update_claimed_run_status(
                    run_id, claimed.lease_id, RunStatus.COMPLETED
                )
            else:
                assert await storage.update_run_status(run_id, RunStatus.PENDING)
        assert await storage.purge_runs(finished_before=2_000, limit=10) == 1
        await storage.close()

    run(main())
    conn = sqlite3.connect(path)
    try:
        for table in ("reflow_runs", "reflow_steps", "reflow_events", "reflow_event_keys"):
            column = "id" if table == "reflow_runs" else "run_id"
            rows = conn.execute(f"SELECT DISTINCT {column} FROM {table}").fetchall()
            assert rows == [("r1",)], (table, rows)
    finally:
        conn.close()


@pytest.mark.parametrize("cls", ADAPTERS)
def test_claims_skip_a_backlog_of_another_workflow(
    cls: type[SQLiteStorageBase], tmp_path: Path
) -> None:
    """5,000 older pending runs of another workflow: the candidate query has no table
    scan, finds exactly the five runs of 'wf', and claim_runs takes them oldest first."""
    path = tmp_path / "backlog.db"

    async def claim(storage: SQLiteStorageBase) -> None:
        got = await storage.claim_runs(["wf", "absent"], lease_ms=60_000, limit=5)
        assert [c.run.id for c in got] == [f"wf-{i}" for i in range(5)]

    async def main() -> None:
        storage = cls(path)
        await storage.initialize()
        for i in range(5):
            await storage.create_run(make_run(f"wf-{i}", 10_000 + i))
        await storage.close()

    run(main())
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 5000) "
            "INSERT INTO reflow_runs (id, workflow, input, status, created_at, updated_at) "
            "SELECT 'other-' || i, 'other', 'null', 'pending', i, i FROM n"
        )
        queries = sql.queries()
        params = {"workflow": "other", "now": 10**12, "limit": 5}
        plan = conn.execute("EXPLAIN QUERY PLAN " + queries["claim_candidates"], params)
        assert not [row for row in plan if "SCAN reflow_runs" in row[3]]
        # The candidates of 'wf' are exactly its five runs, read through the index.
        rows = conn.execute(queries["claim_candidates"], {**params, "workflow": "wf"}).fetchall()
        assert [r[1] for r in rows] == [f"wf-{i}" for i in range(5)]
    finally:
        conn.close()

    async def check() -> None:
        storage = cls(path)
        await storage.initialize()
        await claim(storage)
        await storage.close()

    run(check())
