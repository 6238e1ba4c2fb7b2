"""Between contract records and Redis hashes.

Values are the codec's exact text, encoded *before* any script runs (so a
``SerializationError`` leaves the store untouched) and decoded with
:func:`~reflow_core.damage.decode_stored`, so a damaged value comes back as a
``DamagedValue`` instead of raising. ``ErrorInfo``, ``LeaseHolder`` and ``Recurrence``
are msgspec JSON (a fixed field order, so recurrences compare as text). A hash field
that is absent is ``None``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
from reflow_core import codec
from reflow_core.damage import decode_stored
from reflow_core.types import (
    ErrorInfo,
    EventRecord,
    LeaseHolder,
    Recurrence,
    RunStatus,
    Schedule,
    StepResult,
    StepStatus,
    WorkflowRun,
)

from .keys import sort_key

__all__ = [
    "dump_error",
    "dump_holder",
    "dump_recurrence",
    "dump_value",
    "run_fields",
    "step_fields",
    "to_event",
    "to_hash",
    "to_run",
    "to_schedule",
    "to_step",
]


def dump_value(value: Any) -> str:
    """Codec JSON text for a persistable value (raises ``SerializationError`` otherwise)."""
    return codec.encode(value).decode()


def dump_error(error: ErrorInfo | None) -> str:
    """msgspec JSON for an error, or ``''`` (unset)."""
    return "" if error is None else msgspec.json.encode(error).decode()


def dump_holder(holder: LeaseHolder | None) -> str:
    """msgspec JSON for a lease holder, or ``''`` (unset)."""
    return "" if holder is None else msgspec.json.encode(holder).decode()


def dump_recurrence(recurrence: Recurrence) -> str:
    """msgspec JSON for a recurrence: same recurrence, same text."""
    return msgspec.json.encode(recurrence).decode()


def _opt(value: int | str | None) -> str | None:
    return None if value is None else str(value)


def run_fields(run: WorkflowRun) -> list[str | bytes]:
    """A new run as hash field/value pairs (unset fields left out)."""
    fields: dict[str, str | bytes | None] = {
        "id": run.id,
        "workflow": run.workflow,
        "status": RunStatus(run.status).value,
        "input": dump_value(run.input),
        "output": dump_value(run.output),
        "error": dump_error(run.error) or None,
        "idempotency_key": run.idempotency_key,
        "wake_at": _opt(run.wake_at),
        "waiting_for": run.waiting_for,
        "heartbeat_at": _opt(run.heartbeat_at),
        "attempt": str(run.attempt),
        "created_at": str(run.created_at),
        "updated_at": str(run.updated_at),
        "recoveries": str(run.recoveries),
        "claimed_at": _opt(run.claimed_at),
        "lease_ms": _opt(run.lease_ms),
        "lease_expires_at": _opt(run.lease_expires_at),
        "holder": dump_holder(run.holder) or None,
        "sk": sort_key(run.created_at, run.id),
    }
    flat: list[str | bytes] = []
    for name, value in fields.items():
        if value is not None:
            flat += [name, value]
    return flat


def step_fields(step: StepResult, *, with_output: bool = True) -> list[str]:
    """A step row's fields as pairs for the step scripts (``''`` = unset)."""
    flat = [
        "status", StepStatus(step.status).value,
        "error", dump_error(step.error),
        "attempts", str(step.attempts),
        "created_at", str(step.created_at),
        "updated_at", str(step.updated_at),
        "wake_at", "" if step.wake_at is None else str(step.wake_at),
    ]  # fmt: skip
    if with_output:
        flat += ["output", dump_value(step.output)]
    return flat


def to_hash(flat: Sequence[bytes]) -> dict[str, bytes]:
    """An HGETALL reply as a dict with text field names."""
    return {flat[i].decode(): flat[i + 1] for i in range(0, len(flat), 2)}


def _text(h: dict[str, bytes], name: str) -> str | None:
    value = h.get(name)
    return None if value is None else value.decode()


def _int(h: dict[str, bytes], name: str) -> int | None:
    value = h.get(name)
    return None if value is None else int(value)


def _load_error(raw: bytes | None) -> ErrorInfo | None:
    if raw is None:
        return None
    try:
        return msgspec.json.decode(raw, type=ErrorInfo)
    except msgspec.DecodeError as exc:
        return ErrorInfo(type="reflow.DamagedValue", message=f"stored error unreadable: {exc}")


def _load_holder(raw: bytes | None) -> LeaseHolder | None:
    if raw is None:
        return None
    try:
        return msgspec.json.decode(raw, type=LeaseHolder)
    except msgspec.DecodeError:
        return None  # informational only: a damaged holder must not hide the run


def _load_value(raw: bytes | None) -> Any:
    return None if raw is None else decode_stored(raw)


def to_run(h: dict[str, bytes]) -> WorkflowRun:
    """A run hash as a record."""
    return WorkflowRun(
        id=h["id"].decode(),
        workflow=h["workflow"].decode(),
        input=decode_stored(h["input"]),
        status=RunStatus(h["status"].decode()),
        created_at=int(h["created_at"]),
        updated_at=int(h["updated_at"]),
        idempotency_key=_text(h, "idempotency_key"),
        output=_load_value(h.get("output")),
        error=_load_error(h.get("error")),
        wake_at=_int(h, "wake_at"),
        waiting_for=_text(h, "waiting_for"),
        heartbeat_at=_int(h, "heartbeat_at"),
        attempt=int(h.get("attempt", b"0")),
        recoveries=int(h.get("recoveries", b"0")),
        claimed_at=_int(h, "claimed_at"),
        lease_ms=_int(h, "lease_ms"),
        lease_expires_at=_int(h, "lease_expires_at"),
        holder=_load_holder(h.get("holder")),
    )


def to_step(h: dict[str, bytes]) -> StepResult:
    """A step hash (with its ``id``) as a record."""
    return StepResult(
        id=h["id"].decode(),
        run_id=h["run_id"].decode(),
        name=h["name"].decode(),
        status=StepStatus(h["status"].decode()),
        output=_load_value(h.get("output")),
        error=_load_error(h.get("error")),
        attempts=int(h.get("attempts", b"0")),
        created_at=int(h["created_at"]),
        updated_at=int(h["updated_at"]),
        wake_at=_int(h, "wake_at"),
    )


def to_schedule(key: str, h: dict[str, bytes]) -> Schedule:
    """A schedule hash as a record."""
    return Schedule(
        key=key,
        workflow=h["workflow"].decode(),
        input=decode_stored(h["input"]),
        recurrence=msgspec.json.decode(h["recurrence"], type=Recurrence),
        next_run_at=int(h["next_run_at"]),
        created_at=int(h["created_at"]),
        updated_at=int(h["updated_at"]),
    )


def to_event(raw: bytes) -> EventRecord:
    """A buffered event, ``<delivered_at>:<payload>``, as a record."""
    at, _, payload = raw.partition(b":")
    return EventRecord(decode_stored(payload), int(at))
