"""The example adapter's tables: plain dicts in one :class:`Tables` per named store.

Everything here is called by :class:`~reflow_example_adapter.storage.ExampleStorage`
with the store's lock held; nothing here locks, awaits or reads a clock.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import msgspec
from reflow_core import RunStatus, Schedule, StepResult, StorageError, WorkflowRun, codec

__all__ = [
    "REQUEUEABLE",
    "Row",
    "Tables",
    "attach",
    "check_step",
    "claimable",
    "dec",
    "detach",
    "enc",
    "held",
    "pop_event",
    "put_step",
    "record",
]

Row = dict[str, Any]
"""A stored run: the fields of a WorkflowRun (input and output as codec bytes) plus
``lease_id``, the lease that holds it while it is running."""

REQUEUEABLE = (RunStatus.FAILED, RunStatus.CANCELLED)
_SUSPENDED = (RunStatus.SLEEPING, RunStatus.WAITING)


def enc(value: Any) -> bytes:
    """Encode with the core codec; raises ``SerializationError``, so call before any write."""
    return codec.encode(value)


def dec(data: bytes) -> Any:
    """Decode codec bytes: a fresh value, equal to and of the same type as the one stored."""
    return codec.decode(data)


@dataclass
class Tables:
    """One named store: every table, and the lock that makes each adapter method atomic."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    handles: int = 0
    runs: dict[str, Row] = field(default_factory=dict)
    keys: dict[tuple[str, str], str] = field(default_factory=dict)
    """(workflow, idempotency key) -> run id."""
    steps: dict[str, dict[str, tuple[StepResult, bytes]]] = field(default_factory=dict)
    """Run id -> step name -> (the row without its output, the encoded output)."""
    step_ids: dict[str, tuple[str, str]] = field(default_factory=dict)
    events: dict[tuple[str, str], deque[tuple[bytes, int]]] = field(default_factory=dict)
    """(run id, event name) -> buffered (payload bytes, delivered_at), oldest first."""
    schedules: dict[str, tuple[Schedule, bytes]] = field(default_factory=dict)


_STORES: dict[str, Tables] = {}
_STORES_LOCK = threading.Lock()


def attach(name: str) -> Tables:
    """The store called ``name``, created on first use; counts one more handle."""
    with _STORES_LOCK:
        tables = _STORES.setdefault(name, Tables())
        tables.handles += 1
        return tables


def detach(name: str, tables: Tables) -> None:
    """One handle fewer; the store is dropped with its last handle (it is not durable)."""
    with _STORES_LOCK:
        tables.handles -= 1
        if tables.handles == 0 and _STORES.get(name) is tables:
            del _STORES[name]


def record(row: Row) -> WorkflowRun:
    """The public record of a stored run (values decoded, lease left out)."""
    fields = {key: value for key, value in row.items() if key != "lease_id"}
    fields.update(input=dec(row["input"]), output=dec(row["output"]))
    return WorkflowRun(**fields)


def held(tables: Tables, run_id: str, lease_id: str) -> Row | None:
    """The run if it is running under ``lease_id`` (the lease check), else ``None``."""
    row = tables.runs.get(run_id)
    if row is None or row["status"] != RunStatus.RUNNING or row["lease_id"] != lease_id:
        return None
    return row


def claimable(tables: Tables, row: Row, now: int, stale_before: int | None) -> bool:
    """Whether ``claim_next_run(..., stale_before)`` at ``now`` may take ``row``."""
    status = row["status"]
    if status == RunStatus.PENDING:
        return True
    if status == RunStatus.RUNNING:
        beat = row["heartbeat_at"]
        return stale_before is not None and beat is not None and beat < stale_before
    if status not in _SUSPENDED:
        return False
    if row["wake_at"] is not None and row["wake_at"] <= now:
        return True
    waiting_for = row["waiting_for"]
    return status == RunStatus.WAITING and bool(tables.events.get((row["id"], waiting_for)))


def check_step(tables: Tables, step: StepResult, operation: str) -> int:
    """The ``created_at`` an upsert of ``step`` keeps; ``StorageError`` on an id clash."""
    owner = tables.step_ids.get(step.id)
    if owner is not None and owner != (step.run_id, step.name):
        raise StorageError(operation, f"step id {step.id!r} already names step {owner!r}")
    existing = tables.steps.get(step.run_id, {}).get(step.name)
    if existing is None:
        return step.created_at
    if existing[0].id != step.id:
        raise StorageError(operation, f"step {step.name!r} already has id {existing[0].id!r}")
    return existing[0].created_at


def put_step(tables: Tables, step: StepResult, created_at: int, output: bytes) -> None:
    """Upsert a step row (after :func:`check_step` said it may be written)."""
    row = msgspec.structs.replace(step, output=None, created_at=created_at)
    tables.steps.setdefault(step.run_id, {})[step.name] = (row, output)
    tables.step_ids[step.id] = (step.run_id, step.name)


def pop_event(tables: Tables, run_id: str, event_name: str) -> tuple[bytes, int] | None:
    """Remove and return the oldest buffered event of that name, or ``None``."""
    buffered = tables.events.get((run_id, event_name))
    if not buffered:
        return None
    event = buffered.popleft()
    if not buffered:
        del tables.events[run_id, event_name]
    return event
