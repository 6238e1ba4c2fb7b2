"""Durable schedules: registering them, and the loop that fires due occurrences.

A schedule enqueues ``workflow`` with ``input`` every ``every`` (an interval) or on a
cron expression evaluated in an IANA time zone (UTC by default). Schedules live in
storage and are shared by every worker; each worker fires those of the workflows it
registered, and one occurrence creates one run across all of them.

Keys. A schedule's key defaults to a hash of (workflow, cadence, time zone, input),
so registering the same schedule on every start-up is a no-op that keeps its cadence.
Pass ``key=`` to be able to change a schedule's cadence or input in place; a changed
cadence with the default key is a *new* schedule (unschedule the old one).

Timing (arithmetic in :mod:`reflow_core.schedule`):

* An interval first fires one interval after registration, then keeps its phase.
* A cron schedule fires at the next match strictly after registration.
* Missed occurrences (all workers down) are skipped: the schedule fires once for the
  latest missed slot, then resumes its cadence. ``catch_up=True`` fires every missed
  occurrence instead.
* Daylight saving time, for a cron in a zone that has it (the rules in full are in
  :mod:`reflow_core.schedule`): for a fixed time (minute and hour fields not starting
  with ``*``), a wall-clock time that does not exist (the spring-forward gap, e.g.
  02:30 on 2024-03-10 in America/New_York) fires once at the first instant after the
  gap (03:00); a time that occurs twice (the autumn overlap, 01:30 on 2024-11-03) fires
  once, at its first occurrence, and a schedule registered during the second pass
  first fires the next day. Expressions whose minute or hour field starts with ``*``
  follow real time: they fire in both passes of a repeated hour and not at all in a
  skipped one.
* Every claim moves a schedule strictly forward. Should an adapter ever leave a
  schedule at or before the slot it just fired, the loop reports a ``StorageError`` and
  sets that schedule's workflow aside (claims are per workflow) until the schedule's
  next run time changes, instead of spinning on it; other workflows keep firing.

Firing. The loop runs beside the dispatcher, so it fires even when every run slot is
busy. For each due occurrence it first *enqueues* the run, with the idempotency key
``reflow.schedule:<key>:<slot>``, and only then claims (advances) the schedule. A
crash between the two leaves the occurrence due; whichever worker fires it next finds
the run already created under that key. So every occurrence yields exactly one run,
with one narrow exception: when two workers race for the same schedule and the claim
hands this worker a later slot than the one it enqueued (possible with ``catch_up`` or
several due schedules), that slot is enqueued after the claim, and a crash in that
instant loses it (at most once).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from reflow_core import codec
from reflow_core.durations import Duration, to_millis
from reflow_core.errors import ConfigError, IdempotencyConflictError, StorageError
from reflow_core.identifiers import MAX_SCHEDULE_KEY_LENGTH, check_identifier
from reflow_core.observers import Observers
from reflow_core.schedule import first_fire_time, validate_recurrence
from reflow_core.storage import Clock, StorageAdapter
from reflow_core.types import Recurrence, Schedule
from reflow_core.waits import wait_set
from reflow_core.workflow import Workflow

__all__ = ["Scheduler", "build_schedule", "default_key", "occurrence_key"]

_ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
"""Common nicknames, expanded before the expression is stored and evaluated."""

Enqueue = Callable[[str, Any, str], Awaitable[object]]
"""Enqueue (workflow name, plain input, idempotency key)."""


def default_key(workflow: str, recurrence: Recurrence, plain_input: Any) -> str:
    """A stable key for (workflow, cadence, time zone, input): 22 url-safe characters."""
    cadence = (
        f"every:{recurrence.every_ms}"
        if recurrence.every_ms is not None
        else f"cron:{recurrence.cron}@{recurrence.timezone}"
    )
    digest = hashlib.sha256(
        workflow.encode() + b"\0" + cadence.encode() + b"\0" + codec.canonical(plain_input)
    ).digest()
    return base64.urlsafe_b64encode(digest).decode()[:22]


def _normalize_cron(cron: str) -> str:
    text = " ".join(cron.split())
    return _ALIASES.get(text.lower(), text)


def occurrence_key(key: str, slot: int) -> str:
    """The idempotency key of the run created for occurrence ``slot`` of schedule ``key``."""
    return f"reflow.schedule:{key}:{slot}"


def build_schedule(
    workflow: Workflow[Any],
    input: Any,
    *,
    every: Duration | None,
    cron: str | None,
    timezone: str,
    key: str | None,
    catch_up: bool,
    now: int,
) -> Schedule:
    """Validate a registration and build the record to upsert (first firing included).

    Raises :class:`ConfigError` for a malformed, unsatisfiable or ambiguous recurrence,
    an unknown time zone or a bad key, and ``ValidationError`` / ``SerializationError``
    for an input the workflow would refuse. Nothing is stored by this function.
    """
    if cron is not None and not isinstance(cron, str):
        raise ConfigError(f"cron must be a str, got {cron!r}")
    if not isinstance(timezone, str):
        raise ConfigError(f"timezone must be an IANA zone name (str), got {timezone!r}")
    if not isinstance(catch_up, bool):
        raise ConfigError(f"catch_up must be a bool, got {catch_up!r}")
    if key is not None:
        check_identifier(key, "schedule key", MAX_SCHEDULE_KEY_LENGTH)
    every_ms = (
        None if every is None else to_millis(every, what="schedule interval", allow_zero=False)
    )
    recurrence = Recurrence(
        every_ms=every_ms,
        cron=None if cron is None else _normalize_cron(cron),
        timezone=timezone,
        catch_up=catch_up,
    )
    validate_recurrence(recurrence)
    plain = workflow.validate_input(input)
    codec.check(plain)
    return Schedule(
        key=key or default_key(workflow.name, recurrence, plain),
        workflow=workflow.name,
        input=plain,
        recurrence=recurrence,
        next_run_at=first_fire_time(recurrence, now),
        created_at=now,
        updated_at=now,
    )


class Scheduler:
    """Fires the due schedules of ``names``: enqueue the occurrence's run, then claim it."""

    def __init__(
        self,
        *,
        storage: StorageAdapter,
        names: Collection[str],
        clock: Clock,
        observers: Observers,
        enqueue: Enqueue,
        poll_interval: float,
    ) -> None:
        self.storage = storage
        self.names = frozenset(names)
        self.clock = clock
        self.observers = observers
        self._enqueue = enqueue
        self.poll_interval = poll_interval
        self.wake = asyncio.Event()
        self._next_at: int | None = None
        # The store's clock minus ours, as last seen: due times are the store's, and this
        # turns the next one into a local wait.
        self._offset = 0
        # Schedules an adapter failed to advance: key -> (workflow, the next_run_at it
        # was left at, at or before the slot that fired). Their workflows are set aside
        # until that value changes.
        self._stuck: dict[str, tuple[str, int]] = {}

    def poke(self) -> None:
        """A schedule was registered or changed: look again now."""
        self.wake.set()

    async def _due(self, now: int) -> list[Schedule] | None:
        """Our due schedules in claim order; ``None`` (reported) if storage failed.

        Also remembers the earliest future firing, so the loop wakes just in time.
        """
        try:
            schedules = await self.storage.list_schedules()
        except Exception as exc:
            await self.observers.error(exc)
            return None
        ours = [s for s in schedules if s.workflow in self.names]
        if self._stuck:
            current = {s.key: s.next_run_at for s in ours}
            self._stuck = {k: v for k, v in self._stuck.items() if current.get(k) == v[1]}
            blocked = self._blocked()
            ours = [s for s in ours if s.workflow not in blocked]
        later = [s.next_run_at for s in ours if s.next_run_at > now]
        self._next_at = min(later) if later else None
        return sorted(
            (s for s in ours if s.next_run_at <= now), key=lambda s: (s.next_run_at, s.key)
        )

    async def _create(self, schedule: Schedule, slot: int) -> bool:
        """Enqueue one occurrence; ``False`` if storage failed and it must stay due."""
        try:
            await self._enqueue(
                schedule.workflow, schedule.input, occurrence_key(schedule.key, slot)
            )
        except IdempotencyConflictError:
            pass  # the occurrence already has its run (enqueued before an input change)
        except StorageError as exc:
            await self.observers.error(exc)
            return False
        except Exception as exc:
            # The stored input no longer suits the workflow: report it and skip this
            # occurrence rather than retrying it forever.
            await self.observers.error(exc)
        return True

    async def fire_due(self) -> int:
        """Fire every occurrence due now; return how many were claimed. Never raises."""
        fired = 0
        while True:
            try:
                now = await self.storage.now()  # due times are judged by the store's clock
            except Exception as exc:
                await self.observers.error(exc)
                return fired
            self._offset = now - self.clock()
            due = await self._due(now)
            if not due:
                return fired
            first = due[0]
            if not await self._create(first, first.next_run_at):
                return fired
            try:
                claimed = await self.storage.claim_due_schedule(self.names - self._blocked())
            except Exception as exc:
                await self.observers.error(exc)
                return fired
            if claimed is None:
                return fired  # another worker claimed it after our enqueue: it is done
            if (claimed.schedule.key, claimed.slot) != (first.key, first.next_run_at):
                await self._create(claimed.schedule, claimed.slot)  # raced: see module doc
            fired += 1
            if claimed.schedule.next_run_at <= claimed.slot:
                await self._not_advanced(claimed.schedule, claimed.slot)
            await asyncio.sleep(0)  # a long catch-up must not hold the event loop

    def _blocked(self) -> frozenset[str]:
        return frozenset(workflow for workflow, _ in self._stuck.values())

    async def _not_advanced(self, schedule: Schedule, slot: int) -> None:
        """The claim left ``schedule`` due at or before ``slot``: claiming it again would
        repeat (or go back to) an occurrence, forever, and hold back every schedule due
        after it. Report it and set its workflow aside until it moves."""
        self._stuck[schedule.key] = (schedule.workflow, schedule.next_run_at)
        await self.observers.error(
            StorageError(
                "claim_due_schedule",
                f"schedule {schedule.key!r} fired slot {slot} but was advanced to "
                f"{schedule.next_run_at}, not past it; this worker fires no schedule of "
                f"workflow {schedule.workflow!r} until that next run time changes",
            )
        )

    def _idle_timeout(self) -> float:
        timeout = self.poll_interval
        if self._next_at is not None:
            timeout = min(timeout, (self._next_at - self.clock() - self._offset) / 1000)
        return max(timeout, 0.0)

    async def loop(self) -> None:
        """Fire due schedules until cancelled; sleep until the next known firing, the poll
        interval (to see schedules registered elsewhere) or a poke, whichever is first."""
        while True:
            self.wake.clear()
            await self.fire_due()
            await wait_set(self.wake, self._idle_timeout())
