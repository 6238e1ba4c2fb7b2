"""``ExampleStorage``: the whole Reflow storage contract on plain dicts and one lock.

A worked example of a third-party adapter, written only against ``reflow_core`` (the
public API every adapter author has), never against Reflow's own adapters. It is small
on purpose, and correct on purpose: it passes every conformance case that applies to
it. The design choices an adapter author has to make, and the ones made here:

* **Atomicity.** Every method runs its whole body under one ``threading.Lock`` and
  never awaits inside it, so a check and its write can never be split — not by
  another coroutine on the same loop, not by another thread. A database adapter gets
  the same from one transaction (or one conditional ``UPDATE``) per method.
* **Sharing.** ``example://NAME`` names a store held in this process; every handle
  opened on the same name shares it, so the adapter declares the ``threads``
  capability. It is not durable (closing the last handle drops the data) and not
  cross-process, so it declares neither ``durable`` nor ``cross-process``, and the kit
  reports those cases as skipped, naming the capability.
* **Exactness.** Values are stored as :func:`reflow_core.codec.encode` bytes, encoded
  *before* any state changes, so a non-persistable value raises ``SerializationError``
  with nothing written, and every read decodes a fresh, equal value of the same type.
* **Identifiers.** Every id, name and key a method is given is checked first with the
  helpers of ``reflow_core.identifiers`` (an invalid one, say with a NUL or a lone
  surrogate, raises ``InvalidIdentifierError`` before anything is read or written; a
  lease id is only compared, and one never issued is never held), and is then used
  exactly as given: composite keys are tuples such as ``(workflow, key)``,
  never ``f"{workflow}:{key}"``, which would let workflow ``a:b`` with key ``c`` find
  workflow ``a``'s run with key ``b:c``. A SQL adapter compares with ``=`` (never
  ``LIKE``, whose ``%`` and ``_`` are wildcards) and orders ids and keys by code point
  (``COLLATE "C"``).
* **Errors.** Nothing here can fail like a driver does; a broken invariant (a step id
  clash, use after ``close``) is raised as ``StorageError``.
* **Time.** The store's clock is the only one that decides (contract 2.0): whether a
  lease has expired, a sleeper is due or a schedule fires is judged by :meth:`now`,
  here the ``clock`` given at construction (epoch milliseconds; the conformance kit
  passes its own, so it can move time by hand). Each method reads it once, under the
  lock. A server adapter would read the server's clock instead (SQL ``now()``), never
  the client's.
* **Leases.** A claim stores the claimer's lease length and ``lease_expires_at = now +
  lease_ms``; a heartbeat renews it by that stored length. So no other worker's clock
  or lease setting can make a live lease look expired.

Claims and listings scan every run: fine for an example and for tests, where a real
adapter would use an index. The tables and row helpers live in :mod:`.tables`.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Any

import msgspec
from reflow_core import (
    ClaimedRun,
    ClaimedSchedule,
    Clock,
    ConsumeResult,
    CreateRunResult,
    ErrorInfo,
    EventRecord,
    LeaseHolder,
    RunFilter,
    RunStatus,
    Schedule,
    StepResult,
    StepStatus,
    StorageError,
    WorkflowRun,
    system_clock,
)
from reflow_core.identifiers import (
    MAX_SCHEDULE_KEY_LENGTH,
    check_holder,
    check_identifier,
    check_names,
    check_run,
    check_schedule,
)
from reflow_core.identifiers import check_step as check_step_identifiers
from reflow_core.schedule import next_fire_time
from reflow_core.storage import check_limit, check_purge_args

from reflow_example_adapter.tables import (
    LEASE_CLEARED,
    REQUEUEABLE,
    Row,
    Tables,
    attach,
    check_step,
    claimable,
    dec,
    detach,
    enc,
    held,
    is_final,
    pop_event,
    put_step,
    record,
)

__all__ = ["ExampleStorage"]


class ExampleStorage:
    """A store in this process's memory, shared by every handle opened on its URL."""

    def __init__(self, name: str | None = None, *, clock: Clock | None = None) -> None:
        # No I/O and no sharing yet: initialize() attaches to the named store.
        self.name = name or uuid.uuid4().hex
        self.url: str | None = f"example://{self.name}"
        self._clock: Clock = clock or system_clock
        self._tables: Tables | None = None
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------

    async def initialize(self) -> None:
        """Attach to the named store, creating it on first use. Idempotent."""
        if self._closed:
            raise StorageError("initialize", "storage is closed")
        if self._tables is None:
            self._tables = attach(self.name)

    async def close(self) -> None:
        """Detach; the store is dropped with its last handle. Safe to call twice."""
        tables, self._tables, self._closed = self._tables, None, True
        if tables is not None:
            detach(self.name, tables)

    @contextmanager
    def _tx(self, operation: str) -> Iterator[Tables]:
        """The store, locked for one whole method: the unit of atomicity."""
        tables = self._tables
        if tables is None:
            raise StorageError(operation, "storage is closed or not initialized")
        with tables.lock:
            yield tables

    async def now(self) -> int:
        """The store's clock: the ``clock`` given at construction."""
        with self._tx("now"):
            return self._clock()

    @staticmethod
    def _set(
        row: Row, status: RunStatus, now: int, *, keep_lease: bool = False, **fields: Any
    ) -> None:
        """Every status change: wake_at, waiting_for and (unless kept) the lease fields are
        cleared, then ``fields`` are written. ``heartbeat_at`` is never cleared."""
        row.update(wake_at=None, waiting_for=None, updated_at=now)
        if not keep_lease:
            row.update(LEASE_CLEARED)
        row.update(status=RunStatus(status), **fields)

    # -- runs --------------------------------------------------------------------

    async def create_run(self, run: WorkflowRun) -> CreateRunResult:
        """Store a new run, or return the run already holding its idempotency key."""
        check_run(run)
        payload, output = enc(run.input), enc(run.output)
        with self._tx("create_run") as db:
            key = run.idempotency_key
            if key is not None and (run.workflow, key) in db.keys:
                return CreateRunResult(record(db.runs[db.keys[run.workflow, key]]), False)
            if run.id in db.runs:
                raise StorageError("create_run", f"a run with id {run.id!r} already exists")
            row = msgspec.structs.asdict(run)
            row.update(input=payload, output=output, status=RunStatus(run.status), lease_id=None)
            db.runs[run.id] = row
            if key is not None:
                db.keys[run.workflow, key] = run.id
            return CreateRunResult(record(row), True)

    async def get_run(self, run_id: str) -> WorkflowRun | None:
        """The run, or ``None``."""
        check_identifier(run_id, "run id")
        with self._tx("get_run") as db:
            row = db.runs.get(run_id)
            return None if row is None else record(row)

    async def list_runs(self, filter: RunFilter) -> list[WorkflowRun]:
        """Newest first by ``(created_at, id)``, filtered, with exact keyset paging."""
        if filter.workflow is not None:
            check_identifier(filter.workflow, "workflow name")
        if filter.before_id is not None:
            check_identifier(filter.before_id, "run id")
        with self._tx("list_runs") as db:
            rows = sorted(db.runs.values(), key=lambda r: (r["created_at"], r["id"]))
            found: list[WorkflowRun] = []
            for row in reversed(rows):
                if len(found) >= filter.limit:
                    break
                if filter.before is not None and (row["created_at"], row["id"]) >= (
                    filter.before,
                    filter.before_id or "",
                ):
                    continue  # "" sorts first, so before alone means created_at < before
                if filter.status is not None and row["status"] != filter.status:
                    continue
                if filter.workflow is not None and row["workflow"] != filter.workflow:
                    continue
                found.append(record(row))
            return found

    async def claim_next_run(
        self,
        workflow_names: Collection[str],
        *,
        lease_ms: int,
        holder: LeaseHolder | None = None,
    ) -> ClaimedRun | None:
        """Claim the oldest claimable run of the named workflows, atomically, storing the
        claimer's lease length, expiry and holder with it."""
        claimed = self._claim("claim_next_run", workflow_names, lease_ms, holder, 1)
        return claimed[0] if claimed else None

    async def claim_runs(
        self,
        workflow_names: Collection[str],
        *,
        lease_ms: int,
        holder: LeaseHolder | None = None,
        limit: int,
    ) -> list[ClaimedRun]:
        """Claim up to ``limit`` runs, oldest first, each exactly as ``claim_next_run``
        would (contract 2.1), all under one hold of the lock."""
        check_limit(limit, "claim_runs")
        return self._claim("claim_runs", workflow_names, lease_ms, holder, limit)

    def _claim(
        self,
        operation: str,
        workflow_names: Collection[str],
        lease_ms: int,
        holder: LeaseHolder | None,
        limit: int,
    ) -> list[ClaimedRun]:
        check_names(workflow_names)
        check_holder(holder)
        names = set(workflow_names)
        with self._tx(operation) as db:
            now = self._clock()
            # A scan keeps the example short; a real store finds the oldest claimable
            # runs through an index per workflow instead (see the built-in adapters).
            candidates = sorted(
                (
                    row
                    for row in db.runs.values()
                    if row["workflow"] in names and claimable(row, now)
                ),
                key=lambda r: (r["created_at"], r["id"]),
            )
            claimed: list[ClaimedRun] = []
            for row in candidates[:limit]:
                taken_over = row["status"] == RunStatus.RUNNING  # its lease had expired
                lease_id = uuid.uuid4().hex
                self._set(
                    row,
                    RunStatus.RUNNING,
                    now,
                    lease_id=lease_id,
                    claimed_at=now,
                    heartbeat_at=now,
                    lease_ms=lease_ms,
                    lease_expires_at=now + lease_ms,
                    holder=holder,
                    attempt=row["attempt"] + 1,
                    recoveries=row["recoveries"] + taken_over,
                )
                claimed.append(ClaimedRun(record(row), lease_id))
            return claimed

    async def heartbeat_run(self, run_id: str, lease_id: str) -> bool:
        """Renew a held lease by its stored length (``updated_at`` unchanged); ``False``
        once it is lost. An expired lease nobody has taken yet is still held."""
        check_identifier(run_id, "run id")
        with self._tx("heartbeat_run") as db:
            row = held(db, run_id, lease_id)
            if row is not None:
                now = self._clock()
                row.update(heartbeat_at=now, lease_expires_at=now + row["lease_ms"])
            return row is not None

    async def sleep_run(self, run_id: str, lease_id: str, wake_at: int) -> bool:
        """Held run to ``sleeping`` until ``wake_at``, lease released."""
        check_identifier(run_id, "run id")
        with self._tx("sleep_run") as db:
            row = held(db, run_id, lease_id)
            if row is not None:
                self._set(row, RunStatus.SLEEPING, self._clock(), wake_at=wake_at)
            return row is not None

    async def wait_run(
        self, run_id: str, lease_id: str, event_name: str, wake_at: int | None
    ) -> bool:
        """Held run to ``waiting`` for ``event_name`` (``pending`` if one is buffered)."""
        check_identifier(run_id, "run id")
        check_identifier(event_name, "event name")
        with self._tx("wait_run") as db:
            row = held(db, run_id, lease_id)
            if row is None:
                return False
            now = self._clock()
            if db.events.get((run_id, event_name)):
                self._set(row, RunStatus.PENDING, now)
            else:
                self._set(row, RunStatus.WAITING, now, wake_at=wake_at, waiting_for=event_name)
            return True

    async def update_run_status(
        self, run_id: str, status: RunStatus, *, expected: Collection[RunStatus] | None = None
    ) -> bool:
        """Set a status with no lease check (cancel); with ``expected``, only from those."""
        check_identifier(run_id, "run id")
        with self._tx("update_run_status") as db:
            row = db.runs.get(run_id)
            if row is None or (expected is not None and row["status"] not in expected):
                return False
            now = self._clock()
            self._set(row, status, now)
            if row["status"] is RunStatus.RUNNING:
                # Running with no holder: claimable at once, as if its lease had expired.
                row["lease_expires_at"] = now
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
        check_identifier(run_id, "run id")
        encoded = enc(output)
        with self._tx("update_claimed_run_status") as db:
            row = held(db, run_id, lease_id)
            if row is None:
                return False
            keep = RunStatus(status) == RunStatus.RUNNING
            self._set(row, status, self._clock(), keep_lease=keep, output=encoded, error=error)
            return True

    async def requeue_run(self, run_id: str) -> bool:
        """A failed or cancelled run back to ``pending``, dropping only its failed steps;
        ``recoveries`` starts again from 0."""
        check_identifier(run_id, "run id")
        with self._tx("requeue_run") as db:
            row = db.runs.get(run_id)
            if row is None or row["status"] not in REQUEUEABLE:
                return False
            steps = db.steps.get(run_id, {})
            for name, (step, _) in list(steps.items()):
                if step.status == StepStatus.FAILED:
                    del steps[name], db.step_ids[step.id]
            self._set(
                row, RunStatus.PENDING, self._clock(), output=enc(None), error=None, recoveries=0
            )
            return True

    # -- steps -------------------------------------------------------------------

    async def purge_runs(
        self,
        *,
        finished_before: int,
        limit: int,
        statuses: Collection[RunStatus] | None = None,
    ) -> int:
        """Delete up to ``limit`` finished runs with ``updated_at < finished_before``,
        oldest first, with everything stored for them (contract 2.1)."""
        chosen = check_purge_args(finished_before, limit, statuses)
        with self._tx("purge_runs") as db:
            doomed = sorted(
                (
                    row
                    for row in db.runs.values()
                    if row["status"] in chosen and row["updated_at"] < finished_before
                ),
                key=lambda r: (r["updated_at"], r["id"]),
            )[:limit]
            for row in doomed:
                run_id = row["id"]
                del db.runs[run_id]
                if row["idempotency_key"] is not None:
                    db.keys.pop((row["workflow"], row["idempotency_key"]), None)
                for step, _ in db.steps.pop(run_id, {}).values():
                    db.step_ids.pop(step.id, None)
                for name in [name for (rid, name) in db.events if rid == run_id]:
                    del db.events[run_id, name]
                db.event_keys.pop(run_id, None)
            return len(doomed)

    async def save_step_result(self, result: StepResult, lease_id: str | None = None) -> bool:
        """Upsert a step row by id; with ``lease_id``, only while that lease is held. A
        final row is never written again (``False``): the first writer wins."""
        check_step_identifiers(result)
        output = enc(result.output)
        with self._tx("save_step_result") as db:
            if lease_id is not None and held(db, result.run_id, lease_id) is None:
                return False
            created_at = check_step(db, result, "save_step_result")
            if is_final(db, result):
                return False
            put_step(db, result, created_at, output)
            return True

    async def get_step_results(self, run_id: str) -> list[StepResult]:
        """The run's step rows ordered by ``(created_at, id)``."""
        check_identifier(run_id, "run id")
        with self._tx("get_step_results") as db:
            rows = sorted(
                db.steps.get(run_id, {}).values(), key=lambda r: (r[0].created_at, r[0].id)
            )
            return [msgspec.structs.replace(step, output=dec(out)) for step, out in rows]

    # -- events ------------------------------------------------------------------

    async def deliver_event(
        self, run_id: str, event_name: str, payload: Any, *, key: str | None = None
    ) -> bool:
        """Buffer an event for a run that has not ended; a run waiting for that name goes to
        ``pending``. A ``key`` already delivered to the run stores nothing (``True``)."""
        check_identifier(run_id, "run id")
        check_identifier(event_name, "event name")
        if key is not None:
            check_identifier(key, "event key")
        encoded = enc(payload)
        with self._tx("deliver_event") as db:
            row = db.runs.get(run_id)
            if row is None:
                return False
            if key is not None and key in db.event_keys.get(run_id, ()):
                return True  # a retry of a delivery that was stored
            if RunStatus(row["status"]).is_terminal:
                return False
            now = self._clock()
            db.events.setdefault((run_id, event_name), deque()).append((encoded, now))
            if key is not None:
                db.event_keys.setdefault(run_id, set()).add(key)
            if row["status"] == RunStatus.WAITING and row["waiting_for"] == event_name:
                self._set(row, RunStatus.PENDING, now)
            return True

    async def take_event(self, run_id: str, event_name: str) -> EventRecord | None:
        """Remove and return the oldest buffered event of that name, or ``None``."""
        check_identifier(run_id, "run id")
        check_identifier(event_name, "event name")
        with self._tx("take_event") as db:
            event = pop_event(db, run_id, event_name)
            return None if event is None else EventRecord(dec(event[0]), event[1])

    async def consume_event(
        self, event_name: str, checkpoint: StepResult, lease_id: str
    ) -> ConsumeResult:
        """Take the oldest buffered event and checkpoint its payload, all or nothing."""
        check_identifier(event_name, "event name")
        check_step_identifiers(checkpoint)
        with self._tx("consume_event") as db:
            run_id = checkpoint.run_id
            if held(db, run_id, lease_id) is None or is_final(db, checkpoint):
                return ConsumeResult(held=False)  # not held, or already checkpointed
            if not db.events.get((run_id, event_name)):
                return ConsumeResult(held=True)
            created_at = check_step(db, checkpoint, "consume_event")  # may raise
            event = pop_event(db, run_id, event_name)
            assert event is not None
            put_step(db, checkpoint, created_at, event[0])
            return ConsumeResult(held=True, event=EventRecord(dec(event[0]), event[1]))

    # -- schedules ---------------------------------------------------------------

    async def upsert_schedule(self, schedule: Schedule) -> Schedule:
        """Insert or update by key, keeping ``created_at`` (and cadence if unchanged)."""
        check_schedule(schedule)
        encoded = enc(schedule.input)
        with self._tx("upsert_schedule") as db:
            stored = msgspec.structs.replace(schedule, input=None)
            old = db.schedules.get(schedule.key)
            if old is not None:
                same = old[0].recurrence == schedule.recurrence
                stored = msgspec.structs.replace(
                    stored,
                    created_at=old[0].created_at,
                    next_run_at=old[0].next_run_at if same else schedule.next_run_at,
                )
            db.schedules[schedule.key] = (stored, encoded)
            return msgspec.structs.replace(stored, input=dec(encoded))

    async def claim_due_schedule(self, workflow_names: Collection[str]) -> ClaimedSchedule | None:
        """Claim the earliest schedule due by the store's clock (ties by key) and advance it
        under the same lock."""
        check_names(workflow_names)
        names = set(workflow_names)
        with self._tx("claim_due_schedule") as db:
            now = self._clock()
            due = [
                (s.next_run_at, key)
                for key, (s, _) in db.schedules.items()
                if s.workflow in names and s.next_run_at <= now
            ]
            if not due:
                return None
            slot, key = min(due)
            schedule, encoded = db.schedules[key]
            following = next_fire_time(schedule.recurrence, slot, now)  # may raise: no write yet
            stored = msgspec.structs.replace(schedule, next_run_at=following, updated_at=now)
            db.schedules[key] = (stored, encoded)
            return ClaimedSchedule(msgspec.structs.replace(stored, input=dec(encoded)), slot)

    async def delete_schedule(self, key: str) -> bool:
        """Remove a schedule; ``False`` if there was none."""
        check_identifier(key, "schedule key", MAX_SCHEDULE_KEY_LENGTH)
        with self._tx("delete_schedule") as db:
            return db.schedules.pop(key, None) is not None

    async def list_schedules(self) -> list[Schedule]:
        """All schedules ordered by key."""
        with self._tx("list_schedules") as db:
            return [
                msgspec.structs.replace(s, input=dec(encoded))
                for _, (s, encoded) in sorted(db.schedules.items())
            ]
