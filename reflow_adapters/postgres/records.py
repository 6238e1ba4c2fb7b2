"""Between contract records and table rows: value columns hold the codec's JSON text.

Values are encoded here *before* any SQL runs, so a ``SerializationError`` leaves the
store untouched. ``ErrorInfo``, ``LeaseHolder`` and ``Recurrence`` are msgspec Structs
with a fixed shape, stored as msgspec JSON (a fixed field order, which
``upsert_schedule`` relies on to compare recurrences as text; an operator reads a
holder with ``holder->>'host'``).

Reading never raises on a damaged value: a value that cannot be decoded comes back as
:class:`~reflow_core.types.DamagedValue` (the engine fails that run, naming it), and a
damaged error or holder as a readable stand-in, so one bad row blocks no claim or list.
"""

from __future__ import annotations

from typing import Any

import msgspec
from psycopg.rows import DictRow

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
    "dump_error",
    "dump_holder",
    "dump_recurrence",
    "dump_value",
    "load_value",
    "to_run",
    "to_schedule",
    "to_step",
]


def dump_value(value: Any) -> str:
    """Codec JSON text for a persistable value (raises ``SerializationError`` otherwise)."""
    return codec.encode(value).decode()


def load_value(text: str | None) -> Any:
    """The value a json column holds; SQL NULL (an unset output) is ``None``."""
    return None if text is None else decode_stored(text)


def dump_error(error: ErrorInfo | None) -> str | None:
    """msgspec JSON for an error, or NULL."""
    return None if error is None else msgspec.json.encode(error).decode()


def _load_error(text: str | None) -> ErrorInfo | None:
    if text is None:
        return None
    try:
        return msgspec.json.decode(text, type=ErrorInfo)
    except msgspec.DecodeError as exc:
        return ErrorInfo(type="reflow.DamagedValue", message=f"stored error unreadable: {exc}")


def dump_holder(holder: LeaseHolder | None) -> str | None:
    """msgspec JSON for a lease holder, or NULL."""
    return None if holder is None else msgspec.json.encode(holder).decode()


def _load_holder(text: str | None) -> LeaseHolder | None:
    if text is None:
        return None
    try:
        return msgspec.json.decode(text, type=LeaseHolder)
    except msgspec.DecodeError:
        return None  # informational only: a damaged holder must not hide the run


def dump_recurrence(recurrence: Recurrence) -> str:
    """msgspec JSON for a recurrence: same recurrence, same text."""
    return msgspec.json.encode(recurrence).decode()


def to_run(row: DictRow) -> WorkflowRun:
    """A ``runs`` row as a record."""
    return WorkflowRun(
        id=row["id"],
        workflow=row["workflow"],
        input=decode_stored(row["input"]),
        status=RunStatus(row["status"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        idempotency_key=row["idempotency_key"],
        output=load_value(row["output"]),
        error=_load_error(row["error"]),
        wake_at=row["wake_at"],
        waiting_for=row["waiting_for"],
        heartbeat_at=row["heartbeat_at"],
        attempt=row["attempt"],
        recoveries=row["recoveries"],
        claimed_at=row["claimed_at"],
        lease_ms=row["lease_ms"],
        lease_expires_at=row["lease_expires_at"],
        holder=_load_holder(row["holder"]),
    )


def to_step(row: DictRow) -> StepResult:
    """A ``steps`` row as a record."""
    return StepResult(
        id=row["id"],
        run_id=row["run_id"],
        name=row["name"],
        status=StepStatus(row["status"]),
        output=load_value(row["output"]),
        error=_load_error(row["error"]),
        attempts=row["attempts"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        wake_at=row["wake_at"],
    )


def to_schedule(row: DictRow) -> Schedule:
    """A ``schedules`` row as a record."""
    return Schedule(
        key=row["key"],
        workflow=row["workflow"],
        input=decode_stored(row["input"]),
        recurrence=msgspec.json.decode(row["recurrence"], type=Recurrence),
        next_run_at=row["next_run_at"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )
