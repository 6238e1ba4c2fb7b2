"""Finished runs by ``(updated_at, id)``, per status: what ``purge_runs`` takes first.

A purge must find the oldest finished runs without scanning every run. One heap per
finished status holds ``(updated_at, id)`` entries, pushed whenever a run enters that
status. Entries are never removed eagerly: one whose run has since changed (requeued,
finished again later, deleted) no longer matches its row and is dropped when it
reaches the top. Separate heaps per status let a purge narrowed to ``failed`` skip
every ``completed`` run without touching it.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection

from reflow_adapters.memory.claims import RunRow
from reflow_core.storage import TERMINAL_STATUSES
from reflow_core.types import RunStatus

__all__ = ["FinishedIndex"]

_Key = tuple[int, str]


class FinishedIndex:
    """Finds the oldest finished runs of some statuses in amortised O(log n) each."""

    def __init__(self, runs: dict[str, RunRow]) -> None:
        self._runs = runs
        self._heaps: dict[RunStatus, list[_Key]] = {s: [] for s in TERMINAL_STATUSES}

    def clear(self) -> None:
        """Forget every entry (the store is being dropped)."""
        for heap in self._heaps.values():
            heap.clear()

    def file(self, row: RunRow) -> None:
        """Note ``row``'s new state; call after every status change."""
        heap = self._heaps.get(row.status)
        if heap is not None:
            heapq.heappush(heap, (row.updated_at, row.id))

    def _top(self, status: RunStatus) -> _Key | None:
        heap, runs = self._heaps[status], self._runs
        while heap:
            at, run_id = heap[0]
            row = runs.get(run_id)
            if row is not None and row.status is status and row.updated_at == at:
                return heap[0]
            heapq.heappop(heap)  # stale: the run changed or is gone
        return None

    def take_oldest(self, statuses: Collection[RunStatus], before: int, limit: int) -> list[RunRow]:
        """Remove from the index and return up to ``limit`` rows of ``statuses`` with
        ``updated_at < before``, oldest ``(updated_at, id)`` first."""
        taken: list[RunRow] = []
        while len(taken) < limit:
            best: tuple[_Key, RunStatus] | None = None
            for status in statuses:
                top = self._top(status)
                if top is not None and top[0] < before and (best is None or top < best[0]):
                    best = (top, status)
            if best is None:
                break
            heapq.heappop(self._heaps[best[1]])
            taken.append(self._runs[best[0][1]])
        return taken
