"""Run rows and the claim index behind ``MemoryStorage.claim_next_run``.

Claims must not scan every run (the adapter sustains thousands of runs a second).
Each workflow has a heap of *ready* candidates keyed ``(created_at, id)``, so the
oldest claimable run is at a heap's top. A run enters it when it becomes pending,
when its wake time passes (moved from a global heap of ``(wake_at, id)``) or when its
heartbeat goes stale (moved from a global heap of ``(heartbeat_at, id)``).

Entries are never removed eagerly: each one is checked when it reaches a heap's top,
so a run whose state changed since it was pushed is skipped there. The two time
heaps are rebuilt from the live runs when stale entries outnumber them, which keeps
memory bounded and every operation amortised O(log n).
"""

from __future__ import annotations

import heapq
from collections.abc import Collection
from dataclasses import dataclass

from reflow_core.types import ErrorInfo, RunStatus

__all__ = ["ClaimIndex", "RunRow"]

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
    lease_id: str | None = None
    queued: bool = False
    """An entry for this run sits in its workflow's ready heap (so never push a second)."""


def claimable(row: RunRow, now: int, stale_before: int | None) -> bool:
    """Whether ``claim_next_run(..., stale_before)`` at ``now`` may take ``row``."""
    status = row.status
    if status is _PENDING:
        return True
    if status is _RUNNING:
        beat = row.heartbeat_at
        return stale_before is not None and beat is not None and beat < stale_before
    return status in _SUSPENDED and row.wake_at is not None and row.wake_at <= now


class ClaimIndex:
    """Finds the oldest claimable run of some workflows in amortised O(log n)."""

    def __init__(self, runs: dict[str, RunRow]) -> None:
        self._runs = runs
        self._ready: dict[str, list[_Key]] = {}
        self._wakes: list[_Key] = []
        self._beats: list[_Key] = []
        self._running: set[str] = set()  # the live entries of the two time heaps
        self._suspended: set[str] = set()

    def clear(self) -> None:
        """Forget every entry (the store is being dropped)."""
        self._ready.clear()
        self._wakes.clear()
        self._beats.clear()
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
            self.beat(row)
        elif status in _SUSPENDED and row.wake_at is not None:
            self._suspended.add(row.id)
            heapq.heappush(self._wakes, (row.wake_at, row.id))
            if len(self._wakes) > 2 * len(self._suspended) + 64:
                runs = self._runs
                self._wakes = [
                    (at, i) for i in self._suspended if (at := runs[i].wake_at) is not None
                ]
                heapq.heapify(self._wakes)

    def beat(self, row: RunRow) -> None:
        """Note a running row's new ``heartbeat_at``, for stale detection."""
        if row.heartbeat_at is None:
            return
        heapq.heappush(self._beats, (row.heartbeat_at, row.id))
        # Every claim and heartbeat pushes, so superseded entries pile up; rebuild.
        if len(self._beats) > 2 * len(self._running) + 64:
            runs = self._runs
            self._beats = [
                (at, i) for i in self._running if (at := runs[i].heartbeat_at) is not None
            ]
            heapq.heapify(self._beats)

    def _queue(self, row: RunRow) -> None:
        if not row.queued:
            row.queued = True
            heapq.heappush(self._ready.setdefault(row.workflow, []), (row.created_at, row.id))

    def pop_oldest(
        self, workflow_names: Collection[str], now: int, stale_before: int | None
    ) -> RunRow | None:
        """Remove and return the claimable row with the lowest ``(created_at, id)``."""
        runs, wakes, beats = self._runs, self._wakes, self._beats
        while wakes and wakes[0][0] <= now:
            row = runs.get(heapq.heappop(wakes)[1])
            if row is not None and claimable(row, now, None):
                self._queue(row)
        if stale_before is not None:
            while beats and beats[0][0] < stale_before:
                at, run_id = heapq.heappop(beats)
                row = runs.get(run_id)
                if row is not None and row.status is _RUNNING and row.heartbeat_at == at:
                    self._queue(row)
        best: list[_Key] | None = None
        for name in workflow_names:
            heap = self._ready.get(name)
            while heap:
                row = runs.get(heap[0][1])
                if row is not None and claimable(row, now, stale_before):
                    if best is None or heap[0] < best[0]:
                        best = heap
                    break
                heapq.heappop(heap)
                if row is not None:
                    row.queued = False
                    if row.status is _RUNNING:  # not stale for this caller: back to the beats
                        self.beat(row)
        if best is None:
            return None
        row = runs[heapq.heappop(best)[1]]
        row.queued = False
        return row
