"""The storage operations as plain functions of a connection.

Each function runs on a worker thread: writes inside the writer's transaction (and
their own savepoint), reads on the reader's connection. Parameters arrive already
encoded (see ``rows.py``), so nothing here can raise ``SerializationError``. Every
check-then-write is either one statement or several statements of one job, in that
transaction. "Now" is the adapter's clock, read by the caller and bound as ``:now``.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import msgspec

from reflow_adapters.sqlite_common import sql
from reflow_adapters.sqlite_common.driver import Connection
from reflow_adapters.sqlite_common.rows import (
    run_from_row,
    schedule_from_row,
    step_from_row,
    value_from_text,
)
from reflow_core.errors import StorageError
from reflow_core.lease import new_lease_id
from reflow_core.schedule import next_fire_time
from reflow_core.types import (
    ClaimedRun,
    ClaimedSchedule,
    ConsumeResult,
    CreateRunResult,
    EventRecord,
    RunFilter,
    Schedule,
    StepResult,
    WorkflowRun,
)

_Q = sql.queries()

MANY_NAMES = 16
"""From this many workflow names on, a claim looks them all up in one statement
(claim_candidates_many) instead of one query per name: 10,000 names took about a second
name by name."""

_MAX_TIME = 2**63 - 1
"""``before`` when a listing starts at the newest run (SQLite's largest integer)."""


def create_run(conn: Connection, run: WorkflowRun, params: dict[str, Any]) -> CreateRunResult:
    """Insert ``run``, or return the run already holding its idempotency key."""
    conn.execute(_Q["insert_run"], params)
    if conn.changes() == 1:
        signal_work(conn)
        return CreateRunResult(run, created=True)
    rows = conn.execute(
        _Q["get_run_by_idempotency_key"],
        {"workflow": run.workflow, "idempotency_key": run.idempotency_key},
    )
    if not rows:  # pragma: no cover - the unique index makes this impossible
        raise StorageError("create_run", "insert ignored but no run holds the key")
    return CreateRunResult(run_from_row(rows[0]), created=False)


def get_run(conn: Connection, run_id: str) -> WorkflowRun | None:
    """One run by id."""
    rows = conn.execute(_Q["get_run"], {"run_id": run_id})
    return run_from_row(rows[0]) if rows else None


def list_runs(conn: Connection, filter: RunFilter) -> list[WorkflowRun]:
    """One page of runs, newest first; each filter combination has an index-served query."""
    if filter.status is not None and filter.workflow is not None:
        name = "list_runs_by_workflow_and_status"
    elif filter.status is not None:
        name = "list_runs_by_status"
    elif filter.workflow is not None:
        name = "list_runs_by_workflow"
    else:
        name = "list_runs"
    params = {
        "status": None if filter.status is None else filter.status.value,
        "workflow": filter.workflow,
        "before": _MAX_TIME if filter.before is None else filter.before,
        "before_id": None if filter.before is None else filter.before_id,
        "limit": filter.limit,
    }
    return [run_from_row(row) for row in conn.execute(_Q[name], params)]


def claim_runs(
    conn: Connection, workflow_names: Collection[str], limit: int, params: dict[str, Any]
) -> list[ClaimedRun]:
    """Claim up to ``limit`` claimable runs, oldest ``(created_at, id)`` first.

    ``params`` carries the lease length, the holder and the store's ``now`` that judges
    expiry. Each workflow's candidates come from its own index ranges (claim_candidates),
    so the cost is O(workflows x log n), whatever other workflows hold; the merged
    first ``limit`` are claimed one by one in this job, inside the writer's transaction.
    Lease ids are drawn here, one per run actually claimed: a re-run of the batch draws
    new ones and answers with those, and only its outcome is ever returned.
    """
    candidates: list[tuple[int, str]] = []
    if len(workflow_names) >= MANY_NAMES:
        names = msgspec.json.encode(list(workflow_names)).decode()
        found = conn.execute(
            _Q["claim_candidates_many"],
            {"workflow_names": names, "now": params["now"], "limit": limit},
        )
        candidates.extend((created_at, run_id) for created_at, run_id in found)
    for name in workflow_names if len(workflow_names) < MANY_NAMES else ():
        found = conn.execute(
            _Q["claim_candidates"], {"workflow": name, "now": params["now"], "limit": limit}
        )
        candidates.extend((created_at, run_id) for created_at, run_id in found)
    candidates.sort()  # three kinds per workflow, each in order: merge them
    claimed: list[ClaimedRun] = []
    for _, run_id in candidates:
        if len(claimed) == limit:
            break
        lease_id = new_lease_id()
        rows = conn.execute(_Q["claim_run"], {**params, "id": run_id, "lease_id": lease_id})
        if rows:
            claimed.append(ClaimedRun(run_from_row(rows[0]), lease_id))
    return claimed


def purge_runs(conn: Connection, params: dict[str, Any]) -> int:
    """Delete the oldest finished runs selected by ``params`` with everything stored for
    them (cascading); return how many runs went."""
    conn.execute(_Q["purge_runs"], params)
    return conn.changes()


def changed(conn: Connection, query: str, params: dict[str, Any], signal: bool = False) -> bool:
    """Run a single-row write; True if it changed a row (lease checks answer False).
    With ``signal``, a write that changed a row also bumps the work signal."""
    conn.execute(_Q[query], params)
    if conn.changes() == 0:
        return False
    if signal:
        signal_work(conn)
    return True


def signal_work(conn: Connection) -> None:
    """Tell other processes' wake-up watches that a run may have become claimable
    (the SQLite counterpart of the PostgreSQL adapter's NOTIFY; see notify.py)."""
    conn.execute(_Q["signal_work"])


def requeue_run(conn: Connection, run_id: str, now: int) -> bool:
    """A failed or cancelled run back to pending, dropping only its failed steps."""
    conn.execute(_Q["requeue_run"], {"run_id": run_id, "now": now})
    if conn.changes() == 0:
        return False
    conn.execute(_Q["delete_failed_steps"], {"run_id": run_id})
    signal_work(conn)
    return True


def save_step_result(conn: Connection, params: dict[str, Any]) -> bool:
    """Upsert a step row (lease-checked when ``params["lease_id"]`` is set); never
    over a final row (write-once, decided by the upsert itself)."""
    conn.execute(_Q["save_step_result"], params)
    if conn.changes() > 0:
        return True
    # Nothing written: the lease is not held, or the stored row is final, or the id
    # already names another (run_id, name), which the contract makes an error rather
    # than a silent no-op.
    clash = _step_id_clash(conn, params)
    if clash is None:
        return False
    if params["lease_id"] is None or conn.execute(_Q["run_is_held"], params):
        raise StorageError("save_step_result", clash)
    return False


def _step_id_clash(conn: Connection, params: dict[str, Any]) -> str | None:
    """Why ``params["id"]`` cannot be upserted as ``(run_id, name)``, or ``None`` if it can."""
    rows = conn.execute(_Q["get_step_identity"], {"id": params["id"]})
    if not rows or (rows[0][0], rows[0][1]) == (params["run_id"], params["name"]):
        return None
    return (
        f"step id {params['id']!r} already belongs to step {rows[0][1]!r} of run "
        f"{rows[0][0]!r}, not step {params['name']!r} of run {params['run_id']!r}"
    )


def get_step_results(conn: Connection, run_id: str) -> list[StepResult]:
    """A run's steps by (created_at, id)."""
    return [step_from_row(row) for row in conn.execute(_Q["get_step_results"], {"run_id": run_id})]


def deliver_event(conn: Connection, params: dict[str, Any]) -> bool:
    """Buffer an event for a run that has not ended and wake it if it waits for that name.

    One writer job, so the status check, the key check and the writes are atomic. With a
    key already delivered to the run, nothing is stored and the answer is ``True`` even
    if the run has ended since: that delivery did land (a missing run has no keys left,
    they are deleted with it).
    """
    conn.execute(_Q["insert_event"], params)
    if conn.changes() == 0:
        return params["key"] is not None and bool(conn.execute(_Q["event_key_seen"], params))
    if params["key"] is not None:
        conn.execute(_Q["record_event_key"], params)
    conn.execute(_Q["wake_waiting_run"], params)
    if conn.changes() > 0:
        signal_work(conn)
    return True


def take_event(conn: Connection, run_id: str, event_name: str) -> EventRecord | None:
    """Delete and return the oldest buffered event of that name."""
    rows = conn.execute(_Q["take_event"], {"run_id": run_id, "event_name": event_name})
    return EventRecord(value_from_text(rows[0][0]), rows[0][1]) if rows else None


def consume_event(conn: Connection, params: dict[str, Any]) -> ConsumeResult:
    """Lease and write-once check, take the oldest event, checkpoint its payload: one
    job, so all or nothing.

    ``params`` are ``step_params`` of the checkpoint (its ``output`` is ignored) plus
    ``event_name``. The job runs inside the writer's transaction, and a job that raises
    is rolled back alone, so a clash raised after the DELETE puts the event back.
    """
    if not conn.execute(_Q["may_consume"], params):
        # Not held, or a final row already stands for the checkpoint: either way the
        # caller must stop, and nothing was read from the buffer or written.
        return ConsumeResult(held=False)
    rows = conn.execute(_Q["take_event"], params)
    if not rows:
        return ConsumeResult(held=True)
    payload, delivered_at = rows[0]
    # The stored text is copied as is: the payload the step row holds is byte for byte
    # the one delivered. A new dict, not an update of params: a batch may be re-run.
    conn.execute(_Q["save_step_result"], {**params, "output": payload})
    if conn.changes() == 0:
        # The lease and the row's status were checked above in this transaction, so
        # only an id clash is left.
        raise StorageError(
            "consume_event", _step_id_clash(conn, params) or "checkpoint was not written"
        )
    return ConsumeResult(held=True, event=EventRecord(value_from_text(payload), delivered_at))


def upsert_schedule(conn: Connection, params: dict[str, Any]) -> Schedule:
    """Insert or update a schedule; the stored row comes back."""
    return schedule_from_row(conn.execute(_Q["upsert_schedule"], params)[0])


def claim_due_schedule(conn: Connection, workflow_names: str, now: int) -> ClaimedSchedule | None:
    """Claim the earliest due schedule by the store's ``now`` and advance it, in the
    writer's transaction."""
    rows = conn.execute(_Q["next_due_schedule"], {"workflow_names": workflow_names, "now": now})
    if not rows:
        return None
    due = schedule_from_row(rows[0])
    advanced = conn.execute(
        _Q["advance_schedule"],
        {
            "key": due.key,
            "slot": due.next_run_at,
            "next_run_at": next_fire_time(due.recurrence, due.next_run_at, now),
            "now": now,
        },
    )
    # Inside BEGIN IMMEDIATE nobody can move the slot between the two statements; the
    # guard keeps the update correct even if this ever runs outside such a transaction.
    if not advanced:  # pragma: no cover
        return None
    return ClaimedSchedule(schedule_from_row(advanced[0]), slot=due.next_run_at)


def list_schedules(conn: Connection) -> list[Schedule]:
    """All schedules by key."""
    return [schedule_from_row(row) for row in conn.execute(_Q["list_schedules"])]
