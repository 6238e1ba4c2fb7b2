"""PostgresStorage beyond the conformance kit: real processes, locks, notifications, failures.

The kit runs the whole contract against this adapter; these tests cover what only a
server shows: migrations raced by processes, claims raced by processes, SKIP LOCKED,
LISTEN/NOTIFY, killed backends, and exact text in json columns.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

# The fixture module lives in tests/; test files have no package to import it through.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import postgres_fixtures

from reflow_adapters.postgres import (
    PostgresStorage,
    plugin,
)
from reflow_core import codec
from reflow_core.errors import ConfigError, SerializationError, StorageError
from reflow_core.registry import Capability
from reflow_core.types import (
    Recurrence,
    RunStatus,
    Schedule,
    StepResult,
    StepStatus,
    WorkflowRun,
)

pytestmark = pytest.mark.postgres
pg_dsn = postgres_fixtures.pg_dsn
pg_schema = postgres_fixtures.pg_schema
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def new_run(
    run_id: str, created_at: int = 1, workflow: str = "wf", value: Any = None
) -> WorkflowRun:
    return WorkflowRun(
        id=run_id,
        workflow=workflow,
        input=value,
        status=RunStatus.PENDING,
        created_at=created_at,
        updated_at=created_at,
    )


class Clock:
    """A hand-moved clock."""

    def __init__(self, now: int = 1_000_000) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


async def opened(dsn: str, schema: str, **kwargs: Any) -> PostgresStorage:
    storage = PostgresStorage(dsn, schema=schema, **kwargs)
    await storage.initialize()
    return storage


async def wait_until(predicate: Callable[[], Awaitable[bool]]) -> None:
    for _ in range(500):
        if await predicate():
            return
        await asyncio.sleep(0.02)
    pytest.fail("condition not reached within 10 s")


def with_app_name(dsn: str) -> tuple[str, str]:
    app = f"reflow_kill_{uuid.uuid4().hex[:8]}"
    return make_conninfo(dsn, application_name=app), app


async def terminate_backends(dsn: str, app: str) -> int:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND application_name = %s",
            (app,),
        )
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])


# -- processes (spawned: module-level targets) -------------------------------------------


def _initialize_in_process(dsn: str, schema: str, barrier: Any) -> None:
    async def main() -> None:
        storage = PostgresStorage(dsn, schema=schema)
        barrier.wait()
        await storage.initialize()
        await storage.close()

    asyncio.run(main())


def _claim_all_in_process(dsn: str, schema: str, barrier: Any, results: Any) -> None:
    async def main() -> list[str]:
        storage = await opened(dsn, schema, max_size=2)
        claimed: list[str] = []
        barrier.wait()
        while (claim := await storage.claim_next_run(["wf"])) is not None:
            claimed.append(claim.run.id)
        await storage.close()
        return claimed

    results.put(asyncio.run(main()))


def _spawn(target: Callable[..., None], *args: Any, count: int) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(count)
    procs = [ctx.Process(target=target, args=(*args, barrier)) for _ in range(count)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0


# -- migrations ---------------------------------------------------------------------------


async def _catalog(dsn: str, schema: str) -> dict[str, list[tuple[Any, ...]]]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        columns = await conn.execute(
            "SELECT table_name, column_name, data_type, is_nullable, column_default"
            " FROM information_schema.columns WHERE table_schema = %s ORDER BY 1, 2",
            (schema,),
        )
        indexes = await conn.execute(
            "SELECT indexname, replace(indexdef, %s, 'S') FROM pg_indexes"
            " WHERE schemaname = %s ORDER BY 1",
            (schema + ".", schema),
        )
        constraints = await conn.execute(
            "SELECT conname, contype, replace(pg_get_constraintdef(c.oid), %s, 'S')"
            " FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace"
            " WHERE n.nspname = %s ORDER BY 1",
            (schema + ".", schema),
        )
        return {
            "columns": await columns.fetchall(),
            "indexes": await indexes.fetchall(),
            "constraints": await constraints.fetchall(),
        }


def test_concurrent_initialize_from_processes_leaves_one_schema(
    pg_dsn: str, pg_schema: str
) -> None:
    _spawn(_initialize_in_process, pg_dsn, pg_schema, count=4)

    async def check() -> None:
        storage = await opened(pg_dsn, pg_schema)  # and once more: idempotent
        async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
            cur = await conn.execute(
                sql.SQL("SELECT version FROM {}.schema_version ORDER BY 1").format(
                    sql.Identifier(pg_schema)
                )
            )
            assert [row[0] for row in await cur.fetchall()] == [1]
        catalog = await _catalog(pg_dsn, pg_schema)
        tables = {row[0] for row in catalog["columns"]}
        assert tables == {"runs", "steps", "events", "schedules", "schema_version"}
        await storage.close()

    run(check())


def test_all_migrations_one_by_one_equal_a_fresh_schema(pg_dsn: str, pg_schema: str) -> None:
    from reflow_adapters.postgres.sql import migrations

    fresh_schema = pg_schema + "_fresh"

    async def main() -> None:
        stepwise = PostgresStorage(pg_dsn, schema=pg_schema)
        await stepwise._open_pool()
        for migration in migrations():  # an upgrade path: one start-up per release
            await stepwise._migrate(up_to=migration.version)
        fresh = PostgresStorage(pg_dsn, schema=fresh_schema, drop_schema_on_close=True)
        await fresh.initialize()
        try:
            assert await _catalog(pg_dsn, pg_schema) == await _catalog(pg_dsn, fresh_schema)
        finally:
            await fresh.close()
            await stepwise.close()

    run(main())


# -- claims -------------------------------------------------------------------------------


def test_each_run_is_claimed_exactly_once_by_racing_processes(pg_dsn: str, pg_schema: str) -> None:
    async def seed() -> None:
        storage = await opened(pg_dsn, pg_schema)
        for i in range(200):
            await storage.create_run(new_run(f"r{i:03}", created_at=i))
        await storage.close()

    run(seed())
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [
        ctx.Process(target=_claim_all_in_process, args=(pg_dsn, pg_schema, barrier, results))
        for _ in range(4)
    ]
    for proc in procs:
        proc.start()
    per_process = [results.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    claimed = [run_id for ids in per_process for run_id in ids]
    assert sorted(claimed) == [f"r{i:03}" for i in range(200)]  # all, none twice
    assert sum(1 for ids in per_process if ids) >= 2  # they really raced


def test_claim_skips_a_locked_run_instead_of_blocking(pg_dsn: str, pg_schema: str) -> None:
    async def main() -> None:
        storage = await opened(pg_dsn, pg_schema)
        await storage.create_run(new_run("older", created_at=1))
        await storage.create_run(new_run("newer", created_at=2))
        async with await psycopg.AsyncConnection.connect(pg_dsn) as blocker:
            query = sql.SQL("SELECT 1 FROM {}.runs WHERE id = 'older' FOR UPDATE")
            await blocker.execute(query.format(sql.Identifier(pg_schema)))
            claim = await asyncio.wait_for(storage.claim_next_run(["wf"]), timeout=5)
            assert claim is not None
            assert claim.run.id == "newer"
            await blocker.rollback()
        claim = await storage.claim_next_run(["wf"])
        assert claim is not None
        assert claim.run.id == "older"
        await storage.close()

    run(main())


def test_claim_reads_time_from_the_injected_clock(pg_dsn: str, pg_schema: str) -> None:
    async def main() -> None:
        clock = Clock()
        storage = await opened(pg_dsn, pg_schema, clock=clock)
        await storage.create_run(new_run("r"))
        claim = await storage.claim_next_run(["wf"])
        assert claim is not None
        assert claim.run.heartbeat_at == clock.now
        assert await storage.sleep_run("r", claim.lease_id, wake_at=clock.now + 500)
        assert await storage.claim_next_run(["wf"]) is None
        clock.now += 500
        again = await storage.claim_next_run(["wf"])
        assert again is not None
        assert again.run.attempt == 2
        await storage.close()

    run(main())


def test_concurrent_deliver_and_wait_never_lose_the_wakeup(pg_dsn: str, pg_schema: str) -> None:
    async def main() -> None:
        first, second = await opened(pg_dsn, pg_schema), await opened(pg_dsn, pg_schema)
        for i in range(40):
            await first.create_run(new_run(f"r{i}", created_at=i))
            claim = await first.claim_next_run(["wf"])
            assert claim is not None
            await asyncio.gather(
                first.wait_run(claim.run.id, claim.lease_id, "go", None),
                second.deliver_event(claim.run.id, "go", i),
            )
            stored = await first.get_run(claim.run.id)
            assert stored is not None
            assert stored.status is RunStatus.PENDING, f"lost wake-up in round {i}"
            assert await first.update_run_status(claim.run.id, RunStatus.COMPLETED)
        await first.close()
        await second.close()

    run(main())


def test_a_schedule_occurrence_is_claimed_once_across_adapters(pg_dsn: str, pg_schema: str) -> None:
    async def main() -> None:
        stores = [await opened(pg_dsn, pg_schema) for _ in range(4)]
        schedule = Schedule(
            key="tick",
            workflow="wf",
            input=None,
            recurrence=Recurrence(every_ms=1000),
            next_run_at=1000,
            created_at=0,
            updated_at=0,
        )
        await stores[0].upsert_schedule(schedule)
        claims = await asyncio.gather(*(s.claim_due_schedule(["wf"], 1500) for s in stores))
        won = [c for c in claims if c is not None]
        assert len(won) == 1
        assert won[0].slot == 1000
        assert won[0].schedule.next_run_at == 2000
        for store in stores:
            await store.close()

    run(main())


# -- notifications ------------------------------------------------------------------------


class Wakeups:
    """Counts on_work calls; ``wait`` returns once one arrives."""

    def __init__(self) -> None:
        self.count = 0
        self.event = asyncio.Event()

    def __call__(self) -> None:
        self.count += 1
        self.event.set()

    async def wait(self, within: float = 5.0) -> None:
        await asyncio.wait_for(self.event.wait(), within)
        self.event.clear()


async def _listening(storage: PostgresStorage, writer: PostgresStorage, wakeups: Wakeups) -> Any:
    """Start a listener and return its task once a probe notification got through."""
    task = asyncio.create_task(storage.listen_for_work(wakeups))
    for attempt in range(100):
        await writer.create_run(new_run(f"probe-{uuid.uuid4().hex}", workflow="probe"))
        try:
            await wakeups.wait(within=0.1)
            return task
        except TimeoutError:
            assert attempt < 99, "listener never started"
    return task


def test_every_release_path_notifies_another_process_handle(pg_dsn: str, pg_schema: str) -> None:
    async def main() -> None:
        listener, writer = await opened(pg_dsn, pg_schema), await opened(pg_dsn, pg_schema)
        wakeups = Wakeups()
        task = await _listening(listener, writer, wakeups)

        started = time.perf_counter()
        await writer.create_run(new_run("r"))
        await wakeups.wait()
        assert time.perf_counter() - started < 2
        claim = await writer.claim_next_run(["wf"])
        assert claim is not None
        assert await writer.sleep_run("r", claim.lease_id, wake_at=10**15)
        await wakeups.wait()
        assert await writer.update_run_status("r", RunStatus.PENDING)
        await wakeups.wait()
        claim = await writer.claim_next_run(["wf"])
        assert claim is not None
        assert await writer.wait_run("r", claim.lease_id, "go", None)
        assert await writer.deliver_event("r", "other", 1)  # not awaited: no wake-up
        assert await writer.deliver_event("r", "go", 1)
        await wakeups.wait()
        claim = await writer.claim_next_run(["wf"])
        assert claim is not None
        assert await writer.update_claimed_run_status("r", claim.lease_id, RunStatus.PENDING)
        await wakeups.wait()
        claim = await writer.claim_next_run(["wf"])
        assert claim is not None
        assert await writer.update_claimed_run_status("r", claim.lease_id, RunStatus.FAILED)
        assert await writer.requeue_run("r")
        await wakeups.wait()
        await asyncio.sleep(0.2)
        assert not wakeups.event.is_set()  # the non-waking delivery sent nothing

        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await listener.close()
        await writer.close()

    run(main())


def test_close_ends_a_running_listener(pg_dsn: str, pg_schema: str) -> None:
    async def main() -> None:
        listener, writer = await opened(pg_dsn, pg_schema), await opened(pg_dsn, pg_schema)
        task = await _listening(listener, writer, Wakeups())
        await listener.close()
        await asyncio.wait_for(task, timeout=5)  # returns instead of reconnecting
        await writer.close()

    run(main())


# -- connection loss ----------------------------------------------------------------------


def test_killed_connection_fails_the_call_as_storage_error_then_recovers(
    pg_dsn: str, pg_schema: str
) -> None:
    dsn, app = with_app_name(pg_dsn)

    async def main() -> None:
        storage = await opened(dsn, pg_schema, max_size=3)
        await storage.create_run(new_run("r"))
        async with await psycopg.AsyncConnection.connect(pg_dsn) as blocker:
            query = sql.SQL("SELECT 1 FROM {}.runs WHERE id = 'r' FOR UPDATE")
            await blocker.execute(query.format(sql.Identifier(pg_schema)))
            in_flight = asyncio.create_task(storage.update_run_status("r", RunStatus.CANCELLED))

            async def blocked() -> bool:
                cur = await blocker.execute(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE application_name = %s AND wait_event_type = 'Lock'",
                    (app,),
                )
                row = await cur.fetchone()
                return row is not None and row[0] == 1

            await wait_until(blocked)
            assert await terminate_backends(pg_dsn, app) >= 1
            with pytest.raises(StorageError) as caught:
                await in_flight
            assert isinstance(caught.value.__cause__, psycopg.OperationalError)
            assert caught.value.operation == "update_run_status"
            await blocker.rollback()
        stored = await storage.get_run("r")  # reconnected: a fresh backend serves it
        assert stored is not None
        assert stored.status is RunStatus.PENDING
        assert await storage.update_run_status("r", RunStatus.CANCELLED)
        await storage.close()

    run(main())


def test_listener_reconnects_and_resumes_after_its_backend_is_killed(
    pg_dsn: str, pg_schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    dsn, app = with_app_name(pg_dsn)

    async def main() -> None:
        listener = PostgresStorage(dsn, schema=pg_schema)
        listener.reconnect_initial_s = 0.05
        await listener.initialize()
        writer = await opened(pg_dsn, pg_schema)
        wakeups = Wakeups()
        task = await _listening(listener, writer, wakeups)
        assert await terminate_backends(pg_dsn, app) >= 1
        await wakeups.wait()  # the catch-up call after reconnecting
        await writer.create_run(new_run("after"))
        await wakeups.wait()  # and live notifications again
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await listener.close()
        await writer.close()

    with caplog.at_level("WARNING", logger="reflow.postgres"):
        run(main())
    assert any("lost its connection" in r.getMessage() for r in caplog.records)


# -- values -------------------------------------------------------------------------------

TRICKY = [
    1e300,
    -0.0,
    5e-324,
    0.1,
    2**64 + 1,
    -(2**70),
    "nul \u0000 inside",
    "emoji 😀 and \\u0000 as text",
    {"$datetime": "not a date", "$dict": {"$": []}},
    [1, 1.0, True, None, "1"],
    datetime(2024, 3, 31, 2, 30, 15, 123456, tzinfo=timezone(timedelta(hours=5, minutes=30))),
    datetime(2024, 1, 1, 12, 0),
    {"nested": [{"at": datetime(2000, 1, 1, tzinfo=UTC)}]},
]


def assert_identical(got: Any, want: Any) -> None:
    assert type(got) is type(want), (got, want)
    if isinstance(want, float):
        assert got == want
        assert math.copysign(1, got) == math.copysign(1, want)
    elif isinstance(want, datetime):
        assert got.isoformat() == want.isoformat()
    elif isinstance(want, dict):
        assert list(got) == list(want)
        for key in want:
            assert_identical(got[key], want[key])
    elif isinstance(want, list):
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            assert_identical(a, b)
    else:
        assert got == want


@pytest.mark.parametrize("value", TRICKY, ids=repr)
def test_tricky_values_come_back_exactly(pg_dsn: str, pg_schema: str, value: Any) -> None:
    async def main() -> None:
        storage = await opened(pg_dsn, pg_schema)
        await storage.create_run(new_run("r", value=value))
        stored = await storage.get_run("r")
        assert stored is not None
        assert_identical(stored.input, value)
        step = StepResult(
            id="s",
            run_id="r",
            name="s",
            status=StepStatus.COMPLETED,
            output=value,
            created_at=1,
            updated_at=1,
        )
        assert await storage.save_step_result(step)
        assert_identical((await storage.get_step_results("r"))[0].output, value)
        assert await storage.deliver_event("r", "e", value)
        event = await storage.take_event("r", "e")
        assert event is not None
        assert_identical(event.payload, value)
        # The column holds the codec's text byte for byte (json, not jsonb).
        async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
            query = sql.SQL("SELECT input::text FROM {}.runs").format(sql.Identifier(pg_schema))
            row = await (await conn.execute(query)).fetchone()
            assert row is not None
            assert row[0] == codec.encode(value).decode()
        await storage.close()

    run(main())


def test_unpersistable_value_raises_before_anything_is_written(pg_dsn: str, pg_schema: str) -> None:
    async def main() -> None:
        storage = await opened(pg_dsn, pg_schema)
        with pytest.raises(SerializationError):
            await storage.create_run(new_run("r", value={"bad": float("nan")}))
        assert await storage.get_run("r") is None
        await storage.create_run(new_run("r"))
        claim = await storage.claim_next_run(["wf"])
        assert claim is not None
        with pytest.raises(SerializationError):
            await storage.update_claimed_run_status(
                "r", claim.lease_id, RunStatus.COMPLETED, output={1, 2}
            )
        stored = await storage.get_run("r")
        assert stored is not None
        assert stored.status is RunStatus.RUNNING
        await storage.close()

    run(main())


# -- errors, lifecycle, plugin ------------------------------------------------------------


def test_driver_errors_become_storage_errors(pg_dsn: str, pg_schema: str) -> None:
    async def main() -> None:
        storage = PostgresStorage(pg_dsn, schema=pg_schema)
        with pytest.raises(StorageError, match="not initialized"):
            await storage.get_run("r")
        await storage.initialize()
        await storage.create_run(new_run("r"))
        step = StepResult(
            id="a", run_id="r", name="n", status=StepStatus.COMPLETED, created_at=1, updated_at=1
        )
        assert await storage.save_step_result(step)
        with pytest.raises(StorageError) as caught:  # same (run_id, name), another id
            await storage.save_step_result(step.__class__(**{**_fields(step), "id": "b"}))
        assert isinstance(caught.value.__cause__, psycopg.errors.UniqueViolation)
        with pytest.raises(StorageError, match="already belongs"):  # same id, another name
            await storage.save_step_result(step.__class__(**{**_fields(step), "name": "m"}))
        await storage.close()
        await storage.close()  # twice is fine
        with pytest.raises(StorageError, match="closed"):
            await storage.get_run("r")

    run(main())


def _fields(step: StepResult) -> dict[str, Any]:
    return {name: getattr(step, name) for name in step.__struct_fields__}


def test_drop_schema_on_close_removes_everything(pg_dsn: str, pg_schema: str) -> None:
    async def main() -> bool:
        storage = await opened(pg_dsn, pg_schema, drop_schema_on_close=True)
        await storage.create_run(new_run("r"))
        await storage.close()
        async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
            cur = await conn.execute(
                "SELECT count(*) FROM pg_namespace WHERE nspname = %s", (pg_schema,)
            )
            row = await cur.fetchone()
            return row is not None and row[0] == 0

    assert run(main())


def test_url_reopens_the_same_store_through_the_plugin_factory(pg_dsn: str, pg_schema: str) -> None:
    async def main() -> None:
        storage = await opened(make_conninfo(pg_dsn), pg_schema)  # key=value form in
        await storage.create_run(new_run("r"))
        assert storage.url is not None
        assert f"reflow_schema={pg_schema}" in storage.url
        reopened = plugin.create(storage.url)
        assert isinstance(reopened, PostgresStorage)
        assert reopened.schema == pg_schema
        await reopened.initialize()
        assert await reopened.get_run("r") is not None
        assert reopened.url == storage.url
        await reopened.close()
        await storage.close()

    run(main())


def test_plugin_spec_and_configuration_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    (spec,) = plugin.reflow_adapters()
    assert spec.name == "postgres"
    assert set(spec.schemes) == {"postgresql", "postgres"}
    assert spec.capabilities == {
        Capability.DURABLE,
        Capability.CROSS_PROCESS,
        Capability.THREADS,
        Capability.NOTIFY,
    }
    with pytest.raises(ConfigError, match="needs a DSN"):
        spec.factory()
    with pytest.raises(ConfigError, match="schema name"):
        spec.factory("postgresql://localhost/db?reflow_schema=Bad-Name")
    monkeypatch.delenv(plugin.TEST_DSN_ENV, raising=False)
    assert spec.conformance_factory is not None
    with pytest.raises(ConfigError, match="--reflow-option dsn="):
        spec.conformance_factory(Path("."), {})
    made = spec.conformance_factory(Path("."), {"dsn": "postgresql://localhost/db"})
    assert isinstance(made, PostgresStorage)
    assert made.schema.startswith("reflow_test_")
