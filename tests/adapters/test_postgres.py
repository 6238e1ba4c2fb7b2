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
from collections.abc import Awaitable, Callable, Coroutine, Iterator
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
from reflow_adapters.postgres.sql import migrations, queries
from reflow_core import codec
from reflow_core.errors import ConfigError, SerializationError, StorageError
from reflow_core.registry import Capability, get_adapter
from reflow_core.types import (
    ConsumeResult,
    LeaseHolder,
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
LEASE = 30_000


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
        while (claim := await storage.claim_next_run(["wf"], lease_ms=LEASE)) is not None:
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
        functions = await conn.execute(
            "SELECT p.proname, pg_get_function_arguments(p.oid), p.provolatile, p.prosrc"
            " FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE n.nspname = %s ORDER BY 1",
            (schema,),
        )
        return {
            "columns": await columns.fetchall(),
            "indexes": await indexes.fetchall(),
            "constraints": await constraints.fetchall(),
            "functions": await functions.fetchall(),
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
            versions = [m.version for m in migrations()]
            assert [row[0] for row in await cur.fetchall()] == versions
        catalog = await _catalog(pg_dsn, pg_schema)
        tables = {row[0] for row in catalog["columns"]}
        assert tables == {"runs", "steps", "events", "event_keys", "schedules", "schema_version"}
        assert [row[0] for row in catalog["functions"]] == ["reflow_now"]
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
            claim = await asyncio.wait_for(
                storage.claim_next_run(["wf"], lease_ms=LEASE), timeout=5
            )
            assert claim is not None
            assert claim.run.id == "newer"
            await blocker.rollback()
        claim = await storage.claim_next_run(["wf"], lease_ms=LEASE)
        assert claim is not None
        assert claim.run.id == "older"
        await storage.close()

    run(main())


def test_claim_reads_time_from_the_injected_clock(pg_dsn: str, pg_schema: str) -> None:
    async def main() -> None:
        clock = Clock()
        storage = await opened(pg_dsn, pg_schema, clock=clock)
        assert await storage.now() == clock.now
        await storage.create_run(new_run("r"))
        claim = await storage.claim_next_run(["wf"], lease_ms=LEASE)
        assert claim is not None
        assert claim.run.heartbeat_at == clock.now
        assert claim.run.claimed_at == clock.now
        assert claim.run.lease_expires_at == clock.now + LEASE
        assert await storage.sleep_run("r", claim.lease_id, wake_at=clock.now + 500)
        assert await storage.claim_next_run(["wf"], lease_ms=LEASE) is None
        clock.now += 500
        again = await storage.claim_next_run(["wf"], lease_ms=LEASE)
        assert again is not None
        assert again.run.attempt == 2
        await storage.close()

    run(main())


# -- contract 2.0: the server's clock, stored leases ----------------------------------------


async def server_ms(dsn: str) -> int:
    """The server's clock_timestamp() in epoch ms, read on a connection of its own."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint"
        )
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])


async def raw(dsn: str, schema: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    """Run SQL directly in the adapter's schema (autocommit); rows if any."""
    async with await psycopg.AsyncConnection.connect(
        dsn, autocommit=True, options=f"-c search_path={schema}"
    ) as conn:
        cur = await conn.execute(query.encode(), args or None)
        return await cur.fetchall() if cur.description is not None else []


async def must_get(storage: PostgresStorage, run_id: str) -> WorkflowRun:
    stored = await storage.get_run(run_id)
    assert stored is not None
    return stored


def wrong_python_clock(monkeypatch: pytest.MonkeyPatch, offset_s: float) -> None:
    """Make this process's wall clock wildly wrong (the adapter must not care)."""
    real_ns, real_s = time.time_ns, time.time
    monkeypatch.setattr(time, "time_ns", lambda: real_ns() + int(offset_s * 1e9))
    monkeypatch.setattr(time, "time", lambda: real_s() + offset_s)


YEAR_S = 365 * 24 * 3600.0


@pytest.mark.parametrize("offset_s", [YEAR_S, -YEAR_S], ids=["client-ahead", "client-behind"])
def test_now_and_leases_follow_the_server_clock_not_the_client_clock(
    pg_dsn: str, pg_schema: str, monkeypatch: pytest.MonkeyPatch, offset_s: float
) -> None:
    async def main() -> None:
        storage, other = await opened(pg_dsn, pg_schema), await opened(pg_dsn, pg_schema)
        await storage.create_run(new_run("r"))
        before = await server_ms(pg_dsn)
        wrong_python_clock(monkeypatch, offset_s)
        assert abs(time.time_ns() // 1_000_000 - before) > YEAR_S * 1000 / 2  # really wrong
        now = await storage.now()
        claim = await storage.claim_next_run(["wf"], lease_ms=60_000)
        assert claim is not None
        after = await server_ms(pg_dsn)
        assert before <= now <= after
        held = claim.run
        assert held.claimed_at is not None
        assert before <= held.claimed_at <= after
        # One "now" per statement: every stamp of the claim is the same instant.
        assert held.heartbeat_at == held.claimed_at == held.updated_at
        assert held.lease_ms == 60_000
        assert held.lease_expires_at == held.claimed_at + 60_000
        # A client a year ahead would call this lease long expired; the server does not.
        assert await other.claim_next_run(["wf"], lease_ms=1) is None
        assert await storage.heartbeat_run("r", claim.lease_id)
        renewed = await must_get(other, "r")
        assert renewed.heartbeat_at is not None
        assert held.claimed_at <= renewed.heartbeat_at <= await server_ms(pg_dsn)
        assert renewed.lease_expires_at == renewed.heartbeat_at + 60_000
        await storage.close()
        await other.close()

    run(main())


def test_a_lease_is_claimable_exactly_when_the_server_clock_passes_its_expiry(
    pg_dsn: str, pg_schema: str
) -> None:
    async def main() -> None:
        storage = await opened(pg_dsn, pg_schema)  # the server's clock decides
        await storage.create_run(new_run("r"))
        first = await storage.claim_next_run(["wf"], lease_ms=LEASE)
        assert first is not None
        expires = first.run.lease_expires_at
        assert expires is not None
        assert await storage.claim_next_run(["wf"], lease_ms=LEASE) is None
        # The boundary, through the test-only override of the statements' "now".
        early = await opened(pg_dsn, pg_schema, clock=Clock(expires - 1))
        assert await early.claim_next_run(["wf"], lease_ms=LEASE) is None
        on_time = await opened(pg_dsn, pg_schema, clock=Clock(expires))
        taken = await on_time.claim_next_run(["wf"], lease_ms=LEASE)
        assert taken is not None
        assert taken.run.recoveries == 1
        assert taken.run.claimed_at == expires
        # on_time's lease was stamped 30 s ahead of the server: live for the server.
        assert await storage.claim_next_run(["wf"], lease_ms=LEASE) is None
        # And on the server's own clock alone: a 1 ms lease is stale once the server's
        # clock has reached its expiry (polled, not slept).
        assert await on_time.update_run_status("r", RunStatus.PENDING)
        short = await storage.claim_next_run(["wf"], lease_ms=1)
        assert short is not None
        short_expiry = short.run.lease_expires_at
        assert short_expiry is not None
        polls = 0
        while await storage.now() < short_expiry:
            polls += 1
            assert polls < 10_000, "the server's clock did not advance"
        again = await storage.claim_next_run(["wf"], lease_ms=LEASE)
        assert again is not None
        assert again.run.recoveries == 2
        for store in (storage, early, on_time):
            await store.close()

    run(main())


def test_mixed_lease_lengths_each_holder_is_judged_by_its_own(pg_dsn: str, pg_schema: str) -> None:
    async def main() -> None:
        clock = Clock(1_000_000)
        storage = await opened(pg_dsn, pg_schema, clock=clock)
        await storage.create_run(new_run("long", created_at=1))
        await storage.create_run(new_run("short", created_at=2))
        long = await storage.claim_next_run(["wf"], lease_ms=10_000)
        short = await storage.claim_next_run(["wf"], lease_ms=1_000)
        assert long is not None and short is not None
        assert (long.run.id, short.run.id) == ("long", "short")
        assert long.run.lease_expires_at == 1_010_000
        assert short.run.lease_expires_at == 1_001_000
        clock.now = 1_000_999
        assert await storage.claim_next_run(["wf"], lease_ms=60_000) is None
        clock.now = 1_001_000
        # A long-lease claimer takes the expired short lease, not the older live one.
        taken = await storage.claim_next_run(["wf"], lease_ms=60_000)
        assert taken is not None
        assert taken.run.id == "short"
        assert taken.run.lease_ms == 60_000
        assert taken.run.lease_expires_at == 1_061_000
        # A short-lease claimer cannot make the 10 s lease look stale (1.x would have:
        # stale_before = now - 100 ms).
        clock.now = 1_005_000
        assert await storage.claim_next_run(["wf"], lease_ms=100) is None
        clock.now = 1_009_999
        assert await storage.claim_next_run(["wf"], lease_ms=100) is None
        clock.now = 1_010_000
        again = await storage.claim_next_run(["wf"], lease_ms=100)
        assert again is not None
        assert again.run.id == "long"
        assert (again.run.lease_ms, again.run.lease_expires_at) == (100, 1_010_100)
        await storage.close()

    run(main())


def test_heartbeat_extends_by_the_stored_lease_length(pg_dsn: str, pg_schema: str) -> None:
    async def main() -> None:
        clock = Clock(1_000_000)
        storage = await opened(pg_dsn, pg_schema, clock=clock)
        await storage.create_run(new_run("r"))
        claim = await storage.claim_next_run(["wf"], lease_ms=5_000)
        assert claim is not None
        clock.now = 1_003_000
        assert await storage.heartbeat_run("r", claim.lease_id)
        beat = await must_get(storage, "r")
        assert beat.heartbeat_at == 1_003_000
        assert beat.lease_expires_at == 1_008_000  # the stored 5 s, from the heartbeat
        assert beat.lease_ms == 5_000
        assert beat.claimed_at == 1_000_000  # the claim time stays
        assert beat.updated_at == claim.run.updated_at  # a heartbeat is not an update
        clock.now = 1_007_999
        assert await storage.claim_next_run(["wf"], lease_ms=60_000) is None
        # Expired but not yet reclaimed: still held, and renewing is allowed.
        clock.now = 1_009_000
        assert await storage.heartbeat_run("r", claim.lease_id)
        assert (await must_get(storage, "r")).lease_expires_at == 1_014_000
        assert not await storage.heartbeat_run("r", "not-the-lease")
        clock.now = 1_014_000
        taken = await storage.claim_next_run(["wf"], lease_ms=60_000)
        assert taken is not None
        assert not await storage.heartbeat_run("r", claim.lease_id)  # lost
        clock.now = 1_020_000
        assert await storage.heartbeat_run("r", taken.lease_id)
        assert (await must_get(storage, "r")).lease_expires_at == 1_080_000  # its own 60 s
        await storage.close()

    run(main())


def test_recoveries_count_expired_takeovers_only_and_requeue_resets_them(
    pg_dsn: str, pg_schema: str
) -> None:
    async def main() -> None:
        clock = Clock(1_000_000)
        storage = await opened(pg_dsn, pg_schema, clock=clock)
        await storage.create_run(new_run("r"))
        first = await storage.claim_next_run(["wf"], lease_ms=1_000)
        assert first is not None
        assert (first.run.attempt, first.run.recoveries) == (1, 0)
        clock.now += 1_000
        second = await storage.claim_next_run(["wf"], lease_ms=1_000)
        assert second is not None
        assert (second.run.attempt, second.run.recoveries) == (2, 1)
        clock.now += 1_000
        third = await storage.claim_next_run(["wf"], lease_ms=1_000)
        assert third is not None
        assert (third.run.attempt, third.run.recoveries) == (3, 2)
        # Claims of sleeping and released runs are not recoveries.
        assert await storage.sleep_run("r", third.lease_id, wake_at=clock.now + 10)
        clock.now += 10
        woken = await storage.claim_next_run(["wf"], lease_ms=1_000)
        assert woken is not None
        assert (woken.run.attempt, woken.run.recoveries) == (4, 2)
        assert await storage.update_claimed_run_status("r", woken.lease_id, RunStatus.PENDING)
        released = await storage.claim_next_run(["wf"], lease_ms=1_000)
        assert released is not None
        assert (released.run.attempt, released.run.recoveries) == (5, 2)
        assert await storage.update_claimed_run_status("r", released.lease_id, RunStatus.FAILED)
        assert (await must_get(storage, "r")).recoveries == 2  # kept until an operator acts
        assert await storage.requeue_run("r")
        assert (await must_get(storage, "r")).recoveries == 0
        fresh = await storage.claim_next_run(["wf"], lease_ms=1_000)
        assert fresh is not None
        assert (fresh.run.attempt, fresh.run.recoveries) == (6, 0)
        await storage.close()

    run(main())


def _lease_fields(run: WorkflowRun) -> tuple[Any, ...]:
    return (run.claimed_at, run.lease_ms, run.lease_expires_at, run.holder)


HOLDER = LeaseHolder(worker="w-1", host="box-a", pid=4242)


def test_lease_fields_exist_only_while_running(pg_dsn: str, pg_schema: str) -> None:
    async def main() -> None:
        clock = Clock(1_000_000)
        storage = await opened(pg_dsn, pg_schema, clock=clock)

        async def held(run_id: str) -> str:
            claim = await storage.claim_next_run([run_id], lease_ms=LEASE, holder=HOLDER)
            assert claim is not None
            assert _lease_fields(claim.run) == (clock.now, LEASE, clock.now + LEASE, HOLDER)
            clock.now += 7
            assert await storage.heartbeat_run(run_id, claim.lease_id)
            return claim.lease_id

        async def assert_released(run_id: str, status: RunStatus, beat: int) -> None:
            stored = await must_get(storage, run_id)
            assert stored.status is status
            assert _lease_fields(stored) == (None, None, None, None)
            assert stored.heartbeat_at == beat  # the last renewal is kept
            rows = await raw(pg_dsn, pg_schema, "SELECT lease_id FROM runs WHERE id = %s", run_id)
            assert rows == [(None,)]

        exits: dict[str, Callable[[str], Awaitable[bool]]] = {
            "sleep": lambda lease: storage.sleep_run("sleep", lease, wake_at=10**15),
            "wait": lambda lease: storage.wait_run("wait", lease, "go", None),
            "wait-buffered": lambda lease: storage.wait_run("wait-buffered", lease, "go", None),
            "complete": lambda lease: storage.update_claimed_run_status(
                "complete", lease, RunStatus.COMPLETED, output=1
            ),
            "release": lambda lease: storage.update_claimed_run_status(
                "release", lease, RunStatus.PENDING
            ),
            "fail": lambda lease: storage.update_claimed_run_status(
                "fail", lease, RunStatus.FAILED
            ),
            "cancel": lambda lease: storage.update_run_status("cancel", RunStatus.CANCELLED),
        }
        expected = {
            "sleep": RunStatus.SLEEPING,
            "wait": RunStatus.WAITING,
            "wait-buffered": RunStatus.PENDING,
            "complete": RunStatus.COMPLETED,
            "release": RunStatus.PENDING,
            "fail": RunStatus.FAILED,
            "cancel": RunStatus.CANCELLED,
        }
        for run_id, leave in exits.items():
            await storage.create_run(new_run(run_id, workflow=run_id))
            lease = await held(run_id)
            if run_id == "wait-buffered":
                assert await storage.deliver_event(run_id, "go", 1)
            assert await leave(lease)
            await assert_released(run_id, expected[run_id], beat=clock.now)
        beat = (await must_get(storage, "fail")).heartbeat_at
        assert beat is not None
        clock.now += 1
        assert await storage.requeue_run("fail")
        await assert_released("fail", RunStatus.PENDING, beat=beat)

        # Staying running keeps the lease, holder and all.
        await storage.create_run(new_run("stay", workflow="stay"))
        lease = await held("stay")
        assert await storage.update_claimed_run_status("stay", lease, RunStatus.RUNNING)
        stored = await must_get(storage, "stay")
        assert _lease_fields(stored) == (clock.now - 7, LEASE, clock.now + LEASE, HOLDER)
        assert await storage.heartbeat_run("stay", lease)
        # Forced to running without a lease: nobody can renew it, so it is claimable now.
        assert await storage.update_run_status("stay", RunStatus.RUNNING)
        forced = await must_get(storage, "stay")
        assert (forced.claimed_at, forced.lease_ms, forced.holder) == (None, None, None)
        assert forced.lease_expires_at == clock.now
        assert not await storage.heartbeat_run("stay", lease)
        taken = await storage.claim_next_run(["stay"], lease_ms=LEASE)
        assert taken is not None
        assert taken.run.recoveries == 1
        await storage.close()

    run(main())


def test_holder_is_stored_with_the_claim_and_replaced_by_a_takeover(
    pg_dsn: str, pg_schema: str
) -> None:
    async def main() -> None:
        clock = Clock(1_000_000)
        storage = await opened(pg_dsn, pg_schema, clock=clock)
        await storage.create_run(new_run("r"))
        claim = await storage.claim_next_run(["wf"], lease_ms=1_000, holder=HOLDER)
        assert claim is not None
        assert claim.run.holder == HOLDER
        assert (await must_get(storage, "r")).holder == HOLDER
        # An operator finds the worker with plain SQL.
        rows = await raw(
            pg_dsn,
            pg_schema,
            "SELECT holder->>'worker', holder->>'host', (holder->>'pid')::int FROM runs"
            " WHERE status = 'running'",
        )
        assert rows == [("w-1", "box-a", 4242)]
        clock.now += 1_000
        other = LeaseHolder(worker="w-2", host="box-b", pid=7)
        taken = await storage.claim_next_run(["wf"], lease_ms=1_000, holder=other)
        assert taken is not None
        assert (await must_get(storage, "r")).holder == other
        clock.now += 1_000
        anonymous = await storage.claim_next_run(["wf"], lease_ms=1_000)
        assert anonymous is not None
        assert anonymous.run.holder is None
        assert (await must_get(storage, "r")).holder is None
        await storage.close()

    run(main())


def test_claim_takes_the_oldest_claimable_run_of_any_kind(pg_dsn: str, pg_schema: str) -> None:
    async def main() -> None:
        clock = Clock(1_000_000)
        storage = await opened(pg_dsn, pg_schema, clock=clock)
        for i, run_id in enumerate(["live", "asleep", "expired", "due", "pending"]):
            await storage.create_run(new_run(run_id, created_at=i))
        leases = {}
        for run_id, lease_ms in [("live", 60_000), ("asleep", 60_000), ("expired", 10)]:
            claim = await storage.claim_next_run(["wf"], lease_ms=lease_ms)
            assert claim is not None
            assert claim.run.id == run_id
            leases[run_id] = claim.lease_id
        due = await storage.claim_next_run(["wf"], lease_ms=60_000)
        assert due is not None
        assert await storage.sleep_run("asleep", leases["asleep"], wake_at=clock.now + 60_000)
        assert await storage.wait_run("due", due.lease_id, "go", clock.now + 5)
        clock.now += 10
        order = []
        while (claim := await storage.claim_next_run(["wf"], lease_ms=60_000)) is not None:
            order.append(claim.run.id)
        assert order == ["expired", "due", "pending"]  # by created_at, whatever the kind
        await storage.close()

    run(main())


def test_the_stale_and_due_branches_use_their_partial_indexes(pg_dsn: str, pg_schema: str) -> None:
    """Thousands of live leases and future wake-ups: the claim reads none of them."""

    async def main() -> None:
        storage = await opened(pg_dsn, pg_schema)
        await raw(
            pg_dsn,
            pg_schema,
            "INSERT INTO runs (id, workflow, status, input, created_at, updated_at, lease_id,"
            " lease_ms, lease_expires_at, claimed_at, heartbeat_at, wake_at)"
            " SELECT 'r' || i, 'wf', (ARRAY['running', 'sleeping', 'completed'])[i % 3 + 1],"
            " 'null', i, i, 'l' || i, 60000, 10^15, 1, 1, 10^15"
            " FROM generate_series(1, 30000) AS i",
        )
        await raw(pg_dsn, pg_schema, "UPDATE runs SET wake_at = NULL WHERE status <> 'sleeping'")
        await raw(
            pg_dsn,
            pg_schema,
            "UPDATE runs SET lease_id = NULL, lease_ms = NULL, lease_expires_at = NULL,"
            " claimed_at = NULL WHERE status <> 'running'",
        )
        await raw(pg_dsn, pg_schema, "ANALYZE runs")
        nodes = await _claim_plan(pg_dsn, pg_schema, ["wf"], limit=1)
        scans = {node.get("Index Name"): node for node in nodes if "Index Name" in node}
        assert "runs_lease_expiry_idx" in scans, nodes
        assert "runs_wake_idx" in scans, nodes
        read = _rows_read(nodes)
        assert read < 100, f"the claim read {read} rows"  # not the 20,000 live ones
        await storage.close()

    run(main())


def test_claims_and_listings_read_only_their_workflow_on_a_fresh_schema(
    pg_dsn: str, pg_schema: str
) -> None:
    """50,000 pending runs of another workflow and 50,000 finished runs, no ANALYZE
    (a fresh schema has no statistics): a claim of 10 and a listing by workflow and
    status each read a handful of rows, and a purge batch only what it deletes."""

    async def main() -> None:
        storage = await opened(pg_dsn, pg_schema)
        await raw(
            pg_dsn,
            pg_schema,
            "INSERT INTO runs (id, workflow, status, input, created_at, updated_at)"
            " SELECT 'o' || i, 'other', 'pending', 'null', i, i"
            " FROM generate_series(1, 50000) AS i",
        )
        await raw(
            pg_dsn,
            pg_schema,
            "INSERT INTO runs (id, workflow, status, input, created_at, updated_at)"
            " SELECT 'f' || i, 'wf', 'completed', 'null', i, i"
            " FROM generate_series(1, 50000) AS i",
        )
        await raw(
            pg_dsn,
            pg_schema,
            "INSERT INTO runs (id, workflow, status, input, created_at, updated_at)"
            " SELECT 'p' || i, 'wf', 'pending', 'null', 100000 + i, 100000 + i"
            " FROM generate_series(1, 20) AS i",
        )
        nodes = await _claim_plan(pg_dsn, pg_schema, ["wf", "absent"], limit=10)
        assert _rows_read(nodes) < 200, nodes
        assert not any(n.get("Node Type") == "Seq Scan" for n in nodes), nodes
        listing = {"workflow": "wf", "status": "pending", "before": 2**63 - 1}
        nodes = await _plan(
            pg_dsn,
            pg_schema,
            queries()["list_runs_by_workflow_and_status"],
            {**listing, "before_id": "", "limit": 10},
        )
        assert _rows_read(nodes) < 100, nodes
        purge = {"before": 10, "limit": 5, "completed": True, "failed": True, "cancelled": True}
        nodes = await _plan(pg_dsn, pg_schema, queries()["purge_runs"], purge)
        assert _rows_read(nodes) < 100, nodes
        claimed = await storage.claim_runs(["wf"], lease_ms=60_000, limit=10)
        assert [c.run.id for c in claimed] == [f"p{i}" for i in range(1, 11)]
        await storage.close()

    run(main())


async def _plan(
    pg_dsn: str, pg_schema: str, query: Any, params: dict[str, Any]
) -> list[dict[str, Any]]:
    """The executed plan's nodes (EXPLAIN ANALYZE runs the statement: a transaction
    that is rolled back keeps the rows as they were)."""
    async with await psycopg.AsyncConnection.connect(
        pg_dsn, options=f"-c search_path={pg_schema}"
    ) as conn:
        cur = await conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + query, params)
        row = await cur.fetchone()
        await conn.rollback()
    assert row is not None
    return list(_plan_nodes(row[0][0]["Plan"]))


async def _claim_plan(
    pg_dsn: str, pg_schema: str, names: list[str], *, limit: int
) -> list[dict[str, Any]]:
    params = {"names": names, "limit": limit, "lease_ms": 1, "holder": None, "now": None}
    return await _plan(pg_dsn, pg_schema, queries()["claim_runs"], params)


def _rows_read(nodes: list[dict[str, Any]]) -> int:
    return sum(
        int(n.get("Actual Rows", 0)) + int(n.get("Rows Removed by Filter", 0)) for n in nodes
    )


def _plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _plan_nodes(child)


def test_schedules_are_due_by_the_server_clock(
    pg_dsn: str, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        storage = await opened(pg_dsn, pg_schema)
        start = await server_ms(pg_dsn)

        def schedule(key: str, next_run_at: int) -> Schedule:
            return Schedule(
                key=key,
                workflow="wf",
                input=None,
                recurrence=Recurrence(every_ms=1000),
                next_run_at=next_run_at,
                created_at=0,
                updated_at=0,
            )

        await storage.upsert_schedule(schedule("late", start - 10_500))
        await storage.upsert_schedule(schedule("later", start + 3_600_000))
        wrong_python_clock(monkeypatch, YEAR_S)  # "later" would be due by this clock
        claimed = await storage.claim_due_schedule(["wf"])
        end = await server_ms(pg_dsn)
        assert claimed is not None
        assert claimed.slot == start - 10_500
        # Advanced past the server's now (missed occurrences skipped, phase kept).
        advanced = claimed.schedule.next_run_at
        assert (advanced - claimed.slot) % 1000 == 0
        assert start < advanced <= end + 1000
        assert start <= claimed.schedule.updated_at <= end
        assert await storage.claim_due_schedule(["wf"]) is None
        await storage.close()

    run(main())


# -- contract 2.0: write-once checkpoints -------------------------------------------------


def step_row(status: StepStatus, output: Any = None, run_id: str = "r") -> StepResult:
    return StepResult(
        id=f"{run_id}:s",
        run_id=run_id,
        name="s",
        status=status,
        output=output,
        created_at=1,
        updated_at=1,
    )


@pytest.mark.parametrize(
    "final", [StepStatus.COMPLETED, StepStatus.COMPLETED_EARLY, StepStatus.SKIPPED]
)
def test_a_final_step_row_is_never_written_again(
    pg_dsn: str, pg_schema: str, final: StepStatus
) -> None:
    async def main() -> None:
        storage = await opened(pg_dsn, pg_schema)
        await storage.create_run(new_run("r"))
        claim = await storage.claim_next_run(["wf"], lease_ms=LEASE)
        assert claim is not None
        # Non-final rows are overwritten as before.
        for status in (StepStatus.RUNNING, StepStatus.FAILED, StepStatus.WAITING):
            assert await storage.save_step_result(step_row(status), claim.lease_id)
        assert await storage.save_step_result(step_row(final, "first"), claim.lease_id)
        for status in StepStatus:
            again = step_row(status, "second")
            assert not await storage.save_step_result(again, claim.lease_id)  # held lease
            assert not await storage.save_step_result(again)  # no lease
        (stored,) = await storage.get_step_results("r")
        assert (stored.status, stored.output) == (final, "first")

        # consume_event refuses too, and consumes nothing.
        assert await storage.deliver_event("r", "go", "payload")
        result = await storage.consume_event("go", step_row(StepStatus.COMPLETED), claim.lease_id)
        assert result == ConsumeResult(held=False)
        (stored,) = await storage.get_step_results("r")
        assert (stored.status, stored.output) == (final, "first")
        event = await storage.take_event("r", "go")
        assert event is not None
        assert event.payload == "payload"
        await storage.close()

    run(main())


def test_consume_event_against_a_row_made_final_meanwhile_consumes_nothing(
    pg_dsn: str, pg_schema: str
) -> None:
    """The first writer wins even when it commits while consume_event's statement runs."""
    dsn, app = with_app_name(pg_dsn)

    async def main() -> None:
        storage = await opened(dsn, pg_schema)
        await storage.create_run(new_run("r"))
        claim = await storage.claim_next_run(["wf"], lease_ms=LEASE)
        assert claim is not None
        assert await storage.deliver_event("r", "go", "payload")
        async with await psycopg.AsyncConnection.connect(
            pg_dsn, options=f"-c search_path={pg_schema}"
        ) as blocker:
            # A lease-less writer's final row, not yet committed when consume_event starts.
            await blocker.execute(
                "INSERT INTO steps (id, run_id, name, status, output, attempts, created_at,"
                " updated_at) VALUES ('r:s', 'r', 's', 'completed', '\"first\"', 1, 1, 1)"
            )
            consuming = asyncio.create_task(
                storage.consume_event("go", step_row(StepStatus.COMPLETED), claim.lease_id)
            )

            async def blocked() -> bool:
                cur = await blocker.execute(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE application_name = %s AND wait_event_type = 'Lock'",
                    (app,),
                )
                row = await cur.fetchone()
                return row is not None and row[0] == 1

            await wait_until(blocked)  # its upsert waits on the uncommitted row
            await blocker.commit()
            assert await consuming == ConsumeResult(held=False)
        (stored,) = await storage.get_step_results("r")
        assert (stored.status, stored.output) == (StepStatus.COMPLETED, "first")
        event = await storage.take_event("r", "go")  # rolled back: still buffered
        assert event is not None
        assert event.payload == "payload"
        await storage.close()

    run(main())


# -- contract 2.0: deliver_event ----------------------------------------------------------


async def ended_run(storage: PostgresStorage, run_id: str, status: RunStatus) -> None:
    await storage.create_run(new_run(run_id, workflow=run_id))
    claim = await storage.claim_next_run([run_id], lease_ms=LEASE)
    assert claim is not None
    if status is RunStatus.CANCELLED:
        assert await storage.update_run_status(run_id, status)
    else:
        assert await storage.update_claimed_run_status(run_id, claim.lease_id, status)


async def count_rows(dsn: str, schema: str, table: str, run_id: str) -> int:
    query = f"SELECT count(*) FROM {table} WHERE run_id = %s"
    return int((await raw(dsn, schema, query, run_id))[0][0])


@pytest.mark.parametrize(
    "status", [RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED], ids=str
)
def test_deliver_event_to_an_ended_run_stores_nothing(
    pg_dsn: str, pg_schema: str, status: RunStatus
) -> None:
    async def main() -> None:
        storage = await opened(pg_dsn, pg_schema)
        assert not await storage.deliver_event("missing", "go", 1)
        assert not await storage.deliver_event("missing", "go", 1, key="k")
        await ended_run(storage, "r", status)
        before = await must_get(storage, "r")
        assert not await storage.deliver_event("r", "go", "late")
        assert not await storage.deliver_event("r", "go", "late", key="k")
        assert await must_get(storage, "r") == before
        assert await count_rows(pg_dsn, pg_schema, "events", "r") == 0
        assert await count_rows(pg_dsn, pg_schema, "event_keys", "r") == 0  # key not taken
        if status is not RunStatus.COMPLETED:
            assert await storage.requeue_run("r")
            assert await storage.deliver_event("r", "go", "after requeue", key="k")
            event = await storage.take_event("r", "go")
            assert event is not None
            assert event.payload == "after requeue"
        await storage.close()

    run(main())


def test_deliver_event_to_a_run_that_ends_meanwhile_stores_nothing(
    pg_dsn: str, pg_schema: str
) -> None:
    """The status check and the write are atomic: a delivery that waits for a finishing
    run's row sees it finished."""
    dsn, app = with_app_name(pg_dsn)

    async def main() -> None:
        storage = await opened(dsn, pg_schema)
        await storage.create_run(new_run("r"))
        async with await psycopg.AsyncConnection.connect(
            pg_dsn, options=f"-c search_path={pg_schema}"
        ) as finisher:
            await finisher.execute("UPDATE runs SET status = 'completed' WHERE id = 'r'")
            delivering = asyncio.create_task(storage.deliver_event("r", "go", 1, key="k"))

            async def blocked() -> bool:
                cur = await finisher.execute(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE application_name = %s AND wait_event_type = 'Lock'",
                    (app,),
                )
                row = await cur.fetchone()
                return row is not None and row[0] == 1

            await wait_until(blocked)
            await finisher.commit()
            assert await delivering is False
        assert await count_rows(pg_dsn, pg_schema, "events", "r") == 0
        assert await count_rows(pg_dsn, pg_schema, "event_keys", "r") == 0
        await storage.close()

    run(main())


def test_a_repeated_event_key_delivers_once(pg_dsn: str, pg_schema: str) -> None:
    async def main() -> None:
        storage = await opened(pg_dsn, pg_schema)
        await storage.create_run(new_run("r"))
        await storage.create_run(new_run("other", created_at=2, workflow="other"))
        assert await storage.deliver_event("r", "go", 1, key="k")
        assert await storage.deliver_event("r", "go", 2, key="k")  # still buffered
        assert await storage.deliver_event("other", "go", 3, key="k")  # keys are per run
        assert await count_rows(pg_dsn, pg_schema, "events", "r") == 1
        event = await storage.take_event("r", "go")
        assert event is not None
        assert event.payload == 1
        assert await storage.deliver_event("r", "go", 4, key="k")  # consumed since
        assert await storage.take_event("r", "go") is None
        assert await storage.deliver_event("r", "go", 5)  # unkeyed: always stored
        assert await storage.deliver_event("r", "go", 6, key="k2")
        assert await count_rows(pg_dsn, pg_schema, "events", "r") == 2

        # A repeated key does not wake a run that waits again.
        claim = await storage.claim_next_run(["wf"], lease_ms=LEASE)
        assert claim is not None
        assert await storage.take_event("r", "go") is not None
        assert await storage.take_event("r", "go") is not None
        assert await storage.wait_run("r", claim.lease_id, "go", None)
        assert await storage.deliver_event("r", "go", 7, key="k2")
        assert (await must_get(storage, "r")).status is RunStatus.WAITING
        assert await count_rows(pg_dsn, pg_schema, "events", "r") == 0

        # After the run ends: an old key still answers True (it was delivered); a new
        # one is refused. Deleting the run deletes its keys.
        assert await storage.update_run_status("r", RunStatus.CANCELLED)
        assert await storage.deliver_event("r", "go", 8, key="k")
        assert not await storage.deliver_event("r", "go", 9, key="new")
        assert await count_rows(pg_dsn, pg_schema, "events", "r") == 0
        await raw(pg_dsn, pg_schema, "DELETE FROM runs WHERE id = 'r'")
        assert await count_rows(pg_dsn, pg_schema, "event_keys", "r") == 0
        await storage.close()

    run(main())


def test_concurrent_deliveries_of_one_key_store_one_event(pg_dsn: str, pg_schema: str) -> None:
    async def main() -> None:
        stores = [await opened(pg_dsn, pg_schema) for _ in range(3)]
        await stores[0].create_run(new_run("r"))
        answers = await asyncio.gather(
            *(stores[i % 3].deliver_event("r", "go", i, key="k") for i in range(12))
        )
        assert answers == [True] * 12
        assert await count_rows(pg_dsn, pg_schema, "events", "r") == 1
        for store in stores:
            await store.close()

    run(main())


def test_upgrading_from_0001_gives_held_runs_a_lease(pg_dsn: str, pg_schema: str) -> None:
    async def main() -> None:
        old = PostgresStorage(pg_dsn, schema=pg_schema)
        await old._open_pool()
        await old._migrate(up_to=1)
        await raw(
            pg_dsn,
            pg_schema,
            "INSERT INTO runs (id, workflow, status, input, lease_id, heartbeat_at, attempt,"
            " created_at, updated_at) VALUES ('r', 'wf', 'running', 'null', 'old', 5000, 1,"
            " 1, 1)",
        )
        await old.close()
        clock = Clock(34_999)
        storage = await opened(pg_dsn, pg_schema, clock=clock)
        stored = await must_get(storage, "r")
        assert _lease_fields(stored) == (5000, 30_000, 35_000, None)
        assert stored.recoveries == 0
        assert await storage.claim_next_run(["wf"], lease_ms=LEASE) is None
        clock.now = 35_000
        taken = await storage.claim_next_run(["wf"], lease_ms=LEASE)
        assert taken is not None
        assert taken.run.recoveries == 1
        await storage.close()

    run(main())


def test_concurrent_deliver_and_wait_never_lose_the_wakeup(pg_dsn: str, pg_schema: str) -> None:
    async def main() -> None:
        first, second = await opened(pg_dsn, pg_schema), await opened(pg_dsn, pg_schema)
        for i in range(40):
            await first.create_run(new_run(f"r{i}", created_at=i))
            claim = await first.claim_next_run(["wf"], lease_ms=LEASE)
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
        stores = [await opened(pg_dsn, pg_schema, clock=Clock(1500)) for _ in range(4)]
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
        claims = await asyncio.gather(*(s.claim_due_schedule(["wf"]) for s in stores))
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
        claim = await writer.claim_next_run(["wf"], lease_ms=LEASE)
        assert claim is not None
        assert await writer.sleep_run("r", claim.lease_id, wake_at=10**15)
        await wakeups.wait()
        assert await writer.update_run_status("r", RunStatus.PENDING)
        await wakeups.wait()
        claim = await writer.claim_next_run(["wf"], lease_ms=LEASE)
        assert claim is not None
        assert await writer.wait_run("r", claim.lease_id, "go", None)
        assert await writer.deliver_event("r", "other", 1)  # not awaited: no wake-up
        assert await writer.deliver_event("r", "go", 1)
        await wakeups.wait()
        claim = await writer.claim_next_run(["wf"], lease_ms=LEASE)
        assert claim is not None
        assert await writer.update_claimed_run_status("r", claim.lease_id, RunStatus.PENDING)
        await wakeups.wait()
        claim = await writer.claim_next_run(["wf"], lease_ms=LEASE)
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
        claim = await storage.claim_next_run(["wf"], lease_ms=LEASE)
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
        next(spec.conformance_factory(Path("."), {}, clock=Clock()))
    clock = Clock()
    factory = spec.conformance_factory(Path("."), {"dsn": "postgresql://localhost/db"}, clock=clock)
    made = next(factory)  # a generator factory: the code after its yield drops the schema
    assert isinstance(made, PostgresStorage)
    assert made.schema.startswith("reflow_test_")
    assert made._now() == clock.now  # the kit's clock is the statements' "now"
    clock.now += 5
    assert made._now() == clock.now
    assert PostgresStorage("postgresql://localhost/db")._now() is None  # the server's


def test_the_conformance_factory_drops_its_schema_after_the_case(pg_dsn: str) -> None:
    spec = get_adapter("postgres")
    assert spec.conformance_factory is not None
    factory = spec.conformance_factory(Path("."), {"dsn": pg_dsn})
    storage = next(factory)

    async def use() -> None:
        await storage.initialize()
        await storage.close()

    asyncio.run(use())

    def exists() -> bool:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            found = conn.execute(
                "SELECT 1 FROM information_schema.schemata WHERE schema_name = %s",
                (storage.schema,),
            ).fetchone()
        return found is not None

    assert exists()
    with pytest.raises(StopIteration):
        next(factory)  # the kit's teardown
    assert not exists()
