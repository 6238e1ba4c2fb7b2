"""A worker process for the SIGKILL acceptance tests: ``python crash_worker.py DB LEDGER``.

It serves the workflows below from the SQLite file ``DB`` with a one-second lease, so a
fresh worker reclaims what a killed one held within about a second. Every step
execution appends a row to the side-effect ledger ``LEDGER`` (a separate SQLite file)
*before* doing anything else, so the test can count executions exactly. Runs whose
input says ``crash`` park one step on its first execution after printing
``READY <run_id> <step>``: the test kills the worker then.
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
from typing import Any

from reflow_adapters.sqlite import SQLiteStorage
from reflow_core import Engine, LeaseOptions, StepCompleted, StepContext, StepStarted, Workflow

LEASE = LeaseOptions(duration=1, heartbeat_interval=0.2)


class Ledger:
    """One row per step execution (or per hook call), in its own SQLite file.

    A connection per call: steps write from worker threads and the event loop alike.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        conn = self._connect()
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS executions (run_id TEXT, step TEXT)")
        finally:
            conn.close()

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, isolation_level=None, timeout=10)

    def record(self, run_id: str, step: str) -> int:
        """Append an execution; return how many executions of it there were before."""
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            (before,) = conn.execute(
                "SELECT count(*) FROM executions WHERE run_id = ? AND step = ?", (run_id, step)
            ).fetchone()
            conn.execute("INSERT INTO executions VALUES (?, ?)", (run_id, step))
            conn.execute("COMMIT")
            return int(before)
        finally:
            conn.close()

    def counts(self, run_id: str) -> dict[str, int]:
        """Executions per step of one run."""
        conn = self._connect()
        try:
            rows = conn.execute(
                "SELECT step, count(*) FROM executions WHERE run_id = ? GROUP BY step",
                (run_id,),
            ).fetchall()
        finally:
            conn.close()
        return {step: int(n) for step, n in rows}


def ready(run_id: str, step: str) -> None:
    print(f"READY {run_id} {step}", flush=True)


def build(ledger: Ledger) -> tuple[list[Workflow[Any]], object]:
    """The three scenarios. In a ``crash`` run, the step after the sleep or the wait, or
    branch ``b`` of the group (once ``a`` is stored), parks on its first execution."""

    async def parks_first_time(
        ctx: StepContext[Any], name: str, after: asyncio.Event | None = None
    ) -> None:
        if ledger.record(ctx.run_id, name) == 0 and ctx.input.get("crash"):
            if after is not None:
                await after.wait()
            ready(ctx.run_id, name)
            await asyncio.Event().wait()  # until SIGKILL

    def before(ctx: StepContext[Any]) -> int:
        ledger.record(ctx.run_id, "before")
        return int(ctx.input["n"]) * 10

    async def after(ctx: StepContext[Any]) -> dict[str, Any]:
        await parks_first_time(ctx, "after")
        return {"prev": ctx.prev, "seen": sorted(ctx.steps)}

    def join(ctx: StepContext[Any]) -> dict[str, Any]:
        ledger.record(ctx.run_id, "after")
        return {"prev": ctx.prev, "seen": sorted(ctx.steps)}

    sleeper: Workflow[Any] = Workflow("sleeper")
    sleeper.step(before, name="before")
    sleeper.sleep("nap", "1500ms")
    sleeper.step(after, name="after")

    waiter: Workflow[Any] = Workflow("waiter")
    waiter.step(before, name="before")
    waiter.wait_for_event("go")
    waiter.step(after, name="after")

    a_saved = asyncio.Event()

    def a(ctx: StepContext[Any]) -> int:
        ledger.record(ctx.run_id, "a")
        return int(ctx.prev) + 1

    async def b(ctx: StepContext[Any]) -> int:
        # Park only once a's checkpoint is stored, so the kill finds a done, b in flight.
        await parks_first_time(ctx, "b", after=a_saved)
        return int(ctx.prev) + 2

    fanout: Workflow[Any] = Workflow("fanout")
    fanout.step(before, name="before")
    fanout.parallel("group", {"a": a, "b": b})
    fanout.step(join, name="after")

    class Hooks:
        def reflow_step_started(self, event: StepStarted) -> None:
            # Counts control-flow units started: a restarted sleep or wait would show here.
            if event.step in ("nap", "go"):
                ledger.record(event.run_id, f"started:{event.step}")

        def reflow_step_completed(self, event: StepCompleted) -> None:
            if event.step == "a":
                a_saved.set()

    return [sleeper, waiter, fanout], Hooks()


async def main(db: str, ledger_path: str) -> None:
    workflows, hooks = build(Ledger(ledger_path))
    storage = SQLiteStorage(db)
    engine = Engine(
        storage,
        workflows,
        lease=LEASE,
        poll_interval=0.1,
        hooks=[hooks],
        use_plugins=False,
    )
    await engine.start()
    print("STARTED", flush=True)
    try:
        await asyncio.Event().wait()  # serve until killed
    finally:
        await engine.stop()
        await storage.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
