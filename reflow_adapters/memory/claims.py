"""Run rows and the claim index behind ``MemoryStorage.claim_next_run``.

Claims must not scan every run (the adapter sustains thousands of runs a second).
Each workflow has a heap of *ready* candidates keyed ``(created_at, id)``, so the
oldest claimable run is at a heap's top. A run enters it when it becomes pending,
when its wake time passes (moved from a global heap of ``(wake_at, id)``) or when its
lease expires (moved from a global heap of ``(lease_expires_at, id)``). Both times are
read against the store's clock only, so whether a run is claimable never depends on
who asks.

Entries are never removed eagerly: each one is checked when it reaches a heap's top,
so a run whose state changed since it was pushed is skipped there (and filed again,
in case the clock moved back). The two time heaps are rebuilt from the live runs when
stale entries outnumber them, which keeps memory bounded and every operation
amortised O(log n).
"""

from __future__ import annotations

import heapq
from collections.abc import Collection
from dataclasses import dataclass

from reflow_core.damage import decode_stored
from reflow_core.types import ErrorInfo, LeaseHolder, RunStatus, WorkflowRun

__all__ = ["ClaimIndex", "RunRow", "claimable"]

_PENDING = RunStatus.PENDING
_RUNNING = RunStatus.RUNNING
_SUSPENDED = frozenset({RunStatus.SLEEPING, RunStatus.WAITING})
_Key = tuple[int, str]


@dataclass(slots=True, eq=False, kw_only=True)
class RunRow:
    """One stored run: mutable, values as codec bytes, plus the lease that holds it."""

    id: str
    workflow: str
    input: bytes | None
    status: RunStatus
    created_at: int
    updated_at: int
    idempotency_key: str | None
    output: bytes | None
    error: ErrorInfo | None
    wake_at: int | None
    waiting_for: str | None
    heartbeat_at: int | None
    attempt: int
    recoveries: int = 0
    # The lease: set by a claim, present only while the run is running.
    lease_id: str | None = None
    claimed_at: int | None = None
    lease_ms: int | None = None
    lease_expires_at: int | None = None
    holder: LeaseHolder | None = None
    queued: bool = False
    """An entry for this run sits in its workflow's ready heap (so never push a second)."""

    @classmethod
    def create(cls, run: WorkflowRun, data: bytes | None, output: bytes | None) -> RunRow:
        """A row storing ``run`` as given, with its input and output already encoded."""
        return cls(
            id=run.id,
            workflow=run.workflow,
            input=data,
            status=RunStatus(run.status),
            created_at=run.created_at,
            updated_at=run.updated_at,
            idempotency_key=run.idempotency_key,
            output=output,
            error=run.error,
            wake_at=run.wake_at,
            waiting_for=run.waiting_for,
            heartbeat_at=run.heartbeat_at,
            attempt=run.attempt,
            recoveries=run.recoveries,
            claimed_at=run.claimed_at,
            lease_ms=run.lease_ms,
            lease_expires_at=run.lease_expires_at,
            holder=run.holder,
        )

    def record(self) -> WorkflowRun:
        """The public record: values decoded into fresh objects, the lease id left out."""
        return WorkflowRun(
            id=self.id,
            workflow=self.workflow,
            input=None if self.input is None else decode_stored(self.input),
            status=self.status,
            created_at=self.created_at,
            updated_at=self.updated_at,
            idempotency_key=self.idempotency_key,
            output=None if self.output is None else decode_stored(self.output),
            error=self.error,
            wake_at=self.wake_at,
            waiting_for=self.waiting_for,
            heartbeat_at=self.heartbeat_at,
            attempt=self.attempt,
            recoveries=self.recoveries,
            claimed_at=self.claimed_at,
            lease_ms=self.lease_ms,
            lease_expires_at=self.lease_expires_at,
            holder=self.holder,
        )

    def release(self) -> None:
        """Drop the lease fields (the run is leaving ``running``); ``heartbeat_at`` stays."""
        self.lease_id = self.claimed_at = self.lease_ms = self.lease_expires_at = None
        self.holder = None


def claimable(row: RunRow, now: int) -> bool:
    """Whether ``claim_next_run`` at the store's ``now`` may take ``row``."""
    status = row.status
    if status is _PENDING:
        return True
    if status is _RUNNING:
        expires = row.lease_expires_at
        return expires is not None and expires <= now
    return status in _SUSPENDED and row.wake_at is not None and row.wake_at <= now


class ClaimIndex:
    """Finds the oldest claimable run of some workflows in amortised O(log n)."""

    def __init__(self, runs: dict[str, RunRow]) -> None:
        self._runs = runs
        self._ready: dict[str, list[_Key]] = {}
        self._wakes: list[_Key] = []
        self._leases: list[_Key] = []
        self._running: set[str] = set()  # the live entries of the two time heaps
        self._suspended: set[str] = set()

    def clear(self) -> None:
        """Forget every entry (the store is being dropped)."""
        self._ready.clear()
        self._wakes.clear()
        self._leases.clear()
        self._running.clear()
        self._suspended.clear()

    def file(self, row: RunRow) -> None:
        """Record where ``row`` may next become claimable; call after every state change."""
        self._running.discard(row.id)
        self._suspended.discard(row.id)
        status = row.status
        if status is _PENDING:
            self._queue(row)
        elif status is _RUNNING:
            self._running.add(row.id)
            self.renew(row)
        elif status in _SUSPENDED and row.wake_at is not None:
            self._suspended.add(row.id)
            heapq.heappush(self._wakes, (row.wake_at, row.id))
            if len(self._wakes) > 2 * len(self._suspended) + 64:
                self._rebuild_wakes()

    def renew(self, row: RunRow) -> None:
        """Note a running row's new ``lease_expires_at`` (a claim or a heartbeat)."""
        if row.lease_expires_at is None:
            return
        heapq.heappush(self._leases, (row.lease_expires_at, row.id))
        # Every claim and heartbeat pushes, so superseded entries pile up; rebuild.
        if len(self._leases) > 2 * len(self._running) + 64:
            self._rebuild_leases()

    # The rebuilds are methods of their own: their comprehensions would otherwise make
    # file() and renew(), called on every claim and completion, build closure cells.

    def _rebuild_wakes(self) -> None:
        runs = self._runs
        self._wakes = [(at, i) for i in self._suspended if (at := runs[i].wake_at) is not None]
        heapq.heapify(self._wakes)

    def _rebuild_leases(self) -> None:
        runs = self._runs
        self._leases = [
            (at, i) for i in self._running if (at := runs[i].lease_expires_at) is not None
        ]
        heapq.heapify(self._leases)

    def _queue(self, row: RunRow) -> None:
        if not row.queued:
            row.queued = True
            heapq.heappush(self._ready.setdefault(row.workflow, []), (row.created_at, row.id))

    def _promote(self, heap: list[_Key], now: int) -> None:
        """Move every entry of a time heap that is due at ``now`` to the ready heaps."""
        runs = self._runs
        while heap and heap[0][0] <= now:
            row = runs.get(heapq.heappop(heap)[1])
            if row is not None and claimable(row, now):
                self._queue(row)

    def pop_oldest(
        self, workflow_names: Collection[str], now: int, *, promote: bool = True
    ) -> RunRow | None:
        """Remove and return the claimable row with the lowest ``(created_at, id)``.

        ``promote=False`` skips moving due wake-ups and expired leases to the ready
        heaps: for a caller that already did at this same ``now`` (a claim's lease ends
        after ``now``, so claiming adds nothing due).
        """
        if promote:
            self._promote(self._wakes, now)
            self._promote(self._leases, now)
        runs = self._runs
        best: list[_Key] | None = None
        for name in workflow_names:
            heap = self._ready.get(name)
            while heap:
                row = runs.get(heap[0][1])
                if row is not None and claimable(row, now):
                    if best is None or heap[0] < best[0]:
                        best = heap
                    break
                heapq.heappop(heap)
                if row is not None:
                    # Renewed, woken or ended since it was queued, or the clock moved
                    # back: file it again so its time entry is not lost.
                    row.queued = False
                    self.file(row)
        if best is None:
            return None
        row = runs[heapq.heappop(best)[1]]
        row.queued = False
        return row
