"""The schedule table behind ``MemoryStorage``: upsert, claim-and-advance, delete, list.

Plain synchronous code with no awaits: :class:`MemoryStorage` calls it from inside its
method bodies, passing the store's clock, so each call is one atomic adapter method.
Inputs are held as codec bytes next to a copy of the schedule without its input.
"""

from __future__ import annotations

from collections.abc import Collection

import msgspec

from reflow_core.damage import decode_stored
from reflow_core.schedule import next_fire_time
from reflow_core.types import ClaimedSchedule, Schedule

__all__ = ["ScheduleTable"]


def _out(schedule: Schedule, data: bytes | None) -> Schedule:
    return msgspec.structs.replace(schedule, input=None if data is None else decode_stored(data))


class ScheduleTable:
    """Schedules by key, each with its encoded input."""

    def __init__(self) -> None:
        self._rows: dict[str, tuple[Schedule, bytes | None]] = {}

    def clear(self) -> None:
        """Drop every schedule."""
        self._rows.clear()

    def upsert(self, schedule: Schedule, data: bytes | None) -> Schedule:
        """Insert or update by key, keeping ``created_at`` (and cadence if unchanged)."""
        stored = msgspec.structs.replace(schedule, input=None)
        existing = self._rows.get(schedule.key)
        if existing is not None:
            old = existing[0]
            keep_next = old.recurrence == schedule.recurrence
            stored = msgspec.structs.replace(
                stored,
                created_at=old.created_at,
                next_run_at=old.next_run_at if keep_next else schedule.next_run_at,
            )
        self._rows[schedule.key] = (stored, data)
        return _out(stored, data)

    def claim_due(self, workflow_names: Collection[str], now: int) -> ClaimedSchedule | None:
        """Claim the earliest schedule due at ``now`` (ties by key) and advance it."""
        names = set(workflow_names)
        due = [
            (s.next_run_at, key)
            for key, (s, _) in self._rows.items()
            if s.workflow in names and s.next_run_at <= now
        ]
        if not due:
            return None
        slot, key = min(due)
        schedule, data = self._rows[key]
        # Computed before any write: a bad cron expression raises with nothing changed.
        following = next_fire_time(schedule.recurrence, slot, now)
        stored = msgspec.structs.replace(schedule, next_run_at=following, updated_at=now)
        self._rows[key] = (stored, data)
        return ClaimedSchedule(_out(stored, data), slot)

    def delete(self, key: str) -> bool:
        """Remove a schedule; ``False`` if there was none."""
        return self._rows.pop(key, None) is not None

    def listing(self) -> list[Schedule]:
        """All schedules ordered by key."""
        return [_out(s, data) for _, (s, data) in sorted(self._rows.items(), key=lambda i: i[0])]
