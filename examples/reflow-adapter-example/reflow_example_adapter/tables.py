"""The example adapter's tables: plain dicts in one :class:`Tables` per named store.

Everything here is called by :class:`~reflow_example_adapter.storage.ExampleStorage`
with the store's lock held; nothing here locks, awaits or reads a clock (the storage
reads the store's clock once per method and passes ``now`` in).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import msgspec
from reflow_core import (
    RunStatus,
    Schedule,
    StepResult,
    StepStatus,
    StorageError,
    WorkflowRun,
    codec,
)

__all__ = [
    "LEASE_CLEARED",
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
    "is_final",
    "pop_event",
    "put_step",
    "record",
]

Row = dict[str, Any]
"""A stored run: the fields of a WorkflowRun (input and output as codec bytes) plus
``lease_id``, the lease that holds it while it is running."""

REQUEUEABLE = (RunStatus.FAILED, RunStatus.CANCELLED)
_SUSPENDED = (RunStatus.SLEEPING, RunStatus.WAITING)

LEASE_CLEARED: dict[str, Any] = dict.fromkeys(
    ("lease_id", "claimed_at", "lease_ms", "lease_expires_at", "holder")
)
"""The lease fields, all ``None``: a claim sets them, every write leaving running clears
them (``heartbeat_at`` is not among them: it keeps its last value)."""


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
    event_keys: dict[str, set[str]] = field(default_factory=dict)
    """Run id -> every ``deliver_event`` key stored for it (buffered or consumed since)."""
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


def claimable(row: Row, now: int) -> bool:
    """Whether ``claim_next_run`` at the store's ``now`` may take ``row``: pending, a lease
    that expired (``lease_expires_at <= now``), or a sleeper or waiter that is due."""
    status = row["status"]
    if status == RunStatus.PENDING:
        return True
    if status == RunStatus.RUNNING:
        expires = row["lease_expires_at"]
        return expires is not None and expires <= now
    return status in _SUSPENDED and row["wake_at"] is not None and row["wake_at"] <= now


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


def is_final(tables: Tables, step: StepResult) -> bool:
    """Whether a final row (completed, completed-early, skipped) already stands for
    ``step``: checkpoints are written once, so such a row is never written again."""
    existing = tables.steps.get(step.run_id, {}).get(step.name)
    return (
        existing is not None
        and existing[0].id == step.id
        and StepStatus(existing[0].status).is_done
    )


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
