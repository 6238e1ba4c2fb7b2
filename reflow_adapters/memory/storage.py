"""``MemoryStorage``: the storage contract held in one process's memory.

A real adapter, held to the same conformance suite as SQLite and PostgreSQL, for
tests, examples and workloads that need no durability. Every method body runs
without an ``await``, so on one event loop each call is atomic: that is the whole
concurrency story, and why there are no locks.

Values are stored as :func:`reflow_core.codec.encode` bytes and decoded on every
read, so a caller never shares a mutable object with storage, and a value that
cannot be persisted raises before any state changes (encode first, then mutate).

The claim index (which run is oldest and claimable, without a scan) lives in
:mod:`reflow_adapters.memory.claims`.
"""

from __future__ import annotations

import bisect
import uuid
from collections import deque
from collections.abc import Collection
from typing import Any

import msgspec

from reflow_adapters.memory.claims import ClaimIndex, RunRow
from reflow_core import codec
from reflow_core.errors import StorageError
from reflow_core.schedule import next_fire_time
from reflow_core.storage import Clock, system_clock
from reflow_core.types import (
    ClaimedRun,
    ClaimedSchedule,
    ConsumeResult,
    CreateRunResult,
    ErrorInfo,
    EventRecord,
    RunFilter,
    RunStatus,
    Schedule,
    StepResult,
    StepStatus,
    WorkflowRun,
)

__all__ = ["MemoryStorage"]

_PENDING = RunStatus.PENDING
_RUNNING = RunStatus.RUNNING
_REQUEUEABLE = frozenset({RunStatus.FAILED, RunStatus.CANCELLED})
_Key = tuple[int, str]


def _enc(value: Any) -> bytes | None:
    # None is by far the most common output; skip the codec for it.
    return None if value is None else codec.encode(value)


def _dec(data: bytes | None) -> Any:
    return None if data is None else codec.decode(data)


class MemoryStorage:
    """In-process storage adapter; see :class:`reflow_core.storage.StorageAdapter`.

    Not durable and not shareable across processes (``url`` is ``None``). ``clock``
    supplies "now" in epoch milliseconds, so tests can move time by hand.
    """

    url: str | None = None

    def __init__(self, *, clock: Clock | None = None) -> None:
        self._clock: Clock = clock if clock is not None else system_clock
        self._closed = False
        self._runs: dict[str, RunRow] = {}
        self._keys: dict[tuple[str, str], str] = {}
        self._order: list[_Key] = []  # every run's (created_at, id), sorted: list_runs pages it
        self._claims = ClaimIndex(self._runs)
        # run id -> step name -> (row with output=None, encoded output)
        self._steps: dict[str, dict[str, tuple[StepResult, bytes | None]]] = {}
        self._step_ids: dict[str, tuple[str, str]] = {}
        self._events: dict[str, dict[str, deque[tuple[bytes | None, int]]]] = {}
        self._schedules: dict[str, tuple[Schedule, bytes | None]] = {}

    # -- lifecycle ----------------------------------------------------------

    async def initialize(self) -> None:
        """Nothing to create; idempotent. Raises once closed."""
        self._check("initialize")

    async def close(self) -> None:
        """Drop all state; later calls raise ``StorageError``. Safe to call twice."""
        self._closed = True
        self._claims.clear()
        self._runs.clear()
        self._keys.clear()
        self._order.clear()
        self._steps.clear()
        self._step_ids.clear()
        self._events.clear()
        self._schedules.clear()

    def _check(self, operation: str) -> None:
        if self._closed:
            raise StorageError(operation, "storage is closed")

    def _move(
        self,
        row: RunRow,
        status: RunStatus,
        now: int,
        *,
        wake_at: int | None = None,
        waiting_for: str | None = None,
        lease_id: str | None = None,
    ) -> None:
        # Every status change goes through here, so the claim index never misses one.
        row.status = status
        row.wake_at = wake_at
        row.waiting_for = waiting_for
        row.lease_id = lease_id
        row.updated_at = now
        self._claims.file(row)

    def _held(self, run_id: str, lease_id: str) -> RunRow | None:
        row = self._runs.get(run_id)
        if row is None or row.status is not _RUNNING or row.lease_id != lease_id:
            return None
        return row

    def _record(self, row: RunRow) -> WorkflowRun:
        return WorkflowRun(
            id=row.id,
            workflow=row.workflow,
            input=_dec(row.input),
            status=row.status,
            created_at=row.created_at,
            updated_at=row.updated_at,
            idempotency_key=row.idempotency_key,
            output=_dec(row.output),
            error=row.error,
            wake_at=row.wake_at,
            waiting_for=row.waiting_for,
            heartbeat_at=row.heartbeat_at,
            attempt=row.attempt,
        )

    # -- runs ---------------------------------------------------------------

    async def create_run(self, run: WorkflowRun) -> CreateRunResult:
        """Store a new run, or return the run already holding its idempotency key."""
        self._check("create_run")
        data, output = _enc(run.input), _enc(run.output)
        if run.idempotency_key is not None:
            existing = self._keys.get((run.workflow, run.idempotency_key))
            if existing is not None:
                return CreateRunResult(self._record(self._runs[existing]), False)
        if run.id in self._runs:
            raise StorageError("create_run", f"a run with id {run.id!r} already exists")
        row = RunRow(
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
        )
        self._runs[row.id] = row
        if row.idempotency_key is not None:
            self._keys[(row.workflow, row.idempotency_key)] = row.id
        bisect.insort(self._order, (row.created_at, row.id))  # appends when created in order
        self._claims.file(row)
        return CreateRunResult(self._record(row), True)

    async def get_run(self, run_id: str) -> WorkflowRun | None:
        """The run, or ``None``."""
        self._check("get_run")
        row = self._runs.get(run_id)
        return None if row is None else self._record(row)

    async def list_runs(self, filter: RunFilter) -> list[WorkflowRun]:
        """Newest first by ``(created_at, id)``, filtered, with exact keyset paging."""
        self._check("list_runs")
        order, runs = self._order, self._runs
        if filter.before is None:
            i = len(order)
        else:  # "" sorts before every id, so the key alone means created_at < before
            i = bisect.bisect_left(order, (filter.before, filter.before_id or ""))
        status, workflow = filter.status, filter.workflow
        found: list[WorkflowRun] = []
        while i > 0 and len(found) < filter.limit:
            i -= 1
            row = runs[order[i][1]]
            if (status is None or row.status == status) and (
                workflow is None or row.workflow == workflow
            ):
                found.append(self._record(row))
        return found

    async def claim_next_run(
        self, workflow_names: Collection[str], stale_before: int | None = None
    ) -> ClaimedRun | None:
        """Claim the oldest claimable run of the named workflows (see the contract)."""
        self._check("claim_next_run")
        now = self._clock()
        row = self._claims.pop_oldest(workflow_names, now, stale_before)
        if row is None:
            return None
        lease_id = str(uuid.uuid4())
        row.heartbeat_at = now
        row.attempt += 1
        self._move(row, _RUNNING, now, lease_id=lease_id)
        return ClaimedRun(self._record(row), lease_id)

    async def heartbeat_run(self, run_id: str, lease_id: str) -> bool:
        """Renew a held lease; ``False`` once it is lost."""
        self._check("heartbeat_run")
        row = self._held(run_id, lease_id)
        if row is None:
            return False
        row.heartbeat_at = self._clock()
        self._claims.beat(row)
        return True

    async def sleep_run(self, run_id: str, lease_id: str, wake_at: int) -> bool:
        """Held run to ``sleeping`` until ``wake_at``, lease released; ``False`` if not held."""
        self._check("sleep_run")
        row = self._held(run_id, lease_id)
        if row is None:
            return False
        self._move(row, RunStatus.SLEEPING, self._clock(), wake_at=wake_at)
        return True

    async def wait_run(
        self, run_id: str, lease_id: str, event_name: str, wake_at: int | None
    ) -> bool:
        """Held run to ``waiting`` for ``event_name`` (``pending`` if one is buffered)."""
        self._check("wait_run")
        row = self._held(run_id, lease_id)
        if row is None:
            return False
        now = self._clock()
        if self._events.get(run_id, {}).get(event_name):
            self._move(row, _PENDING, now)
        else:
            self._move(row, RunStatus.WAITING, now, wake_at=wake_at, waiting_for=event_name)
        return True

    async def update_run_status(
        self,
        run_id: str,
        status: RunStatus,
        *,
        expected: Collection[RunStatus] | None = None,
    ) -> bool:
        """Set a status with no lease check, clearing lease and wake; optionally conditional."""
        self._check("update_run_status")
        row = self._runs.get(run_id)
        if row is None or (expected is not None and row.status not in expected):
            return False
        self._move(row, RunStatus(status), self._clock())
        return True

    async def update_claimed_run_status(
        self,
        run_id: str,
        lease_id: str,
        status: RunStatus,
        *,
        output: Any = None,
        error: ErrorInfo | None = None,
    ) -> bool:
        """Set a held run's status with ``output``/``error``; lease kept only when running."""
        self._check("update_claimed_run_status")
        data = _enc(output)
        row = self._held(run_id, lease_id)
        if row is None:
            return False
        status = RunStatus(status)
        row.output, row.error = data, error
        self._move(row, status, self._clock(), lease_id=lease_id if status is _RUNNING else None)
        return True

    async def requeue_run(self, run_id: str) -> bool:
        """A failed or cancelled run back to ``pending``, dropping only its failed steps."""
        self._check("requeue_run")
        row = self._runs.get(run_id)
        if row is None or row.status not in _REQUEUEABLE:
            return False
        steps = self._steps.get(run_id, {})
        for name, (step, _) in list(steps.items()):
            if step.status is StepStatus.FAILED:
                del steps[name]
                del self._step_ids[step.id]
        row.output = row.error = None
        self._move(row, _PENDING, self._clock())
        return True

    # -- steps --------------------------------------------------------------

    async def save_step_result(self, result: StepResult, lease_id: str | None = None) -> bool:
        """Upsert a step row by id; with ``lease_id``, only while that lease is held."""
        self._check("save_step_result")
        output = _enc(result.output)
        if lease_id is not None and self._held(result.run_id, lease_id) is None:
            return False
        created_at = self._step_created_at(result, "save_step_result")
        self._put_step(result, created_at, output)
        return True

    def _step_created_at(self, result: StepResult, operation: str) -> int:
        """The ``created_at`` an upsert of ``result`` stores; raises on an identity clash.

        Checks only, so a caller that must change other state as well (consume_event)
        can raise before it has changed anything.
        """
        pair = (result.run_id, result.name)
        owner = self._step_ids.get(result.id)
        if owner is not None and owner != pair:
            raise StorageError(
                operation,
                f"step id {result.id!r} already names step {owner[1]!r} of run {owner[0]!r}",
            )
        existing = self._steps.get(result.run_id, {}).get(result.name)
        if existing is None:
            return result.created_at
        if existing[0].id != result.id:
            raise StorageError(
                operation,
                f"step {result.name!r} of run {result.run_id!r} already has id "
                f"{existing[0].id!r}, not {result.id!r}",
            )
        return existing[0].created_at

    def _put_step(self, result: StepResult, created_at: int, output: bytes | None) -> None:
        steps = self._steps.setdefault(result.run_id, {})
        steps[result.name] = (
            msgspec.structs.replace(result, output=None, created_at=created_at),
            output,
        )
        self._step_ids[result.id] = (result.run_id, result.name)

    async def get_step_results(self, run_id: str) -> list[StepResult]:
        """The run's step rows ordered by ``(created_at, id)``."""
        self._check("get_step_results")
        rows = sorted(
            self._steps.get(run_id, {}).values(), key=lambda r: (r[0].created_at, r[0].id)
        )
        return [msgspec.structs.replace(step, output=_dec(data)) for step, data in rows]

    # -- events -------------------------------------------------------------

    async def deliver_event(self, run_id: str, event_name: str, payload: Any) -> bool:
        """Buffer an event; a run waiting for that name goes to ``pending``."""
        self._check("deliver_event")
        data = _enc(payload)
        row = self._runs.get(run_id)
        if row is None:
            return False
        now = self._clock()
        self._events.setdefault(run_id, {}).setdefault(event_name, deque()).append((data, now))
        if row.status is RunStatus.WAITING and row.waiting_for == event_name:
            self._move(row, _PENDING, now)
        return True

    async def take_event(self, run_id: str, event_name: str) -> EventRecord | None:
        """Remove and return the oldest buffered event of that name, or ``None``."""
        self._check("take_event")
        by_name = self._events.get(run_id)
        buffered = by_name.get(event_name) if by_name is not None else None
        if by_name is None or not buffered:
            return None
        data, delivered_at = self._pop_event(run_id, event_name)
        return EventRecord(_dec(data), delivered_at)

    async def consume_event(
        self, event_name: str, checkpoint: StepResult, lease_id: str
    ) -> ConsumeResult:
        """Take the oldest buffered event and checkpoint its payload, all or nothing."""
        self._check("consume_event")
        run_id = checkpoint.run_id
        if self._held(run_id, lease_id) is None:
            return ConsumeResult(held=False)
        buffered = self._events.get(run_id, {}).get(event_name)
        if not buffered:
            return ConsumeResult(held=True)
        # Every check that can raise comes before the first change: no await splits this
        # body, so nothing else can observe (or interleave with) a half-done consume.
        created_at = self._step_created_at(checkpoint, "consume_event")
        data, delivered_at = self._pop_event(run_id, event_name)
        # The stored bytes are the payload exactly as delivered: no re-encoding.
        self._put_step(checkpoint, created_at, data)
        return ConsumeResult(held=True, event=EventRecord(_dec(data), delivered_at))

    def _pop_event(self, run_id: str, event_name: str) -> tuple[bytes | None, int]:
        """Remove the oldest buffered event (which must exist); drop emptied buffers."""
        by_name = self._events[run_id]
        buffered = by_name[event_name]
        event = buffered.popleft()
        if not buffered:  # drop empty buffers so consumed events leave nothing behind
            del by_name[event_name]
            if not by_name:
                del self._events[run_id]
        return event

    # -- schedules ----------------------------------------------------------

    async def upsert_schedule(self, schedule: Schedule) -> Schedule:
        """Insert or update by key, keeping ``created_at`` (and cadence if unchanged)."""
        self._check("upsert_schedule")
        data = _enc(schedule.input)
        stored = msgspec.structs.replace(schedule, input=None)
        existing = self._schedules.get(schedule.key)
        if existing is not None:
            old = existing[0]
            keep_next = old.recurrence == schedule.recurrence
            stored = msgspec.structs.replace(
                stored,
                created_at=old.created_at,
                next_run_at=old.next_run_at if keep_next else schedule.next_run_at,
            )
        self._schedules[schedule.key] = (stored, data)
        return msgspec.structs.replace(stored, input=_dec(data))

    async def claim_due_schedule(
        self, workflow_names: Collection[str], now: int
    ) -> ClaimedSchedule | None:
        """Claim the earliest due schedule (ties by key) and advance it in the same step."""
        self._check("claim_due_schedule")
        names = set(workflow_names)
        due = [
            (s.next_run_at, key)
            for key, (s, _) in self._schedules.items()
            if s.workflow in names and s.next_run_at <= now
        ]
        if not due:
            return None
        slot, key = min(due)
        schedule, data = self._schedules[key]
        # Computed before any write: a bad cron expression raises with nothing changed.
        following = next_fire_time(schedule.recurrence, slot, now)
        stored = msgspec.structs.replace(schedule, next_run_at=following, updated_at=self._clock())
        self._schedules[key] = (stored, data)
        return ClaimedSchedule(msgspec.structs.replace(stored, input=_dec(data)), slot)

    async def delete_schedule(self, key: str) -> bool:
        """Remove a schedule; ``False`` if there was none."""
        self._check("delete_schedule")
        return self._schedules.pop(key, None) is not None

    async def list_schedules(self) -> list[Schedule]:
        """All schedules ordered by key."""
        self._check("list_schedules")
        return [
            msgspec.structs.replace(s, input=_dec(data))
            for _, (s, data) in sorted(self._schedules.items(), key=lambda item: item[0])
        ]
