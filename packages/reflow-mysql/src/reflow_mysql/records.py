"""Between contract records and table rows.

Identifiers live in VARBINARY columns and come back as ``bytes``: they are UTF-8
(the adapter checks every identifier before writing, so it encodes), decoded here.
Values are the codec's bytes in LONGBLOB columns, encoded *before* any SQL runs (a
``SerializationError`` leaves the store untouched) and handed back byte for byte.

Reading never raises on a damaged value: a value that cannot be decoded comes back as
:class:`~reflow_core.types.DamagedValue` (the engine fails that run, naming it), and a
damaged error or holder as a readable stand-in, so one bad row blocks no claim or list.
"""

from __future__ import annotations

from typing import Any

import msgspec

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
    "Row",
    "dump_error",
    "dump_holder",
    "dump_recurrence",
    "dump_value",
    "load_value",
    "text",
    "to_run",
    "to_schedule",
    "to_step",
]

Row = dict[str, Any]


def text(raw: Any) -> Any:
    """A VARBINARY identifier as ``str`` (``None`` stays ``None``)."""
    if isinstance(raw, bytes | bytearray):
        return bytes(raw).decode("utf-8")
    return raw


def dump_value(value: Any) -> bytes:
    """Codec bytes for a persistable value (raises ``SerializationError`` otherwise)."""
    return codec.encode(value)


def load_value(raw: bytes | None) -> Any:
    """The value a LONGBLOB column holds; SQL NULL (an unset output) is ``None``."""
    return None if raw is None else decode_stored(raw)


def dump_error(error: ErrorInfo | None) -> bytes | None:
    """msgspec JSON for an error, or NULL."""
    return None if error is None else msgspec.json.encode(error)


def _load_error(raw: bytes | None) -> ErrorInfo | None:
    if raw is None:
        return None
    try:
        return msgspec.json.decode(raw, type=ErrorInfo)
    except msgspec.DecodeError as exc:
        return ErrorInfo(type="reflow.DamagedValue", message=f"stored error unreadable: {exc}")


def dump_holder(holder: LeaseHolder | None) -> bytes | None:
    """msgspec JSON for a lease holder, or NULL."""
    return None if holder is None else msgspec.json.encode(holder)


def _load_holder(raw: bytes | None) -> LeaseHolder | None:
    if raw is None:
        return None
    try:
        return msgspec.json.decode(raw, type=LeaseHolder)
    except msgspec.DecodeError:
        return None  # informational only: a damaged holder must not hide the run


def dump_recurrence(recurrence: Recurrence) -> bytes:
    """msgspec JSON for a recurrence: same recurrence, same bytes."""
    return msgspec.json.encode(recurrence)


def to_run(row: Row) -> WorkflowRun:
    """A ``runs`` row as a record."""
    return WorkflowRun(
        id=text(row["id"]),
        workflow=text(row["workflow"]),
        input=decode_stored(row["input"]),
        status=RunStatus(row["status"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        idempotency_key=text(row["idempotency_key"]),
        output=load_value(row["output"]),
        error=_load_error(row["error"]),
        wake_at=row["wake_at"],
        waiting_for=text(row["waiting_for"]),
        heartbeat_at=row["heartbeat_at"],
        attempt=row["attempt"],
        recoveries=row["recoveries"],
        claimed_at=row["claimed_at"],
        lease_ms=row["lease_ms"],
        lease_expires_at=row["lease_expires_at"],
        holder=_load_holder(row["holder"]),
    )


def to_step(row: Row) -> StepResult:
    """A ``steps`` row as a record."""
    return StepResult(
        id=text(row["id"]),
        run_id=text(row["run_id"]),
        name=text(row["name"]),
        status=StepStatus(row["status"]),
        output=load_value(row["output"]),
        error=_load_error(row["error"]),
        attempts=row["attempts"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        wake_at=row["wake_at"],
    )


def to_schedule(row: Row) -> Schedule:
    """A ``schedules`` row as a record."""
    return Schedule(
        key=text(row["key"]),
        workflow=text(row["workflow"]),
        input=decode_stored(row["input"]),
        recurrence=msgspec.json.decode(row["recurrence"], type=Recurrence),
        next_run_at=row["next_run_at"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )
