"""Engine events: what hooks receive and what :meth:`Engine.events` yields.

Each event names its run and workflow and says when it happened, twice: ``at``, in
milliseconds since the epoch on the engine's clock (the clock that stamps stored
records), for showing and correlating; and ``monotonic``, :func:`time.monotonic` seconds,
for measuring the time between two events of one process. Events that end something
carry its ``duration`` in seconds (monotonic), ``None`` where this engine did not see
it begin. Outputs are the checkpointed values (what a replay would see), not the
objects a step returned.

One run *attempt* (a claim) begins with :class:`RunStarted` and ends with exactly one of
:class:`RunCompleted`, :class:`RunFailed`, :class:`RunSuspended`, :class:`RunCancelled`
(``executing=True``), :class:`LeaseLost` or :class:`RunInterrupted`. Within it, a step
that starts ends with :class:`StepCompleted` or :class:`StepFailed`, or is left
unfinished by the run's suspension or stop; :class:`RetryScheduled` marks each failed
attempt that will be retried. Steps whose checkpoint is replayed send nothing.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import msgspec

from reflow_core.types import ErrorInfo

__all__ = [
    "EngineEvent",
    "LeaseLost",
    "RetryScheduled",
    "RunCancelled",
    "RunCompleted",
    "RunFailed",
    "RunInterrupted",
    "RunStarted",
    "RunSuspended",
    "StepCompleted",
    "StepFailed",
    "StepSkipped",
    "StepStarted",
]


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class _Event(msgspec.Struct, frozen=True, kw_only=True):
    run_id: str
    workflow: str
    at: int = msgspec.field(default_factory=_wall_ms)
    """When it happened: milliseconds since the epoch on the engine's clock (the system
    clock unless the engine was given another)."""
    monotonic: float = msgspec.field(default_factory=time.monotonic)
    """When it happened on :func:`time.monotonic` (seconds): subtract two events' values
    for the time between them, immune to clock changes."""


class RunStarted(_Event, frozen=True, kw_only=True, tag="run_started"):
    """A worker claimed a run; ``attempt`` > 1 means it resumes after a crash or wake."""

    attempt: int
    """The run's claim count, this claim included."""
    recoveries: int = 0
    """How many claims took the run over from an expired lease (a crashed holder)."""
    claimed_at: int | None = None
    """When the store granted the claim (the store's clock, ms)."""
    claim_latency: float | None = None
    """Seconds between enqueueing the run and this claim, on its first claim (``None``
    after): how long work waited for a worker."""


class StepStarted(_Event, frozen=True, kw_only=True, tag="step_started"):
    """A step (or sleep, wait, parallel branch) begins executing in this claim."""

    step: str
    attempt: int = 1
    """The step's attempt about to run (more than 1 when earlier attempts failed)."""


class StepCompleted(_Event, frozen=True, kw_only=True, tag="step_completed"):
    """A step's result was checkpointed."""

    step: str
    output: Any
    attempts: int
    duration: float | None = None
    """Seconds from the step's start in this claim (its attempts here, or how long a
    sleep or wait lasted since it was first reached) to its checkpoint."""


class StepSkipped(_Event, frozen=True, kw_only=True, tag="step_skipped"):
    """A conditional step was skipped."""

    step: str


class StepFailed(_Event, frozen=True, kw_only=True, tag="step_failed"):
    """A step failed for good (its retries are spent, its error is not retried, its
    predicate raised, or a wait timed out without a default); the run fails next."""

    step: str
    error: ErrorInfo
    attempts: int
    duration: float | None = None
    """Seconds from the step's start in this claim to its failure."""


class RetryScheduled(_Event, frozen=True, kw_only=True, tag="retry_scheduled"):
    """An attempt of a step failed and its retry policy grants another after ``delay``."""

    step: str
    attempt: int
    """The attempt that failed."""
    error: ErrorInfo
    delay: float
    """Seconds until the next attempt."""
    retry_at: int | None = None
    """When the next attempt is due (the store's clock, ms) if the wait is left to
    storage (``durable``); ``None`` when this worker waits in place."""

    @property
    def durable(self) -> bool:
        """Whether the run is suspended in storage until the retry is due."""
        return self.retry_at is not None


class RunCompleted(_Event, frozen=True, kw_only=True, tag="run_completed"):
    """A run completed with ``output``."""

    output: Any
    attempt: int = 0
    duration: float | None = None
    """Seconds this claim took, from :class:`RunStarted` to now."""


class RunFailed(_Event, frozen=True, kw_only=True, tag="run_failed"):
    """A run failed at ``error.step``."""

    error: ErrorInfo
    attempt: int = 0
    duration: float | None = None
    """Seconds this claim took, from :class:`RunStarted` to now."""


SuspendReason = Literal["sleep", "wait", "retry"]
"""Why a run was suspended: a durable sleep, a wait for an event, a step's retry."""


class RunSuspended(_Event, frozen=True, kw_only=True, tag="run_suspended"):
    """A run was suspended in storage, its lease released, until ``wake_at`` or an event."""

    attempt: int
    reason: SuspendReason
    step: str
    """The sleep, wait or retried step it is suspended at."""
    wake_at: int | None = None
    """When it becomes claimable again (the store's clock, ms); ``None``: a wait with no
    deadline."""
    event: str | None = None
    """The event a waiting run waits for."""
    duration: float | None = None
    """Seconds this claim took, from :class:`RunStarted` to now."""


class RunCancelled(_Event, frozen=True, kw_only=True, tag="run_cancelled"):
    """A run was cancelled: by this engine's :meth:`~reflow_core.Engine.cancel` while no
    execution of it was here (``executing=False``), or while this engine executed it,
    wherever the cancel came from (``executing=True``: this claim ends here)."""

    executing: bool
    attempt: int | None = None
    """The claim that was stopped, when ``executing``."""
    step: str | None = None
    """The unit executing when it was stopped, if any."""
    duration: float | None = None
    """Seconds the stopped claim took, when ``executing``."""


class LeaseLost(_Event, frozen=True, kw_only=True, tag="lease_lost"):
    """This engine lost a run's lease (its heartbeat was refused, or its lease fence
    passed) and stopped executing it without writing; another worker takes it over."""

    attempt: int
    reason: str
    step: str | None = None
    """The unit executing when the lease was lost, if any."""
    duration: float | None = None
    """Seconds the claim lasted."""


InterruptReason = Literal["engine_stopped", "error"]
"""Why an execution stopped without an outcome: the engine stopped (the run was handed
back), or an error outside the run's steps (storage failing mid-run; the lease lapses)."""


class RunInterrupted(_Event, frozen=True, kw_only=True, tag="run_interrupted"):
    """This engine stopped executing a run without an outcome; another claim resumes it."""

    attempt: int
    reason: InterruptReason
    error: ErrorInfo | None = None
    """The error, when ``reason`` is ``"error"``."""
    step: str | None = None
    duration: float | None = None
    """Seconds the claim lasted."""


EngineEvent = (
    RunStarted
    | StepStarted
    | StepCompleted
    | StepSkipped
    | StepFailed
    | RetryScheduled
    | RunCompleted
    | RunFailed
    | RunSuspended
    | RunCancelled
    | LeaseLost
    | RunInterrupted
)
"""Any engine event."""
