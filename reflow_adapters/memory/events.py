"""The event buffers behind ``MemoryStorage``: per run and name, oldest first, plus keys.

Plain synchronous code with no clock and no awaits: :class:`MemoryStorage` calls it
from inside its method bodies, so each call is part of one atomic adapter method.
Payloads are held as the codec bytes they were delivered as.
"""

from __future__ import annotations

from collections import deque

__all__ = ["EventBuffers"]

_Event = tuple[bytes | None, int]
"""A buffered event: its encoded payload and ``delivered_at``."""


class EventBuffers:
    """Every run's buffered events, and every delivery key each run has received."""

    def __init__(self) -> None:
        self._buffers: dict[str, dict[str, deque[_Event]]] = {}  # run id -> name -> events
        self._keys: dict[str, set[str]] = {}  # run id -> keys delivered (buffered or consumed)

    def clear(self) -> None:
        """Drop every event and key."""
        self._buffers.clear()
        self._keys.clear()

    def has(self, run_id: str, event_name: str) -> bool:
        """Whether an event of that name is buffered for the run."""
        by_name = self._buffers.get(run_id)
        return by_name is not None and event_name in by_name

    def delivered(self, run_id: str, key: str) -> bool:
        """Whether an event with this key was delivered to the run before (kept forever)."""
        keys = self._keys.get(run_id)
        return keys is not None and key in keys

    def push(
        self, run_id: str, event_name: str, data: bytes | None, now: int, key: str | None
    ) -> None:
        """Buffer an event behind the others of its name; remember its key."""
        self._buffers.setdefault(run_id, {}).setdefault(event_name, deque()).append((data, now))
        if key is not None:
            self._keys.setdefault(run_id, set()).add(key)

    def pop(self, run_id: str, event_name: str) -> _Event | None:
        """Remove and return the oldest buffered event of that name, or ``None``.

        Emptied buffers are dropped, so consumed events leave nothing behind.
        """
        by_name = self._buffers.get(run_id)
        buffered = by_name.get(event_name) if by_name is not None else None
        if by_name is None or not buffered:
            return None
        event = buffered.popleft()
        if not buffered:
            del by_name[event_name]
            if not by_name:
                del self._buffers[run_id]
        return event

    def drop_run(self, run_id: str) -> None:
        """Forget the run's buffered events and delivered keys (a purge)."""
        self._buffers.pop(run_id, None)
        self._keys.pop(run_id, None)
