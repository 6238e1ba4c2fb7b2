"""The reference model: the whole storage contract (2.1) as plain, sequential Python.

:class:`ReferenceStore` holds everything an adapter stores — every run with every field,
every step row, every buffered event with its key and delivery time, every delivered
event key, every schedule — and one method per contract method that applies the call
and returns the answer the contract requires. It has no I/O, no concurrency and no
clock of its own: each method is given the store's ``now`` (the kit clock) and, where
the adapter generates a value the contract cannot predict (a lease id), the adapter's
own answer to take it from.

It is what :mod:`reflow_conformance.differential` compares an adapter with after every
operation of every case, so it is also executable documentation: each method is the
contract's docstring of that method, and nothing more.

Where the contract leaves a choice, the model takes none and says so:

* ``updated_at`` is stamped by the adapter. The model does not predict it for a record
  an operation wrote (it adopts what the adapter stored, :meth:`ReferenceStore.adopt`);
  a record no operation wrote must keep it unchanged.
* A call the adapter *raised* for is not applied at all (a failed call leaves stored
  state as it was), so the model never needs to know which driver error is allowed.
* A call the contract says must raise (an invalid identifier, a value the codec cannot
  store, a step id clash, a bad ``limit``) raises :class:`ModelRefusal` here, with the
  exception type the contract names.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import msgspec

from reflow_core import codec
from reflow_core.errors import ConfigError, InvalidIdentifierError, SerializationError, StorageError
from reflow_core.identifiers import (
    MAX_SCHEDULE_KEY_LENGTH,
    check_holder,
    check_identifier,
    check_names,
    check_run,
    check_schedule,
    check_step,
    is_identifier,
)
from reflow_core.schedule import next_fire_time
from reflow_core.storage import check_limit, check_purge_args
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
    StepStatus,
    WorkflowRun,
)

__all__ = ["Buffered", "ModelRefusal", "ReferenceStore"]

_SUSPENDED = frozenset({RunStatus.SLEEPING, RunStatus.WAITING})
_REQUEUEABLE = frozenset({RunStatus.FAILED, RunStatus.CANCELLED})
_REFUSALS = (InvalidIdentifierError, SerializationError, StorageError, ConfigError)


class ModelRefusal(Exception):
    """The contract requires this call to raise ``expected`` (an exception type) instead
    of answering; ``cause`` is the exception the model's own check raised."""

    def __init__(self, expected: type[BaseException], cause: BaseException) -> None:
        super().__init__(f"{expected.__name__}: {cause}")
        self.expected = expected
        self.cause = cause


@dataclass
class Buffered:
    """One buffered event: what :meth:`ReferenceStore.take_event` will hand back."""

    payload: Any
    delivered_at: int
    key: str | None


@dataclass
class _Run:
    record: WorkflowRun
    lease_id: str | None = None


@dataclass
class ReferenceStore:
    """Everything one store holds, and the contract's answer to every call on it."""

    runs: dict[str, _Run] = field(default_factory=dict)
    steps: dict[str, dict[str, StepResult]] = field(default_factory=dict)
    """run id -> step name -> row (also rows of runs that do not exist: the contract does
    not forbid them)."""
    events: dict[str, dict[str, deque[Buffered]]] = field(default_factory=dict)
    keys: dict[str, set[str]] = field(default_factory=dict)
    """run id -> every event key delivered to it, buffered or consumed since."""
    schedules: dict[str, Schedule] = field(default_factory=dict)
    issued: set[str] = field(default_factory=set)
    """Every lease id the adapter issued: a new claim must never reuse one."""
    known_run_ids: set[str] = field(default_factory=set)
    """Every run id ever created (purged ones too): their reads are checked as well."""
    touched: set[tuple[str, str, str]] = field(default_factory=set)
    """Records written since the last :meth:`adopt`: (kind, owner, id) whose
    ``updated_at`` the adapter chooses."""

    # -- helpers -------------------------------------------------------------------

    def run(self, run_id: str) -> WorkflowRun | None:
        entry = self.runs.get(run_id)
        return None if entry is None else entry.record

    def held(self, run_id: str, lease_id: str) -> _Run | None:
        """The run if it is ``running`` with this lease, else ``None``."""
        entry = self.runs.get(run_id)
        if entry is None or entry.record.status is not RunStatus.RUNNING:
            return None
        return entry if entry.lease_id is not None and entry.lease_id == lease_id else None

    def buffered(self, run_id: str) -> dict[str, list[Buffered]]:
        """The run's buffered events by name, oldest first (names with none left out)."""
        return {name: list(q) for name, q in self.events.get(run_id, {}).items() if q}

    def ordered_runs(self) -> list[WorkflowRun]:
        """Every run, newest first by ``(created_at, id)`` (the listing order)."""
        records = [entry.record for entry in self.runs.values()]
        return sorted(records, key=lambda r: (r.created_at, r.id), reverse=True)

    def step_rows(self, run_id: str) -> list[StepResult]:
        """The run's step rows ordered by ``(created_at, id)``."""
        return sorted(self.steps.get(run_id, {}).values(), key=lambda s: (s.created_at, s.id))

    def schedule_list(self) -> list[Schedule]:
        return [self.schedules[key] for key in sorted(self.schedules)]

    def _set(self, entry: _Run, **changes: Any) -> None:
        entry.record = msgspec.structs.replace(entry.record, **changes)
        self.touched.add(("run", entry.record.id, entry.record.id))

    def _release(self, entry: _Run, status: RunStatus, **changes: Any) -> None:
        """Move out of (or within) a status with the lease fields cleared."""
        entry.lease_id = None
        self._set(
            entry,
            status=status,
            wake_at=None,
            waiting_for=None,
            claimed_at=None,
            lease_ms=None,
            lease_expires_at=None,
            holder=None,
            **changes,
        )

    def adopt(self, kind: str, owner: str, key: str, updated_at: int) -> None:
        """Take the adapter's ``updated_at`` for a record an operation wrote."""
        if kind == "run":
            entry = self.runs.get(key)
            if entry is not None:
                entry.record = msgspec.structs.replace(entry.record, updated_at=updated_at)
        elif kind == "step":
            row = self.steps.get(owner, {}).get(key)
            if row is not None:
                self.steps[owner][key] = msgspec.structs.replace(row, updated_at=updated_at)
        elif kind == "schedule" and key in self.schedules:
            self.schedules[key] = msgspec.structs.replace(
                self.schedules[key], updated_at=updated_at
            )

    @staticmethod
    def _refuse(check: Any, *args: Any) -> None:
        try:
            check(*args)
        except _REFUSALS as exc:
            kind = next(t for t in _REFUSALS if isinstance(exc, t))
            raise ModelRefusal(kind, exc) from exc

    def _run_id(self, run_id: str) -> None:
        self._refuse(check_identifier, run_id, "run id")

    def _encodable(self, value: Any) -> None:
        if value is not None:
            self._refuse(codec.check, value)

    # -- runs ----------------------------------------------------------------------

    def create_run(self, run: WorkflowRun) -> CreateRunResult:
        self._refuse(check_run, run)
        self._encodable(run.input)
        self._encodable(run.output)
        if run.idempotency_key is not None:
            for entry in self.runs.values():
                record = entry.record
                if (record.workflow, record.idempotency_key) == (run.workflow, run.idempotency_key):
                    return CreateRunResult(record, False)
        if run.id in self.runs:
            raise ModelRefusal(StorageError, StorageError("create_run", "duplicate run id"))
        record = msgspec.structs.replace(run, status=RunStatus(run.status))
        self.runs[run.id] = _Run(record)
        self.known_run_ids.add(run.id)
        self.touched.add(("run", run.id, run.id))
        return CreateRunResult(record, True)

    def get_run(self, run_id: str) -> WorkflowRun | None:
        self._run_id(run_id)
        return self.run(run_id)

    def list_runs(self, filter: RunFilter) -> list[WorkflowRun]:
        if filter.workflow is not None:
            self._refuse(check_identifier, filter.workflow, "workflow name")
        if filter.before_id is not None:
            self._refuse(check_identifier, filter.before_id, "run id")
        found: list[WorkflowRun] = []
        for record in self.ordered_runs():
            if len(found) >= filter.limit:
                break
            if filter.status is not None and record.status != filter.status:
                continue
            if filter.workflow is not None and record.workflow != filter.workflow:
                continue
            if filter.before is not None:
                if filter.before_id is None:
                    if not record.created_at < filter.before:
                        continue
                elif (record.created_at, record.id) >= (filter.before, filter.before_id):
                    continue
            found.append(record)
        return found

    def claimable(self, names: Collection[str], now: int) -> list[_Run]:
        """Every claimable run of ``names`` at ``now``, oldest first."""
        wanted = set(names)

        def ok(record: WorkflowRun) -> bool:
            if record.workflow not in wanted:
                return False
            if record.status is RunStatus.PENDING:
                return True
            if record.status is RunStatus.RUNNING:
                return record.lease_expires_at is not None and record.lease_expires_at <= now
            if record.status in _SUSPENDED:
                return record.wake_at is not None and record.wake_at <= now
            return False

        chosen = [entry for entry in self.runs.values() if ok(entry.record)]
        return sorted(chosen, key=lambda e: (e.record.created_at, e.record.id))

    def _claim(
        self, entry: _Run, lease_id: str, now: int, lease_ms: int, holder: LeaseHolder | None
    ) -> ClaimedRun:
        record = entry.record
        recoveries = record.recoveries + (1 if record.status is RunStatus.RUNNING else 0)
        entry.lease_id = lease_id
        self.issued.add(lease_id)
        self._set(
            entry,
            status=RunStatus.RUNNING,
            attempt=record.attempt + 1,
            recoveries=recoveries,
            claimed_at=now,
            heartbeat_at=now,
            lease_ms=lease_ms,
            lease_expires_at=now + lease_ms,
            holder=holder,
            wake_at=None,
            waiting_for=None,
        )
        return ClaimedRun(entry.record, lease_id)

    def new_lease_problem(self, lease_id: object) -> str | None:
        """Why ``lease_id`` cannot be a freshly issued lease id, or ``None``."""
        if not isinstance(lease_id, str) or not is_identifier(lease_id):
            return f"lease id {lease_id!r} is not a valid identifier"
        if lease_id in self.issued:
            return f"lease id {lease_id!r} was issued before (a new claim needs a new one)"
        return None

    def claim_next_run(
        self,
        names: Collection[str],
        lease_ms: int,
        holder: LeaseHolder | None,
        now: int,
        lease_id: str | None,
    ) -> ClaimedRun | None:
        """``lease_id`` is the one the adapter issued (``None`` if it claimed nothing)."""
        self._refuse(check_names, names)
        self._refuse(check_holder, holder)
        candidates = self.claimable(names, now)
        if not candidates:
            return None
        return self._claim(candidates[0], lease_id or "<none issued>", now, lease_ms, holder)

    def claim_runs(
        self,
        names: Collection[str],
        lease_ms: int,
        holder: LeaseHolder | None,
        limit: int,
        now: int,
        lease_ids: list[str],
    ) -> list[ClaimedRun]:
        self._refuse(check_limit, limit, "claim_runs")
        self._refuse(check_names, names)
        self._refuse(check_holder, holder)
        claimed: list[ClaimedRun] = []
        for index in range(limit):
            candidates = self.claimable(names, now)
            if not candidates:
                break
            lease = lease_ids[index] if index < len(lease_ids) else "<none issued>"
            claimed.append(self._claim(candidates[0], lease, now, lease_ms, holder))
        return claimed

    def heartbeat_run(self, run_id: str, lease_id: str, now: int) -> bool:
        self._run_id(run_id)
        entry = self.held(run_id, lease_id)
        if entry is None:
            return False
        lease_ms = entry.record.lease_ms or 0
        # updated_at is not changed: not a touch.
        entry.record = msgspec.structs.replace(
            entry.record, heartbeat_at=now, lease_expires_at=now + lease_ms
        )
        return True

    def sleep_run(self, run_id: str, lease_id: str, wake_at: int) -> bool:
        self._run_id(run_id)
        entry = self.held(run_id, lease_id)
        if entry is None:
            return False
        self._release(entry, RunStatus.SLEEPING)
        self._set(entry, wake_at=wake_at)
        return True

    def wait_run(self, run_id: str, lease_id: str, event_name: str, wake_at: int | None) -> bool:
        self._run_id(run_id)
        self._refuse(check_identifier, event_name, "event name")
        entry = self.held(run_id, lease_id)
        if entry is None:
            return False
        if self.events.get(run_id, {}).get(event_name):
            self._release(entry, RunStatus.PENDING)
        else:
            self._release(entry, RunStatus.WAITING)
            self._set(entry, wake_at=wake_at, waiting_for=event_name)
        return True

    def update_run_status(
        self, run_id: str, status: RunStatus, expected: Collection[RunStatus] | None, now: int
    ) -> bool:
        self._run_id(run_id)
        entry = self.runs.get(run_id)
        if entry is None:
            return False
        if expected is not None and entry.record.status not in {RunStatus(s) for s in expected}:
            return False
        target = RunStatus(status)
        self._release(entry, target)
        if target is RunStatus.RUNNING:
            self._set(entry, lease_expires_at=now)  # no holder: the next claim takes it
        return True

    def update_claimed_run_status(
        self,
        run_id: str,
        lease_id: str,
        status: RunStatus,
        output: Any,
        error: ErrorInfo | None,
    ) -> bool:
        self._run_id(run_id)
        entry = self.held(run_id, lease_id)
        if entry is None:
            return False
        self._encodable(output)
        target = RunStatus(status)
        if target is RunStatus.RUNNING:
            self._set(entry, status=target, output=output, error=error)
        else:
            self._release(entry, target, output=output, error=error)
        return True

    def requeue_run(self, run_id: str) -> bool:
        self._run_id(run_id)
        entry = self.runs.get(run_id)
        if entry is None or entry.record.status not in _REQUEUEABLE:
            return False
        rows = self.steps.get(run_id, {})
        for name in [n for n, row in rows.items() if StepStatus(row.status) is StepStatus.FAILED]:
            del rows[name]
        self._release(entry, RunStatus.PENDING, output=None, error=None, recoveries=0)
        return True

    def purge_runs(
        self, finished_before: int, limit: int, statuses: Collection[RunStatus] | None
    ) -> int:
        self._refuse(check_purge_args, finished_before, limit, statuses)
        chosen = check_purge_args(finished_before, limit, statuses)
        doomed = sorted(
            (
                entry.record
                for entry in self.runs.values()
                if entry.record.status in chosen and entry.record.updated_at < finished_before
            ),
            key=lambda r: (r.updated_at, r.id),
        )[:limit]
        for record in doomed:
            del self.runs[record.id]
            self.steps.pop(record.id, None)
            self.events.pop(record.id, None)
            self.keys.pop(record.id, None)
        return len(doomed)

    # -- steps ---------------------------------------------------------------------

    def _clash(self, result: StepResult) -> str | None:
        """Why an upsert of ``result`` is an identity clash, or ``None``."""
        for run_id, rows in self.steps.items():
            for name, row in rows.items():
                if row.id == result.id and (run_id, name) != (result.run_id, result.name):
                    return f"step id {result.id!r} already names step {name!r} of run {run_id!r}"
        stored = self.steps.get(result.run_id, {}).get(result.name)
        if stored is not None and stored.id != result.id:
            return f"step {result.name!r} of run {result.run_id!r} already has id {stored.id!r}"
        return None

    def final_row(self, result: StepResult) -> bool:
        """Whether a final (write-once) row stands for ``result``'s run and name."""
        stored = self.steps.get(result.run_id, {}).get(result.name)
        return stored is not None and StepStatus(stored.status).is_done

    def _put(self, result: StepResult) -> None:
        rows = self.steps.setdefault(result.run_id, {})
        stored = rows.get(result.name)
        created_at = result.created_at if stored is None else stored.created_at
        rows[result.name] = msgspec.structs.replace(
            result, status=StepStatus(result.status), created_at=created_at
        )
        self.touched.add(("step", result.run_id, result.name))

    def save_step_result(self, result: StepResult, lease_id: str | None) -> bool | None:
        """The answer, or ``None`` when the contract allows either: a write over a final
        row that is also an identity clash may be refused by either rule."""
        self._refuse(check_step, result)
        if lease_id is not None and self.held(result.run_id, lease_id) is None:
            return False
        clash = self._clash(result)
        if self.final_row(result):
            return None if clash else False
        if clash is not None:
            raise ModelRefusal(StorageError, StorageError("save_step_result", clash))
        self._encodable(result.output)
        self._put(result)
        return True

    def get_step_results(self, run_id: str) -> list[StepResult]:
        self._run_id(run_id)
        return self.step_rows(run_id)

    # -- events --------------------------------------------------------------------

    def deliver_event(
        self, run_id: str, event_name: str, payload: Any, key: str | None, now: int
    ) -> bool:
        self._run_id(run_id)
        self._refuse(check_identifier, event_name, "event name")
        if key is not None:
            self._refuse(check_identifier, key, "event key")
        entry = self.runs.get(run_id)
        if entry is None:
            return False
        if key is not None and key in self.keys.get(run_id, set()):
            return True
        if entry.record.status.is_terminal:
            return False
        self._encodable(payload)
        self.events.setdefault(run_id, {}).setdefault(event_name, deque()).append(
            Buffered(payload, now, key)
        )
        if key is not None:
            self.keys.setdefault(run_id, set()).add(key)
        record = entry.record
        if record.status is RunStatus.WAITING and record.waiting_for == event_name:
            self._release(entry, RunStatus.PENDING)
        return True

    def _pop(self, run_id: str, event_name: str) -> EventRecord | None:
        queue = self.events.get(run_id, {}).get(event_name)
        if not queue:
            return None
        event = queue.popleft()
        return EventRecord(event.payload, event.delivered_at)

    def take_event(self, run_id: str, event_name: str) -> EventRecord | None:
        self._run_id(run_id)
        self._refuse(check_identifier, event_name, "event name")
        return self._pop(run_id, event_name)

    def consume_event(
        self, event_name: str, checkpoint: StepResult, lease_id: str
    ) -> ConsumeResult:
        self._refuse(check_identifier, event_name, "event name")
        self._refuse(check_step, checkpoint)
        run_id = checkpoint.run_id
        if self.held(run_id, lease_id) is None or self.final_row(checkpoint):
            return ConsumeResult(held=False)
        if not self.events.get(run_id, {}).get(event_name):
            return ConsumeResult(held=True)
        clash = self._clash(checkpoint)
        if clash is not None:
            raise ModelRefusal(StorageError, StorageError("consume_event", clash))
        event = self._pop(run_id, event_name)
        assert event is not None
        self._put(msgspec.structs.replace(checkpoint, output=event.payload))
        return ConsumeResult(held=True, event=event)

    # -- schedules -----------------------------------------------------------------

    def upsert_schedule(self, schedule: Schedule) -> Schedule:
        self._refuse(check_schedule, schedule)
        self._encodable(schedule.input)
        old = self.schedules.get(schedule.key)
        stored = schedule
        if old is not None:
            keep = old.recurrence == schedule.recurrence
            stored = msgspec.structs.replace(
                schedule,
                created_at=old.created_at,
                next_run_at=old.next_run_at if keep else schedule.next_run_at,
            )
        self.schedules[schedule.key] = stored
        self.touched.add(("schedule", schedule.key, schedule.key))
        return stored

    def claim_due_schedule(self, names: Collection[str], now: int) -> ClaimedSchedule | None:
        self._refuse(check_names, names)
        wanted = set(names)
        due = sorted(
            (s.next_run_at, s.key)
            for s in self.schedules.values()
            if s.workflow in wanted and s.next_run_at <= now
        )
        if not due:
            return None
        slot, key = due[0]
        schedule = self.schedules[key]
        following = next_fire_time(schedule.recurrence, slot, now)
        stored = msgspec.structs.replace(schedule, next_run_at=following)
        self.schedules[key] = stored
        self.touched.add(("schedule", key, key))
        return ClaimedSchedule(stored, slot)

    def delete_schedule(self, key: str) -> bool:
        self._refuse(check_identifier, key, "schedule key", MAX_SCHEDULE_KEY_LENGTH)
        return self.schedules.pop(key, None) is not None

    def list_schedules(self) -> list[Schedule]:
        return self.schedule_list()
