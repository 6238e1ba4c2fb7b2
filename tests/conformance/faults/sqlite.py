"""Single faults built on the real SQLite adapter (``SQLiteStorage``, stdlib ``sqlite3``).

:class:`FaultSQLite` is ``SQLiteStorage`` with its own URL scheme and a driver whose
connections substitute patched SQL for the original text of one named query (from
``sqlite_common/queries.sql``) or one statement of ``schema.sql``. Method faults
override one method, reusing the adapter's own queries and ``ops`` functions, so each
fault differs from the shipped adapter in exactly the place its description names.

Split check-then-write faults run the check and the write as two writer jobs. Each job
is its own ``SAVEPOINT`` and, across handles, its own transaction, so another caller's
job can land in between exactly as it would between two statements of a careless
adapter.
"""

from __future__ import annotations

import functools
import sqlite3
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import msgspec

from faults.base import Fault, Patch, load_module_copy, patched_text, statement_map
from reflow_adapters.sqlite import SQLiteStorage
from reflow_adapters.sqlite_common import ops
from reflow_adapters.sqlite_common import sql as sqlite_sql
from reflow_adapters.sqlite_common.driver import Connection, Driver, Params, Row
from reflow_adapters.sqlite_common.rows import (
    run_from_row,
    schedule_from_row,
    step_from_row,
    value_from_text,
    value_text,
)
from reflow_adapters.sqlite_common.url import storage_arguments
from reflow_core import codec
from reflow_core.errors import StorageError
from reflow_core.registry import AdapterSpec, Capability
from reflow_core.schedule import next_fire_time
from reflow_core.storage import Clock, system_clock
from reflow_core.types import (
    ClaimedRun,
    ClaimedSchedule,
    ConsumeResult,
    CreateRunResult,
    EventRecord,
    RunStatus,
    StepResult,
    WorkflowRun,
)

__all__ = ["FAULTS", "FaultSQLite", "spec"]

CAPABILITIES = frozenset({Capability.DURABLE, Capability.CROSS_PROCESS, Capability.THREADS})
_Q = sqlite_sql.queries()
_FINAL = ("completed", "completed-early", "skipped")


# -- machinery ---------------------------------------------------------------------------


class _PatchingConnection:
    """A driver connection that runs patched text in place of original statements."""

    def __init__(self, conn: Connection, replace: Mapping[str, str]) -> None:
        self._conn = conn
        self._replace = replace

    def execute(self, sql: str, params: Params | None = None) -> list[Row]:
        return self._conn.execute(self._replace.get(sql, sql), params)

    def changes(self) -> int:
        return self._conn.changes()

    def in_transaction(self) -> bool:
        return self._conn.in_transaction()

    def close(self) -> None:
        self._conn.close()


class _PatchingDriver:
    """The adapter's own driver, with patched statements (and optionally other errors)."""

    def __init__(
        self,
        base: Driver,
        replace: Mapping[str, str],
        errors: tuple[type[BaseException], ...] | None = None,
    ) -> None:
        self._base = base
        self._replace = dict(replace)
        self.name = base.name
        self.errors = base.errors if errors is None else errors

    def connect(self, path: str) -> Connection:
        conn = self._base.connect(path)
        return _PatchingConnection(conn, self._replace) if self._replace else conn

    def is_busy(self, exc: BaseException) -> bool:
        return self._base.is_busy(exc)

    def is_full(self, exc: BaseException) -> bool:
        return self._base.is_full(exc)

    def library_version(self) -> Sequence[int]:
        return self._base.library_version()


class FaultSQLite(SQLiteStorage):
    """``SQLiteStorage`` under another scheme; subclasses carry exactly one fault."""

    scheme: ClassVar[str] = "fault-sqlite-intact"
    ops_module: ClassVar[Any] = None
    """A private copy of ``sqlite_common.ops`` with one function replaced, or None."""
    split: ClassVar[Mapping[str, SplitJob]] = {}
    """Operations whose one job the fault runs as two (see the split faults below)."""

    async def _call(self, operation: str, fn: Any, *, scan: bool = False) -> Any:
        if self.ops_module is not None:
            fn = _rebind(fn, self.ops_module)
        splitter = self.split.get(operation)
        if splitter is not None and not scan:
            return await splitter(self, fn)
        return await super()._call(operation, fn, scan=scan)

    async def job(self, operation: str, fn: Callable[..., Any], **keywords: Any) -> Any:
        """One writer job, as the real adapter submits it (never split again)."""
        return await SQLiteStorage._call(self, operation, functools.partial(fn, **keywords))


SplitJob = Callable[[FaultSQLite, Any], Awaitable[Any]]
"""``splitter(storage, job)``: runs the job the real method submitted as two jobs."""


def _rebind(fn: Any, module: Any) -> Any:
    """``fn`` (an ``ops`` function or a partial of one) taken from ``module`` instead."""
    if isinstance(fn, functools.partial):
        inner = fn.func
        if getattr(inner, "__module__", None) == ops.__name__:
            return functools.partial(getattr(module, inner.__name__), *fn.args, **fn.keywords)
        return fn
    if getattr(fn, "__module__", None) == ops.__name__:
        return getattr(module, fn.__name__)
    return fn


def _query_map(patches: Sequence[Patch]) -> dict[str, str]:
    replace: dict[str, str] = {}
    for p in patches:
        original = _Q[p.query]
        current = replace.get(original, original)
        replace[original] = patched_text(current, p.old, p.new, p.count, f"query {p.query}")
    return replace


def _schema_map(old: str, new: str) -> dict[str, str]:
    script = sqlite_sql.schema()
    patched = patched_text(script, old, new, 1, "schema.sql")
    split = sqlite_sql.split_statements
    return statement_map(split(script), split(patched), "schema.sql")


_FAULTS: list[Fault] = []


def fault(
    name: str,
    *,
    rule: str,
    topic: str,
    methods: tuple[str, ...],
    change: str,
    caught_by: Collection[str],
    patches: Sequence[Patch] = (),
    schema: tuple[str, str] | None = None,
    cls: type[FaultSQLite] = FaultSQLite,
    errors: tuple[type[BaseException], ...] | None = None,
    split: Mapping[str, SplitJob] | None = None,
    race: bool | None = None,
    raced_by: Collection[str] = (),
) -> type[FaultSQLite]:
    """Build the fault's adapter class and record the fault."""
    full = f"fault-sqlite-{name}"
    replace = _query_map(patches)
    if schema is not None:
        replace.update(_schema_map(*schema))
    kind = "schema" if schema else "query" if patches else "method"
    attrs: dict[str, Any] = {"scheme": full, "__module__": __name__}
    if replace or errors is not None:
        attrs["driver"] = _PatchingDriver(SQLiteStorage.driver, replace, errors)
    if split is not None:
        attrs["split"] = dict(split)
    adapter = type(f"Fault_{name.replace('-', '_')}", (cls,), attrs)
    _FAULTS.append(
        Fault(
            name=full,
            base="sqlite",
            kind=kind,
            rule=rule,
            topic=topic,
            methods=methods,
            change=change,
            caught_by=frozenset(caught_by),
            adapter=adapter,
            race=split is not None if race is None else race,
            raced_by=frozenset(raced_by),
        )
    )
    return adapter


def spec(f: Fault) -> AdapterSpec:
    """The fault as an adapter: its scheme opens a file with the faulty class."""
    adapter = f.adapter

    def factory(url: str | None = None, **options: Any) -> SQLiteStorage:
        path, arguments = storage_arguments(url, f.name, options)
        storage: SQLiteStorage = adapter(path, **arguments)
        return storage

    def conformance(
        tmp_path: Path, options: Mapping[str, str], *, clock: Clock | None = None
    ) -> SQLiteStorage:
        storage: SQLiteStorage = adapter(tmp_path / "conformance.db", clock=clock)
        return storage

    return AdapterSpec(
        name=f.name,
        factory=factory,
        schemes=(f.name,),
        capabilities=CAPABILITIES,
        conformance_factory=conformance,
        description=f"single fault on sqlite: {f.change}",
    )


def _ops_with(name: str, **replacements: Any) -> Any:
    """A private copy of ``ops`` whose listed functions are replaced."""
    module = load_module_copy(ops.__name__, f"faults._ops_{name}")
    for attribute, value in replacements.items():
        if not hasattr(module, attribute):
            raise ValueError(f"ops has no {attribute!r}")
        setattr(module, attribute, value)
    return module


# -- query faults: one fragment of one named query ---------------------------------------

CLAIM_PENDING_ORDER = (
    "WHERE workflow = :workflow AND status = 'pending'\n    ORDER BY created_at, id LIMIT :limit)"
)

fault(
    "claim-expiry-lt",
    rule="store clock: running is claimable once lease_expires_at <= now",
    topic="store clock",
    methods=("claim_next_run",),
    change="claim's expired-lease branch tests lease_expires_at < :now instead of <=",
    patches=[Patch("claim_candidates", "lease_expires_at <= :now", "lease_expires_at < :now")],
    caught_by={"clock.stale_at_expiry", "claim.stale_reclaim"},
)
fault(
    "claim-wake-lt",
    rule="store clock: sleeping/waiting is claimable once wake_at <= now",
    topic="store clock",
    methods=("claim_next_run",),
    change="claim's due branch tests wake_at < :now instead of <=",
    patches=[Patch("claim_candidates", "wake_at <= :now", "wake_at < :now")],
    caught_by={"claim.sleeping_not_before_wake", "claim.waiting_before_deadline"},
)
fault(
    "claim-no-recovery",
    rule="recoveries: a takeover of an expired lease adds one",
    topic="recoveries",
    methods=("claim_next_run",),
    change="recoveries + (status = 'running') became recoveries",
    patches=[
        Patch(
            "claim_run",
            "recoveries = recoveries + (status = 'running')",
            "recoveries = recoveries",
        )
    ],
    caught_by={"recoveries.counted_on_expired_takeover", "clock.stale_at_expiry"},
)
fault(
    "claim-recovery-always",
    rule="recoveries: only a takeover counts (not pending, not a wake-up)",
    topic="recoveries",
    methods=("claim_next_run",),
    change="recoveries + (status = 'running') became recoveries + 1",
    patches=[
        Patch(
            "claim_run",
            "recoveries = recoveries + (status = 'running')",
            "recoveries = recoveries + 1",
        )
    ],
    caught_by={"recoveries.not_on_pending_claim", "recoveries.not_on_woken_sleep"},
)
fault(
    "claim-keeps-wake",
    rule="claim clears wake_at/waiting_for",
    topic="claims",
    methods=("claim_next_run",),
    change="claim's SET lost wake_at = NULL",
    patches=[
        Patch(
            "claim_run",
            "wake_at = NULL, waiting_for = NULL, attempt",
            "waiting_for = NULL, attempt",
        )
    ],
    caught_by={"claim.sleeping_woken_by_time", "claim.waiting_deadline_passed"},
)
fault(
    "claim-fixed-lease",
    rule="lease fields: lease_expires_at = now + the claimer's lease_ms",
    topic="lease fields",
    methods=("claim_next_run",),
    change="lease_expires_at = :now + :lease_ms became :now + 30000 (a default)",
    patches=[
        Patch(
            "claim_run",
            "lease_expires_at = :now + :lease_ms",
            "lease_expires_at = :now + 30000",
        )
    ],
    caught_by={"lease_fields.set_by_claim", "clock.short_lease_expires_for_long_claimers"},
)
fault(
    "claim-ties-id-desc",
    rule="claim order: oldest by (created_at, id)",
    topic="claims",
    methods=("claim_next_run",),
    change="pending branch orders by created_at, id DESC",
    patches=[
        Patch(
            "claim_candidates",
            CLAIM_PENDING_ORDER,
            CLAIM_PENDING_ORDER.replace("created_at, id LIMIT", "created_at, id DESC LIMIT"),
        )
    ],
    caught_by={"claim.ties_broken_by_id"},
)
fault(
    "claim-drops-holder",
    rule="holder round trip",
    topic="holder round trip",
    methods=("claim_next_run",),
    change="claim's SET holder = :holder became holder = NULL",
    patches=[Patch("claim_run", "holder = :holder,", "holder = NULL,")],
    caught_by={"lease_fields.holder_roundtrip", "lease_fields.set_by_claim"},
)
fault(
    "claim-no-attempt",
    rule="claim adds one to attempt",
    topic="claims",
    methods=("claim_next_run",),
    change="attempt = attempt + 1 became attempt = attempt",
    patches=[Patch("claim_run", "attempt = attempt + 1,", "attempt = attempt,")],
    caught_by={"claim.marks_running_with_lease", "claim.stale_reclaim"},
)
fault(
    "heartbeat-unfenced",
    rule="held means running with that lease id",
    topic="held: lease checks",
    methods=("heartbeat_run",),
    change="heartbeat's WHERE lost AND lease_id = :lease_id",
    patches=[Patch("heartbeat_run", " AND lease_id = :lease_id", "")],
    caught_by={"leases.fencing_heartbeat_run", "leases.heartbeat_foreign_lease"},
)
fault(
    "heartbeat-fixed-lease",
    rule="store clock: a heartbeat renews by the holder's stored lease_ms",
    topic="store clock",
    methods=("heartbeat_run",),
    change="lease_expires_at = :now + lease_ms became :now + 30000",
    patches=[
        Patch(
            "heartbeat_run", "lease_expires_at = :now + lease_ms", "lease_expires_at = :now + 30000"
        )
    ],
    caught_by={"clock.heartbeat_extends_by_stored_lease", "clock.heartbeat_fields_after_renewal"},
)
fault(
    "heartbeat-touches-updated-at",
    rule="heartbeat: updated_at is not changed",
    topic="lease fields",
    methods=("heartbeat_run",),
    change="heartbeat also sets updated_at = :now",
    patches=[
        Patch(
            "heartbeat_run",
            "SET heartbeat_at = :now,",
            "SET heartbeat_at = :now, updated_at = :now,",
        )
    ],
    caught_by={"clock.heartbeat_fields_after_renewal"},
)
fault(
    "sleep-unfenced",
    rule="sleep_run is a no-op returning False unless held",
    topic="held: lease checks",
    methods=("sleep_run",),
    change="sleep_run's WHERE lost AND lease_id = :lease_id",
    patches=[Patch("sleep_run", " AND lease_id = :lease_id", "")],
    caught_by={"leases.fencing_sleep_run"},
)
fault(
    "sleep-keeps-holder",
    rule="lease fields: leaving running clears holder",
    topic="lease fields",
    methods=("sleep_run",),
    change="sleep_run's SET lost holder = NULL",
    patches=[Patch("sleep_run", "holder = NULL, wake_at = :wake_at", "wake_at = :wake_at")],
    caught_by={"lease_fields.cleared_by_sleep_run"},
)
fault(
    "wait-any-name-buffered",
    rule="wait_run goes to pending only for a buffered event of that name",
    topic="events and keys",
    methods=("wait_run",),
    change="wait_run's buffered-event check lost AND name = :event_name",
    patches=[
        Patch(
            "wait_run", "WHERE run_id = :run_id AND name = :event_name)", "WHERE run_id = :run_id)"
        )
    ],
    caught_by={"events.other_name_buffered_does_not_shortcut_wait"},
)
fault(
    "status-expected-ignored",
    rule="update_run_status(expected=...) changes only a run in expected",
    topic="status updates",
    methods=("update_run_status",),
    change="update_run_status lost its AND (:expected IS NULL OR ...) condition",
    patches=[
        Patch(
            "update_run_status",
            "\n  AND (:expected IS NULL OR EXISTS (SELECT 1 FROM json_each(:expected) "
            "WHERE value = status))",
            "",
        )
    ],
    caught_by={"status.expected_mismatch_refused", "status.expected_empty_refuses"},
)
fault(
    "status-running-never-expires",
    rule="update_run_status(running): no holder, lease_expires_at = now",
    topic="status updates",
    methods=("update_run_status",),
    change="lease_expires_at = CASE WHEN :status = 'running' THEN :now END became NULL",
    patches=[
        Patch(
            "update_run_status",
            "lease_expires_at = CASE WHEN :status = 'running' THEN :now END",
            "lease_expires_at = NULL",
        )
    ],
    caught_by={"rules.update_run_status_running_claimable_at_once"},
)
fault(
    "release-keeps-expiry",
    rule="lease fields: update_claimed_run_status keeps them only for running",
    topic="lease fields",
    methods=("update_claimed_run_status",),
    change="lease_expires_at = CASE WHEN :status = 'running' THEN lease_expires_at END became "
    "lease_expires_at = lease_expires_at",
    patches=[
        Patch(
            "update_claimed_run_status",
            "lease_expires_at = CASE WHEN :status = 'running' THEN lease_expires_at END",
            "lease_expires_at = lease_expires_at",
        )
    ],
    caught_by={
        "lease_fields.cleared_by_update_claimed_pending",
        "lease_fields.cleared_by_update_claimed_completed",
    },
)
fault(
    "update-claimed-unfenced",
    rule="update_claimed_run_status is a no-op unless held",
    topic="held: lease checks",
    methods=("update_claimed_run_status",),
    change="update_claimed_run_status's WHERE lost AND lease_id = :lease_id",
    patches=[Patch("update_claimed_run_status", " AND lease_id = :lease_id", "")],
    caught_by={"status.update_claimed_respects_lease", "leases.fencing_update_claimed_run_status"},
)
fault(
    "requeue-keeps-recoveries",
    rule="recoveries: requeue_run resets them to 0",
    topic="recoveries",
    methods=("requeue_run",),
    change="requeue_run's SET lost recoveries = 0",
    patches=[Patch("requeue_run", "waiting_for = NULL, recoveries = 0,", "waiting_for = NULL,")],
    caught_by={"recoveries.reset_by_requeue"},
)
fault(
    "requeue-completed",
    rule="requeue_run only from failed or cancelled",
    topic="requeue",
    methods=("requeue_run",),
    change="status IN ('failed', 'cancelled') also lets 'completed' through",
    patches=[
        Patch(
            "requeue_run",
            "status IN ('failed', 'cancelled')",
            "status IN ('failed', 'cancelled', 'completed')",
        )
    ],
    caught_by={"requeue.refuses_completed"},
)
fault(
    "requeue-deletes-all-steps",
    rule="requeue_run deletes only failed step rows",
    topic="requeue",
    methods=("requeue_run",),
    change="delete_failed_steps lost AND status = 'failed'",
    patches=[Patch("delete_failed_steps", " AND status = 'failed'", "")],
    caught_by={"requeue.failed_discards_only_failed_steps"},
)
fault(
    "list-keyset-inclusive",
    rule="keyset paging: strictly after (before, before_id)",
    topic="keyset paging and filters",
    methods=("list_runs",),
    change="list_runs' (created_at, id) < (:before, :before_id) became <=",
    patches=[
        Patch(
            "list_runs",
            "WHERE (created_at, id) < (:before, :before_id)",
            "WHERE (created_at, id) <= (:before, :before_id)",
        )
    ],
    caught_by={"listing.keyset_with_equal_created_at"},
)
fault(
    "list-both-filters-drop-status",
    rule="listing filters: status and workflow combine",
    topic="keyset paging and filters",
    methods=("list_runs",),
    change="list_runs_by_workflow_and_status lost AND status = :status",
    patches=[Patch("list_runs_by_workflow_and_status", " AND status = :status", "")],
    caught_by={"listing.filter_both"},
)
fault(
    "list-limit-off-by-one",
    rule="list_runs returns at most limit rows",
    topic="keyset paging and filters",
    methods=("list_runs",),
    change="list_runs' LIMIT :limit became LIMIT :limit + 1",
    patches=[Patch("list_runs", "LIMIT :limit", "LIMIT :limit + 1")],
    caught_by={"listing.limit"},
)
fault(
    "steps-ordered-by-id",
    rule="get_step_results ordered by (created_at, id)",
    topic="steps",
    methods=("get_step_results",),
    change="get_step_results ORDER BY created_at, id became ORDER BY id",
    patches=[Patch("get_step_results", "ORDER BY created_at, id", "ORDER BY id")],
    caught_by={"rules.step_order_created_at_before_id"},
)
fault(
    "save-step-no-write-once",
    rule="checkpoints are written once",
    topic="write-once",
    methods=("save_step_result",),
    change="the upsert's DO UPDATE lost AND reflow_steps.status NOT IN (final statuses)",
    patches=[
        Patch(
            "save_step_result",
            "\n  AND reflow_steps.status NOT IN ('completed', 'completed-early', 'skipped')",
            "",
        )
    ],
    caught_by={
        "checkpoints.completed_kept_without_lease",
        "checkpoints.completed_kept_with_held_lease",
    },
)
fault(
    "save-step-completed-early-writable",
    rule="checkpoints are written once (completed-early is final too)",
    topic="write-once",
    methods=("save_step_result",),
    change="the final-status list lost 'completed-early'",
    patches=[
        Patch(
            "save_step_result",
            "NOT IN ('completed', 'completed-early', 'skipped')",
            "NOT IN ('completed', 'skipped')",
        )
    ],
    caught_by={
        "checkpoints.completed_early_kept_without_lease",
        "checkpoints.completed_early_kept_after_takeover",
    },
)
fault(
    "save-step-unfenced",
    rule="save_step_result with a lease is a no-op unless held",
    topic="held: lease checks",
    methods=("save_step_result",),
    change="the lease check lost AND lease_id = :lease_id",
    patches=[Patch("save_step_result", " AND lease_id = :lease_id)", ")")],
    caught_by={"leases.fencing_save_step_result", "steps.stale_lease_refused"},
)
fault(
    "save-step-resets-created-at",
    rule="save_step_result keeps created_at of an existing row",
    topic="steps",
    methods=("save_step_result", "consume_event"),
    change="the upsert's DO UPDATE also sets created_at = excluded.created_at",
    patches=[
        Patch(
            "save_step_result",
            "SET status = excluded.status,",
            "SET created_at = excluded.created_at, status = excluded.status,",
        )
    ],
    caught_by={"steps.upsert_keeps_created_at", "consume.keeps_created_at"},
)
fault(
    "deliver-to-cancelled",
    rule="deliver_event refuses ended runs (completed, failed, cancelled)",
    topic="events and keys",
    methods=("deliver_event",),
    change="insert_event's ended-status list lost 'cancelled'",
    patches=[
        Patch(
            "insert_event",
            "status NOT IN ('completed', 'failed', 'cancelled')",
            "status NOT IN ('completed', 'failed')",
        )
    ],
    caught_by={"events.refused_for_cancelled"},
)
fault(
    "event-key-ignored",
    rule="events: a key already delivered stores nothing",
    topic="events and keys",
    methods=("deliver_event",),
    change="insert_event lost its AND NOT EXISTS (... reflow_event_keys ...) guard",
    patches=[
        Patch(
            "insert_event",
            "\n  AND NOT EXISTS (SELECT 1 FROM reflow_event_keys"
            " WHERE run_id = :run_id AND key = :key)",
            "",
        )
    ],
    caught_by={"events.key_dedupe_while_buffered", "events.key_dedupe_after_take"},
)
fault(
    "wake-any-name",
    rule="deliver_event wakes only a run waiting for that name",
    topic="events and keys",
    methods=("deliver_event",),
    change="wake_waiting_run lost AND waiting_for = :event_name",
    patches=[Patch("wake_waiting_run", " AND waiting_for = :event_name", "")],
    caught_by={"events.other_name_does_not_wake"},
)
fault(
    "take-newest-first-in-ms",
    rule="events: oldest first (delivered_at, then delivery order)",
    topic="events and keys",
    methods=("take_event", "consume_event"),
    change="take_event ORDER BY delivered_at, seq became delivered_at, seq DESC",
    patches=[
        Patch(
            "take_event",
            "ORDER BY delivered_at, seq LIMIT 1",
            "ORDER BY delivered_at, seq DESC LIMIT 1",
        )
    ],
    caught_by={"events.fifo", "consume.fifo"},
)
fault(
    "consume-over-final",
    rule="consume_event: write-once, held=False over a final row",
    topic="write-once",
    methods=("consume_event",),
    change="may_consume lost its NOT EXISTS (final row) condition",
    patches=[
        Patch(
            "may_consume",
            "\n  AND NOT EXISTS (SELECT 1 FROM reflow_steps\n"
            "                  WHERE id = :id AND run_id = :run_id AND name = :name\n"
            "                    AND status IN ('completed', 'completed-early', 'skipped'))",
            "",
        )
    ],
    caught_by={
        "checkpoints.consume_over_completed_refused",
        "checkpoints.consume_over_skipped_refused",
    },
)
fault(
    "schedule-resets-cadence",
    rule="upsert_schedule keeps next_run_at when the recurrence is unchanged",
    topic="schedules",
    methods=("upsert_schedule",),
    change="next_run_at = CASE WHEN recurrence = excluded.recurrence ... END became "
    "excluded.next_run_at",
    patches=[
        Patch(
            "upsert_schedule",
            "next_run_at = CASE WHEN recurrence = excluded.recurrence THEN next_run_at\n"
            "                       ELSE excluded.next_run_at END",
            "next_run_at = excluded.next_run_at",
        )
    ],
    caught_by={
        "schedules.unchanged_interval_keeps_cadence",
        "schedules.unchanged_cron_keeps_cadence",
    },
)
fault(
    "schedule-resets-created-at",
    rule="upsert_schedule keeps created_at",
    topic="schedules",
    methods=("upsert_schedule",),
    change="the DO UPDATE also sets created_at = excluded.created_at",
    patches=[
        Patch(
            "upsert_schedule",
            "SET workflow = excluded.workflow,",
            "SET created_at = excluded.created_at, workflow = excluded.workflow,",
        )
    ],
    caught_by={"schedules.upsert_keeps_created_at"},
)
fault(
    "schedule-due-lt",
    rule="store clock: a schedule is due once next_run_at <= now",
    topic="store clock",
    methods=("claim_due_schedule",),
    change="next_due_schedule's next_run_at <= :now became <",
    patches=[Patch("next_due_schedule", "next_run_at <= :now", "next_run_at < :now")],
    caught_by={"schedules.not_due_ignored"},
)
fault(
    "schedule-ties-key-desc",
    rule="claim_due_schedule: earliest first, ties by key",
    topic="schedules",
    methods=("claim_due_schedule",),
    change="next_due_schedule ORDER BY next_run_at, key became key DESC",
    patches=[
        Patch("next_due_schedule", "ORDER BY next_run_at, key", "ORDER BY next_run_at, key DESC")
    ],
    caught_by={"schedules.earliest_first_ties_by_key"},
)
fault(
    "schedules-listed-desc",
    rule="list_schedules ordered by key",
    topic="schedules",
    methods=("list_schedules",),
    change="list_schedules ORDER BY key became ORDER BY key DESC",
    patches=[Patch("list_schedules", "ORDER BY key", "ORDER BY key DESC")],
    caught_by={"schedules.listed_by_key"},
)
fault(
    "migration-version-ignored",
    rule="initialize is idempotent and safe from many workers at once",
    topic="lifecycle",
    methods=("initialize",),
    change="schema_version reads 0 whatever is recorded, so every open re-creates the tables",
    patches=[
        Patch(
            "schema_version",
            "SELECT coalesce(max(version), 0) FROM reflow_schema_version",
            "SELECT 0",
        )
    ],
    caught_by={"lifecycle.reopen_keeps_state", "lifecycle.concurrent_initialize"},
)


# -- schema faults: one column declaration -------------------------------------------------

fault(
    "steps-no-unique-run-name",
    rule="(run_id, name) is unique: a second id for a pair is a StorageError",
    topic="steps",
    methods=("save_step_result",),
    change="reflow_steps lost UNIQUE (run_id, name)",
    schema=("    wake_at    INTEGER,\n    UNIQUE (run_id, name)\n);", "    wake_at    INTEGER\n);"),
    caught_by={"steps.run_and_name_unique"},
)
fault(
    "event-keys-global",
    rule="events: keys are per run",
    topic="events and keys",
    methods=("deliver_event",),
    change="reflow_event_keys PRIMARY KEY (run_id, key) became PRIMARY KEY (key)",
    schema=(
        "    PRIMARY KEY (run_id, key)\n) WITHOUT ROWID;",
        "    PRIMARY KEY (key)\n) WITHOUT ROWID;",
    ),
    caught_by={"events.key_scoped_per_run"},
)
fault(
    "run-id-nocase",
    rule="identifiers: exact and ordered by code point",
    topic="identifiers",
    methods=("create_run", "list_runs", "claim_next_run"),
    change="reflow_runs.id declared COLLATE NOCASE",
    schema=(
        "    id              TEXT PRIMARY KEY NOT NULL,\n    workflow",
        "    id              TEXT PRIMARY KEY NOT NULL COLLATE NOCASE,\n    workflow",
    ),
    caught_by={"listing.id_order_is_code_point_order"},
)
fault(
    "attempt-text",
    rule="attempt is an int counted by claims",
    topic="claims",
    methods=("claim_next_run", "get_run"),
    change="reflow_runs.attempt declared TEXT (SQLite then stores '1')",
    schema=(
        "    attempt         INTEGER NOT NULL DEFAULT 0,",
        "    attempt         TEXT NOT NULL DEFAULT 0,",
    ),
    caught_by={"claim.marks_running_with_lease"},
)
fault(
    "idempotency-not-unique",
    rule="idempotency: one key, one run (per workflow)",
    topic="idempotency",
    methods=("create_run",),
    change="the (workflow, idempotency_key) index lost UNIQUE",
    schema=("CREATE UNIQUE INDEX reflow_runs_idempotency", "CREATE INDEX reflow_runs_idempotency"),
    caught_by={"runs.idempotency_returns_existing"},
)
fault(
    "next-run-at-real",
    rule="times are integer milliseconds",
    topic="times are integers",
    methods=("upsert_schedule", "claim_due_schedule", "list_schedules"),
    change="reflow_schedules.next_run_at declared REAL (read back as float)",
    schema=("    next_run_at INTEGER NOT NULL,", "    next_run_at REAL NOT NULL,"),
    caught_by={"rules.times_are_ints"},
)


# -- method faults: one method body --------------------------------------------------------


class _NowSystemClock(FaultSQLite):
    async def now(self) -> int:
        return system_clock()  # the fault: not the adapter's (injected) clock


fault(
    "now-system-clock",
    rule="store clock: now() is the adapter's Clock",
    topic="store clock",
    methods=("now",),
    change="now() returns the system clock instead of the injected clock",
    cls=_NowSystemClock,
    caught_by={"clock.now_is_injected"},
)


class _CloseTwiceRaises(FaultSQLite):
    async def close(self) -> None:
        if self._closed:
            raise StorageError("close", "already closed")  # the fault
        await super().close()


fault(
    "close-twice-raises",
    rule="close() is safe to call twice",
    topic="lifecycle",
    methods=("close",),
    change="a second close() raises",
    cls=_CloseTwiceRaises,
    caught_by={"lifecycle.close_twice"},
)

fault(
    "driver-errors-untranslated",
    rule="a driver exception never escapes: it becomes StorageError",
    topic="driver errors",
    methods=("save_step_result", "every method"),
    change="the driver's error tuple is (sqlite3.OperationalError,): IntegrityError escapes",
    errors=(sqlite3.OperationalError,),
    caught_by={"steps.run_and_name_unique"},
)


def _run_without_holder(row: Row) -> WorkflowRun:
    return msgspec.structs.replace(run_from_row(row), holder=None)  # the fault


class _RowsForgetHolder(FaultSQLite):
    ops_module = _ops_with("forget_holder", run_from_row=_run_without_holder)


fault(
    "rows-forget-holder",
    rule="holder round trip",
    topic="holder round trip",
    methods=("get_run", "list_runs", "claim_next_run"),
    change="run_from_row leaves holder out (None)",
    cls=_RowsForgetHolder,
    caught_by={"lease_fields.holder_roundtrip"},
)


def _step_without_wake(row: Row) -> StepResult:
    return msgspec.structs.replace(step_from_row(row), wake_at=None)  # the fault


class _RowsForgetStepWake(FaultSQLite):
    ops_module = _ops_with("forget_step_wake", step_from_row=_step_without_wake)


fault(
    "rows-forget-step-wake",
    rule="steps round-trip every field",
    topic="steps",
    methods=("get_step_results",),
    change="step_from_row leaves wake_at out (None)",
    cls=_RowsForgetStepWake,
    caught_by={"steps.error_and_wake_roundtrip"},
)


class _DeleteScheduleAlwaysTrue(FaultSQLite):
    async def delete_schedule(self, key: str) -> bool:
        await super().delete_schedule(key)
        return True  # the fault: the row count is not looked at


fault(
    "delete-schedule-always-true",
    rule="delete_schedule is False if there was none",
    topic="schedules",
    methods=("delete_schedule",),
    change="delete_schedule answers True without looking at the changed rows",
    cls=_DeleteScheduleAlwaysTrue,
    caught_by={"schedules.delete_reports_removal"},
)


class _StatusMembersOnly(FaultSQLite):
    async def update_run_status(
        self, run_id: str, status: RunStatus, *, expected: Collection[RunStatus] | None = None
    ) -> bool:
        # The fault: ``status.value`` assumes a RunStatus member; its string has no .value.
        return await super().update_run_status(run_id, RunStatus(status.value), expected=expected)


fault(
    "status-members-only",
    rule="status arguments: RunStatus members or their string values",
    topic="status arguments",
    methods=("update_run_status",),
    change="update_run_status reads status.value, so a status given as a string raises",
    cls=_StatusMembersOnly,
    caught_by={"rules.status_strings_accepted"},
)


def _write_output(conn: Connection, run_id: str, output: str) -> None:
    conn.execute("UPDATE reflow_runs SET output = :output WHERE id = :run_id", locals())


class _OutputEncodedAfterWrite(FaultSQLite):
    async def update_claimed_run_status(
        self,
        run_id: str,
        lease_id: str,
        status: RunStatus,
        *,
        output: Any = None,
        error: Any = None,
    ) -> bool:
        done = await super().update_claimed_run_status(run_id, lease_id, status, error=error)
        if done and output is not None:
            # The fault: the output is encoded (and may be refused) after the status landed.
            text = value_text(output)
            await self.job("update_claimed_run_status", _write_output, run_id=run_id, output=text)
        return done


fault(
    "output-encoded-after-write",
    rule="values: a value the codec refuses is refused before anything is written",
    topic="values",
    methods=("update_claimed_run_status",),
    change="update_claimed_run_status writes the status first and encodes the output after",
    cls=_OutputEncodedAfterWrite,
    caught_by={"values.reject_run_output"},
)


# -- split faults: the method unchanged, its one writer job split in two -----------------
#
# A split fault keeps the real method (identifier checks, encoding, parameters) and
# intercepts the one job it submits: the check runs as one job, the write as the next.
# Each job is its own SAVEPOINT and, across handles, its own transaction, so another
# caller's job can land in between, as between two statements of a careless adapter.


def _held(conn: Connection, params: dict[str, Any]) -> bool:
    return bool(conn.execute(_Q["run_is_held"], params))


def _status_of(conn: Connection, run_id: str) -> str | None:
    rows = conn.execute("SELECT status FROM reflow_runs WHERE id = :run_id", {"run_id": run_id})
    return rows[0][0] if rows else None


def _consume_take(conn: Connection, params: dict[str, Any]) -> Any:
    if not conn.execute(_Q["may_consume"], params):
        return None
    return conn.execute(_Q["take_event"], params)


async def _consume_take_then_save(s: FaultSQLite, fn: Any) -> ConsumeResult:
    params = fn.keywords["params"]
    taken = await s.job("consume_event", _consume_take, params=params)
    if taken is None:
        return ConsumeResult(held=False)
    if not taken:
        return ConsumeResult(held=True)
    payload, delivered_at = taken[0]
    # The fault: the event is gone (committed) before its checkpoint is written.
    await s.job("consume_event", ops.save_step_result, params={**params, "output": payload})
    return ConsumeResult(held=True, event=EventRecord(codec.decode(payload), delivered_at))


fault(
    "consume-take-then-save",
    rule="consume_event is all or nothing",
    topic="consume atomicity",
    methods=("consume_event",),
    change="consume_event takes the event in one job and saves the checkpoint in the next",
    split={"consume_event": _consume_take_then_save},
    race=False,  # split, but caught without a race: the second job fails
    caught_by={"consume.checkpoint_clash_consumes_nothing"},
)

_CLAIM_RECHECK = (
    "\n  AND (status = 'pending'\n"
    "       OR (status = 'running' AND lease_expires_at <= :now)\n"
    "       OR (status IN ('sleeping', 'waiting') AND wake_at <= :now))"
)
_CLAIM_WRITE = patched_text(_Q["claim_run"], _CLAIM_RECHECK, "", 1, "query claim_run")


def _claim_pick(conn: Connection, workflow_names: Sequence[str], limit: int, now: int) -> list[str]:
    candidates: list[tuple[int, str]] = []
    for name in workflow_names:
        params = {"workflow": name, "now": now, "limit": limit}
        candidates.extend((c, i) for c, i in conn.execute(_Q["claim_candidates"], params))
    return [run_id for _, run_id in sorted(candidates)[:limit]]


def _claim_write(conn: Connection, ids: Sequence[str], params: dict[str, Any]) -> list[ClaimedRun]:
    claimed = []
    for run_id in ids:
        lease_id = str(uuid.uuid4())
        rows = conn.execute(_CLAIM_WRITE, {**params, "id": run_id, "lease_id": lease_id})
        if rows:
            claimed.append(ClaimedRun(run_from_row(rows[0]), lease_id))
    return claimed


async def _split_claim(s: FaultSQLite, fn: Any) -> list[ClaimedRun]:
    names, limit, params = (
        fn.keywords["workflow_names"],
        fn.keywords["limit"],
        fn.keywords["params"],
    )
    chosen = await s.job(
        "claim_next_run", _claim_pick, workflow_names=names, limit=limit, now=params["now"]
    )
    if not chosen:
        return []
    # The fault: the UPDATE is the next job, by id, without re-checking the run is claimable.
    claimed: list[ClaimedRun] = await s.job(
        "claim_next_run", _claim_write, ids=chosen, params=params
    )
    return claimed


fault(
    "split-claim",
    rule="claim_next_run is atomic: two callers never get the same run",
    topic="claims",
    methods=("claim_next_run",),
    change="claim picks the oldest claimable run in one job and updates it by id in the next",
    split={"claim_next_run": _split_claim, "claim_runs": _split_claim},
    caught_by={
        "concurrency.claim_coroutines",
        "concurrency.claim_threads",
        "concurrency.stale_reclaim_coroutines",
        "concurrency.stale_reclaim_threads",
    },
    raced_by={
        "concurrency.claim_processes",
        "concurrency.stale_takeover_processes",
        "rules.race_paths_processes",
    },
)


async def _split_fenced_save(s: FaultSQLite, fn: Any) -> bool:
    params = fn.keywords["params"]
    if params["lease_id"] is not None and not await s.job("save_step_result", _held, params=params):
        return False
    # The fault: the write is the next job, without the lease.
    result: bool = await s.job(
        "save_step_result", ops.save_step_result, params={**params, "lease_id": None}
    )
    return result


fault(
    "split-fenced-save",
    rule="save_step_result: the lease check and the write are atomic",
    topic="held: lease checks",
    methods=("save_step_result",),
    change="save_step_result checks the lease in one job and upserts without it in the next",
    split={"save_step_result": _split_fenced_save},
    caught_by={"concurrency.fenced_save_threads"},
    raced_by={"concurrency.fenced_save_coroutines", "rules.race_paths_processes"},
)


async def _split_conditional_cancel(s: FaultSQLite, fn: Any) -> bool:
    params = fn.keywords["params"]
    if params["expected"] is not None:
        current = await s.job("update_run_status", _status_of, run_id=params["run_id"])
        if current is None or current not in msgspec.json.decode(params["expected"]):
            return False
    # The fault: the write is the next job, unconditional.
    changed: bool = await s.job(
        "update_run_status",
        ops.changed,
        query="update_run_status",
        params={**params, "expected": None},
    )
    return changed


fault(
    "split-conditional-cancel",
    rule="update_run_status(expected=...): check and write are one atomic step",
    topic="status updates",
    methods=("update_run_status",),
    change="update_run_status reads the status in one job and writes unconditionally in the next",
    split={"update_run_status": _split_conditional_cancel},
    caught_by={
        "concurrency.cancel_vs_complete_coroutines",
        "concurrency.cancel_vs_complete_threads",
    },
    raced_by={"rules.race_paths_processes"},
)

_OPS_UNGUARDED = _ops_with(
    "unguarded_save",
    _Q={
        **_Q,
        "save_step_result": patched_text(
            _Q["save_step_result"],
            "\n  AND reflow_steps.status NOT IN ('completed', 'completed-early', 'skipped')",
            "",
            1,
            "query save_step_result",
        ),
    },
)


def _step_is_final(conn: Connection, params: dict[str, Any]) -> bool:
    rows = conn.execute("SELECT status FROM reflow_steps WHERE id = :id", {"id": params["id"]})
    return bool(rows) and rows[0][0] in _FINAL


async def _split_write_once(s: FaultSQLite, fn: Any) -> bool:
    params = fn.keywords["params"]
    if await s.job("save_step_result", _step_is_final, params=params):
        return False
    # The fault: the final-row check was the previous job; this upsert has no guard.
    saved: bool = await s.job("save_step_result", _OPS_UNGUARDED.save_step_result, params=params)
    return saved


fault(
    "split-write-once",
    rule="checkpoints are written once: the first writer wins",
    topic="write-once",
    methods=("save_step_result",),
    change="save_step_result looks for a final row in one job and upserts unguarded in the next",
    split={"save_step_result": _split_write_once},
    caught_by={"concurrency.write_once_coroutines", "concurrency.write_once_threads"},
    raced_by={"rules.race_paths_processes"},
)


def _key_seen(conn: Connection, params: dict[str, Any]) -> bool:
    return bool(conn.execute(_Q["event_key_seen"], params))


def _deliver_then_record_key(conn: Connection, params: dict[str, Any]) -> bool:
    if not ops.deliver_event(conn, {**params, "key": None}):
        return False
    conn.execute(
        "INSERT OR IGNORE INTO reflow_event_keys (run_id, key) VALUES (:run_id, :key)",
        {"run_id": params["run_id"], "key": params["key"]},
    )
    return True


async def _split_event_key(s: FaultSQLite, fn: Any) -> bool:
    params = fn.keywords["params"]
    if params["key"] is not None and await s.job("deliver_event", _key_seen, params=params):
        return True
    # The fault: the key was looked up in the previous job.
    delivered: bool = await s.job("deliver_event", _deliver_then_record_key, params=params)
    return delivered


fault(
    "split-event-key",
    rule="events: one key, one delivery, atomically",
    topic="events and keys",
    methods=("deliver_event",),
    change="deliver_event looks the key up in one job and stores the event in the next",
    split={"deliver_event": _split_event_key},
    caught_by={"concurrency.event_key_coroutines", "concurrency.event_key_threads"},
    raced_by={"rules.race_paths_processes"},
)

_INSERT_RUN_PLAIN = _Q["insert_run"][: _Q["insert_run"].index("ON CONFLICT")].rstrip()


def _run_by_key(conn: Connection, run: WorkflowRun) -> WorkflowRun | None:
    rows = conn.execute(
        _Q["get_run_by_idempotency_key"],
        {"workflow": run.workflow, "idempotency_key": run.idempotency_key},
    )
    return run_from_row(rows[0]) if rows else None


def _insert_plain(conn: Connection, params: dict[str, Any]) -> None:
    conn.execute(_INSERT_RUN_PLAIN, params)


async def _split_idempotency(s: FaultSQLite, fn: Any) -> CreateRunResult:
    run, params = fn.keywords["run"], fn.keywords["params"]
    if run.idempotency_key is not None:
        existing = await s.job("create_run", _run_by_key, run=run)
        if existing is not None:
            return CreateRunResult(existing, created=False)
    # The fault: the key was looked up in the previous job; a plain INSERT follows.
    await s.job("create_run", _insert_plain, params=params)
    return CreateRunResult(run, created=True)


fault(
    "split-idempotency",
    rule="create_run with a key is atomic: one key, one run",
    topic="idempotency",
    methods=("create_run",),
    change="create_run looks the key up in one job and inserts (no ON CONFLICT) in the next",
    split={"create_run": _split_idempotency},
    caught_by={"concurrency.idempotency_coroutines", "concurrency.idempotency_threads"},
    raced_by={"rules.race_paths_processes"},
)

_ADVANCE_UNGUARDED = patched_text(
    _Q["advance_schedule"],
    "WHERE key = :key AND next_run_at = :slot",
    "WHERE key = :key",
    1,
    "query advance_schedule",
)


def _due(conn: Connection, workflow_names: str, now: int) -> Any:
    rows = conn.execute(_Q["next_due_schedule"], {"workflow_names": workflow_names, "now": now})
    return schedule_from_row(rows[0]) if rows else None


def _advance(conn: Connection, params: dict[str, Any]) -> Any:
    rows = conn.execute(_ADVANCE_UNGUARDED, params)
    return schedule_from_row(rows[0]) if rows else None


async def _split_schedule(s: FaultSQLite, fn: Any) -> ClaimedSchedule | None:
    names, now = fn.keywords["workflow_names"], fn.keywords["now"]
    due = await s.job("claim_due_schedule", _due, workflow_names=names, now=now)
    if due is None:
        return None
    params = {
        "key": due.key,
        "slot": due.next_run_at,
        "next_run_at": next_fire_time(due.recurrence, due.next_run_at, now),
        "now": now,
    }
    # The fault: the advance is the next job and not guarded on the slot just read.
    advanced = await s.job("claim_due_schedule", _advance, params=params)
    return None if advanced is None else ClaimedSchedule(advanced, slot=due.next_run_at)


fault(
    "split-schedule",
    rule="claim_due_schedule: one occurrence fires once across all workers",
    topic="schedules",
    methods=("claim_due_schedule",),
    change="the due schedule is read in one job and advanced, unguarded, in the next",
    split={"claim_due_schedule": _split_schedule},
    caught_by={"concurrency.schedule_once_coroutines", "concurrency.schedule_once_threads"},
    raced_by={"concurrency.schedule_once_processes", "rules.race_paths_processes"},
)


def _oldest_event(conn: Connection, run_id: str, event_name: str) -> Any:
    rows = conn.execute(
        "SELECT seq, payload, delivered_at FROM reflow_events "
        "WHERE run_id = :run_id AND name = :event_name ORDER BY delivered_at, seq LIMIT 1",
        {"run_id": run_id, "event_name": event_name},
    )
    return rows[0] if rows else None


def _delete_event(conn: Connection, seq: int) -> None:
    conn.execute("DELETE FROM reflow_events WHERE seq = :seq", {"seq": seq})


async def _split_take_event(s: FaultSQLite, fn: Any) -> EventRecord | None:
    row = await s.job("take_event", _oldest_event, **fn.keywords)
    if row is None:
        return None
    # The fault: read, then delete in the next job, never checking it deleted anything.
    await s.job("take_event", _delete_event, seq=row[0])
    return EventRecord(value_from_text(row[1]), row[2])


fault(
    "split-take-event",
    rule="take_event: concurrent callers never receive the same event",
    topic="events and keys",
    methods=("take_event",),
    change="take_event reads the oldest event in one job and deletes it by seq in the next",
    split={"take_event": _split_take_event},
    caught_by={"concurrency.event_once_coroutines", "concurrency.event_once_threads"},
    raced_by={"rules.race_paths_processes"},
)

_OPS_NO_CONSUME_CHECK = _ops_with("no_consume_check", _Q={**_Q, "may_consume": "SELECT 1"})


def _may_consume(conn: Connection, params: dict[str, Any]) -> bool:
    return bool(conn.execute(_Q["may_consume"], params))


async def _split_consume(s: FaultSQLite, fn: Any) -> ConsumeResult:
    params = fn.keywords["params"]
    if not await s.job("consume_event", _may_consume, params=params):
        return ConsumeResult(held=False)
    # The fault: lease and write-once were checked in the previous job.
    result: ConsumeResult = await s.job(
        "consume_event", _OPS_NO_CONSUME_CHECK.consume_event, params=params
    )
    return result


fault(
    "split-consume",
    rule="consume_event: lease check, take and checkpoint are one atomic step",
    topic="consume atomicity",
    methods=("consume_event",),
    change="consume_event checks lease and final row in one job, takes and saves in the next",
    split={"consume_event": _split_consume},
    caught_by={"rules.race_consume_vs_takeover_threads"},
    raced_by={"rules.race_consume_vs_takeover_coroutines", "rules.race_paths_processes"},
)

_WAIT_FOUND = patched_text(
    _Q["wait_run"],
    "FROM (SELECT EXISTS (SELECT 1 FROM reflow_events\n"
    "                     WHERE run_id = :run_id AND name = :event_name) AS found) AS buffered",
    "FROM (SELECT :found AS found) AS buffered",
    1,
    "query wait_run",
)


def _buffered(conn: Connection, params: dict[str, Any]) -> bool:
    return bool(
        conn.execute(
            "SELECT 1 FROM reflow_events WHERE run_id = :run_id AND name = :event_name", params
        )
    )


def _wait_with(conn: Connection, params: dict[str, Any]) -> bool:
    conn.execute(_WAIT_FOUND, params)
    return conn.changes() > 0


async def _split_wait(s: FaultSQLite, fn: Any) -> bool:
    params = fn.keywords["params"]
    found = await s.job("wait_run", _buffered, params=params)
    # The fault: "is an event buffered?" was the previous job; a delivery in between
    # finds the run still running (no wake-up) and this write then misses it.
    waited: bool = await s.job("wait_run", _wait_with, params={**params, "found": int(found)})
    return waited


fault(
    "split-wait",
    rule="wait_run: a buffered event makes the run pending, atomically (no lost wake-up)",
    topic="events and keys",
    methods=("wait_run",),
    change="wait_run looks for a buffered event in one job and suspends the run in the next",
    split={"wait_run": _split_wait},
    caught_by={"rules.race_wait_vs_deliver_coroutines", "rules.race_wait_vs_deliver_threads"},
    raced_by={"rules.race_paths_processes"},
)

_OPS_UNFENCED_STATUS = _ops_with(
    "unfenced_status",
    _Q={
        **_Q,
        "update_claimed_run_status": patched_text(
            _Q["update_claimed_run_status"],
            "WHERE id = :run_id AND status = 'running' AND lease_id = :lease_id",
            "WHERE id = :run_id",
            1,
            "query update_claimed_run_status",
        ),
    },
)


async def _split_complete(s: FaultSQLite, fn: Any) -> bool:
    params = fn.keywords["params"]
    if not await s.job("update_claimed_run_status", _held, params=params):
        return False
    # The fault: the lease was checked in the previous job; this write is by id only.
    changed: bool = await s.job(
        "update_claimed_run_status",
        _OPS_UNFENCED_STATUS.changed,
        query="update_claimed_run_status",
        params=params,
    )
    return changed


fault(
    "split-complete",
    rule="update_claimed_run_status: the lease check and the write are atomic",
    topic="held: lease checks",
    methods=("update_claimed_run_status",),
    change="update_claimed_run_status checks the lease in one job and writes by id in the next",
    split={"update_claimed_run_status": _split_complete},
    caught_by={
        "rules.race_complete_vs_takeover_coroutines",
        "rules.race_complete_vs_takeover_threads",
    },
    raced_by={"rules.race_paths_processes"},
)


def _requeue_unconditional(conn: Connection, run_id: str, now: int) -> bool:
    conn.execute(
        patched_text(_Q["requeue_run"], " AND status IN ('failed', 'cancelled')", "", 1, "requeue"),
        {"run_id": run_id, "now": now},
    )
    conn.execute(_Q["delete_failed_steps"], {"run_id": run_id})
    return True


async def _split_requeue(s: FaultSQLite, fn: Any) -> bool:
    run_id = fn.keywords["run_id"]
    if await s.job("requeue_run", _status_of, run_id=run_id) not in ("failed", "cancelled"):
        return False
    # The fault: the status was checked in the previous job.
    requeued: bool = await s.job("requeue_run", _requeue_unconditional, **fn.keywords)
    return requeued


fault(
    "split-requeue",
    rule="requeue_run: only a failed or cancelled run, in one transaction",
    topic="requeue",
    methods=("requeue_run",),
    change="requeue_run reads the status in one job and requeues unconditionally in the next",
    split={"requeue_run": _split_requeue},
    caught_by={"rules.race_requeue_once_coroutines", "rules.race_requeue_once_threads"},
    raced_by={"rules.race_paths_processes"},
)

_HELD_CLAUSE = "WHERE id = :run_id AND status = 'running' AND lease_id = :lease_id"
_UNFENCED = {
    name: patched_text(_Q[name], _HELD_CLAUSE, "WHERE id = :run_id", 1, f"query {name}")
    for name in ("sleep_run", "heartbeat_run")
}


def _write_by_id(conn: Connection, query: str, params: dict[str, Any]) -> bool:
    conn.execute(_UNFENCED[query], params)
    return conn.changes() > 0


async def _split_held_write(s: FaultSQLite, fn: Any) -> bool:
    query, params = fn.keywords["query"], fn.keywords["params"]
    if not await s.job(query, _held, params=params):
        return False
    # The fault: the lease was checked in the previous job; this write is by id only.
    written: bool = await s.job(query, _write_by_id, query=query, params=params)
    return written


fault(
    "split-sleep",
    rule="sleep_run: the lease check and the write are atomic",
    topic="held: lease checks",
    methods=("sleep_run",),
    change="sleep_run checks the lease in one job and suspends the run by id in the next",
    split={"sleep_run": _split_held_write},
    caught_by={"rules.race_held_vs_takeover_threads", "rules.race_held_vs_cancel_threads"},
    raced_by={
        "rules.race_held_vs_takeover_coroutines",
        "rules.race_held_vs_cancel_coroutines",
        "rules.race_paths_processes",
    },
)
fault(
    "split-heartbeat",
    rule="heartbeat_run: the lease check and the renewal are atomic",
    topic="held: lease checks",
    methods=("heartbeat_run",),
    change="heartbeat_run checks the lease in one job and renews by id in the next",
    split={"heartbeat_run": _split_held_write},
    caught_by={"rules.race_held_vs_takeover_coroutines"},
    raced_by={"rules.race_held_vs_takeover_threads"},
)


# -- contract 2.1: claim_runs, purge_runs -------------------------------------------------


def _claim_runs_unsorted(
    conn: Connection, workflow_names: Sequence[str], limit: int, params: dict[str, Any]
) -> list[ClaimedRun]:
    """``ops.claim_runs`` without the merge: workflow by workflow, in the order named."""
    candidates: list[tuple[int, str]] = []
    for name in workflow_names:
        found = conn.execute(
            _Q["claim_candidates"], {"workflow": name, "now": params["now"], "limit": limit}
        )
        candidates.extend((created_at, run_id) for created_at, run_id in found)
    # The fault: no sort, so the first workflow's candidates come first whatever their age.
    claimed: list[ClaimedRun] = []
    for _, run_id in candidates:
        if len(claimed) == limit:
            break
        lease_id = str(uuid.uuid4())
        rows = conn.execute(_Q["claim_run"], {**params, "id": run_id, "lease_id": lease_id})
        if rows:
            claimed.append(ClaimedRun(run_from_row(rows[0]), lease_id))
    return claimed


class _ClaimRunsUnsorted(FaultSQLite):
    ops_module = _ops_with("claim_runs_unsorted", claim_runs=_claim_runs_unsorted)


fault(
    "claim-runs-unsorted",
    rule="claim_runs: the oldest (created_at, id) runs of all named workflows, oldest first",
    topic="claims",
    methods=("claim_runs",),
    change="claim_runs no longer merges the workflows' candidates by (created_at, id)",
    cls=_ClaimRunsUnsorted,
    caught_by={"rules.claim_runs_oldest_first_across_workflows"},
)
fault(
    "purge-inclusive",
    rule="purge_runs: only runs finished strictly before the cutoff",
    topic="lifecycle",
    methods=("purge_runs",),
    change="purge_runs tests updated_at <= :before instead of <",
    patches=[Patch("purge_runs", "AND updated_at < :before", "AND updated_at <= :before", 3)],
    caught_by={"rules.purge_runs_finished_before_oldest_first"},
)
fault(
    "purge-status-flag",
    rule="purge_runs: only the statuses asked for",
    topic="lifecycle",
    methods=("purge_runs",),
    change="the cancelled branch of purge_runs tests the :completed flag",
    patches=[
        Patch(
            "purge_runs",
            "WHERE :cancelled AND status = 'cancelled'",
            "WHERE :completed AND status = 'cancelled'",
        )
    ],
    caught_by={"rules.purge_runs_finished_before_oldest_first"},
)

FAULTS: tuple[Fault, ...] = tuple(_FAULTS)
