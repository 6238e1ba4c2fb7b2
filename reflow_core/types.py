"""The records that cross the storage contract, and the statuses they carry.

Records are frozen ``msgspec.Struct`` values: cheap to build, compare and copy.
Times are integer milliseconds since the Unix epoch. Value fields (``input``,
``output``, payloads) hold plain Python values; adapters persist them through
:mod:`reflow_core.codec` and hand back equal values of the same types.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec

__all__ = [
    "ClaimedRun",
    "ClaimedSchedule",
    "ConsumeResult",
    "CreateRunResult",
    "DamagedValue",
    "ErrorInfo",
    "EventRecord",
    "LeaseHolder",
    "Recurrence",
    "RunFilter",
    "RunStatus",
    "Schedule",
    "StepResult",
    "StepStatus",
    "WorkflowRun",
]


class RunStatus(enum.StrEnum):
    """Lifecycle of a run."""

    PENDING = "pending"
    """Waiting to be claimed by any worker."""
    RUNNING = "running"
    """Claimed: a worker holds its lease and executes it."""
    SLEEPING = "sleeping"
    """Suspended with no lease until ``wake_at``."""
    WAITING = "waiting"
    """Suspended with no lease until an event arrives or ``wake_at`` (its deadline) passes."""
    COMPLETED = "completed"
    """Finished; ``output`` holds the final value. Terminal."""
    FAILED = "failed"
    """A step failed for good; ``error`` says why. Terminal until resumed."""
    CANCELLED = "cancelled"
    """Cancelled by an operator. Terminal until resumed."""

    @property
    def is_terminal(self) -> bool:
        """True for completed, failed and cancelled."""
        return self in _TERMINAL


_TERMINAL = frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED})


class StepStatus(enum.StrEnum):
    """State of one step row (one per named unit of a run)."""

    RUNNING = "running"
    """An attempt is in progress (written only by engines that record attempts)."""
    COMPLETED = "completed"
    """Done; ``output`` is its checkpointed result, never recomputed."""
    COMPLETED_EARLY = "completed-early"
    """Done and ended the whole run early with ``output`` as the run's output."""
    SKIPPED = "skipped"
    """Its condition was false; the decision is final."""
    SLEEPING = "sleeping"
    """A durable sleep in progress until ``wake_at``."""
    WAITING = "waiting"
    """Waiting for an event until ``wake_at`` (``None``: no deadline)."""
    FAILED = "failed"
    """Failed after its last attempt; ``error`` says why."""

    @property
    def is_done(self) -> bool:
        """True when the step's result is final and must be replayed, not re-executed."""
        return self in _STEP_DONE


_STEP_DONE = frozenset({StepStatus.COMPLETED, StepStatus.COMPLETED_EARLY, StepStatus.SKIPPED})


class ErrorInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A failure as stored: enough to diagnose without the original exception."""

    type: str
    """Qualified exception type, e.g. ``"httpx.ConnectError"``."""
    message: str
    code: str | None = None
    """The ``ReflowError.code`` when the error was one of Reflow's."""
    traceback: str | None = None
    step: str | None = None
    """The step that failed, on a run's error."""


class LeaseHolder(msgspec.Struct, frozen=True, kw_only=True):
    """Who holds a run's lease: stored with the claim so an operator can find the worker."""

    worker: str
    """The holding engine's id, unique per engine instance (``Engine.worker_id``)."""
    host: str
    """Host name of the holder's machine."""
    pid: int
    """Process id of the holder on that host."""


class WorkflowRun(msgspec.Struct, frozen=True, kw_only=True):
    """One execution of a workflow."""

    id: str
    workflow: str
    input: Any
    status: RunStatus
    created_at: int
    updated_at: int
    idempotency_key: str | None = None
    output: Any = None
    """Final output once completed (the last unit's output, or an early completion's value)."""
    error: ErrorInfo | None = None
    """Why the run failed, once failed."""
    wake_at: int | None = None
    """When a sleeping or waiting run becomes claimable again."""
    waiting_for: str | None = None
    """Event name a waiting run waits for."""
    heartbeat_at: int | None = None
    """Last claim or heartbeat (the store's clock). Kept after the lease ends, so an
    operator can tell how long ago the run was last alive."""
    attempt: int = 0
    """How many times the run was claimed (1 on first execution)."""
    recoveries: int = 0
    """How many claims took the run over from a holder whose lease had expired (a crash,
    a hang, a lost lease). Reset to 0 by ``requeue_run``."""
    claimed_at: int | None = None
    """When the current holder claimed the run (the store's clock); only while running."""
    lease_ms: int | None = None
    """Lease length granted to the current holder at claim; only while running."""
    lease_expires_at: int | None = None
    """When the current lease expires unless renewed (the store's clock): the claim time
    or the last heartbeat plus ``lease_ms``. Only while running."""
    holder: LeaseHolder | None = None
    """Who holds the lease, as given to the claim; only while running."""


class CreateRunResult(msgspec.Struct, frozen=True):
    """Answer of ``create_run``: the stored run and whether this call created it."""

    run: WorkflowRun
    created: bool


class ClaimedRun(msgspec.Struct, frozen=True):
    """A run claimed by this worker, with the lease every later write must present."""

    run: WorkflowRun
    lease_id: str


class StepResult(msgspec.Struct, frozen=True, kw_only=True):
    """The checkpoint of one named unit of a run.

    ``id`` is the row identity (upserts key on it); ``(run_id, name)`` is unique too.
    The engine derives ``id`` from ``(run_id, name)`` so a re-executed step updates its row.
    """

    id: str
    run_id: str
    name: str
    status: StepStatus
    output: Any = None
    error: ErrorInfo | None = None
    attempts: int = 0
    created_at: int
    updated_at: int
    wake_at: int | None = None
    """Deadline of a sleeping or waiting step; stored so a reclaim never restarts the clock."""


class DamagedValue(msgspec.Struct, frozen=True, kw_only=True):
    """Stands in for a stored value that cannot be decoded (a damaged row, or one written
    by a newer version): adapters return it in the value's place instead of raising, so
    one bad row never blocks a claim or a listing. The engine fails the run that holds
    it, naming the value; everything else carries on.
    """

    error: str
    """Why decoding failed."""
    stored: str
    """The start of the stored text, for a human to look at."""


class EventRecord(msgspec.Struct, frozen=True):
    """An event taken from a run's buffer.

    A record rather than the bare payload, so that a ``None`` payload is distinguishable
    from "no event buffered".
    """

    payload: Any
    delivered_at: int


class ConsumeResult(msgspec.Struct, frozen=True, kw_only=True):
    """Answer of ``consume_event``: whether the lease was held, and what was consumed.

    Three outcomes, each with nothing half-done: ``held=False`` (lease not held; nothing
    read or written), ``held=True, event=None`` (nothing buffered; nothing written), and
    ``held=True`` with an ``event`` (consumed and checkpointed together). A record
    rather than ``EventRecord | None`` so that a lost lease is never mistaken for "no
    event yet", which would suspend a run this worker no longer owns.
    """

    held: bool
    event: EventRecord | None = None


class RunFilter(msgspec.Struct, frozen=True, kw_only=True):
    """Selection for ``list_runs``: newest first by ``(created_at, id)``.

    Keyset paging: pass the last row's ``created_at`` as ``before`` and its ``id`` as
    ``before_id`` to get the next page exactly (no row skipped or repeated).
    """

    status: RunStatus | None = None
    workflow: str | None = None
    before: int | None = None
    before_id: str | None = None
    limit: int = 100


class Recurrence(msgspec.Struct, frozen=True, kw_only=True):
    """How often a schedule fires: every ``every_ms`` milliseconds, or on a cron expression."""

    every_ms: int | None = None
    cron: str | None = None
    timezone: str = "UTC"
    """IANA zone the cron expression is evaluated in."""
    catch_up: bool = False
    """Fire every missed occurrence after downtime instead of skipping to the next one."""


class Schedule(msgspec.Struct, frozen=True, kw_only=True):
    """A durable recurring enqueue of ``workflow`` with ``input``."""

    key: str
    workflow: str
    input: Any
    recurrence: Recurrence
    next_run_at: int
    created_at: int
    updated_at: int


class ClaimedSchedule(msgspec.Struct, frozen=True):
    """A due occurrence claimed by this worker: ``slot`` is the occurrence's time."""

    schedule: Schedule
    slot: int
