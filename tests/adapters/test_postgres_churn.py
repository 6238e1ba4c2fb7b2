"""PostgresStorage under connection churn: backends terminated while idle, mid-statement,
and repeatedly under a running engine.

``pg_terminate_backend`` from another connection is exactly what an operator, a
failover or an idle-killing proxy does to the adapter's sessions.
"""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import postgres_fixtures

from reflow_adapters.postgres import PostgresStorage
from reflow_core import Engine, StepContext, Workflow
from reflow_core.errors import StorageError
from reflow_core.lease import LeaseOptions
from reflow_core.types import RunStatus, WorkflowRun

pytestmark = pytest.mark.postgres
pg_dsn = postgres_fixtures.pg_dsn
pg_schema = postgres_fixtures.pg_schema
WAIT_S = 30.0


def new_run(run_id: str) -> WorkflowRun:
    return WorkflowRun(
        id=run_id, workflow="wf", input=None, status=RunStatus.PENDING, created_at=1, updated_at=1
    )


async def backends(admin: psycopg.AsyncConnection[Any], app: str, *, blocked: bool = False) -> int:
    cur = await admin.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
        " AND (NOT %s OR wait_event_type = 'Lock')",
        (app, blocked),
    )
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def terminate(admin: psycopg.AsyncConnection[Any], app: str) -> int:
    cur = await admin.execute(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE application_name = %s AND pid <> pg_backend_pid()",
        (app,),
    )
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def wait_until(check: Callable[[], Awaitable[bool]]) -> None:
    """Poll a server-side condition, bounded (the server offers no event for it)."""
    for _ in range(int(WAIT_S / 0.01)):
        if await check():
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"condition not reached within {WAIT_S:g} s")


def test_connections_killed_while_idle_are_replaced_without_failing_a_call(
    pg_dsn: str, pg_schema: str
) -> None:
    app = f"reflow:{pg_schema}"

    async def main() -> None:
        size = 6
        storage = PostgresStorage(pg_dsn, schema=pg_schema, max_size=size)
        await storage.initialize()
        assert storage._pool is not None
        # Well under the sum of psycopg_pool's sleeps between failed checks (1 s, 2 s,
        # 4 s...) over six dead connections: met one by one, they would time out.
        storage._pool.timeout = 5.0
        async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as admin:
            await storage.create_run(new_run("r"))
            all_held = asyncio.Event()
            held = 0

            async def hold() -> None:
                nonlocal held
                async with storage._connection("hold"):
                    held += 1
                    if held == size:
                        all_held.set()
                    await all_held.wait()

            # Six connections open, then all idle in the pool.
            await asyncio.gather(*(hold() for _ in range(size)))
            assert await backends(admin, app) == size
            assert await terminate(admin, app) == size

            async def gone() -> bool:
                return await backends(admin, app) == 0

            await wait_until(gone)
            # Not idempotent, so never retried: it succeeds only because the dead
            # connections were noticed at checkout, before anything was sent.
            assert await storage.update_run_status("r", RunStatus.CANCELLED)
            assert await backends(admin, app) >= 1
        stored = await storage.get_run("r")
        assert stored is not None and stored.status is RunStatus.CANCELLED
        await storage.close()

    asyncio.run(main())


def test_an_idempotent_call_killed_mid_statement_is_retried_once_on_a_fresh_connection(
    pg_dsn: str, pg_schema: str
) -> None:
    app = f"reflow:{pg_schema}"

    async def main() -> None:
        storage = PostgresStorage(pg_dsn, schema=pg_schema, max_size=3)
        await storage.initialize()
        await storage.create_run(new_run("r"))
        claimed = await storage.claim_next_run(["wf"], lease_ms=30_000)
        assert claimed is not None
        async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as admin:
            async with await psycopg.AsyncConnection.connect(pg_dsn) as blocker:
                lock = sql.SQL("SELECT 1 FROM {}.runs WHERE id = 'r' FOR UPDATE")
                await blocker.execute(lock.format(sql.Identifier(pg_schema)))
                beat = asyncio.create_task(storage.heartbeat_run("r", claimed.lease_id))

                async def blocked() -> bool:
                    return await backends(admin, app, blocked=True) == 1

                await wait_until(blocked)
                first = await admin.execute(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = %s"
                    " AND wait_event_type = 'Lock'",
                    (app,),
                )
                killed = await first.fetchone()
                assert killed is not None
                assert await terminate(admin, app) >= 1

                async def retried() -> bool:
                    cur = await admin.execute(
                        "SELECT pid FROM pg_stat_activity WHERE application_name = %s"
                        " AND wait_event_type = 'Lock'",
                        (app,),
                    )
                    row = await cur.fetchone()
                    return row is not None and row[0] != killed[0]

                await wait_until(retried)  # the same statement, on a new backend
                assert not beat.done()
                await blocker.rollback()
            assert await asyncio.wait_for(beat, WAIT_S)
        await storage.close()

    asyncio.run(main())


class Recorder:
    """Counts step bodies and checkpoints; flags a body that starts after its checkpoint."""

    def __init__(self, runs: int, kill_every: int) -> None:
        self.runs, self.kill_every = runs, kill_every
        self.bodies: Counter[tuple[str, str]] = Counter()
        self.checkpointed: set[tuple[str, str]] = set()
        self.rerun_after_checkpoint: list[tuple[str, str]] = []
        self.completed: set[str] = set()
        self.all_done = asyncio.Event()
        self.kill_now = asyncio.Event()

    def body(self, run_id: str, step: str) -> None:
        key = (run_id, step)
        if key in self.checkpointed:
            self.rerun_after_checkpoint.append(key)
        self.bodies[key] += 1

    def reflow_step_completed(self, event: Any) -> None:
        self.checkpointed.add((event.run_id, event.step))
        if len(self.checkpointed) % self.kill_every == 0:
            self.kill_now.set()

    def reflow_run_completed(self, event: Any) -> None:
        self.completed.add(event.run_id)
        if len(self.completed) >= self.runs:
            self.all_done.set()
            self.kill_now.set()


def test_an_engine_finishes_every_run_while_its_backends_are_terminated_repeatedly(
    pg_dsn: str, pg_schema: str
) -> None:
    runs, steps = 40, 3
    app = f"reflow:{pg_schema}"
    recorder = Recorder(runs, kill_every=6)
    wf: Workflow[Any] = Workflow("churn")
    for index in range(steps):

        async def step(ctx: StepContext[Any], index: int = index) -> int:
            recorder.body(ctx.run_id, f"s{index}")
            return index

        step.__name__ = f"s{index}"
        wf.step(step)

    async def main() -> None:
        url = f"{pg_dsn}?reflow_schema={pg_schema}"
        engine = Engine(
            url,
            [wf],
            concurrency=10,
            hooks=[recorder],
            use_plugins=False,
            # Short enough that a run whose claim answer was lost with its connection
            # (leased to nobody) is taken over within the test's bound.
            lease=LeaseOptions(duration=3.0),
            poll_interval=0.2,
        )
        ids = [(await engine.enqueue(wf, {"n": n})).id for n in range(runs)]
        kills = 0
        async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as admin:
            await engine.start()
            try:
                async with asyncio.timeout(120):
                    while not recorder.all_done.is_set():
                        await recorder.kill_now.wait()
                        recorder.kill_now.clear()
                        if not recorder.all_done.is_set():
                            kills += await terminate(admin, app)
            finally:
                await engine.stop()
        storage = PostgresStorage(pg_dsn, schema=pg_schema)  # the engine closed its own
        await storage.initialize()
        for run_id in ids:
            stored = await storage.get_run(run_id)
            assert stored is not None and stored.status is RunStatus.COMPLETED, stored
            results = await storage.get_step_results(run_id)
            assert sorted(r.name for r in results) == [f"s{i}" for i in range(steps)]
        await storage.close()
        assert kills >= 10, f"only {kills} backends were terminated: the churn did not happen"

    asyncio.run(main())
    assert recorder.completed == {run for run, _ in recorder.bodies}
    assert len(recorder.completed) == runs
    assert recorder.rerun_after_checkpoint == []
    # Every step body ran, and ran again only if its checkpoint never landed.
    assert set(recorder.bodies) == recorder.checkpointed


def test_a_call_that_finds_no_free_connection_fails_with_the_pool_timeout_unretried(
    pg_dsn: str, pg_schema: str
) -> None:
    async def main() -> None:
        storage = PostgresStorage(pg_dsn, schema=pg_schema, max_size=1)
        await storage.initialize()
        await storage.create_run(new_run("r"))
        pool = storage._pool
        assert pool is not None
        pool.timeout = 0.2  # the configured wait (30 s) is too long for a test
        async with storage._connection("hold"):
            # get_run is idempotent, but a pool timeout is not a lost connection: one
            # wait, not two, and a StorageError naming the operation.
            with pytest.raises(StorageError, match=r"get_run.*couldn't get a connection"):
                await storage.get_run("r")
            assert pool.get_stats().get("requests_errors", 0) == 1
        stored = await storage.get_run("r")  # the held connection came back usable
        assert stored is not None
        await storage.close()
        with pytest.raises(StorageError, match="adapter is closed"):
            await storage.get_run("r")

    asyncio.run(main())
