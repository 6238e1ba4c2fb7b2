"""Executor of a durable wait for an external event, and the checks ``send_event`` makes.

Order on each claim: a completed row replays its payload; otherwise a buffered event
is consumed (an event wins over a deadline that passed meanwhile) by one atomic storage
call that also checkpoints it, so no crash can lose it; otherwise, past the
deadline, the wait continues with its default or fails with
:class:`~reflow_core.errors.WaitTimeoutError`; otherwise the run is suspended as
``waiting`` until an event arrives or the deadline passes. The deadline is stored on
the wait's row, so a reclaim never restarts the timeout.

Events are validated against the declared payload type when they are *sent*, so a bad
payload is refused to its sender instead of failing the run later.
"""

from __future__ import annotations

from typing import Any

import msgspec

from reflow_core import codec
from reflow_core.errors import (
    ConfigError,
    DamagedValueError,
    LeaseExpiredError,
    SerializationError,
    ValidationError,
    WaitTimeoutError,
)
from reflow_core.events import RunSuspended, StepCompleted, StepStarted
from reflow_core.execution.run import Outcome, RunExecution, describe_error, executor
from reflow_core.execution.step import step_failed
from reflow_core.types import DamagedValue, StepStatus
from reflow_core.workflow import NO_DEFAULT, WaitUnit, Workflow

__all__ = ["event_payload", "run_wait"]


def event_payload(workflow: Workflow[Any], name: str, payload: Any) -> Any:
    """Validate an event for ``workflow``'s wait ``name``; return the plain data to store.

    :class:`ConfigError` if the workflow has no such wait, :class:`ValidationError` if
    the payload does not match the declared type, :class:`SerializationError` if it
    cannot be stored exactly.
    """
    unit = next((u for u in workflow.units if isinstance(u, WaitUnit) and u.name == name), None)
    if unit is None:
        waits = [u.name for u in workflow.units if isinstance(u, WaitUnit)]
        raise ConfigError(
            f"workflow {workflow.name!r} has no wait_for_event named {name!r} "
            f"(its waits: {', '.join(waits) or 'none'})"
        )
    try:
        typed = codec.validate(payload, unit.payload_type)
    except ValidationError as exc:
        raise ValidationError(f"payload of event {name!r}: {exc}") from None
    plain = codec.to_plain(typed, unit.payload_type)
    codec.check(plain)
    return plain


async def _finish(ex: RunExecution, unit: WaitUnit, plain: Any) -> Outcome:
    """Checkpoint the wait's default output (its deadline passed) and make it ``prev``."""
    await ex.save(unit.name, StepStatus.COMPLETED, output=plain)
    return await _completed(ex, unit, plain)


async def _consume(ex: RunExecution, unit: WaitUnit) -> Outcome | None:
    """Consume the oldest buffered event *and* checkpoint it, atomically; ``None`` if none.

    One storage call rather than ``take_event`` then ``save``: a worker killed between
    two calls would have destroyed the event without recording it, and the run's next
    owner would wait for it forever. :class:`LeaseExpiredError` if the lease is lost,
    in which case nothing was consumed and the event waits for the run's next owner.
    """
    checkpoint = ex.step_row(unit.name, StepStatus.COMPLETED)
    ex.active.guard()
    result = await ex.storage.consume_event(unit.name, checkpoint, ex.lease_id)
    if not result.held:
        raise LeaseExpiredError(ex.run.id)
    if result.event is None:
        return None
    plain = result.event.payload
    ex.rows[unit.name] = msgspec.structs.replace(checkpoint, output=plain)
    if isinstance(plain, DamagedValue):
        what = f"the payload of event {unit.name!r}"
        ex.failure = describe_error(DamagedValueError(ex.run.id, what, plain.error), unit.name)
        await step_failed(ex, unit.name, ex.failure, 0, None)
        return Outcome.FAIL
    return await _completed(ex, unit, plain)


async def _completed(ex: RunExecution, unit: WaitUnit, plain: Any) -> Outcome:
    """The wait's output is checkpointed: make it ``prev`` and tell the observers."""
    ex.record(unit.name, plain, unit.payload_type)
    if ex.listening:
        row = ex.rows.get(unit.name)  # created when the wait was first reached
        waited = None if row is None else max(0, ex.runtime.clock() - row.created_at) / 1000
        await ex.emit(
            StepCompleted,
            step=unit.name,
            output=ex.plain_output(unit.name),
            attempts=0,
            duration=waited,
        )
    return Outcome.ADVANCE


async def _timed_out(ex: RunExecution, unit: WaitUnit) -> Outcome:
    if unit.default is not NO_DEFAULT:
        try:
            plain = codec.to_plain(unit.default, unit.payload_type)
            codec.check(plain)
        except SerializationError as exc:
            ex.failure = describe_error(exc, unit.name)
            await step_failed(ex, unit.name, ex.failure, 0, None)
            return Outcome.FAIL
        return await _finish(ex, unit, plain)
    assert unit.timeout_ms is not None  # a deadline exists only with a timeout
    info = describe_error(WaitTimeoutError(unit.name, unit.timeout_ms / 1000), unit.name)
    await ex.save(unit.name, StepStatus.FAILED, error=info)
    ex.failure = info
    await step_failed(ex, unit.name, info, 0, None)
    return Outcome.FAIL


@executor(WaitUnit)
async def run_wait(ex: RunExecution, unit: WaitUnit) -> Outcome:
    """Replay a received event, take a buffered one, time out, or suspend until one comes."""
    row = ex.rows.get(unit.name)
    if row is not None and row.status is StepStatus.COMPLETED:
        ex.record(unit.name, row.output, unit.payload_type)
        return Outcome.ADVANCE
    if row is not None and row.status is StepStatus.FAILED and row.error is not None:
        ex.failure = row.error  # timed out before the run could be marked failed
        return Outcome.FAIL
    resuming = row is not None and row.status is StepStatus.WAITING
    if not resuming and ex.listening:
        await ex.emit(StepStarted, step=unit.name)
    consumed = await _consume(ex, unit)
    if consumed is not None:
        return consumed
    now = await ex.storage.now()  # the clock that will decide when the deadline passed
    if resuming:
        assert row is not None
        deadline = row.wake_at
    else:
        deadline = None if unit.timeout_ms is None else now + unit.timeout_ms
    if deadline is not None and deadline <= now:
        return await _timed_out(ex, unit)
    if not resuming:
        await ex.save(unit.name, StepStatus.WAITING, wake_at=deadline)
    ex.active.guard()
    if not await ex.storage.wait_run(ex.run.id, ex.lease_id, unit.name, deadline):
        raise LeaseExpiredError(ex.run.id, "the store refused to suspend it")
    if deadline is not None:
        ex.runtime.note_wake(deadline - now)
    await ex.ended_with(
        RunSuspended, reason="wait", step=unit.name, wake_at=deadline, event=unit.name
    )
    return Outcome.SUSPEND
