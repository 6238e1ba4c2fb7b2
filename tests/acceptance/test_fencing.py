"""Fencing: a worker whose lease was taken over cannot write anything (issue 2).

The process test freezes worker A with SIGSTOP while it is inside step ``s1`` (the
step blocks on a pipe), so its heartbeats stop; worker B reclaims the run once the lease
is stale and completes it. Then A is resumed and its step allowed to finish: whatever A
tries to write now must be refused, storage must hold exactly what B wrote, and A must
carry on cleanly. Outputs carry the writer's pid, so any write of A's would show.

The in-process test drives the storage API directly: after a reclaim, every
lease-checked call made with the old lease answers ``False`` and changes nothing.
"""

from __future__ import annotations

import asyncio
import re
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent / "workers"))
import crash_ledger
import postgres_fixtures
from crash_app import expected_output
from crash_harness import Fleet, Store, store_url

from reflow_core import (
    ErrorInfo,
    RunStatus,
    StepResult,
    StepStatus,
    WorkflowRun,
    open_storage,
    system_clock,
)
from reflow_core.execution import step_id

pg_dsn = postgres_fixtures.pg_dsn
pg_schema = postgres_fixtures.pg_schema

B_LEASE = {"lease": 1.0, "heartbeat": 0.2, "poll": 0.05}
A_LEASES = {
    # A heartbeats every 0.2 s: on SIGCONT its overdue heartbeat and its step's
    # checkpoint race, so A learns of the takeover from either (both must be harmless).
    "heartbeating": {"lease": 1.0, "heartbeat": 0.2, "poll": 0.05},
    # A would first heartbeat after 50 s, i.e. never in this test: B still sees its claim
    # go stale after its own 1 s lease, and A's checkpoint write is certainly attempted,
    # so the refusal must come from the lease check in storage itself.
    "silent": {"lease": 60.0, "heartbeat": 50.0, "poll": 0.05},
}


@pytest.mark.slow
@pytest.mark.parametrize("a_mode", list(A_LEASES))
def test_worker_that_lost_its_lease_writes_nothing(tmp_path: Path, a_mode: str) -> None:
    """A SIGSTOPped worker's run is reclaimed and completed by B; when A resumes and its step
    finishes, A's checkpoint is refused, nothing in storage changes (every step row, and
    the run's output, come from B), and A goes on running and stops with status 0.

    Fails if an adapter ignores the lease on writes (A's row would replace B's), or if the
    engine crashes or writes on lease loss.
    """
    url = f"sqlite:///{tmp_path / 'store.db'}"
    ledger = tmp_path / "ledger.db"
    crash_ledger.init(ledger)
    store = Store(url)
    try:
        with Fleet(url, ledger, tmp_path) as fleet:
            [run_id] = store.enqueue([3])
            a = fleet.start("A", hold="s1", **A_LEASES[a_mode])
            a.expect(rf"^STARTED {run_id} s1 ")
            resumed_from = a.pause()

            b = fleet.start("B", **B_LEASE)
            b.expect(rf"^COMPLETED {run_id}$", timeout=30)
            run_by_b = store.run(run_id)
            steps_by_b = store.steps(run_id)
            assert run_by_b.status is RunStatus.COMPLETED
            assert run_by_b.output["value"] == expected_output(3)
            assert run_by_b.output["pid"] == b.pid
            assert sorted(row.name for row in steps_by_b) == ["s1", "s2", "s3", "s4", "s5"]
            assert {row.output["pid"] for row in steps_by_b} == {b.pid}
            assert b.stop() == 0

            a.release()  # buffered in the pipe until A runs again
            a.resume()
            a.expect(rf"^DONE {run_id} s1 1$", since=resumed_from)
            refused = a.expect(
                rf"^(HEARTBEAT {run_id} \S+|WRITE save_step_result {run_id} s1 \S+) -> False$",
                since=resumed_from,
            )
            if a_mode == "silent":
                assert refused.group(1).startswith("WRITE"), refused.string
            assert a.stop() == 0, a.stderr()

        after = a.lines[resumed_from:]
        assert not [line for line in after if re.search(r"-> True$", line)], after
        assert not [line for line in after if line.startswith(("CHECKPOINTED", "COMPLETED"))]
        assert "Traceback" not in a.stderr(), a.stderr()
        assert store.run(run_id) == run_by_b
        assert store.steps(run_id) == steps_by_b
    finally:
        store.close()

    [a_execution] = [e for e in crash_ledger.read_all(ledger) if e.pid == a.pid]
    assert a_execution.step == "s1"
    assert a_execution.finished_ns is not None, "A's step ran to its end after SIGCONT"
    print(f"\nA ({a_mode}) learned of the takeover from: {refused.group(1).split()[0]}")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh store on each backend."""
    return store_url(request.param, tmp_path, request)


async def _old_lease_is_fenced(url: str) -> None:
    storage = open_storage(url)
    await storage.initialize()
    try:
        now = system_clock()
        run_id = str(uuid.uuid4())
        await storage.create_run(
            WorkflowRun(
                id=run_id,
                workflow="five",
                input={"n": 1},
                status=RunStatus.PENDING,
                created_at=now,
                updated_at=now,
            )
        )

        def row(name: str, by: str) -> StepResult:
            return StepResult(
                id=step_id(run_id, name),
                run_id=run_id,
                name=name,
                status=StepStatus.COMPLETED,
                output={"by": by},
                attempts=1,
                created_at=now,
                updated_at=system_clock(),
            )

        first = await storage.claim_next_run(["five"])
        assert first is not None and first.run.id == run_id
        old = first.lease_id
        assert await storage.save_step_result(row("s1", "old"), old)

        # Another worker reclaims: "stale before" a future instant makes any holder stale.
        second = await storage.claim_next_run(["five"], stale_before=system_clock() + 60_000)
        assert second is not None and second.run.id == run_id
        assert second.lease_id != old and second.run.attempt == 2
        new = second.lease_id

        async def state() -> tuple[Any, Any]:
            return await storage.get_run(run_id), await storage.get_step_results(run_id)

        taken_over = await state()
        error = ErrorInfo(type="RuntimeError", message="late", step="s2")
        attempts: dict[str, Callable[[], Awaitable[bool]]] = {
            "heartbeat_run": lambda: storage.heartbeat_run(run_id, old),
            "save_step_result (overwrite)": lambda: storage.save_step_result(
                row("s1", "old-late"), old
            ),
            "save_step_result (new row)": lambda: storage.save_step_result(row("s2", "old"), old),
            "complete": lambda: storage.update_claimed_run_status(
                run_id, old, RunStatus.COMPLETED, output={"by": "old"}
            ),
            "fail": lambda: storage.update_claimed_run_status(
                run_id, old, RunStatus.FAILED, error=error
            ),
            "release": lambda: storage.update_claimed_run_status(run_id, old, RunStatus.PENDING),
            "keep running": lambda: storage.update_claimed_run_status(
                run_id, old, RunStatus.RUNNING
            ),
            "sleep_run": lambda: storage.sleep_run(run_id, old, system_clock() + 1_000),
            "wait_run": lambda: storage.wait_run(run_id, old, "go", None),
        }
        for what, call in attempts.items():
            assert await call() is False, f"{what} with the old lease was accepted"
            assert await state() == taken_over, f"{what} with the old lease changed storage"

        # The new holder is unaffected, and once it completes, neither lease writes.
        assert await storage.heartbeat_run(run_id, new)
        assert await storage.save_step_result(row("s1", "new"), new)
        assert await storage.update_claimed_run_status(
            run_id, new, RunStatus.COMPLETED, output={"by": "new"}
        )
        done = await state()
        for lease in (old, new):
            assert not await storage.save_step_result(row("s1", "late"), lease)
            assert not await storage.update_claimed_run_status(run_id, lease, RunStatus.FAILED)
            assert not await storage.heartbeat_run(run_id, lease)
            assert await state() == done
        run, steps = done
        assert run.status is RunStatus.COMPLETED and run.output == {"by": "new"}
        assert [(s.name, s.output) for s in steps] == [("s1", {"by": "new"})]
    finally:
        await storage.close()


def test_old_lease_is_refused_after_reclaim(url: str) -> None:
    """After another claim takes over a run (``stale_before`` in the future), every
    lease-checked write with the old lease (heartbeat, step upsert, complete, fail,
    release, sleep, wait) returns ``False`` and leaves the run and its steps unchanged;
    the new lease works, and after completion no lease writes at all.
    """
    asyncio.run(_old_lease_is_fenced(url))
