"""Records to query parameters and rows back to records.

Value columns hold :func:`reflow_core.codec.encode` output as TEXT (readable and
queryable with SQLite's JSON functions); ``ErrorInfo``, ``Recurrence`` and a run's
``LeaseHolder`` are msgspec JSON of the struct. The ``*_params`` functions encode, so
they run on the caller's side *before* a job is queued: a ``SerializationError`` then
leaves storage untouched.
Column order here matches the SELECT and RETURNING lists in ``queries.sql``.
"""

from __future__ import annotations

from typing import Any

import msgspec

from reflow_adapters.sqlite_common.driver import Row
from reflow_core import codec
from reflow_core.damage import decode_stored
from reflow_core.types import (
    ErrorInfo,
    LeaseHolder,
    Recurrence,
    RunStatus,
    Schedule,
    StepResult,
    StepStatus,
    WorkflowRun,
)

__all__ = [
    "error_text",
    "holder_text",
    "recurrence_text",
    "run_from_row",
    "run_params",
    "schedule_from_row",
    "schedule_params",
    "step_from_row",
    "step_params",
    "value_from_text",
    "value_text",
]

_struct_encoder = msgspec.json.Encoder()
_error_decoder = msgspec.json.Decoder(ErrorInfo)
_recurrence_decoder = msgspec.json.Decoder(Recurrence)
_holder_decoder = msgspec.json.Decoder(LeaseHolder)


def value_text(value: Any) -> str:
    """A persistable value as stored; raises ``SerializationError`` for anything else."""
    return codec.encode(value).decode()


def value_from_text(text: str | None) -> Any:
    """A stored value back as the Python value (SQL NULL is None); a value that cannot be
    decoded comes back as ``DamagedValue``, never an exception, so one damaged row cannot
    block a claim or a listing (the engine fails that run, naming the value)."""
    return None if text is None else decode_stored(text)


def error_text(error: ErrorInfo | None) -> str | None:
    """An error as stored (``None`` stays SQL NULL)."""
    return None if error is None else _struct_encoder.encode(error).decode()


def _error(text: str | None) -> ErrorInfo | None:
    if text is None:
        return None
    try:
        return _error_decoder.decode(text)
    except msgspec.DecodeError as exc:
        return ErrorInfo(type="reflow.DamagedValue", message=f"stored error unreadable: {exc}")


def holder_text(holder: LeaseHolder | None) -> str | None:
    """A lease holder as stored (``None`` stays SQL NULL)."""
    return None if holder is None else _struct_encoder.encode(holder).decode()


def _holder(text: str | None) -> LeaseHolder | None:
    if text is None:
        return None
    try:
        return _holder_decoder.decode(text)
    except msgspec.DecodeError:
        return None  # informational only: a damaged holder must not hide the run


def recurrence_text(recurrence: Recurrence) -> str:
    """A recurrence as stored; equal recurrences give equal text (fields in declared order)."""
    return _struct_encoder.encode(recurrence).decode()


def run_params(run: WorkflowRun) -> dict[str, Any]:
    """Parameters of ``insert_run``."""
    return {
        "id": run.id,
        "workflow": run.workflow,
        "input": value_text(run.input),
        "status": run.status.value,
        "idempotency_key": run.idempotency_key,
        "output": None if run.output is None else value_text(run.output),
        "error": error_text(run.error),
        "wake_at": run.wake_at,
        "waiting_for": run.waiting_for,
        "heartbeat_at": run.heartbeat_at,
        "attempt": run.attempt,
        "created_at": run.created_at,
        "updated_at": run.updated_at,
        "recoveries": run.recoveries,
        "claimed_at": run.claimed_at,
        "lease_ms": run.lease_ms,
        "lease_expires_at": run.lease_expires_at,
        "holder": holder_text(run.holder),
    }


def run_from_row(row: Row) -> WorkflowRun:
    """A ``reflow_runs`` row, columns in ``queries.sql`` order."""
    return WorkflowRun(
        id=row[0],
        workflow=row[1],
        input=value_from_text(row[2]),
        status=RunStatus(row[3]),
        idempotency_key=row[4],
        output=value_from_text(row[5]),
        error=_error(row[6]),
        wake_at=row[7],
        waiting_for=row[8],
        heartbeat_at=row[9],
        attempt=row[10],
        created_at=row[11],
        updated_at=row[12],
        recoveries=row[13],
        claimed_at=row[14],
        lease_ms=row[15],
        lease_expires_at=row[16],
        holder=_holder(row[17]),
    )


def step_params(step: StepResult, lease_id: str | None) -> dict[str, Any]:
    """Parameters of ``save_step_result``."""
    return {
        "id": step.id,
        "run_id": step.run_id,
        "name": step.name,
        "status": step.status.value,
        "output": None if step.output is None else value_text(step.output),
        "error": error_text(step.error),
        "attempts": step.attempts,
        "created_at": step.created_at,
        "updated_at": step.updated_at,
        "wake_at": step.wake_at,
        "lease_id": lease_id,
    }


def step_from_row(row: Row) -> StepResult:
    """A ``reflow_steps`` row, columns in ``queries.sql`` order."""
    return StepResult(
        id=row[0],
        run_id=row[1],
        name=row[2],
        status=StepStatus(row[3]),
        output=value_from_text(row[4]),
        error=_error(row[5]),
        attempts=row[6],
        created_at=row[7],
        updated_at=row[8],
        wake_at=row[9],
    )


def schedule_params(schedule: Schedule) -> dict[str, Any]:
    """Parameters of ``upsert_schedule``."""
    return {
        "key": schedule.key,
        "workflow": schedule.workflow,
        "input": value_text(schedule.input),
        "recurrence": recurrence_text(schedule.recurrence),
        "next_run_at": schedule.next_run_at,
        "created_at": schedule.created_at,
        "updated_at": schedule.updated_at,
    }


def schedule_from_row(row: Row) -> Schedule:
    """A ``reflow_schedules`` row, columns in ``queries.sql`` order."""
    return Schedule(
        key=row[0],
        workflow=row[1],
        input=value_from_text(row[2]),
        recurrence=_recurrence_decoder.decode(row[3]),
        next_run_at=row[4],
        created_at=row[5],
        updated_at=row[6],
    )
