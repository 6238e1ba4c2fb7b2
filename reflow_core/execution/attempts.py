"""Attempts of one step: the retry loop, per-attempt timeouts, sync steps in threads."""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from reflow_core.context import CancelSignal, EarlyCompletion, StepContext
from reflow_core.errors import ControlFlow, StepInterruptedError, StepTimeoutError
from reflow_core.events import RetryScheduled
from reflow_core.execution.run import RunContext, describe_error
from reflow_core.types import ErrorInfo, StepStatus
from reflow_core.workflow import StepUnit

if TYPE_CHECKING:
    from reflow_core.execution.run import RunExecution

__all__ = ["DURABLE_BACKOFF_S", "AttemptResult", "run_attempts"]


DURABLE_BACKOFF_S = 1.0
"""A wait before the next attempt longer than this is not spent holding a slot and a
lease: the step's row stores the attempt count and when the next attempt is due, the run
sleeps in storage, and whichever worker claims it when due makes the next attempt."""


class AttemptResult(msgspec.Struct):
    """How a step's attempts ended: a value, an early completion, an error, or a retry
    scheduled for later (``retry_at``, the store's clock, which read ``now``).

    A Struct, not a dataclass: one is made for every step, and a Struct is built in C
    (a dataclass's ``__init__`` is a Python call).
    """

    attempts: int
    value: Any = None
    error: BaseException | None = None
    early: bool = False
    retry_at: int | None = None
    now: int = 0


async def _invoke(ex: RunExecution, unit: StepUnit, ctx: StepContext[Any]) -> Any:
    if unit.is_async:
        return await unit.fn(ctx)
    loop = asyncio.get_running_loop()
    thread = loop.run_in_executor(ex.runtime.threads, _in_thread, unit.fn, ctx)
    ex.active.thread = thread
    # Shielded: cancelling the run must not pretend the thread stopped. The execution
    # stops waiting for it (its result is discarded), but whoever must not overlap with
    # it (a stop releasing the lease, a new execution of the same run) waits on
    # ``active.thread`` until it really returns.
    result = await asyncio.shield(thread)
    if isinstance(result, _Raised):
        raise StepInterruptedError(unit.name, result.error) from result.error
    if inspect.isawaitable(result):  # a plain def that returned a coroutine
        return await result
    return result


@dataclass(slots=True)
class _Raised:
    error: BaseException


def _in_thread(fn: Any, ctx: StepContext[Any]) -> Any:
    """Call a ``def`` step, bringing back a non-``Exception`` it raised as a value: a
    ``SystemExit`` or ``GeneratorExit`` must not travel through the loop's futures."""
    try:
        return fn(ctx)
    except Exception:
        raise
    except EarlyCompletion:
        raise
    except BaseException as error:
        return _Raised(error)


def _begin(
    ex: RunExecution, unit: StepUnit, attempt: int, scope: set[CancelSignal] | None
) -> RunContext:
    """Start an attempt: check the lease fence, register the attempt's signal where a stop
    (and ``scope``'s owner) finds it, and make the step's context. Pair with :func:`_end`
    (passing ``ctx.cancel``) in a ``finally``."""
    ex.active.guard()  # never start a step once the lease fence has passed
    signal = CancelSignal()
    ex.active.signals.add(signal)
    if scope is not None:
        scope.add(signal)
    return RunContext(ex, unit.name, attempt, signal)


def _end(ex: RunExecution, signal: CancelSignal, scope: set[CancelSignal] | None) -> None:
    """End an attempt that :func:`_begin` started: nothing signals it any more."""
    ex.active.signals.discard(signal)
    if scope is not None:
        scope.discard(signal)


async def _attempt(
    ex: RunExecution, unit: StepUnit, attempt: int, scope: set[CancelSignal] | None
) -> Any:
    """One attempt of a step with a timeout, a scope, or a thread (see :func:`run_attempts`
    for the common case, which needs no coroutine of its own)."""
    ctx = _begin(ex, unit, attempt, scope)
    signal = ctx.cancel
    try:
        if unit.timeout is None:
            return await _invoke(ex, unit, ctx)
        timeout = asyncio.timeout(unit.timeout)
        try:
            async with timeout:
                return await _invoke(ex, unit, ctx)
        except TimeoutError:
            if not timeout.expired():
                raise  # the step's own TimeoutError, not ours
            error = StepTimeoutError(unit.name, unit.timeout)
            signal.set(TimeoutError(str(error)))
            raise error from None
    finally:
        _end(ex, signal, scope)


async def run_attempts(
    ex: RunExecution,
    unit: StepUnit,
    *,
    scope: set[CancelSignal] | None = None,
    may_suspend: bool = True,
) -> AttemptResult:
    """Run ``unit`` until it succeeds, completes early, or its retry policy gives up.

    Attempts are durable: each failed attempt that will be retried is recorded on the
    step's row (``running``, its count and error) before the wait, and counting resumes
    from that row after a crash. A wait longer than :data:`DURABLE_BACKOFF_S` is left to
    storage when ``may_suspend`` (the result carries ``retry_at``; the caller suspends
    the run); parallel branches, which cannot suspend alone, wait in place.

    Control-flow errors (cancel, lease loss, stop) and task cancellation propagate: they
    end the run's execution, not the step. ``scope`` receives the current attempt's
    signal too, so a caller can stop just this step (a parallel group cancelling the
    siblings of a failed branch) without aborting the whole run.
    """
    row = ex.rows.get(unit.name)
    attempt = row.attempts if row is not None and row.status is StepStatus.RUNNING else 0
    # An async step without timeout or scope (the common case) is awaited right here,
    # without a coroutine of its own.
    direct = unit.timeout is None and unit.is_async and scope is None
    while True:
        attempt += 1
        try:
            if direct:
                ctx = _begin(ex, unit, attempt, None)
                try:
                    value = await unit.fn(ctx)
                finally:
                    _end(ex, ctx.cancel, None)
            else:
                value = await _attempt(ex, unit, attempt, scope)
        except EarlyCompletion as done:
            return AttemptResult(attempts=attempt, value=done.value, early=True)
        except ControlFlow:
            raise
        except asyncio.CancelledError as cancelled:
            if ex.active.engine_cancelled():
                raise
            return AttemptResult(attempts=attempt, error=_interrupted(unit, cancelled))
        except StepInterruptedError as interrupted:
            if ex.active.abort_reason is not None:
                raise ex.active.abort_reason from interrupted
            return AttemptResult(attempts=attempt, error=interrupted)  # never retried
        except Exception as error:
            if ex.active.abort_reason is not None:
                raise ex.active.abort_reason from error
            decision = unit.retry.decide(attempt, error)
            if not decision.retry:
                return AttemptResult(attempts=attempt, error=error)
            info = describe_error(error, unit.name)
            if may_suspend and decision.delay > DURABLE_BACKOFF_S:
                now = await ex.storage.now()
                retry_at = now + math.ceil(decision.delay * 1000)
                await ex.save(
                    unit.name, StepStatus.RUNNING, error=info, attempts=attempt, wake_at=retry_at
                )
                await _retry_scheduled(ex, unit, attempt, info, decision.delay, retry_at)
                return AttemptResult(attempts=attempt, retry_at=retry_at, now=now)
            await ex.save(unit.name, StepStatus.RUNNING, error=info, attempts=attempt)
            await _retry_scheduled(ex, unit, attempt, info, decision.delay, None)
            if decision.delay > 0:
                await asyncio.sleep(decision.delay)
        except BaseException as fatal:
            # SystemExit (a library calling sys.exit()), KeyboardInterrupt, GeneratorExit,
            # a BaseExceptionGroup or any library's own BaseException: the step's outcome,
            # never the worker's end, and never retried.
            if ex.active.abort_reason is not None:
                raise ex.active.abort_reason from fatal
            return AttemptResult(attempts=attempt, error=_interrupted(unit, fatal))
        else:
            return AttemptResult(attempts=attempt, value=value)


async def _retry_scheduled(
    ex: RunExecution,
    unit: StepUnit,
    attempt: int,
    info: ErrorInfo,
    delay: float,
    retry_at: int | None,
) -> None:
    """Tell the log and the observers that a failed attempt (stored) will be retried."""
    ex.log_step(
        logging.INFO,
        "run %s (%s): step %s attempt %d failed (%s: %s); retrying in %.3gs",
        unit.name,
        attempt,
        attempt,
        info.type,
        info.message,
        delay,
    )
    if RetryScheduled in ex.observers.wanted:
        await ex.emit(
            RetryScheduled,
            step=unit.name,
            attempt=attempt,
            error=info,
            delay=delay,
            retry_at=retry_at,
        )


def _interrupted(unit: StepUnit, error: BaseException) -> StepInterruptedError:
    wrapped = StepInterruptedError(unit.name, error)
    wrapped.__cause__ = error
    return wrapped
