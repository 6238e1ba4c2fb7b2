"""Deliberately broken storage adapters: each breaks exactly one rule of the contract.

Every class subclasses the intact :class:`~reflow_adapters.memory.MemoryStorage` and
changes one method (or one detail of one method) the way a real adapter gets it wrong:
a missing ``WHERE lease_id = ?``, a ``<`` for a ``<=``, staleness judged by the
claimer's lease setting, an ``ON CONFLICT DO UPDATE`` that overwrites a completed
checkpoint, a JSON encoder that writes NaN as ``null``, an ``await`` between a check and
its write. ``test_broken_adapters.py`` runs the conformance kit on each and asserts that
the named cases catch it, so this table doubles as the documentation of which case
guards which rule.

Atomicity bugs are made observable on a single event loop by an ``await
asyncio.sleep(0)`` between the check and the write: concurrent coroutines then
interleave exactly where threads or processes would on a real database.

These reach into ``MemoryStorage`` internals (``_runs``, ``_move``, ``_held``,
``_steps``, ``_events`` ...) on purpose: they are test doubles, kept as small as the bug
they model. Staleness bugs replace the claim index with a scan (:class:`_ScanClaims`) so
that the broken rule is one readable predicate.
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
from reflow_adapters.memory.claims import RunRow, claimable
from reflow_adapters.memory.steps import StepTable
from reflow_core import codec
from reflow_core.errors import StorageError
from reflow_core.storage import Clock, system_clock
from reflow_core.types import (
    ClaimedRun,
    ClaimedSchedule,
    ConsumeResult,
    CreateRunResult,
    ErrorInfo,
    EventRecord,
    LeaseHolder,
    RunFilter,
    RunStatus,
    Schedule,
    StepResult,
    WorkflowRun,
)

_TERMINAL = frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED})
_RUNNING = RunStatus.RUNNING


def _enc(value: Any) -> bytes | None:
    return None if value is None else codec.encode(value)


def _dec(data: bytes | None) -> Any:
    return None if data is None else codec.decode(data)


def _lease_fields(row: RunRow) -> tuple[Any, ...]:
    return (row.claimed_at, row.lease_ms, row.lease_expires_at, row.holder)


def _restore_lease_fields(row: RunRow, saved: tuple[Any, ...]) -> None:
    row.claimed_at, row.lease_ms, row.lease_expires_at, row.holder = saved


class _ScanClaims(MemoryStorage):
    """A claim that scans every run with one overridable predicate, then grants the lease
    exactly as the intact adapter does. Not broken by itself."""

    def _claimable(self, row: RunRow, now: int, lease_ms: int) -> bool:
        return claimable(row, now)

    def _oldest(self, workflow_names: Collection[str], now: int, lease_ms: int) -> RunRow | None:
        names = set(workflow_names)
        candidates = [
            row
            for row in self._runs.values()
            if row.workflow in names and self._claimable(row, now, lease_ms)
        ]
        return min(candidates, key=lambda r: (r.created_at, r.id)) if candidates else None

    def _grant(
        self, row: RunRow, now: int, lease_ms: int, holder: LeaseHolder | None
    ) -> ClaimedRun:
        if row.status is _RUNNING:
            row.recoveries += 1
        row.attempt += 1
        row.lease_id = str(uuid.uuid4())
        row.claimed_at = row.heartbeat_at = now
        row.lease_ms, row.lease_expires_at, row.holder = lease_ms, now + lease_ms, holder
        self._move(row, _RUNNING, now, keep_lease=True)
        return ClaimedRun(row.record(), row.lease_id)

    async def claim_next_run(
        self,
        workflow_names: Collection[str],
        *,
        lease_ms: int,
        holder: LeaseHolder | None = None,
    ) -> ClaimedRun | None:
        self._check("claim_next_run")
        now = self._clock()
        row = self._oldest(workflow_names, now, lease_ms)
        return None if row is None else self._grant(row, now, lease_ms, holder)


# -- atomicity --------------------------------------------------------------------------


class NonAtomicClaim(_ScanClaims):
    """Claim = SELECT the oldest claimable run, then UPDATE it, with no lock in between."""

    async def claim_next_run(
        self,
        workflow_names: Collection[str],
        *,
        lease_ms: int,
        holder: LeaseHolder | None = None,
    ) -> ClaimedRun | None:
        now = self._clock()
        row = self._oldest(workflow_names, now, lease_ms)
        if row is None:
            return None
        await asyncio.sleep(0)  # the bug: another claimer runs between the check and the write
        return self._grant(row, now, lease_ms, holder)


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


class NonAtomicWriteOnce(MemoryStorage):
    """save_step_result reads "is the stored row final?", then upserts in a second statement."""

    async def save_step_result(self, result: StepResult, lease_id: str | None = None) -> bool:
        output = _enc(result.output)
        if lease_id is not None and self._held(result.run_id, lease_id) is None:
            return False
        if self._steps.is_final(result):
            return False
        await asyncio.sleep(0)  # the bug: another writer's final row lands in between
        existing = self._steps.existing(result, "save_step_result")
        self._steps.put(result, existing, output)
        return True


class NonAtomicEventKey(MemoryStorage):
    """deliver_event looks the key up, then inserts the event in a second statement."""

    async def deliver_event(
        self, run_id: str, event_name: str, payload: Any, *, key: str | None = None
    ) -> bool:
        if key is not None and self._events.delivered(run_id, key):
            return True
        await asyncio.sleep(0)  # the bug: a retry of the same key runs in between
        ok = await super().deliver_event(run_id, event_name, payload)
        if ok and key is not None:
            self._events._keys.setdefault(run_id, set()).add(key)
        return ok


# -- leases -----------------------------------------------------------------------------


class LeaseIgnoredOnSave(MemoryStorage):
    """save_step_result forgets ``AND lease_id = ?``: a worker that lost its lease still writes."""

    async def save_step_result(self, result: StepResult, lease_id: str | None = None) -> bool:
        return await super().save_step_result(result, None)


class EndingsAnsweredByBatch(MemoryStorage):
    """Concurrent update_claimed_run_status calls are coalesced, and each caller is told
    its batch's answer (True if any row of it was written): a batching adapter that reads
    the statement's row count instead of which rows it wrote."""

    _batch: list[bool] | None = None

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
        if self._batch is None:  # the first caller of this loop turn opens the batch
            self._batch = []
            asyncio.get_running_loop().call_soon(setattr, self, "_batch", None)
        batch = self._batch
        batch.append(ok)
        await asyncio.sleep(0)  # the batch's statement: the turn's other callers join it
        return any(batch)


class HeartbeatTrueAfterTakeover(MemoryStorage):
    """heartbeat_run answers "is the run running?" instead of "is my lease held?"."""

    async def heartbeat_run(self, run_id: str, lease_id: str) -> bool:
        held = await super().heartbeat_run(run_id, lease_id)
        row = self._runs.get(run_id)
        return held or (row is not None and row.status is _RUNNING)


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


class HeartbeatDoesNotExtend(MemoryStorage):
    """heartbeat_run stamps heartbeat_at but leaves lease_expires_at where the claim put it."""

    async def heartbeat_run(self, run_id: str, lease_id: str) -> bool:
        row = self._runs.get(run_id)
        expires = row.lease_expires_at if row is not None else None
        ok = await super().heartbeat_run(run_id, lease_id)
        if ok and row is not None:
            row.lease_expires_at = expires  # the bug: the expiry is never renewed
        return ok


class HeartbeatUsesDefaultLease(MemoryStorage):
    """heartbeat_run extends by the adapter's default (30 s), not the stored lease_ms."""

    async def heartbeat_run(self, run_id: str, lease_id: str) -> bool:
        ok = await super().heartbeat_run(run_id, lease_id)
        row = self._runs.get(run_id)
        if ok and row is not None:
            row.lease_expires_at = self._clock() + 30_000  # the bug: not row.lease_ms
            self._claims.renew(row)
        return ok


class ClaimIgnoresLeaseMs(MemoryStorage):
    """claim_next_run stores a fixed 30 s lease, whatever lease_ms the claimer asked for."""

    async def claim_next_run(
        self,
        workflow_names: Collection[str],
        *,
        lease_ms: int,
        holder: LeaseHolder | None = None,
    ) -> ClaimedRun | None:
        return await super().claim_next_run(workflow_names, lease_ms=30_000, holder=holder)


class HolderNotStored(MemoryStorage):
    """claim_next_run accepts a holder but never writes it (the column was forgotten)."""

    async def claim_next_run(
        self,
        workflow_names: Collection[str],
        *,
        lease_ms: int,
        holder: LeaseHolder | None = None,
    ) -> ClaimedRun | None:
        return await super().claim_next_run(workflow_names, lease_ms=lease_ms, holder=None)


class SleepKeepsLeaseFields(MemoryStorage):
    """sleep_run clears the lease id but leaves claimed_at, lease_ms, lease_expires_at, holder."""

    async def sleep_run(self, run_id: str, lease_id: str, wake_at: int) -> bool:
        row = self._runs.get(run_id)
        saved = _lease_fields(row) if row is not None else None
        ok = await super().sleep_run(run_id, lease_id, wake_at)
        if ok and row is not None and saved is not None:
            _restore_lease_fields(row, saved)  # the bug: only lease_id is cleared
        return ok


class CancelKeepsLeaseFields(MemoryStorage):
    """update_run_status (a cancel) voids the lease id but leaves the other lease fields."""

    async def update_run_status(
        self,
        run_id: str,
        status: RunStatus,
        *,
        expected: Collection[RunStatus] | None = None,
    ) -> bool:
        row = self._runs.get(run_id)
        saved = _lease_fields(row) if row is not None else None
        ok = await super().update_run_status(run_id, status, expected=expected)
        if ok and row is not None and saved is not None and row.status is not _RUNNING:
            _restore_lease_fields(row, saved)  # the bug: only lease_id is cleared
        return ok


class NowIgnoresClock(MemoryStorage):
    """now() answers the system clock instead of the store's (injected) clock."""

    async def now(self) -> int:
        return system_clock()


# -- claims and the store's clock ---------------------------------------------------------


class SleepingClaimableEarly(_ScanClaims):
    """Treats every sleeping run as due: the ``wake_at <= now`` condition is missing."""

    def _claimable(self, row: RunRow, now: int, lease_ms: int) -> bool:
        return row.status is RunStatus.SLEEPING or claimable(row, now)


class NeverReclaimsStale(_ScanClaims):
    """Claims only pending and woken runs: a run whose worker died is never taken over."""

    def _claimable(self, row: RunRow, now: int, lease_ms: int) -> bool:
        return row.status is not _RUNNING and claimable(row, now)


class StaleOneMsEarly(_ScanClaims):
    """``lease_expires_at <= now + 1``: a live run is stolen one millisecond early."""

    def _claimable(self, row: RunRow, now: int, lease_ms: int) -> bool:
        if row.status is _RUNNING:
            return row.lease_expires_at is not None and row.lease_expires_at <= now + 1
        return claimable(row, now)


class StaleOnlyAfterExpiry(_ScanClaims):
    """``lease_expires_at < now`` instead of ``<=``: not taken over at the expiry itself."""

    def _claimable(self, row: RunRow, now: int, lease_ms: int) -> bool:
        if row.status is _RUNNING:
            return row.lease_expires_at is not None and row.lease_expires_at < now
        return claimable(row, now)


class StaleByClaimerLease(_ScanClaims):
    """Contract 1.0's mistake: stale when ``heartbeat_at + <the claimer's lease_ms> <= now``,
    so a claimer with a short lease setting steals runs from holders with long ones."""

    def _claimable(self, row: RunRow, now: int, lease_ms: int) -> bool:
        if row.status is _RUNNING:
            return row.heartbeat_at is not None and row.heartbeat_at + lease_ms <= now
        return claimable(row, now)


class RecoveriesNeverCounted(MemoryStorage):
    """A takeover of an expired lease does not add to recoveries."""

    async def claim_next_run(
        self,
        workflow_names: Collection[str],
        *,
        lease_ms: int,
        holder: LeaseHolder | None = None,
    ) -> ClaimedRun | None:
        claimed = await super().claim_next_run(workflow_names, lease_ms=lease_ms, holder=holder)
        if claimed is None:
            return None
        row = self._runs[claimed.run.id]
        row.recoveries = 0  # the bug: never counted
        return ClaimedRun(row.record(), claimed.lease_id)


class RecoveriesOnEveryReclaim(MemoryStorage):
    """Counts every claim after the first as a recovery (wake-ups and releases included)."""

    async def claim_next_run(
        self,
        workflow_names: Collection[str],
        *,
        lease_ms: int,
        holder: LeaseHolder | None = None,
    ) -> ClaimedRun | None:
        claimed = await super().claim_next_run(workflow_names, lease_ms=lease_ms, holder=holder)
        if claimed is None:
            return None
        row = self._runs[claimed.run.id]
        row.recoveries = row.attempt - 1  # the bug: "attempt > 1" is not "lease expired"
        return ClaimedRun(row.record(), claimed.lease_id)


class RequeueKeepsRecoveries(MemoryStorage):
    """requeue_run leaves recoveries as they were."""

    async def requeue_run(self, run_id: str) -> bool:
        row = self._runs.get(run_id)
        recoveries = row.recoveries if row is not None else 0
        ok = await super().requeue_run(run_id)
        if ok and row is not None:
            row.recoveries = recoveries  # the bug: not reset
        return ok


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


class _DropAllSteps(StepTable):
    def drop_failed(self, run_id: str) -> None:
        for step, _ in self._rows.pop(run_id, {}).values():
            del self._ids[step.id]


class RequeueDropsCompletedSteps(MemoryStorage):
    """requeue_run deletes every step row, so completed work runs again."""

    def __init__(self, *, clock: Clock | None = None) -> None:
        super().__init__(clock=clock)
        self._steps = _DropAllSteps()


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


class _CreatedAtOverwritten(StepTable):
    def put(self, result: StepResult, existing: StepResult | None, output: bytes | None) -> None:
        super().put(result, None, output)  # the bug: as if there were no row to keep

    def upsert(self, result: StepResult, output: bytes | None, operation: str) -> bool:
        kept = self._rows.get(result.run_id, {}).get(result.name)
        written = super().upsert(result, output, operation)
        if written and kept is not None:  # the bug: the new write's created_at wins
            row, data = self._rows[result.run_id][result.name]
            self._rows[result.run_id][result.name] = (
                msgspec.structs.replace(row, created_at=result.created_at),
                data,
            )
        return written


class SaveOverwritesCreatedAt(MemoryStorage):
    """The upsert's ``ON CONFLICT DO UPDATE`` also sets created_at."""

    def __init__(self, *, clock: Clock | None = None) -> None:
        super().__init__(clock=clock)
        self._steps = _CreatedAtOverwritten()


class _InsertionOrder(StepTable):
    def rows(self, run_id: str) -> list[tuple[StepResult, bytes | None]]:
        return list(self._rows.get(run_id, {}).values())


class StepsInInsertionOrder(MemoryStorage):
    """get_step_results has no ``ORDER BY``: rows come back in insertion order."""

    def __init__(self, *, clock: Clock | None = None) -> None:
        super().__init__(clock=clock)
        self._steps = _InsertionOrder()


class DriverErrorLeaks(MemoryStorage):
    """A unique-constraint violation escapes as the driver's own exception, untranslated."""

    async def save_step_result(self, result: StepResult, lease_id: str | None = None) -> bool:
        try:
            return await super().save_step_result(result, lease_id)
        except StorageError:
            raise sqlite3.IntegrityError(
                "UNIQUE constraint failed: steps.run_id, steps.name"
            ) from None


class UpsertOverwritesFinal(MemoryStorage):
    """save_step_result is a plain upsert: a completed checkpoint is overwritten by the next
    writer (``ON CONFLICT DO UPDATE`` with no ``WHERE status NOT IN (...)``)."""

    async def save_step_result(self, result: StepResult, lease_id: str | None = None) -> bool:
        output = _enc(result.output)
        if lease_id is not None and self._held(result.run_id, lease_id) is None:
            return False
        existing = self._steps.existing(result, "save_step_result")
        self._steps.put(result, existing, output)  # the bug: no write-once check
        return True


class ConsumeOverwritesFinal(MemoryStorage):
    """consume_event checks the lease but not whether the checkpoint is already final: it
    consumes another event and overwrites the completed row."""

    async def consume_event(
        self, event_name: str, checkpoint: StepResult, lease_id: str
    ) -> ConsumeResult:
        run_id = checkpoint.run_id
        if self._held(run_id, lease_id) is None:
            return ConsumeResult(held=False)
        if not self._events.has(run_id, event_name):
            return ConsumeResult(held=True)
        existing = self._steps.existing(checkpoint, "consume_event")
        event = self._events.pop(run_id, event_name)
        assert event is not None
        self._steps.put(checkpoint, existing, event[0])  # the bug: over a final row too
        return ConsumeResult(held=True, event=EventRecord(_dec(event[0]), event[1]))


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

    async def deliver_event(
        self, run_id: str, event_name: str, payload: Any, *, key: str | None = None
    ) -> bool:
        row = self._runs.get(run_id)
        if row is not None and row.status is RunStatus.WAITING and row.waiting_for == event_name:
            self._move(row, RunStatus.PENDING, self._clock())
        return await super().deliver_event(run_id, event_name, payload, key=key)


# -- events -----------------------------------------------------------------------------


class EventConsumedTwice(MemoryStorage):
    """take_event reads the oldest event and deletes it only on the next call."""

    def __init__(self, *, clock: Clock | None = None) -> None:
        super().__init__(clock=clock)
        self._peeked: dict[tuple[str, str], EventRecord] = {}

    async def take_event(self, run_id: str, event_name: str) -> EventRecord | None:
        key = (run_id, event_name)
        if key in self._peeked:
            return self._peeked.pop(key)  # the second read of the same event
        record = await super().take_event(run_id, event_name)
        if record is not None:
            self._peeked[key] = record  # the bug: "not deleted yet"
        return record


class WakesOnAnyEvent(MemoryStorage):
    """deliver_event wakes a waiting run whatever event name it waits for."""

    async def deliver_event(
        self, run_id: str, event_name: str, payload: Any, *, key: str | None = None
    ) -> bool:
        ok = await super().deliver_event(run_id, event_name, payload, key=key)
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


class DeliversToEndedRun(MemoryStorage):
    """deliver_event checks only that the run exists: events pile up for ended runs."""

    async def deliver_event(
        self, run_id: str, event_name: str, payload: Any, *, key: str | None = None
    ) -> bool:
        data = _enc(payload)
        row = self._runs.get(run_id)
        if row is None:
            return False
        if key is not None and self._events.delivered(run_id, key):
            return True
        now = self._clock()  # the bug: no "is the run completed, failed or cancelled?"
        self._events.push(run_id, event_name, data, now, key)
        if row.status is RunStatus.WAITING and row.waiting_for == event_name:
            self._move(row, RunStatus.PENDING, now)
        return True


class EventKeyIgnored(MemoryStorage):
    """deliver_event accepts a key and ignores it: every retry is another event."""

    async def deliver_event(
        self, run_id: str, event_name: str, payload: Any, *, key: str | None = None
    ) -> bool:
        return await super().deliver_event(run_id, event_name, payload)


class KeyForgottenOnceConsumed(MemoryStorage):
    """Keys are deduplicated against the buffered events only (a unique index on the events
    table, whose rows are deleted when consumed): a retry after consumption delivers again."""

    def _forget_if_drained(self, run_id: str) -> None:
        if run_id not in self._events._buffers:
            self._events._keys.pop(run_id, None)  # the bug: the keys go with the rows

    async def take_event(self, run_id: str, event_name: str) -> EventRecord | None:
        record = await super().take_event(run_id, event_name)
        self._forget_if_drained(run_id)
        return record

    async def consume_event(
        self, event_name: str, checkpoint: StepResult, lease_id: str
    ) -> ConsumeResult:
        result = await super().consume_event(event_name, checkpoint, lease_id)
        self._forget_if_drained(checkpoint.run_id)
        return result


class KeysShareOneNamespace(MemoryStorage):
    """Event keys are unique across all runs (``UNIQUE (key)``, not ``UNIQUE (run_id, key)``):
    the same key sent to a second run is dropped."""

    def __init__(self, *, clock: Clock | None = None) -> None:
        super().__init__(clock=clock)
        self._all_keys: set[str] = set()

    async def deliver_event(
        self, run_id: str, event_name: str, payload: Any, *, key: str | None = None
    ) -> bool:
        if key is not None and key in self._all_keys:
            return self._runs.get(run_id) is not None  # the bug: another run's key
        ok = await super().deliver_event(run_id, event_name, payload, key=key)
        if ok and key is not None:
            self._all_keys.add(key)
        return ok


# -- schedules --------------------------------------------------------------------------


class ScheduleNotAdvanced(MemoryStorage):
    """claim_due_schedule reports the occurrence but never stores the next firing time."""

    async def claim_due_schedule(self, workflow_names: Collection[str]) -> ClaimedSchedule | None:
        before = dict(self._schedules._rows)
        claimed = await super().claim_due_schedule(workflow_names)
        self._schedules._rows = before  # the bug: the advance is never written
        return claimed


class UpsertResetsCadence(MemoryStorage):
    """upsert_schedule always takes the supplied next_run_at, so every restart moves it."""

    async def upsert_schedule(self, schedule: Schedule) -> Schedule:
        stored = await super().upsert_schedule(schedule)
        row, data = self._schedules._rows[schedule.key]
        self._schedules._rows[schedule.key] = (
            msgspec.structs.replace(row, next_run_at=schedule.next_run_at),
            data,
        )
        return msgspec.structs.replace(stored, next_run_at=schedule.next_run_at)


class ScheduleBySystemClock(MemoryStorage):
    """claim_due_schedule judges "due" by the system clock, not the store's."""

    async def claim_due_schedule(self, workflow_names: Collection[str]) -> ClaimedSchedule | None:
        return self._schedules.claim_due(workflow_names, system_clock())


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


FINAL = ("completed", "completed_early", "skipped")

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
        EndingsAnsweredByBatch,
        "update_claimed_run_status answers for its own run: True only if it was written",
        "concurrency.*_coroutines",
        "concurrency.mixed_writes_coroutines",
    ),
    _b(
        NonAtomicConditionalCancel,
        "update_run_status with expected: the check and the write are one atomic step",
        "concurrency.*_coroutines,status",
        "concurrency.cancel_vs_complete_coroutines",
    ),
    _b(
        NonAtomicWriteOnce,
        "write-once is atomic: of concurrent writers of one final checkpoint, the first wins",
        "concurrency.*_coroutines,checkpoints",
        "concurrency.write_once_coroutines",
    ),
    _b(
        NonAtomicEventKey,
        "deliver_event with a key: concurrent deliveries of one key store one event",
        "concurrency.*_coroutines,events",
        "concurrency.event_key_coroutines",
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
        HeartbeatDoesNotExtend,
        "heartbeat_run sets lease_expires_at = now + lease_ms",
        "clock,leases",
        "clock.heartbeat_extends_by_stored_lease",
        "clock.heartbeat_fields_after_renewal",
        "clock.expired_lease_renewable",
        "leases.heartbeat_keeps_run_live",
    ),
    _b(
        HeartbeatUsesDefaultLease,
        "a heartbeat renews by the lease length stored at the claim",
        "clock",
        "clock.heartbeat_extends_by_stored_lease",
        "clock.heartbeat_fields_after_renewal",
        "clock.expired_lease_renewable",
    ),
    _b(
        ClaimIgnoresLeaseMs,
        "the claim stores lease_ms and lease_expires_at = now + lease_ms",
        "claim,clock,lease_fields",
        "claim.marks_running_with_lease",
        "clock.stale_at_expiry",
        "clock.short_lease_expires_for_long_claimers",
        "lease_fields.set_by_claim",
    ),
    _b(
        HolderNotStored,
        "the claim stores the holder given; get_run and list_runs return it exactly",
        "claim,lease_fields",
        "claim.marks_running_with_lease",
        "lease_fields.set_by_claim",
        "lease_fields.holder_roundtrip",
    ),
    _b(
        SleepKeepsLeaseFields,
        "every write that moves a run out of running clears the lease fields (sleep_run)",
        "lease_fields",
        "lease_fields.cleared_by_sleep_run",
    ),
    _b(
        CancelKeepsLeaseFields,
        "every write that moves a run out of running clears the lease fields (update_run_status)",
        "lease_fields",
        "lease_fields.cleared_by_update_run_status_cancelled",
        "lease_fields.cleared_by_update_run_status_expected",
        "lease_fields.cleared_by_update_run_status_pending",
    ),
    _b(
        NowIgnoresClock,
        "now() is the store's clock: the Clock passed at construction replaces it for tests",
        "clock",
        "clock.now_is_injected",
        "clock.now_monotonic",
    ),
    _b(
        SleepingClaimableEarly,
        "a sleeping run is claimable only once wake_at <= now",
        "claim,leases",
        "claim.sleeping_not_before_wake",
    ),
    _b(
        NeverReclaimsStale,
        "a running run with lease_expires_at <= now is claimable",
        "claim,clock,leases",
        "claim.stale_reclaim",
        "claim.unique_leases",
        "clock.stale_at_expiry",
        "leases.fencing_heartbeat_run",
    ),
    _b(
        StaleOneMsEarly,
        "a run is not stale before lease_expires_at",
        "claim,clock,leases",
        "clock.not_stale_before_expiry",
        "clock.short_lease_expires_for_long_claimers",
        "clock.heartbeat_extends_by_stored_lease",
        "leases.heartbeat_keeps_run_live",
    ),
    _b(
        StaleOnlyAfterExpiry,
        "a run is stale at lease_expires_at itself (lease_expires_at <= now)",
        "clock",
        "clock.stale_at_expiry",
        "clock.long_lease_survives_short_claimers",
        "clock.short_lease_expires_for_long_claimers",
        "clock.heartbeat_extends_by_stored_lease",
        "clock.expired_lease_renewable",
    ),
    _b(
        StaleByClaimerLease,
        "no caller's lease setting decides whether another caller's run is stale",
        "clock,leases",
        "clock.long_lease_survives_short_claimers",
        "clock.short_lease_expires_for_long_claimers",
        "clock.heartbeat_extends_by_stored_lease",
    ),
    _b(
        RecoveriesNeverCounted,
        "a takeover from an expired lease adds one to recoveries",
        "clock,recoveries,concurrency.*_coroutines",
        "clock.stale_at_expiry",
        "recoveries.counted_on_expired_takeover",
        "recoveries.reset_by_requeue",
        "concurrency.stale_reclaim_coroutines",
    ),
    _b(
        RecoveriesOnEveryReclaim,
        "recoveries counts only takeovers from expired leases, not wake-ups or releases",
        "recoveries",
        "recoveries.not_on_pending_claim",
        "recoveries.not_on_woken_sleep",
        "recoveries.not_on_woken_wait",
    ),
    _b(
        RequeueKeepsRecoveries,
        "requeue_run sets recoveries back to 0",
        "recoveries",
        "recoveries.reset_by_requeue",
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
        UpsertOverwritesFinal,
        "checkpoints are written once: save_step_result over a final row is False",
        "checkpoints,concurrency.*_coroutines",
        *(f"checkpoints.{s}_kept_without_lease" for s in FINAL),
        *(f"checkpoints.{s}_kept_with_held_lease" for s in FINAL),
        *(f"checkpoints.{s}_kept_after_takeover" for s in FINAL),
        "concurrency.write_once_coroutines",
    ),
    _b(
        ConsumeOverwritesFinal,
        "consume_event over a final checkpoint is held=False and consumes nothing",
        "checkpoints,consume",
        *(f"checkpoints.consume_over_{s}_refused" for s in FINAL),
        "checkpoints.consume_over_waiting_row",
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
        DeliversToEndedRun,
        "deliver_event is False (nothing stored) for a completed, failed or cancelled run",
        "events",
        "events.refused_for_completed",
        "events.refused_for_failed",
        "events.refused_for_cancelled",
    ),
    _b(
        EventKeyIgnored,
        "a key already delivered to the run stores nothing and answers True",
        "events,concurrency.*_coroutines",
        "events.key_dedupe_while_buffered",
        "events.key_dedupe_after_take",
        "events.key_dedupe_after_consume",
        "events.key_dedupe_does_not_wake",
        "concurrency.event_key_coroutines",
    ),
    _b(
        KeyForgottenOnceConsumed,
        "a key is deduplicated whether its event is still buffered or consumed since",
        "events",
        "events.key_dedupe_after_take",
        "events.key_dedupe_after_consume",
        "events.key_dedupe_does_not_wake",
    ),
    _b(
        KeysShareOneNamespace,
        "event keys are scoped per run",
        "events",
        "events.key_scoped_per_run",
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
    _b(
        ScheduleBySystemClock,
        "a schedule is due by the store's clock (next_run_at <= now)",
        "schedules",
        "schedules.not_due_ignored",
        "schedules.cron_claim_advances",
    ),
]
"""Every broken adapter, with the cases that must catch it."""
