"""Executor of a step unit: replay its checkpoint, or decide, run and checkpoint it."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable

from reflow_core import codec
from reflow_core.context import CancelSignal, EarlyCompletion
from reflow_core.errors import (
    ConfigError,
    ControlFlow,
    SerializationError,
    StepInterruptedError,
)
from reflow_core.events import StepCompleted, StepFailed, StepSkipped, StepStarted
from reflow_core.execution.attempts import run_attempts
from reflow_core.execution.run import (
    ADVANCE,
    COMPLETE,
    Outcome,
    RunExecution,
    describe_error,
    executor,
)
from reflow_core.execution.sleep import suspend_until
from reflow_core.types import ErrorInfo, StepStatus
from reflow_core.workflow import StepUnit

__all__ = ["run_step", "run_step_unit", "step_failed"]

# Read on every step: module constants, not EnumType's __getattr__ hook (see run.py).
_COMPLETED = StepStatus.COMPLETED
_COMPLETED_EARLY = StepStatus.COMPLETED_EARLY


def replay(ex: RunExecution, unit: StepUnit) -> Outcome | None:
    """The outcome of a step that already has a final checkpoint, or ``None`` to execute."""
    row = ex.rows.get(unit.name)
    if row is None:
        return None
    if row.status is StepStatus.COMPLETED:
        ex.record(unit.name, row.output, unit.output_type)
        return Outcome.ADVANCE
    if row.status is StepStatus.COMPLETED_EARLY:
        ex.record(unit.name, row.output, unit.output_type)
        return Outcome.COMPLETE
    if row.status is StepStatus.SKIPPED:
        return Outcome.PASS
    if row.status is StepStatus.FAILED and row.error is not None:
        # Failed for good before the run could be marked failed (a crash in between, or
        # during on_failure): finish the failure rather than retrying behind its back.
        ex.failure = row.error
        return Outcome.FAIL
    return None


async def _decide(ex: RunExecution, unit: StepUnit) -> bool:
    assert unit.when is not None
    try:
        result = unit.when(ex.context(unit.name, 0, CancelSignal()))
        if inspect.isawaitable(result):
            result = await result
        return bool(result)
    except EarlyCompletion:
        raise ConfigError(
            f"ctx.complete() is not allowed in the when= predicate of step {unit.name!r}: a "
            "predicate decides whether the step runs; complete early from a step instead"
        ) from None
    except asyncio.CancelledError as cancelled:
        if ex.active.engine_cancelled():
            raise
        raise StepInterruptedError(unit.name, cancelled) from cancelled
    except Exception:
        raise  # an ordinary error: the caller records it
    except BaseException as fatal:  # sys.exit() and the like: the run's outcome, not ours
        raise StepInterruptedError(unit.name, fatal) from fatal


async def step_failed(
    ex: RunExecution, step: str, info: ErrorInfo, attempts: int, started: float | None
) -> None:
    """Tell the log and the observers that ``step`` failed for good (already stored)."""
    ex.log_step(
        logging.INFO,
        "run %s (%s): step %s failed after %d attempt(s): %s: %s",
        step,
        attempts,
        attempts,
        info.type,
        info.message,
    )
    if StepFailed in ex.observers.wanted:
        duration = None if started is None else time.monotonic() - started
        await ex.emit(StepFailed, step=step, error=info, attempts=attempts, duration=duration)


async def run_step_unit(ex: RunExecution, unit: StepUnit, *, announce: bool = True) -> Outcome:
    """Execute ``unit`` (no checkpoint yet) and checkpoint its result."""
    # Any row of this step (an attempt in progress, a retry scheduled) means the predicate
    # already said "run": it is asked once per run, never again after a reclaim.
    if unit.when is not None and unit.name not in ex.rows:
        try:
            runs = await _decide(ex, unit)
        except ControlFlow:
            raise
        except Exception as exc:
            ex.failure = describe_error(exc, unit.name)
            await step_failed(ex, unit.name, ex.failure, 0, None)
            return Outcome.FAIL
        if not runs:
            await ex.save(unit.name, StepStatus.SKIPPED)
            if StepSkipped in ex.observers.wanted:
                await ex.emit(StepSkipped, step=unit.name)
            return Outcome.PASS
        # Stored both ways, before the step runs.
        await ex.save(unit.name, StepStatus.RUNNING)
    row = ex.rows.get(unit.name)
    if row is not None and row.status is StepStatus.RUNNING and row.wake_at is not None:
        now = await ex.storage.now()
        if row.wake_at > now:  # claimed before its next attempt is due: sleep on
            return await suspend_until(ex, row.wake_at, now, reason="retry", step=unit.name)
    # For the durations of events. Read whether or not anyone listens yet: the clock is
    # cheaper than asking, and an observer subscribed meanwhile still gets a duration.
    started: float | None = time.monotonic()
    if announce and StepStarted in ex.observers.wanted:
        first = row.attempts + 1 if row is not None and row.status is StepStatus.RUNNING else 1
        await ex.emit(StepStarted, step=unit.name, attempt=first)
    result = await run_attempts(ex, unit)
    if result.retry_at is not None:
        return await suspend_until(ex, result.retry_at, result.now, reason="retry", step=unit.name)
    if result.error is None:
        try:
            plain, encoded = codec.to_stored(result.value, unit.output_type)
        except SerializationError as exc:
            result.error = SerializationError(
                f"step {unit.name!r} returned a value that cannot be stored: {exc}", exc.path
            )
    if result.error is not None:
        info = describe_error(result.error, unit.name)
        await ex.save(unit.name, StepStatus.FAILED, error=info, attempts=result.attempts)
        ex.failure = info
        await step_failed(ex, unit.name, info, result.attempts, started)
        return Outcome.FAIL
    status = _COMPLETED_EARLY if result.early else _COMPLETED
    await ex.save(unit.name, status, output=plain, attempts=result.attempts, encoded=encoded)
    ex.record(unit.name, plain, unit.output_type, encoded)
    if StepCompleted in ex.observers.wanted:
        await ex.emit(
            StepCompleted,
            step=unit.name,
            output=codec.decode(encoded),
            attempts=result.attempts,
            duration=None if started is None else time.monotonic() - started,
        )
    return COMPLETE if result.early else ADVANCE


@executor(StepUnit)
def run_step(ex: RunExecution, unit: StepUnit) -> Awaitable[Outcome]:
    """Replay the step's checkpoint if it has one, else execute it.

    A plain function handing back the coroutine to await: no extra frame per step.
    """
    if unit.name in ex.rows:  # only a step with a row can replay (none on a first claim)
        replayed = replay(ex, unit)
        if replayed is not None:
            return _replayed(replayed)
    return run_step_unit(ex, unit)


async def _replayed(outcome: Outcome) -> Outcome:
    return outcome
