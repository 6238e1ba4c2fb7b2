"""Deliberately broken storage adapters: each breaks exactly one rule of the contract.

Every class subclasses the intact :class:`~reflow_adapters.memory.MemoryStorage` and
changes one method (or one detail of one method) the way a real adapter gets it wrong:
a missing ``WHERE lease_id = ?``, a ``<=`` for a ``<``, a JSON encoder that writes NaN
as ``null``, an ``await`` between a check and its write. ``test_broken_adapters.py``
runs the conformance kit on each and asserts that the named cases catch it, so this
table doubles as the documentation of which case guards which rule.

Atomicity bugs are made observable on a single event loop by an ``await
asyncio.sleep(0)`` between the check and the write: concurrent coroutines then
interleave exactly where threads or processes would on a real database.

These reach into ``MemoryStorage`` internals (``_runs``, ``_move``, ``_held`` ...) on
purpose: they are test doubles, kept as small as the bug they model.
"""

from __future__ import annotations

import asyncio
import math
import sqlite3
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import msgspec

from reflow_adapters.memory import MemoryStorage
from reflow_adapters.memory.claims import claimable
from reflow_core import codec
from reflow_core.types import (
    ClaimedRun,
    ClaimedSchedule,
    CreateRunResult,
    ErrorInfo,
    EventRecord,
    RunFilter,
    RunStatus,
    Schedule,
    StepResult,
    WorkflowRun,
)

_TERMINAL = frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED})


def _decoded(data: bytes | None) -> Any:
    return None if data is None else codec.decode(data)


# -- atomicity --------------------------------------------------------------------------


class NonAtomicClaim(MemoryStorage):
    """Claim = SELECT the oldest claimable run, then UPDATE it, with no lock in between."""

    async def claim_next_run(
        self, workflow_names: Collection[str], stale_before: int | None = None
    ) -> ClaimedRun | None:
        self._check("claim_next_run")
        now, names = self._clock(), set(workflow_names)
        candidates = [
            row
            for row in self._runs.values()
            if row.workflow in names and claimable(row, now, stale_before)
        ]
        if not candidates:
            return None
        row = min(candidates, key=lambda r: (r.created_at, r.id))
        await asyncio.sleep(0)  # the bug: another claimer runs between the check and the write
        lease_id = str(uuid.uuid4())
        row.heartbeat_at = now
        row.attempt += 1
        self._move(row, RunStatus.RUNNING, now, lease_id=lease_id)
        return ClaimedRun(self._record(row), lease_id)


class NonAtomicFencedSave(MemoryStorage):
    """save_step_result checks the lease, then writes the row in a second statement."""

    async def save_step_result(self, result: StepResult, lease_id: str | None = None) -> bool:
        if lease_id is not None and self._held(result.run_id, lease_id) is None:
            return False
        await asyncio.sleep(0)  # the bug: a takeover can happen between check and write
        return await super().save_step_result(result, None)


class NonAtomicConditionalCancel(MemoryStorage):
    """update_run_status(expected=...) reads the status, then writes in a second statement."""

    async def update_run_status(
        self,
        run_id: str,
        status: RunStatus,
        *,
        expected: Collection[RunStatus] | None = None,
    ) -> bool:
        row = self._runs.get(run_id)
        if row is None or (expected is not None and row.status not in expected):
            return False
        await asyncio.sleep(0)  # the bug: the run may complete between the check and the write
        return await super().update_run_status(run_id, status)


# -- leases -----------------------------------------------------------------------------


class LeaseIgnoredOnSave(MemoryStorage):
    """save_step_result forgets ``AND lease_id = ?``: a worker that lost its lease still writes."""

    async def save_step_result(self, result: StepResult, lease_id: str | None = None) -> bool:
        return await super().save_step_result(result, None)


class HeartbeatTrueAfterTakeover(MemoryStorage):
    """heartbeat_run answers "is the run running?" instead of "is my lease held?"."""

    async def heartbeat_run(self, run_id: str, lease_id: str) -> bool:
        held = await super().heartbeat_run(run_id, lease_id)
        row = self._runs.get(run_id)
        return held or (row is not None and row.status is RunStatus.RUNNING)


class TerminalKeepsLease(MemoryStorage):
    """Completing or failing keeps lease_id, and the lease check looks only at lease_id."""

    def _held(self, run_id: str, lease_id: str) -> Any:
        row = self._runs.get(run_id)
        return row if row is not None and row.lease_id == lease_id else None

    async def update_claimed_run_status(
        self,
        run_id: str,
        lease_id: str,
        status: RunStatus,
        *,
        output: Any = None,
        error: ErrorInfo | None = None,
    ) -> bool:
        ok = await super().update_claimed_run_status(
            run_id, lease_id, status, output=output, error=error
        )
        if ok and RunStatus(status) in _TERMINAL:
            self._runs[run_id].lease_id = lease_id  # the bug: not cleared on a final status
        return ok


# -- claims -----------------------------------------------------------------------------


class SleepingClaimableEarly(MemoryStorage):
    """Treats every sleeping run as due: the ``wake_at <= now`` condition is missing."""

    async def claim_next_run(
        self, workflow_names: Collection[str], stale_before: int | None = None
    ) -> ClaimedRun | None:
        now, names = self._clock(), set(workflow_names)
        for row in self._runs.values():
            sleeping = row.status is RunStatus.SLEEPING and row.workflow in names
            if sleeping and row.wake_at is not None and row.wake_at > now:
                row.wake_at = now  # the bug: due at once, whatever wake_at said
                self._claims.file(row)
        return await super().claim_next_run(workflow_names, stale_before)


class NeverReclaimsStale(MemoryStorage):
    """Ignores ``stale_before``: a run whose worker died is never taken over."""

    async def claim_next_run(
        self, workflow_names: Collection[str], stale_before: int | None = None
    ) -> ClaimedRun | None:
        return await super().claim_next_run(workflow_names, None)


class ReclaimsAtStaleBoundary(MemoryStorage):
    """``heartbeat_at <= stale_before`` instead of ``<``: a live run is stolen at the edge."""

    async def claim_next_run(
        self, workflow_names: Collection[str], stale_before: int | None = None
    ) -> ClaimedRun | None:
        edge = None if stale_before is None else stale_before + 1
        return await super().claim_next_run(workflow_names, edge)


# -- runs, status, requeue ---------------------------------------------------------------


class IdempotencyKeyIgnored(MemoryStorage):
    """create_run stores the key but never looks it up: every enqueue makes a new run."""

    async def create_run(self, run: WorkflowRun) -> CreateRunResult:
        self._keys.clear()  # the bug: the (workflow, key) index is never consulted
        return await super().create_run(run)


class CancelOverwritesCompleted(MemoryStorage):
    """update_run_status drops ``expected``: a late cancel overwrites a completed run."""

    async def update_run_status(
        self,
        run_id: str,
        status: RunStatus,
        *,
        expected: Collection[RunStatus] | None = None,
    ) -> bool:
        return await super().update_run_status(run_id, status)


class RequeueDropsCompletedSteps(MemoryStorage):
    """requeue_run deletes every step row, so completed work runs again."""

    async def requeue_run(self, run_id: str) -> bool:
        ok = await super().requeue_run(run_id)
        if ok:
            for step, _ in self._steps.pop(run_id, {}).values():
                del self._step_ids[step.id]
        return ok


# -- listing ----------------------------------------------------------------------------


class ListsOldestFirst(MemoryStorage):
    """list_runs sorts ``ORDER BY created_at, id`` (ascending) instead of newest first."""

    async def list_runs(self, filter: RunFilter) -> list[WorkflowRun]:
        return list(reversed(await super().list_runs(filter)))


class KeysetDropsTies(MemoryStorage):
    """Pages with ``created_at < before`` only: rows sharing the boundary millisecond vanish."""

    async def list_runs(self, filter: RunFilter) -> list[WorkflowRun]:
        return await super().list_runs(msgspec.structs.replace(filter, before_id=None))


# -- steps ------------------------------------------------------------------------------


class SaveOverwritesCreatedAt(MemoryStorage):
    """The upsert's ``ON CONFLICT DO UPDATE`` also sets created_at."""

    async def save_step_result(self, result: StepResult, lease_id: str | None = None) -> bool:
        ok = await super().save_step_result(result, lease_id)
        if ok:
            steps = self._steps[result.run_id]
            row, data = steps[result.name]
            steps[result.name] = (msgspec.structs.replace(row, created_at=result.created_at), data)
        return ok


class StepsInInsertionOrder(MemoryStorage):
    """get_step_results has no ``ORDER BY``: rows come back in insertion order."""

    async def get_step_results(self, run_id: str) -> list[StepResult]:
        return [
            msgspec.structs.replace(step, output=_decoded(data))
            for step, data in self._steps.get(run_id, {}).values()
        ]


class DriverErrorLeaks(MemoryStorage):
    """A unique-constraint violation escapes as the driver's own exception, untranslated."""

    async def save_step_result(self, result: StepResult, lease_id: str | None = None) -> bool:
        existing = self._steps.get(result.run_id, {}).get(result.name)
        if existing is not None and existing[0].id != result.id:
            raise sqlite3.IntegrityError("UNIQUE constraint failed: steps.run_id, steps.name")
        return await super().save_step_result(result, lease_id)


# -- values -----------------------------------------------------------------------------


def _nan_to_null(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_nan_to_null(item) for item in value]
    if isinstance(value, dict):
        return {key: _nan_to_null(item) for key, item in value.items()}
    return value


def _tuples_to_lists(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_tuples_to_lists(item) for item in value]
    if isinstance(value, dict):
        return {key: _tuples_to_lists(item) for key, item in value.items()}
    return value


class NaNStoredAsNull(MemoryStorage):
    """Step outputs go through a JSON encoder that writes NaN and infinities as ``null``."""

    async def save_step_result(self, result: StepResult, lease_id: str | None = None) -> bool:
        lossy = msgspec.structs.replace(result, output=_nan_to_null(result.output))
        return await super().save_step_result(lossy, lease_id)


class TupleComesBackAsList(MemoryStorage):
    """Run input goes through a lossy encoder (``json.dumps``-style): a tuple becomes a list."""

    async def create_run(self, run: WorkflowRun) -> CreateRunResult:
        lossy = msgspec.structs.replace(run, input=_tuples_to_lists(run.input))
        return await super().create_run(lossy)


class RejectedEventWakesRun(MemoryStorage):
    """deliver_event wakes the waiting run *before* encoding the payload, so a rejected
    payload still leaves the run woken (storage changed by a failed call)."""

    async def deliver_event(self, run_id: str, event_name: str, payload: Any) -> bool:
        row = self._runs.get(run_id)
        if row is not None and row.status is RunStatus.WAITING and row.waiting_for == event_name:
            self._move(row, RunStatus.PENDING, self._clock())
        return await super().deliver_event(run_id, event_name, payload)


# -- events -----------------------------------------------------------------------------


class EventConsumedTwice(MemoryStorage):
    """take_event reads the oldest event and deletes it only on the next call."""

    def __init__(self) -> None:
        super().__init__()
        self._peeked: set[tuple[str, str]] = set()

    async def take_event(self, run_id: str, event_name: str) -> EventRecord | None:
        buffered = self._events.get(run_id, {}).get(event_name)
        key = (run_id, event_name)
        if buffered and key not in self._peeked:
            self._peeked.add(key)
            data, delivered_at = buffered[0]  # the bug: read, not removed
            return EventRecord(_decoded(data), delivered_at)
        self._peeked.discard(key)
        return await super().take_event(run_id, event_name)


class WakesOnAnyEvent(MemoryStorage):
    """deliver_event wakes a waiting run whatever event name it waits for."""

    async def deliver_event(self, run_id: str, event_name: str, payload: Any) -> bool:
        ok = await super().deliver_event(run_id, event_name, payload)
        row = self._runs.get(run_id)
        if ok and row is not None and row.status is RunStatus.WAITING:
            self._move(row, RunStatus.PENDING, self._clock())
        return ok


class WaitIgnoresBufferedEvent(MemoryStorage):
    """wait_run always parks the run, even when its event arrived before it waited."""

    async def wait_run(
        self, run_id: str, lease_id: str, event_name: str, wake_at: int | None
    ) -> bool:
        row = self._held(run_id, lease_id)
        if row is None:
            return False
        self._move(row, RunStatus.WAITING, self._clock(), wake_at=wake_at, waiting_for=event_name)
        return True


# -- schedules --------------------------------------------------------------------------


class ScheduleNotAdvanced(MemoryStorage):
    """claim_due_schedule reports the occurrence but never stores the next firing time."""

    async def claim_due_schedule(
        self, workflow_names: Collection[str], now: int
    ) -> ClaimedSchedule | None:
        before = dict(self._schedules)
        claimed = await super().claim_due_schedule(workflow_names, now)
        self._schedules = before  # the bug: the advance is never written
        return claimed


class UpsertResetsCadence(MemoryStorage):
    """upsert_schedule always takes the supplied next_run_at, so every restart moves it."""

    async def upsert_schedule(self, schedule: Schedule) -> Schedule:
        stored = await super().upsert_schedule(schedule)
        row, data = self._schedules[schedule.key]
        self._schedules[schedule.key] = (
            msgspec.structs.replace(row, next_run_at=schedule.next_run_at),
            data,
        )
        return msgspec.structs.replace(stored, next_run_at=schedule.next_run_at)


# -- the table --------------------------------------------------------------------------


@dataclass(frozen=True)
class Broken:
    """One broken adapter: what it breaks, where to look, and which cases must catch it."""

    adapter: type[MemoryStorage]
    rule: str
    """The rule of the contract it breaks, in the words of reflow_core/storage.py."""
    select: str
    """The kit selection to run (areas or globs), to keep the test quick."""
    caught_by: frozenset[str]
    """Case ids that must fail (others may fail too)."""

    @property
    def name(self) -> str:
        """The adapter's class name, used as the test id and the AdapterSpec name."""
        return self.adapter.__name__


def _b(adapter: type[MemoryStorage], rule: str, select: str, *caught_by: str) -> Broken:
    return Broken(adapter, rule, select, frozenset(caught_by))


BROKEN: list[Broken] = [
    _b(
        NonAtomicClaim,
        "claim_next_run is atomic: two concurrent callers never get the same run",
        "concurrency.*_coroutines",
        "concurrency.claim_coroutines",
        "concurrency.stale_reclaim_coroutines",
    ),
    _b(
        NonAtomicFencedSave,
        "save_step_result with a lease: the check and the write are atomic",
        "concurrency.*_coroutines,steps,leases",
        "concurrency.fenced_save_coroutines",
    ),
    _b(
        NonAtomicConditionalCancel,
        "update_run_status with expected: the check and the write are one atomic step",
        "concurrency.*_coroutines,status",
        "concurrency.cancel_vs_complete_coroutines",
    ),
    _b(
        LeaseIgnoredOnSave,
        "save_step_result with a lease is a no-op returning False when the lease is not held",
        "steps,leases",
        "steps.stale_lease_refused",
        "steps.lease_on_completed_refused",
        "leases.fencing_save_step_result",
        "leases.released_by_completed",
    ),
    _b(
        HeartbeatTrueAfterTakeover,
        "heartbeat_run is False once the lease is lost",
        "leases,concurrency.*_coroutines",
        "leases.fencing_heartbeat_run",
        "leases.heartbeat_foreign_lease",
        "leases.heartbeat_other_runs_lease",
        "concurrency.stale_reclaim_coroutines",
    ),
    _b(
        TerminalKeepsLease,
        "a completed or failed run refuses every lease-checked write",
        "leases,status,steps",
        "leases.released_by_completed",
        "leases.released_by_failed",
        "status.refused_on_completed",
        "steps.lease_on_completed_refused",
    ),
    _b(
        SleepingClaimableEarly,
        "a sleeping run is claimable only once wake_at <= now",
        "claim,leases",
        "claim.sleeping_not_before_wake",
    ),
    _b(
        NeverReclaimsStale,
        "a running run with heartbeat_at < stale_before is claimable",
        "claim,leases",
        "claim.stale_reclaim",
        "claim.unique_leases",
        "leases.fencing_heartbeat_run",
    ),
    _b(
        ReclaimsAtStaleBoundary,
        "stale means heartbeat_at strictly before stale_before",
        "claim,leases",
        "claim.stale_is_strictly_before",
        "leases.heartbeat_keeps_run_live",
    ),
    _b(
        IdempotencyKeyIgnored,
        "a reused idempotency key returns the existing run with created=False",
        "runs,concurrency.*_coroutines,engine",
        "runs.idempotency_returns_existing",
        "runs.idempotency_any_status",
        "concurrency.idempotency_coroutines",
        "engine.idempotent_enqueue",
    ),
    _b(
        CancelOverwritesCompleted,
        "update_run_status with expected changes only a run in one of those statuses",
        "status",
        "status.expected_mismatch_refused",
        "status.expected_empty_refuses",
    ),
    _b(
        RequeueDropsCompletedSteps,
        "requeue_run deletes only the failed step rows",
        "requeue",
        "requeue.failed_discards_only_failed_steps",
    ),
    _b(
        ListsOldestFirst,
        "list_runs is newest first by (created_at, id)",
        "listing",
        "listing.newest_first",
        "listing.ties_by_id_descending",
        "listing.keyset_many_pages",
    ),
    _b(
        KeysetDropsTies,
        "keyset paging: before + before_id is (created_at, id) < (before, before_id)",
        "listing",
        "listing.keyset_with_equal_created_at",
        "listing.keyset_many_pages",
        "listing.keyset_with_filters",
    ),
    _b(
        SaveOverwritesCreatedAt,
        "an upsert of a step keeps the row's original created_at",
        "steps",
        "steps.upsert_keeps_created_at",
    ),
    _b(
        StepsInInsertionOrder,
        "get_step_results is ordered by (created_at, id)",
        "steps",
        "steps.ordered_by_created_at_then_id",
    ),
    _b(
        DriverErrorLeaks,
        "driver exceptions never leak: they become StorageError",
        "steps",
        "steps.run_and_name_unique",
    ),
    _b(
        NaNStoredAsNull,
        "NaN is not persistable: SerializationError before anything is written",
        "values.reject_*",
        "values.reject_step_output",
    ),
    _b(
        TupleComesBackAsList,
        "a tuple is not persistable (it would come back as a list)",
        "values.reject_*",
        "values.reject_run_input",
    ),
    _b(
        RejectedEventWakesRun,
        "a rejected value leaves storage unchanged",
        "values.reject_*",
        "values.reject_event_payload",
    ),
    _b(
        EventConsumedTwice,
        "take_event atomically removes the event: it is consumed once",
        "events,concurrency.*_coroutines",
        "events.deliver_then_take_once",
        "events.fifo",
        "concurrency.event_once_coroutines",
    ),
    _b(
        WakesOnAnyEvent,
        "deliver_event wakes only a run waiting for that event name",
        "events",
        "events.other_name_does_not_wake",
    ),
    _b(
        WaitIgnoresBufferedEvent,
        "wait_run with a matching event already buffered leaves the run claimable",
        "events",
        "events.buffered_before_wait",
    ),
    _b(
        ScheduleNotAdvanced,
        "claiming a due occurrence advances next_run_at in the same step: it fires once",
        "schedules,concurrency.*_coroutines",
        "schedules.occurrence_claimed_once",
        "schedules.claim_advances_and_reports_slot",
        "concurrency.schedule_once_coroutines",
    ),
    _b(
        UpsertResetsCadence,
        "re-registering an unchanged recurrence keeps its next firing time",
        "schedules",
        "schedules.unchanged_interval_keeps_cadence",
        "schedules.unchanged_cron_keeps_cadence",
    ),
]
"""Every broken adapter, with the cases that must catch it."""
