"""Fencing: a worker whose lease was taken over cannot write anything (issue 2).

The process test freezes worker A with SIGSTOP while it is inside step ``s1`` (the
step blocks on a pipe), so its heartbeats stop; worker B reclaims the run once A's lease
has expired by the store's clock (A's own lease length decides when, not B's) and
completes it. Then A is resumed and its step allowed to finish: A must write nothing
(its local fence has long passed; should a write still be sent, the store must refuse
it), start no new step, storage must hold exactly what B wrote, and A must carry on
cleanly. Outputs carry the writer's pid, so any write of A's would show.

The in-process test drives the storage API directly: after a reclaim, every
lease-checked call made with the old lease answers ``False`` and changes nothing.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
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
    LeaseHolder,
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
    # A heartbeats every 0.2 s; on SIGCONT its fence (long past), its overdue heartbeat
    # and its step's checkpoint race, so A may learn of the takeover from any of them
    # (all must be harmless).
    "1s": {"lease": 1.0, "heartbeat": 0.2, "poll": 0.05},
    # A's lease is three times B's: B must wait for A's lease, not its own, to expire.
    "3s": {"lease": 3.0, "heartbeat": 0.2, "poll": 0.05},
}
SCHEDULING_SLACK_S = 0.5
"""Allowance for process scheduling on a loaded two-core machine: a poll that comes
late, a claim query that takes a while."""
LEARNED = (
    r"^(LOG WARNING lease on run {run} was lost: (?P<why>.*?); stopped executing it"
    r"|HEARTBEAT {run} \S+ -> False|WRITE save_step_result {run} s1 .* -> False)"
)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh store on each backend."""
    return store_url(request.param, tmp_path, request)


@pytest.mark.slow
@pytest.mark.parametrize("a_lease", list(A_LEASES))
def test_worker_that_lost_its_lease_writes_nothing(url: str, tmp_path: Path, a_lease: str) -> None:
    """A SIGSTOPped worker's run is reclaimed by B once A's own lease expired (not sooner,
    and not much later) and completed by B; when A resumes and its step finishes, A
    writes nothing that is accepted, checkpoints nothing, starts no new step, nothing in
    storage changes (every step row, and the run's output, come from B), and A goes on
    running and stops with status 0.

    Fails if the claimer's lease setting decides expiry (B would take over after 1 s from
    a 3 s holder), if A writes after resuming (no fence, and an adapter that ignores the
    lease on writes: A's row would replace B's), or if the engine crashes on lease loss.
    """
    options = A_LEASES[a_lease]
    ledger = tmp_path / "ledger.db"
    crash_ledger.init(ledger)
    store = Store(url)
    try:
        with Fleet(url, ledger, tmp_path) as fleet:
            [run_id] = store.enqueue([3])
            a = fleet.start("A", hold="s1", **options)
            a.expect(rf"^STARTED {run_id} s1 ")
            resumed_from = a.pause()
            paused_at = a.paused_at

            b = fleet.start("B", **B_LEASE)
            b.expect(rf"^COMPLETED {run_id}$", timeout=30)
            [(claimed_at, claim)] = b.matching(rf"^CLAIM {run_id} \S+ (\d+) (\d+) B$")
            assert claim.groups() == ("2", "1"), "second claim, a takeover of an expired lease"
            waited = (claimed_at - paused_at) / 1e9
            lease, beat = options["lease"], options["heartbeat"]
            assert waited >= lease - beat - 0.1, f"B took over after {waited:.2f}s"
            assert waited <= lease + beat + SCHEDULING_SLACK_S, f"B took over after {waited:.2f}s"
            run_by_b = store.run(run_id)
            steps_by_b = store.steps(run_id)
            assert run_by_b.status is RunStatus.COMPLETED
            assert run_by_b.output["value"] == expected_output(3)
            assert run_by_b.output["pid"] == b.pid
            assert (run_by_b.attempt, run_by_b.recoveries) == (2, 1)
            assert sorted(row.name for row in steps_by_b) == ["s1", "s2", "s3", "s4", "s5"]
            assert {row.output["pid"] for row in steps_by_b} == {b.pid}
            assert b.stop() == 0

            a.release()  # buffered in the pipe until A runs again
            resumed_at = time.time_ns()
            a.resume()
            a.expect(rf"^DONE {run_id} s1 1$", since=resumed_from)
            learned = a.expect(LEARNED.format(run=run_id), since=resumed_from)
            assert a.stop() == 0, a.stderr()

        after = a.lines[resumed_from:]
        assert not [line for line in after if re.search(r"-> True$", line)], after
        # Not even sent: a write or heartbeat answered after SIGCONT may have left before
        # SIGSTOP (its stamp is its send time), but none may leave once A runs again.
        sent_after = [
            line
            for stamp, line in a.timed()[resumed_from:]
            if line.startswith(("WRITE", "HEARTBEAT")) and run_id in line and stamp >= resumed_at
        ]
        assert sent_after == [], sent_after
        assert not [line for line in after if line.startswith(("CHECKPOINTED", "COMPLETED"))]
        assert not [line for line in after if line.startswith("STARTED")], after
        assert "Traceback" not in a.stderr(), a.stderr()
        assert store.run(run_id) == run_by_b
        assert store.steps(run_id) == steps_by_b
    finally:
        store.close()

    [a_execution] = [e for e in crash_ledger.read_all(ledger) if e.pid == a.pid]
    assert a_execution.step == "s1"
    assert a_execution.finished_ns is not None, "A's step ran to its end after SIGCONT"
    how = learned.group("why") or learned.group(1).split()[0]
    print(f"\nB took over {waited:.2f}s after A ({a_lease} lease) froze; A learned: {how}")


async def _old_lease_is_fenced(url: str) -> None:
    # The store's clock, moved by hand: the first lease expires when the test says so.
    now = system_clock()
    clock = [now]
    storage = open_storage(url, clock=lambda: clock[0])
    await storage.initialize()
    try:
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

        def row(name: str, by: str, status: StepStatus = StepStatus.COMPLETED) -> StepResult:
            return StepResult(
                id=step_id(run_id, name),
                run_id=run_id,
                name=name,
                status=status,
                output={"by": by},
                attempts=1,
                created_at=now,
                updated_at=system_clock(),
            )

        old_holder = LeaseHolder(worker="old", host="here", pid=1)
        first = await storage.claim_next_run(["five"], lease_ms=1_000, holder=old_holder)
        assert first is not None and first.run.id == run_id
        old = first.lease_id
        # Not final (a when= step's decision, an attempt in progress): the lease alone must
        # keep the old holder from finishing it after the takeover.
        assert await storage.save_step_result(row("s1", "old", StepStatus.RUNNING), old)
        # A live lease is not claimable, whatever lease the claimer asks for.
        clock[0] += 999
        assert await storage.claim_next_run(["five"], lease_ms=1) is None

        # Once the holder's lease has expired by the store's clock, another worker reclaims.
        clock[0] += 1
        new_holder = LeaseHolder(worker="new", host="there", pid=2)
        second = await storage.claim_next_run(["five"], lease_ms=60_000, holder=new_holder)
        assert second is not None and second.run.id == run_id
        assert second.lease_id != old
        assert (second.run.attempt, second.run.recoveries) == (2, 1)
        assert second.run.holder == new_holder and second.run.lease_ms == 60_000
        assert second.run.lease_expires_at == clock[0] + 60_000
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
            "sleep_run": lambda: storage.sleep_run(run_id, old, clock[0] + 1_000),
            "wait_run": lambda: storage.wait_run(run_id, old, "go", None),
        }
        for what, call in attempts.items():
            assert await call() is False, f"{what} with the old lease was accepted"
            assert await state() == taken_over, f"{what} with the old lease changed storage"

        # The new holder is unaffected; its checkpoint is written once, even with its own
        # valid lease; once it completes, neither lease writes.
        assert await storage.heartbeat_run(run_id, new)
        assert await storage.save_step_result(row("s1", "new"), new)
        checkpointed = await state()
        overwritten = await storage.save_step_result(row("s1", "new-again"), new)
        assert not overwritten, "a final checkpoint was overwritten (with a valid lease)"
        assert await state() == checkpointed, "a final checkpoint was overwritten"
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
    """Another claim takes over a run once its lease expired by the store's clock, never
    before, whatever lease the claimer asks for; then every lease-checked write with the
    old lease (heartbeat, step upsert, complete, fail, release, sleep, wait) returns
    ``False`` and leaves the run and its steps unchanged; the new lease works, its final
    checkpoint is never overwritten, and after completion no lease writes at all.
    """
    asyncio.run(_old_lease_is_fenced(url))
