"""Why a run is where it is, and what to do, in plain words (``reflow runs explain``).

:func:`explain` is a pure function of the stored records and the store's "now": no I/O,
no clock of its own, so each situation is decided exactly as the store decides it (a
lease is expired when ``lease_expires_at <= now`` on the store's clock) and every
sentence can be tested from records alone. The caller reads the records and counts the
older pending runs of the workflow (:attr:`Facts.older_pending`).

One situation per run, named by a stable code (:class:`Situation`); the explanation is
one sentence for where the run is and one for what to do.

A stored value that cannot be decoded (the run's input, or a step's checkpointed output)
decides an unfinished run's fate whatever its status says: the engine fails it with
``DAMAGED_VALUE`` at its next claim. Such a run is :attr:`Situation.DAMAGED`; a finished
one keeps its situation, with the damage in its details and an action that does not
send the operator to a resume or retry bound to fail again.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from reflow_cli.text import age, when
from reflow_cli.values import Damage, damaged_values
from reflow_core.types import RunStatus, StepResult, StepStatus, WorkflowRun

__all__ = ["Explanation", "Facts", "Situation", "explain"]

STALLED_PENDING_MS = 10_000
"""A pending run first in line for this long was not claimed by any worker: past it, the
explanation asks whether a worker is running (a live worker polls every second)."""


class Situation(enum.StrEnum):
    """The one situation a run is in (the ``situation`` field of ``--json``)."""

    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"
    PENDING_QUEUED = "pending-queued"
    """Pending behind older pending runs of its workflow."""
    PENDING_NEXT = "pending-next"
    """Pending, first in line, recently enqueued or released."""
    PENDING_UNCLAIMED = "pending-unclaimed"
    """Pending, first in line, and no worker has claimed it for a while."""
    RUNNING = "running"
    """Held by a worker whose lease is live."""
    LEASE_EXPIRED = "lease-expired"
    """Running, but its holder stopped renewing and nobody has taken it over."""
    SLEEPING = "sleeping"
    SLEEP_OVERDUE = "sleep-overdue"
    WAITING = "waiting"
    WAIT_OVERDUE = "wait-overdue"
    DAMAGED = "damaged"
    """Unfinished, but its input or a checkpoint cannot be decoded: the next claim fails it."""


@dataclass(frozen=True, slots=True)
class Facts:
    """What the caller read from the store for one run."""

    run: WorkflowRun
    steps: list[StepResult]
    now: int
    """The store's current time (epoch ms), from ``StorageAdapter.now()``."""
    older_pending: int = 0
    """Pending runs of the same workflow created before this one (claims go oldest first)."""


@dataclass(frozen=True, slots=True)
class Explanation:
    """Where the run is (``state``) and what to do (``action``), one sentence each."""

    situation: Situation
    state: str
    action: str
    details: list[str] = field(default_factory=list)
    """Further facts worth a line (recoveries so far, the wait's deadline)."""

    def sentences(self) -> list[str]:
        """Every sentence, in reading order."""
        return [self.state, *self.details, self.action]


def _failed_step(facts: Facts) -> str | None:
    if facts.run.error is not None and facts.run.error.step:
        return facts.run.error.step
    failed = [s for s in facts.steps if s.status is StepStatus.FAILED]
    return failed[-1].name if failed else None


def _ago(facts: Facts, ms: int) -> str:
    return f"{age(facts.now - ms)} ago"


def _no_worker_question(workflow: str) -> str:
    return (
        f"Is a worker running with workflow {workflow!r} registered? Start one with "
        f"'reflow worker MODULE:ATTR' naming an app that registers it."
    )


def _recoveries(run: WorkflowRun) -> list[str]:
    if not run.recoveries:
        return []
    times = "once" if run.recoveries == 1 else f"{run.recoveries} times"
    return [f"It was taken over from an expired lease {times} (a worker crashed or hung)."]


def _cannot_decode(damage: Damage) -> str:
    return f"{damage.what} cannot be decoded ({damage.marker.error})"


def _damage_action(run: WorkflowRun, damaged: list[Damage], verb: str) -> str:
    """What to do about a run holding ``damaged`` values; ``verb`` says how to stop it
    first (empty for a run that has ended)."""
    rid = run.id
    look = f"'reflow runs show {rid}' prints the start of the stored text."
    if any(d.value == "input" and d.step is None for d in damaged):
        return (
            f"{verb}enqueue a new run with a correct input from your application "
            f"(engine.enqueue); {look}"
        )
    return (
        f"{verb}'reflow runs retry {rid}' starts a new run with the same input from the "
        f"first step; {look}"
    )


def _explain_damaged(facts: Facts, damaged: list[Damage]) -> Explanation:
    """An unfinished run holding a value that cannot be decoded."""
    run, rid = facts.run, facts.run.id
    first, *others = damaged
    if run.status is RunStatus.RUNNING:
        fate = (
            "if it is claimed again (after a sleep, a wait or a lost lease), that claim "
            "fails it with DAMAGED_VALUE"
        )
    else:
        fate = "the next worker to claim it fails it with DAMAGED_VALUE"
    return Explanation(
        Situation.DAMAGED,
        f"Run {rid} of workflow {run.workflow!r} is {run.status.value}, but "
        f"{_cannot_decode(first)}: {fate}; other runs are unaffected.",
        _damage_action(
            run,
            damaged,
            f"Cancel it with 'reflow runs cancel {rid}' (resuming it afterwards "
            "would keep the damaged value), then ",
        ),
        [f"Also, {_cannot_decode(d)}." for d in others],
    )


def explain(facts: Facts) -> Explanation:
    """The explanation of ``facts.run``; see :class:`Situation` for the cases."""
    run, now = facts.run, facts.now
    rid, wf = run.id, run.workflow
    damaged = damaged_values(run, facts.steps)
    still = [f"{(text := _cannot_decode(d))[:1].upper()}{text[1:]}." for d in damaged]
    # What a claim would read (the engine fails the run on these); a run's own output is
    # not read back, and resuming clears it.
    blocking = [d for d in damaged if d.step is not None or d.value == "input"]
    if run.status is RunStatus.COMPLETED:
        done = sum(1 for s in facts.steps if s.status.is_done)
        return Explanation(
            Situation.COMPLETED,
            f"Run {rid} of workflow {wf!r} completed at {when(run.updated_at)} "
            f"({_ago(facts, run.updated_at)}) with {done} step(s) checkpointed.",
            "Nothing to do; 'reflow runs purge' removes it once it is older than your "
            "retention period."
            + (f" 'reflow runs show {rid}' prints the start of the stored text." if still else ""),
            still,
        )
    if run.status is RunStatus.CANCELLED:
        return Explanation(
            Situation.CANCELLED,
            f"Run {rid} of workflow {wf!r} was cancelled at {when(run.updated_at)} "
            f"({_ago(facts, run.updated_at)}).",
            _damage_action(run, blocking, "Resuming it would fail it with DAMAGED_VALUE; ")
            if blocking
            else f"To continue it where it stopped, keeping completed steps: reflow runs "
            f"resume {rid}; to start over as a new run: reflow runs retry {rid}.",
            still,
        )
    if run.status is RunStatus.FAILED:
        step = _failed_step(facts)
        at = f" at step {step!r}" if step else ""
        reason = f": {run.error.type}: {run.error.message}" if run.error else ""
        recovered = "recovery" if run.recoveries == 1 else "recoveries"
        return Explanation(
            Situation.FAILED,
            f"Run {rid} of workflow {wf!r} failed{at} after {run.recoveries} {recovered} "
            f"and {run.attempt} claim(s), at {when(run.updated_at)}{reason}.",
            _damage_action(run, blocking, "Resuming it fails again; ")
            if blocking
            else f"Fix the cause (see 'reflow runs show {rid}' for the traceback), then "
            f"'reflow runs resume {rid}' re-runs{at or ' it'} keeping completed steps, or "
            f"'reflow runs retry {rid}' starts a new run from the first step.",
            still,
        )
    if blocking:
        return _explain_damaged(facts, blocking)
    if run.status is RunStatus.PENDING:
        if facts.older_pending:
            return Explanation(
                Situation.PENDING_QUEUED,
                f"Run {rid} is pending since {when(run.updated_at)} behind "
                f"{facts.older_pending} older pending run(s) of workflow {wf!r}; workers "
                f"claim the oldest first.",
                "It starts when those are claimed; to go faster, run more workers or a "
                "higher --concurrency for this workflow.",
            )
        waited = now - run.updated_at
        if waited >= STALLED_PENDING_MS:
            return Explanation(
                Situation.PENDING_UNCLAIMED,
                f"Run {rid} is pending and first in line, but no worker has claimed it "
                f"since {when(run.updated_at)} ({age(waited)} ago).",
                _no_worker_question(wf),
            )
        return Explanation(
            Situation.PENDING_NEXT,
            f"Run {rid} is pending and first in line of workflow {wf!r}, for "
            f"{age(now - run.updated_at)} so far.",
            "A worker with this workflow registered claims it within its poll interval; "
            "nothing to do yet.",
        )
    if run.status is RunStatus.RUNNING:
        expires = run.lease_expires_at
        if expires is not None and expires <= now:
            return Explanation(
                Situation.LEASE_EXPIRED,
                f"Run {rid} is marked running but its lease expired {age(now - expires)} "
                f"ago and no worker for workflow {wf!r} has claimed it since.",
                _no_worker_question(wf)
                + " Any live worker for it takes it over at its next claim.",
                _recoveries(run),
            )
        holder = run.holder
        who = (
            f"worker {holder.worker} on host {holder.host} (pid {holder.pid})"
            if holder
            else "a worker that did not name itself"
        )
        beat = (
            f", last heartbeat {age(now - run.heartbeat_at)} ago"
            if run.heartbeat_at is not None
            else ""
        )
        left = f", lease valid for {age(expires - now)} more" if expires is not None else ""
        current = [s.name for s in facts.steps if not s.status.is_done]
        on = f" Its latest unfinished step is {current[-1]!r}." if current else ""
        return Explanation(
            Situation.RUNNING,
            f"Run {rid} is held by {who}{beat}{left}.",
            "Nothing to do while the heartbeats continue; 'reflow runs cancel "
            f"{rid}' stops it at the worker's next heartbeat.",
            ([on.strip()] if on else []) + _recoveries(run),
        )
    wake = run.wake_at
    if run.status is RunStatus.SLEEPING:
        if wake is not None and wake <= now:
            return Explanation(
                Situation.SLEEP_OVERDUE,
                f"Run {rid} was due to wake at {when(wake)} ({age(now - wake)} ago) and no "
                f"worker for workflow {wf!r} has claimed it since.",
                _no_worker_question(wf),
            )
        until = f"until {when(wake)} (in {age(wake - now)})" if wake is not None else ""
        return Explanation(
            Situation.SLEEPING,
            f"Run {rid} is sleeping {until}, as its workflow asked.".replace("  ", " "),
            "Nothing to do; a worker for this workflow claims it when it is due.",
        )
    # waiting
    event = run.waiting_for or "?"
    if wake is not None and wake <= now:
        return Explanation(
            Situation.WAIT_OVERDUE,
            f"Run {rid} waited for event {event!r} until its deadline {when(wake)} "
            f"({age(now - wake)} ago), and no worker for workflow {wf!r} has claimed it "
            f"since to time the wait out.",
            _no_worker_question(wf),
        )
    deadline = (
        [f"It gives up at {when(wake)} (in {age(wake - now)}) if no such event arrives."]
        if wake is not None
        else ["The wait has no deadline."]
    )
    # The contract guarantees "none buffered": wait_run turns a run with a buffered event
    # of that name pending, and deliver_event wakes a waiting run.
    return Explanation(
        Situation.WAITING,
        f"Run {rid} is waiting for event {event!r} since {when(run.updated_at)} "
        f"({_ago(facts, run.updated_at)}) with none buffered.",
        f"Send it from your application (engine.send_event) or with: reflow events send "
        f"{rid} {event} --payload JSON",
        deadline,
    )
