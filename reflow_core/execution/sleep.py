"""Executor of a durable sleep: suspend the run, lease released, until its wake time.

The wake time is computed once, on first reach, and stored on the sleep's row
(``wake_at``) before the run is suspended. Every later claim reads it back, so a
reclaim, a resume or an early claim never restarts the clock. A sleep produces no
output: ``prev`` passes through it unchanged and it is absent from ``ctx.steps``.
"""

from __future__ import annotations

from reflow_core.errors import LeaseExpiredError
from reflow_core.events import RunSuspended, StepCompleted, StepStarted, SuspendReason
from reflow_core.execution.run import Outcome, RunExecution, executor
from reflow_core.types import StepStatus
from reflow_core.workflow import SleepUnit

__all__ = ["run_sleep", "suspend_until"]


def _wake_time(unit: SleepUnit, now: int) -> int:
    if unit.until is not None:
        return int(unit.until.timestamp() * 1000)
    assert unit.duration_ms is not None  # Workflow.sleep requires exactly one of the two
    return now + unit.duration_ms


async def suspend_until(
    ex: RunExecution, wake_at: int, now: int, *, reason: SuspendReason, step: str
) -> Outcome:
    """Put the held run to sleep until ``wake_at`` (the store's clock, which read ``now``
    a moment ago) and arrange for this engine to wake then."""
    ex.active.guard()
    if not await ex.storage.sleep_run(ex.run.id, ex.lease_id, wake_at):
        raise LeaseExpiredError(ex.run.id, "the store refused to put it to sleep")
    # Without this the run would be noticed at the next poll, up to poll_interval late.
    ex.runtime.note_wake(wake_at - now)
    await ex.ended_with(RunSuspended, reason=reason, step=step, wake_at=wake_at)
    return Outcome.SUSPEND


@executor(SleepUnit)
async def run_sleep(ex: RunExecution, unit: SleepUnit) -> Outcome:
    """Replay a finished sleep, start one, or continue one whose wake time is stored."""
    row = ex.rows.get(unit.name)
    if row is not None and row.status is StepStatus.COMPLETED:
        return Outcome.PASS
    # The store's clock, not ours: it is the one that will decide when the run is due.
    now = await ex.storage.now()
    stored = row.wake_at if row is not None and row.status is StepStatus.SLEEPING else None
    resuming = stored is not None
    if stored is not None:
        wake_at = stored
    else:
        wake_at = _wake_time(unit, now)
        if ex.listening:
            await ex.emit(StepStarted, step=unit.name)
    if wake_at <= now:
        slept = max(0, ex.runtime.clock() - row.created_at) if resuming and row else 0
        await ex.save(unit.name, StepStatus.COMPLETED)
        if ex.listening:
            await ex.emit(
                StepCompleted, step=unit.name, output=None, attempts=0, duration=slept / 1000
            )
        return Outcome.PASS
    if not resuming:
        # The row first: if we crash before sleep_run, the next claim finds the wake time.
        await ex.save(unit.name, StepStatus.SLEEPING, wake_at=wake_at)
    return await suspend_until(ex, wake_at, now, reason="sleep", step=unit.name)
