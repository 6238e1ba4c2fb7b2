"""``MemoryStorage``: the storage contract held in one process's memory.

A real adapter, held to the same conformance suite as SQLite and PostgreSQL, for
tests, examples and workloads that need no durability. Every method body runs
without an ``await``, so on one event loop each call is atomic: that is the whole
concurrency story, and why there are no locks.

The store's clock is the ``clock`` given at construction (the system clock by
default): it alone decides whether a lease has expired, a wake-up is due or a
schedule fires, and it is what :meth:`MemoryStorage.now` answers.

Values are stored as :func:`reflow_core.codec.encode` bytes and decoded on every
read, so a caller never shares a mutable object with storage, and a value that
cannot be persisted raises before any state changes (encode first, then mutate).
Identifiers (ids, names, keys) are checked first (:mod:`reflow_core.identifiers`: an
invalid one raises ``InvalidIdentifierError`` with nothing read or written) and then
used as given, as dict keys or inside tuples, never joined into one string.

The claim index (which run is oldest and claimable, without a scan) lives in
:mod:`reflow_adapters.memory.claims`; the step rows, event buffers and schedules in
:mod:`~reflow_adapters.memory.steps`, :mod:`~reflow_adapters.memory.events` and
:mod:`~reflow_adapters.memory.schedules`.
"""

from __future__ import annotations

import bisect
from collections.abc import Collection
from typing import Any

from reflow_adapters.memory.claims import ClaimIndex, RunRow
from reflow_adapters.memory.events import EventBuffers
from reflow_adapters.memory.finished import FinishedIndex
from reflow_adapters.memory.schedules import ScheduleTable
from reflow_adapters.memory.steps import StepTable, as_record
from reflow_core import codec
from reflow_core.damage import decode_stored
from reflow_core.errors import StorageError
from reflow_core.identifiers import (
    MAX_SCHEDULE_KEY_LENGTH,
    MAX_STEP_ID_LENGTH,
    check_holder,
    check_identifier,
    check_names,
    check_run,
    check_schedule,
    check_step,
)
from reflow_core.lease import new_lease_id
from reflow_core.storage import Clock, check_limit, check_purge_args, system_clock
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

__all__ = ["MemoryStorage"]

_PENDING = RunStatus.PENDING
_RUNNING = RunStatus.RUNNING
_REQUEUEABLE = frozenset({RunStatus.FAILED, RunStatus.CANCELLED})
_Key = tuple[int, str]
_MAX_KNOWN_NAMES = 4096


def _enc(value: Any) -> bytes | None:
    # None is by far the most common output; skip the codec for it.
    return None if value is None else codec.encode(value)


def _dec(data: bytes | None) -> Any:
    return None if data is None else decode_stored(data)


class MemoryStorage:
    """In-process storage adapter; see :class:`reflow_core.storage.StorageAdapter`.

    Not durable and not shareable across processes (``url`` is ``None``). ``clock``
    is the store's clock ("now" in epoch milliseconds), so tests can move time by hand.
    """

    url: str | None = None

    def __init__(self, *, clock: Clock | None = None) -> None:
        self._clock: Clock = clock if clock is not None else system_clock
        self._closed = False
        self._runs: dict[str, RunRow] = {}
        self._keys: dict[tuple[str, str], str] = {}
        self._order: list[_Key] = []  # every run's (created_at, id), sorted: list_runs pages it
        self._claims = ClaimIndex(self._runs)
        self._finished = FinishedIndex(self._runs)
        self._steps = StepTable()
        self._events = EventBuffers()
        self._schedules = ScheduleTable()
        # Step names already found valid: a workflow has a few, saved once per run each.
        self._step_names: set[str] = set()

    # -- lifecycle ----------------------------------------------------------

    async def initialize(self) -> None:
        """Nothing to create; idempotent. Raises once closed."""
        self._check("initialize")

    async def close(self) -> None:
        """Drop all state; later calls raise ``StorageError``. Safe to call twice."""
        self._closed = True
        self._claims.clear()
        self._finished.clear()
        self._runs.clear()
        self._keys.clear()
        self._order.clear()
        self._steps.clear()
        self._events.clear()
        self._schedules.clear()

    async def now(self) -> int:
        """The store's clock: the ``clock`` given at construction."""
        self._check("now")
        return self._clock()

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
        keep_lease: bool = False,
    ) -> None:
        # Every status change goes through here, so the claim index never misses one,
        # and no write leaves lease fields behind unless it keeps the run held.
        row.status = status
        row.wake_at = wake_at
        row.waiting_for = waiting_for
        if not keep_lease:
            row.release()
        row.updated_at = now
        self._claims.file(row)
        self._finished.file(row)

    def _check_run_id(self, run_id: str) -> None:
        # A stored run's id was checked when it was created: only an unknown one needs
        # the identifier check (which raises for an invalid one; a valid one is "missing").
        if run_id not in self._runs:
            check_identifier(run_id, "run id")

    def _held(self, run_id: str, lease_id: str) -> RunRow | None:
        row = self._runs.get(run_id)
        if row is None or row.status is not _RUNNING or row.lease_id != lease_id:
            return None
        return row

    # -- runs ---------------------------------------------------------------

    async def create_run(self, run: WorkflowRun) -> CreateRunResult:
        """Store a new run, or return the run already holding its idempotency key."""
        check_run(run)
        self._check("create_run")
        data, output = _enc(run.input), _enc(run.output)
        if run.idempotency_key is not None:
            existing = self._keys.get((run.workflow, run.idempotency_key))
            if existing is not None:
                return CreateRunResult(self._runs[existing].record(), False)
        if run.id in self._runs:
            raise StorageError("create_run", f"a run with id {run.id!r} already exists")
        row = RunRow.create(run, data, output)
        self._runs[row.id] = row
        if row.idempotency_key is not None:
            self._keys[(row.workflow, row.idempotency_key)] = row.id
        bisect.insort(self._order, (row.created_at, row.id))  # appends when created in order
        self._claims.file(row)
        self._finished.file(row)
        return CreateRunResult(row.record(), True)

    async def get_run(self, run_id: str) -> WorkflowRun | None:
        """The run, or ``None``."""
        self._check_run_id(run_id)
        self._check("get_run")
        row = self._runs.get(run_id)
        return None if row is None else row.record()

    async def list_runs(self, filter: RunFilter) -> list[WorkflowRun]:
        """Newest first by ``(created_at, id)``, filtered, with exact keyset paging."""
        if filter.workflow is not None:
            check_identifier(filter.workflow, "workflow name")
        if filter.before_id is not None:
            check_identifier(filter.before_id, "run id")
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
                found.append(row.record())
        return found

    async def claim_next_run(
        self,
        workflow_names: Collection[str],
        *,
        lease_ms: int,
        holder: LeaseHolder | None = None,
    ) -> ClaimedRun | None:
        """Claim the oldest claimable run of the named workflows (see the contract)."""
        check_names(workflow_names)
        check_holder(holder)
        self._check("claim_next_run")
        now = self._clock()
        row = self._claims.pop_oldest(workflow_names, now)
        return None if row is None else self._claim(row, now, lease_ms, holder)

    async def claim_runs(
        self,
        workflow_names: Collection[str],
        *,
        lease_ms: int,
        holder: LeaseHolder | None = None,
        limit: int,
    ) -> list[ClaimedRun]:
        """Claim up to ``limit`` runs, oldest first, each as ``claim_next_run`` would."""
        check_limit(limit, "claim_runs")
        check_names(workflow_names)
        check_holder(holder)
        self._check("claim_runs")
        now = self._clock()
        claimed: list[ClaimedRun] = []
        promote = True  # once: every pop is at the same ``now``
        while len(claimed) < limit:
            row = self._claims.pop_oldest(workflow_names, now, promote=promote)
            if row is None:
                break
            promote = False
            claimed.append(self._claim(row, now, lease_ms, holder))
        return claimed

    def _claim(
        self, row: RunRow, now: int, lease_ms: int, holder: LeaseHolder | None
    ) -> ClaimedRun:
        if row.status is _RUNNING:  # taken over from a lease that expired
            row.recoveries += 1
        row.attempt += 1
        row.lease_id = new_lease_id()
        row.claimed_at = row.heartbeat_at = now
        row.lease_ms = lease_ms
        row.lease_expires_at = now + lease_ms
        row.holder = holder
        self._move(row, _RUNNING, now, keep_lease=True)
        return ClaimedRun(row.record(), row.lease_id)

    async def heartbeat_run(self, run_id: str, lease_id: str) -> bool:
        """Renew a held lease by its stored length; ``False`` once it is lost."""
        self._check_run_id(run_id)
        self._check("heartbeat_run")
        row = self._held(run_id, lease_id)
        if row is None:
            return False
        now = self._clock()
        row.heartbeat_at = now
        if row.lease_ms is not None:
            row.lease_expires_at = now + row.lease_ms
            self._claims.renew(row)
        return True

    async def sleep_run(self, run_id: str, lease_id: str, wake_at: int) -> bool:
        """Held run to ``sleeping`` until ``wake_at``, lease released; ``False`` if not held."""
        self._check_run_id(run_id)
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
        self._check_run_id(run_id)
        check_identifier(event_name, "event name")
        self._check("wait_run")
        row = self._held(run_id, lease_id)
        if row is None:
            return False
        now = self._clock()
        if self._events.has(run_id, event_name):
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
        self._check_run_id(run_id)
        self._check("update_run_status")
        row = self._runs.get(run_id)
        if row is None or (expected is not None and row.status not in expected):
            return False
        now = self._clock()
        self._move(row, RunStatus(status), now)
        if row.status is _RUNNING:
            # Running with no holder: claimable at once, as if its lease had expired.
            row.lease_expires_at = now
            self._claims.file(row)
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
        # _check_run_id and _check, inlined: this ends every run.
        row = self._runs.get(run_id)
        if row is None:
            check_identifier(run_id, "run id")
        if self._closed:
            self._check("update_claimed_run_status")
        data = None if output is None else codec.encode(output)
        row = self._held(run_id, lease_id)
        if row is None:
            return False
        if status.__class__ is not RunStatus:  # a plain str value is accepted too
            status = RunStatus(status)
        row.output, row.error = data, error
        self._move(row, status, self._clock(), keep_lease=status is _RUNNING)
        return True

    async def requeue_run(self, run_id: str) -> bool:
        """A failed or cancelled run back to ``pending``: failed steps dropped, count reset."""
        self._check_run_id(run_id)
        self._check("requeue_run")
        row = self._runs.get(run_id)
        if row is None or row.status not in _REQUEUEABLE:
            return False
        self._steps.drop_failed(run_id)
        row.output = row.error = None
        row.recoveries = 0
        self._move(row, _PENDING, self._clock())
        return True

    async def purge_runs(
        self,
        *,
        finished_before: int,
        limit: int,
        statuses: Collection[RunStatus] | None = None,
    ) -> int:
        """Delete up to ``limit`` finished runs with ``updated_at < finished_before``,
        oldest first, with their steps, events and event keys; return how many."""
        chosen = check_purge_args(finished_before, limit, statuses)
        self._check("purge_runs")
        rows = self._finished.take_oldest(chosen, finished_before, limit)
        for row in rows:
            del self._runs[row.id]
            if row.idempotency_key is not None:
                self._keys.pop((row.workflow, row.idempotency_key), None)
            i = bisect.bisect_left(self._order, (row.created_at, row.id))
            del self._order[i]
            self._steps.drop_run(row.id)
            self._events.drop_run(row.id)
        return len(rows)

    # -- steps --------------------------------------------------------------

    async def save_step_result(self, result: StepResult, lease_id: str | None = None) -> bool:
        """Upsert a step row by id, never over a final row; with ``lease_id``, only if held."""
        # A stored run's id was checked when it was created, and a stored row's id and
        # name when it was first written (_check_run_id's shortcut); _check is inlined:
        # this is every step's checkpoint.
        run_id = result.run_id
        row = self._runs.get(run_id)
        if row is None:
            check_step(result)
        elif (owner := self._steps.owner(result.id)) is None or owner != (run_id, result.name):
            name = result.name
            # A str's validity never changes: check each name once (a str subclass could
            # compare equal to a valid name and still be refused, so it is always checked).
            known = name.__class__ is str and name in self._step_names
            # The engine's id, ``<run id>/<name>`` of this stored run's id and a known
            # name, is valid as its parts are: no scan of it character by character.
            if not (known and run_id.__class__ is str and result.id == f"{run_id}/{name}"):
                check_identifier(result.id, "step id", MAX_STEP_ID_LENGTH)
            if not known:
                check_identifier(name, "step name")
                if name.__class__ is str and len(self._step_names) < _MAX_KNOWN_NAMES:
                    self._step_names.add(name)
        if self._closed:
            self._check("save_step_result")
        output = None if result.output is None else codec.encode(result.output)
        if lease_id is not None and self._held(run_id, lease_id) is None:
            return False
        # May raise on an identity clash; False when a final row stands (write-once).
        return self._steps.upsert(result, output, "save_step_result")

    async def get_step_results(self, run_id: str) -> list[StepResult]:
        """The run's step rows ordered by ``(created_at, id)``."""
        self._check_run_id(run_id)
        self._check("get_step_results")
        return [as_record(step, _dec(data)) for step, data in self._steps.rows(run_id)]

    # -- events -------------------------------------------------------------

    async def deliver_event(
        self, run_id: str, event_name: str, payload: Any, *, key: str | None = None
    ) -> bool:
        """Buffer an event for a run that has not ended (once per ``key``); wake its waiter."""
        self._check_run_id(run_id)
        check_identifier(event_name, "event name")
        if key is not None:
            check_identifier(key, "event key")
        self._check("deliver_event")
        data = _enc(payload)
        row = self._runs.get(run_id)
        if row is None:
            return False
        if key is not None and self._events.delivered(run_id, key):
            return True  # delivered before: a retry stores nothing
        if row.status.is_terminal:
            return False
        now = self._clock()
        self._events.push(run_id, event_name, data, now, key)
        if row.status is RunStatus.WAITING and row.waiting_for == event_name:
            self._move(row, _PENDING, now)
        return True

    async def take_event(self, run_id: str, event_name: str) -> EventRecord | None:
        """Remove and return the oldest buffered event of that name, or ``None``."""
        self._check_run_id(run_id)
        check_identifier(event_name, "event name")
        self._check("take_event")
        event = self._events.pop(run_id, event_name)
        return None if event is None else EventRecord(_dec(event[0]), event[1])

    async def consume_event(
        self, event_name: str, checkpoint: StepResult, lease_id: str
    ) -> ConsumeResult:
        """Take the oldest buffered event and checkpoint its payload, all or nothing."""
        check_identifier(event_name, "event name")
        check_step(checkpoint)
        self._check("consume_event")
        run_id = checkpoint.run_id
        if self._held(run_id, lease_id) is None or self._steps.is_final(checkpoint):
            return ConsumeResult(held=False)  # not held, or write-once: the caller stops
        if not self._events.has(run_id, event_name):
            return ConsumeResult(held=True)
        # Every check that can raise comes before the first change: no await splits this
        # body, so nothing else can observe (or interleave with) a half-done consume.
        existing = self._steps.existing(checkpoint, "consume_event")
        event = self._events.pop(run_id, event_name)
        assert event is not None  # has() said so, and nothing ran in between
        # The stored bytes are the payload exactly as delivered: no re-encoding.
        self._steps.put(checkpoint, existing, event[0])
        return ConsumeResult(held=True, event=EventRecord(_dec(event[0]), event[1]))

    # -- schedules ----------------------------------------------------------

    async def upsert_schedule(self, schedule: Schedule) -> Schedule:
        """Insert or update by key, keeping ``created_at`` (and cadence if unchanged)."""
        check_schedule(schedule)
        self._check("upsert_schedule")
        return self._schedules.upsert(schedule, _enc(schedule.input))

    async def claim_due_schedule(self, workflow_names: Collection[str]) -> ClaimedSchedule | None:
        """Claim the earliest schedule due by the store's clock (ties by key), advancing it."""
        check_names(workflow_names)
        self._check("claim_due_schedule")
        return self._schedules.claim_due(workflow_names, self._clock())

    async def delete_schedule(self, key: str) -> bool:
        """Remove a schedule; ``False`` if there was none."""
        check_identifier(key, "schedule key", MAX_SCHEDULE_KEY_LENGTH)
        self._check("delete_schedule")
        return self._schedules.delete(key)

    async def list_schedules(self) -> list[Schedule]:
        """All schedules ordered by key."""
        self._check("list_schedules")
        return self._schedules.listing()
