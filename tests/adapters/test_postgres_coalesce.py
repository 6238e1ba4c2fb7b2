"""Coalesced writes on a real PostgreSQL server: concurrent checkpoints and run endings
share one statement, and each caller still gets exactly the answer it would get alone.

Each scenario runs twice, on two fresh schemas: once with every call awaited in turn (so
each goes alone, by the one-row statement) and once with all calls concurrent (so they
share batches). Answers and stored rows must be the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import postgres_fixtures

from reflow_adapters.postgres import PostgresStorage
from reflow_core.errors import StorageError
from reflow_core.types import ErrorInfo, RunStatus, StepResult, StepStatus, WorkflowRun

pytestmark = pytest.mark.postgres
pg_dsn = postgres_fixtures.pg_dsn
LEASE = 30_000
RUNS = 12


def fresh_storage(dsn: str, *, drop_on_close: bool = True) -> PostgresStorage:
    """An adapter on a schema of its own, dropped when it closes (by default)."""
    schema = f"reflow_co_{uuid.uuid4().hex[:12]}"
    return PostgresStorage(dsn, schema=schema, drop_schema_on_close=drop_on_close)


def new_run(run_id: str) -> WorkflowRun:
    return WorkflowRun(
        id=run_id, workflow="wf", input=None, status=RunStatus.PENDING, created_at=1, updated_at=1
    )


def step(run_id: str, name: str, *, step_id: str | None = None, output: Any = 1) -> StepResult:
    return StepResult(
        id=step_id or f"{run_id}:{name}",
        run_id=run_id,
        name=name,
        status=StepStatus.COMPLETED,
        output=output,
        created_at=5,
        updated_at=6,
    )


async def claimed(storage: PostgresStorage) -> dict[str, str]:
    """RUNS runs, all claimed: run id -> lease id."""
    for i in range(RUNS):
        await storage.create_run(new_run(f"r{i:02}"))
    claims = await storage.claim_runs(["wf"], lease_ms=LEASE, limit=RUNS)
    assert len(claims) == RUNS
    return {c.run.id: c.lease_id for c in claims}


def outcome(result: Any) -> Any:
    """An answer, comparable across two schemas: an error by its type and message."""
    if isinstance(result, StorageError):
        return ("StorageError", str(result))
    assert not isinstance(result, BaseException), result
    return result


async def both_ways(
    dsn: str,
    scenario: Callable[[PostgresStorage, dict[str, str]], list[Awaitable[Any]]],
    rows: str,
) -> tuple[list[Any], PostgresStorage]:
    """The scenario's answers and stored ``rows`` (a SELECT), alone and concurrently; both
    must agree. Returns the concurrent answers and the concurrent schema's storage."""
    answers, tables = [], []
    storages: list[PostgresStorage] = []
    for concurrent in (False, True):
        storage = fresh_storage(dsn)
        storages.append(storage)
        await storage.initialize()
        calls = scenario(storage, await claimed(storage))
        if concurrent:
            results = await asyncio.gather(*calls, return_exceptions=True)
        else:
            results = []
            for call in calls:
                try:
                    results.append(await call)
                except StorageError as exc:
                    results.append(exc)
        answers.append([outcome(r) for r in results])
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            cur = await conn.execute(f"SELECT {rows} ORDER BY 1".replace("{s}", storage.schema))
            tables.append(await cur.fetchall())
    assert answers[0] == answers[1]
    assert tables[0] == tables[1]
    await storages[0].close()
    return answers[1], storages[1]


def test_concurrent_checkpoints_share_statements_and_answer_as_each_alone(pg_dsn: str) -> None:
    def scenario(storage: PostgresStorage, leases: dict[str, str]) -> list[Awaitable[Any]]:
        save = storage.save_step_result
        return [
            *(save(step(f"r{i:02}", "a", output=i), leases[f"r{i:02}"]) for i in range(6)),
            save(step("r06", "a"), leases["r07"]),  # another run's lease: not held
            save(step("r07", "a", output="kept"), leases["r07"]),  # first write of r07:a
            save(step("r07", "a", output="late"), leases["r07"]),  # final row kept
            save(step("r08", "a", step_id="r08:other"), leases["r08"]),  # same name, new id
            save(step("r09", "b", step_id="r00:a"), leases["r09"]),  # r00's step id
            save(step("r10", "a"), None),  # no lease: a plain upsert
            save(step("r11", "a", output={"deep": [1, 2]}), leases["r11"]),
            save(step("r08", "a"), leases["r08"]),
        ]

    async def main() -> None:
        answers, storage = await both_ways(
            pg_dsn, scenario, "id, run_id, name, output::text FROM {s}.steps"
        )
        try:
            assert answers[:10] == [True] * 6 + [False, True, False, True]
            assert answers[10][0] == "StorageError" and "already belongs" in answers[10][1]
            assert answers[11:13] == [True, True]
            # The same name under a new id clashes with r08:other (a unique index).
            assert answers[13][0] == "StorageError" and "steps_run_id_name_key" in answers[13][1]
            writes = storage._step_writes
            assert writes.batches < writes.items, "concurrent checkpoints were not coalesced"
        finally:
            await storage.close()

    asyncio.run(main())


def test_concurrent_run_endings_share_statements_and_answer_as_each_alone(pg_dsn: str) -> None:
    error = ErrorInfo(type="Boom", message="it broke")

    def scenario(storage: PostgresStorage, leases: dict[str, str]) -> list[Awaitable[Any]]:
        end = storage.update_claimed_run_status
        return [
            *(end(f"r{i:02}", leases[f"r{i:02}"], RunStatus.COMPLETED, output=i) for i in range(5)),
            end("r05", leases["r05"], RunStatus.FAILED, error=error),
            end("r06", leases["r06"], RunStatus.CANCELLED),
            end("r07", leases["r07"], RunStatus.RUNNING, output="still"),  # keeps its lease
            end("r08", leases["r09"], RunStatus.COMPLETED),  # another run's lease
            end("r09", leases["r09"], RunStatus.COMPLETED, output="first"),
            end("r09", leases["r09"], RunStatus.COMPLETED, output="second"),  # already ended
            end("r10", "never-issued", RunStatus.COMPLETED),
        ]

    async def main() -> None:
        answers, storage = await both_ways(
            pg_dsn,
            scenario,
            "id, status, output::text, error::text, lease_id IS NULL, lease_expires_at IS NULL"
            " FROM {s}.runs",
        )
        try:
            assert answers == [True] * 8 + [False, True, False, False]
            endings = storage._run_endings
            assert endings.batches < endings.items, "concurrent endings were not coalesced"
        finally:
            await storage.close()

    asyncio.run(main())


async def blocked_backend(dsn: str, storage: PostgresStorage) -> int:
    """The pid of the adapter's backend that waits on a row lock (waits for it to wait)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        async with asyncio.timeout(10):
            while True:
                cur = await conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = %s"
                    " AND wait_event_type = 'Lock'",
                    (f"reflow:{storage.schema}",),
                )
                row = await cur.fetchone()
                if row is not None:
                    return int(row[0])
                await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def run_locked(
    dsn: str, storage: PostgresStorage, run_id: str
) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """Hold ``run_id``'s row FOR UPDATE in a transaction of another connection, as an
    operator's open transaction would (commit or roll back the yielded connection)."""
    async with await psycopg.AsyncConnection.connect(dsn) as locker:
        await locker.execute(
            f"SELECT 1 FROM {storage.schema}.runs WHERE id = %s FOR UPDATE",
            (run_id,),
        )
        yield locker


def test_a_batch_waiting_on_a_row_lock_holds_up_only_its_own_calls(pg_dsn: str) -> None:
    async def main() -> None:
        storage = fresh_storage(pg_dsn)
        await storage.initialize()
        try:
            leases = await claimed(storage)
            async with run_locked(pg_dsn, storage, "r00") as locker:
                save = storage.save_step_result(step("r00", "a"), leases["r00"])
                stuck = asyncio.create_task(save)
                await blocked_backend(pg_dsn, storage)
                # Other runs' checkpoints and endings go on while r00's batch waits.
                for i in range(1, 4):
                    assert await storage.save_step_result(step(f"r{i:02}", "a"), leases[f"r{i:02}"])
                    assert await storage.update_claimed_run_status(
                        f"r{i:02}", leases[f"r{i:02}"], RunStatus.COMPLETED
                    )
                assert not stuck.done()
                await locker.commit()
            assert await stuck is True
        finally:
            await storage.close()

    asyncio.run(main())


def test_a_connection_lost_under_a_batch_fails_each_of_its_callers_once(pg_dsn: str) -> None:
    async def main() -> None:
        storage = fresh_storage(pg_dsn)
        await storage.initialize()
        try:
            leases = await claimed(storage)
            async with run_locked(pg_dsn, storage, "r00") as locker:
                saves = [
                    storage.save_step_result(step(f"r{i:02}", "a"), leases[f"r{i:02}"])
                    for i in range(4)
                ]
                calls = [asyncio.create_task(save) for save in saves]
                pid = await blocked_backend(pg_dsn, storage)
                async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as killer:
                    await killer.execute("SELECT pg_terminate_backend(%s)", (pid,))
                results = await asyncio.gather(*calls, return_exceptions=True)
                await locker.rollback()
            assert all(isinstance(r, StorageError) for r in results), results
            assert len({id(r) for r in results}) == len(results), "callers shared one error"
            assert all(
                isinstance(r, BaseException) and isinstance(r.__cause__, psycopg.Error)
                for r in results
            )
            # Nothing was written, and the adapter goes on with a fresh connection.
            assert await storage.get_step_results("r01") == []
            assert await storage.save_step_result(step("r01", "a"), leases["r01"]) is True
        finally:
            await storage.close()

    asyncio.run(main())


def test_close_cancels_a_batch_stuck_on_a_lock_and_its_callers_hear_why(pg_dsn: str) -> None:
    async def main() -> None:
        # Not dropped by close(): DROP SCHEMA would wait for the lock this test holds.
        storage = fresh_storage(pg_dsn, drop_on_close=False)
        storage.close_wait_s = 0.2
        await storage.initialize()
        try:
            leases = await claimed(storage)
            async with run_locked(pg_dsn, storage, "r00") as locker:
                save = storage.save_step_result(step("r00", "a"), leases["r00"])
                stuck = asyncio.create_task(save)
                await blocked_backend(pg_dsn, storage)
                async with asyncio.timeout(10):  # without the bound, close() never returns
                    await storage.close()
                with pytest.raises(StorageError, match="closed"):
                    await stuck
                await locker.rollback()
        finally:
            postgres_fixtures.drop_schema(pg_dsn, storage.schema)

    asyncio.run(main())
