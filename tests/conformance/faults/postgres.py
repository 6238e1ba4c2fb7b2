"""Single faults built on the real PostgreSQL adapter (``PostgresStorage``, psycopg 3).

:class:`FaultPostgres` is ``PostgresStorage`` with its own URL scheme
(``fault-postgres-<name>://user@host/db?reflow_schema=...``) whose pooled connections
substitute patched text for the original text of one named query (``queries.sql``) or
one migration (``migrations/000N_*.sql``, run by ``initialize`` on the same
connections). Method faults override one method of the real adapter, or keep it and
replace one of its statements by a *handler* (``handlers``), so the real method's
identifier checks, encoding, transaction and notification stay exactly as shipped.

Split check-then-write faults run the check as a statement of its own on another pooled
connection (autocommit, its own transaction, without the row lock the real adapter
takes) and the write without re-checking: exactly the mistake a pooled, autocommit
adapter makes most easily.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import uuid
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterator,
    Mapping,
    Sequence,
)
from pathlib import Path
from typing import Any, ClassVar

import psycopg

from faults.base import Fault, Patch, patched_text
from reflow_adapters.postgres.records import to_schedule
from reflow_adapters.postgres.sql import migrations, queries
from reflow_adapters.postgres.storage import PostgresStorage
from reflow_core.errors import ConfigError, StorageError
from reflow_core.registry import AdapterSpec, Capability
from reflow_core.schedule import next_fire_time
from reflow_core.storage import Clock, system_clock
from reflow_core.types import RunStatus

__all__ = ["FAULTS", "FaultPostgres", "spec"]

CAPABILITIES = frozenset(
    {Capability.DURABLE, Capability.CROSS_PROCESS, Capability.THREADS, Capability.NOTIFY}
)
DSN_ENV = "REFLOW_TEST_POSTGRES_DSN"
_Q = queries()
_FINAL = ("completed", "completed-early", "skipped")


# -- machinery ---------------------------------------------------------------------------


class _PatchingConnection:
    """A pooled psycopg connection that runs patched text in place of original queries,
    hands statements the fault intercepts to their handler, and remembers which contract
    operation it serves."""

    def __init__(self, conn: Any, storage: FaultPostgres, operation: str) -> None:
        self._conn = conn
        self._storage = storage
        self.operation = operation

    async def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        if isinstance(query, str):
            handler = self._storage.handlers.get((self.operation, query))
            if handler is not None:
                return await handler(self._storage, self._conn, dict(params or {}))
            query = self._storage.replace.get(query, query)
        return await self._conn.execute(query, params, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


Handler = Callable[["FaultPostgres", Any, dict[str, Any]], Awaitable[Any]]
"""``handler(storage, conn, params)``: runs in place of one statement of one operation
(on the method's own connection ``conn``) and returns a cursor, so the real method goes
on exactly as it would after its own statement."""


class FaultPostgres(PostgresStorage):
    """``PostgresStorage`` under another scheme; subclasses carry exactly one fault."""

    scheme: ClassVar[str] = "fault-postgres-intact"
    replace: ClassVar[Mapping[str, str]] = {}
    handlers: ClassVar[Mapping[tuple[str, str], Handler]] = {}
    """``(operation, original query text)``: statements the fault replaces by a handler."""
    silent: ClassVar[frozenset[str]] = frozenset()
    """Operations whose work notification the fault leaves out."""

    def __init__(self, dsn: str, **options: Any) -> None:
        super().__init__(dsn, **options)
        assert self.url is not None
        self.url = self.scheme + self.url[self.url.index("://") :]

    @contextlib.asynccontextmanager
    async def _connection(self, operation: str, *, transaction: bool = False) -> AsyncIterator[Any]:
        async with super()._connection(operation, transaction=transaction) as conn:
            yield _PatchingConnection(conn, self, operation)

    async def _once_more(
        self, operation: str, query: Any, params: Any, *, idempotent: bool = False
    ) -> tuple[list[Any], int]:
        """The adapter's one-statement hot path (it takes a pooled connection directly),
        routed through :meth:`_connection` so the fault's substitutions apply to it too.
        What is left out, a retry after a lost connection, is no part of any named case."""
        async with self._connection(operation) as conn:
            cur = await conn.execute(query, params)
            rows = await cur.fetchall() if cur.description is not None else []
            return rows, cur.rowcount

    @contextlib.asynccontextmanager
    async def other_connection(self, operation: str) -> AsyncIterator[Any]:
        """Another pooled connection, autocommit, unpatched: a statement of its own."""
        async with PostgresStorage._connection(self, operation) as conn:
            yield conn

    async def _notify(self, conn: Any) -> None:
        if getattr(conn, "operation", None) in self.silent:
            return  # the fault: this path makes work claimable without telling anyone
        await super()._notify(conn)


def _query_map(patches: Sequence[Patch]) -> dict[str, str]:
    replace: dict[str, str] = {}
    for p in patches:
        original = _Q[p.query]
        current = replace.get(original, original)
        replace[original] = patched_text(current, p.old, p.new, p.count, f"query {p.query}")
    return replace


def _migration_map(version: int, old: str, new: str) -> dict[str, str]:
    migration = migrations()[version - 1]
    where = f"migration {version:04d}_{migration.name}"
    return {migration.sql: patched_text(migration.sql, old, new, 1, where)}


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
    migration: tuple[int, str, str] | None = None,
    cls: type[FaultPostgres] = FaultPostgres,
    silent: Collection[str] = (),
    handlers: Mapping[tuple[str, str], Handler] | None = None,
    race: bool = False,
    raced_by: Collection[str] = (),
) -> type[FaultPostgres]:
    """Build the fault's adapter class and record the fault."""
    full = f"fault-postgres-{name}"
    replace = _query_map(patches)
    if migration is not None:
        replace.update(_migration_map(*migration))
    kind = "schema" if migration else "query" if patches else "method"
    attrs: dict[str, Any] = {"scheme": full, "__module__": __name__}
    if replace:
        attrs["replace"] = replace
    if silent:
        attrs["silent"] = frozenset(silent)
    if handlers is not None:
        attrs["handlers"] = {(op, _Q[name]): handler for (op, name), handler in handlers.items()}
    adapter = type(f"Fault_{name.replace('-', '_')}", (cls,), attrs)
    _FAULTS.append(
        Fault(
            name=full,
            base="postgres",
            kind=kind,
            rule=rule,
            topic=topic,
            methods=methods,
            change=change,
            caught_by=frozenset(caught_by),
            adapter=adapter,
            race=race,
            raced_by=frozenset(raced_by),
        )
    )
    return adapter


_test_schemas: list[tuple[str, str]] = []


def _drop_test_schemas() -> None:
    """Drop the schemas the conformance factories made in this process (best effort)."""
    from psycopg import sql

    for dsn, schema in _test_schemas:
        try:
            with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
                conn.execute(
                    sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
                )
        except psycopg.Error:
            pass
    _test_schemas.clear()


def spec(f: Fault) -> AdapterSpec:
    """The fault as an adapter: its scheme is a ``postgresql://`` URL under another name."""
    adapter = f.adapter

    def factory(url: str | None = None, **options: Any) -> PostgresStorage:
        dsn = options.pop("dsn", None) if url is None else "postgresql" + url[url.index("://") :]
        if not dsn:
            raise ConfigError(f"{f.name} needs a URL or dsn=")
        storage: PostgresStorage = adapter(dsn, **options)
        return storage

    def conformance(
        tmp_path: Path, options: Mapping[str, str], *, clock: Clock | None = None
    ) -> PostgresStorage:
        dsn = options.get("dsn") or os.environ.get(DSN_ENV)
        if not dsn:
            raise ConfigError(f"set {DSN_ENV} or pass dsn= to test {f.name}")
        schema = f"reflow_fault_{uuid.uuid4().hex[:12]}"
        if not _test_schemas:
            atexit.register(_drop_test_schemas)
        _test_schemas.append((dsn, schema))
        storage: PostgresStorage = adapter(dsn, schema=schema, clock=clock)
        return storage

    return AdapterSpec(
        name=f.name,
        factory=factory,
        schemes=(f.name,),
        capabilities=CAPABILITIES,
        conformance_factory=conformance,
        description=f"single fault on postgres: {f.change}",
    )


# -- query faults --------------------------------------------------------------------------

fault(
    "claim-expiry-lt",
    rule="store clock: running is claimable once lease_expires_at <= now",
    topic="store clock",
    methods=("claim_next_run",),
    change="the expired branch tests lease_expires_at < clock.now instead of <=",
    patches=[
        Patch(
            "claim_runs",
            "lease_expires_at <= (SELECT now FROM clock)",
            "lease_expires_at < (SELECT now FROM clock)",
        )
    ],
    caught_by={"clock.stale_at_expiry", "claim.stale_reclaim"},
)
fault(
    "claim-wake-lt",
    rule="store clock: sleeping/waiting is claimable once wake_at <= now",
    topic="store clock",
    methods=("claim_next_run",),
    change="the due branch tests wake_at < clock.now instead of <=",
    patches=[
        Patch(
            "claim_runs",
            "wake_at <= (SELECT now FROM clock)",
            "wake_at < (SELECT now FROM clock)",
        )
    ],
    caught_by={"claim.sleeping_not_before_wake", "claim.waiting_before_deadline"},
)
fault(
    "claim-no-recovery",
    rule="recoveries: a takeover of an expired lease adds one",
    topic="recoveries",
    methods=("claim_next_run",),
    change="recoveries + CASE WHEN status = 'running' THEN 1 ELSE 0 END became recoveries",
    patches=[
        Patch(
            "claim_runs",
            "recoveries = runs.recoveries + CASE WHEN runs.status = 'running' THEN 1 ELSE 0 END,",
            "recoveries = runs.recoveries,",
        )
    ],
    caught_by={"recoveries.counted_on_expired_takeover", "clock.stale_at_expiry"},
)
fault(
    "claim-keeps-wake",
    rule="claim clears wake_at/waiting_for",
    topic="claims",
    methods=("claim_next_run",),
    change="claim's SET lost wake_at = NULL",
    patches=[
        Patch(
            "claim_runs",
            "attempt = runs.attempt + 1, wake_at = NULL, waiting_for = NULL,",
            "attempt = runs.attempt + 1, waiting_for = NULL,",
        )
    ],
    caught_by={"claim.sleeping_woken_by_time", "claim.waiting_deadline_passed"},
)
fault(
    "claim-drops-holder",
    rule="holder round trip",
    topic="holder round trip",
    methods=("claim_next_run",),
    change="claim's SET holder = %(holder)s::json became holder = NULL",
    patches=[Patch("claim_runs", "holder = %(holder)s::json,", "holder = NULL,")],
    caught_by={"lease_fields.holder_roundtrip", "lease_fields.set_by_claim"},
)
fault(
    "claim-pending-not-locked",
    rule="claim_next_run is atomic: two callers never get the same run",
    topic="claims",
    methods=("claim_next_run",),
    change="the pending branch lost FOR UPDATE SKIP LOCKED",
    patches=[
        Patch(
            "claim_runs",
            "        LIMIT %(limit)s\n        FOR UPDATE SKIP LOCKED\n    ) AS c\n    UNION ALL\n"
            "    SELECT c.id, c.created_at FROM names CROSS JOIN LATERAL (\n"
            "        SELECT id, created_at FROM runs\n"
            "        WHERE workflow = names.name AND status = 'running'",
            "        LIMIT %(limit)s\n    ) AS c\n    UNION ALL\n"
            "    SELECT c.id, c.created_at FROM names CROSS JOIN LATERAL (\n"
            "        SELECT id, created_at FROM runs\n"
            "        WHERE workflow = names.name AND status = 'running'",
        )
    ],
    caught_by={"concurrency.claim_threads"},
    race=True,
    raced_by={
        "concurrency.claim_coroutines",
        "concurrency.claim_processes",
        "rules.race_paths_processes",
    },
)
fault(
    "heartbeat-unfenced",
    rule="held means running with that lease id",
    topic="held: lease checks",
    methods=("heartbeat_run",),
    change="heartbeat's WHERE lost AND runs.lease_id = %(lease_id)s",
    patches=[Patch("heartbeat_run", " AND runs.lease_id = %(lease_id)s;", ";")],
    caught_by={"leases.fencing_heartbeat_run", "leases.heartbeat_foreign_lease"},
)
fault(
    "heartbeat-fixed-lease",
    rule="store clock: a heartbeat renews by the holder's stored lease_ms",
    topic="store clock",
    methods=("heartbeat_run",),
    change="lease_expires_at = clock.now + runs.lease_ms became clock.now + 30000",
    patches=[
        Patch(
            "heartbeat_run",
            "lease_expires_at = clock.now + runs.lease_ms",
            "lease_expires_at = clock.now + 30000",
        )
    ],
    caught_by={"clock.heartbeat_extends_by_stored_lease", "clock.heartbeat_fields_after_renewal"},
)
fault(
    "sleep-keeps-expiry",
    rule="lease fields: leaving running clears lease_expires_at",
    topic="lease fields",
    methods=("sleep_run",),
    change="sleep_run's SET lost lease_expires_at = NULL",
    patches=[Patch("sleep_run", "lease_ms = NULL, lease_expires_at = NULL,", "lease_ms = NULL,")],
    caught_by={"lease_fields.cleared_by_sleep_run"},
)
fault(
    "wait-keeps-holder",
    rule="lease fields: leaving running clears holder",
    topic="lease fields",
    methods=("wait_run",),
    change="wait_run's SET holder = NULL became holder = runs.holder",
    patches=[
        Patch("wait_run", "    holder = NULL\nFROM clock,", "    holder = runs.holder\nFROM clock,")
    ],
    caught_by={
        "lease_fields.cleared_by_wait_run",
        "lease_fields.cleared_by_wait_run_event_buffered",
    },
)
fault(
    "status-expected-ignored",
    rule="update_run_status(expected=...) changes only a run in expected",
    topic="status updates",
    methods=("update_run_status",),
    change="update_run_status lost AND (%(expected)s IS NULL OR status = ANY(...))",
    patches=[
        Patch(
            "update_run_status",
            "\n  AND (%(expected)s::text[] IS NULL OR runs.status = ANY(%(expected)s::text[]))",
            "",
        )
    ],
    caught_by={"status.expected_mismatch_refused", "status.expected_empty_refuses"},
)
fault(
    "update-claimed-keeps-claimed-at",
    rule="lease fields: update_claimed_run_status clears them unless running",
    topic="lease fields",
    methods=("update_claimed_run_status",),
    change="claimed_at = CASE WHEN status = 'running' THEN claimed_at END became claimed_at",
    patches=[
        Patch(
            "update_claimed_run_status",
            "claimed_at = CASE WHEN %(status)s::text = 'running' THEN runs.claimed_at END,",
            "claimed_at = runs.claimed_at,",
        ),
        # The same statement for a batch of concurrent callers (coalesce.py).
        Patch(
            "update_claimed_run_statuses",
            "claimed_at = CASE WHEN batch.status = 'running' THEN runs.claimed_at END,",
            "claimed_at = runs.claimed_at,",
        ),
    ],
    caught_by={
        "lease_fields.cleared_by_update_claimed_completed",
        "lease_fields.cleared_by_update_claimed_pending",
    },
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
    "requeue-keeps-recoveries",
    rule="recoveries: requeue_run resets them to 0",
    topic="recoveries",
    methods=("requeue_run",),
    change="requeue_run's SET lost recoveries = 0",
    patches=[
        Patch("requeue_run", "recoveries = 0, updated_at = clock.now,", "updated_at = clock.now,")
    ],
    caught_by={"recoveries.reset_by_requeue"},
)
fault(
    "list-keyset-inclusive",
    rule="keyset paging: strictly after (before, before_id)",
    topic="keyset paging and filters",
    methods=("list_runs",),
    change="(created_at, id) < (before, before_id) became <=",
    patches=[
        Patch(
            "list_runs",
            "WHERE (created_at, id) < (%(before)s::bigint",
            "WHERE (created_at, id) <= (%(before)s::bigint",
        )
    ],
    caught_by={"listing.keyset_with_equal_created_at"},
)
fault(
    "list-before-alone-inclusive",
    rule="keyset paging: before alone means created_at < before",
    topic="keyset paging and filters",
    methods=("list_runs",),
    change="before without before_id (bound as an empty id) became created_at <= before",
    patches=[
        Patch(
            "list_runs",
            "WHERE (created_at, id) < (%(before)s::bigint, %(before_id)s::text)",
            "WHERE (created_at < %(before)s::bigint OR (created_at = %(before)s::bigint"
            " AND (%(before_id)s::text = '' OR id < %(before_id)s::text)))",
        )
    ],
    caught_by={"listing.before_alone_is_strict"},
)
fault(
    "list-workflow-filter-dropped",
    rule="listing filters by workflow",
    topic="keyset paging and filters",
    methods=("list_runs",),
    change="list_runs lost its workflow condition",
    patches=[Patch("list_runs_by_workflow", "WHERE workflow = %(workflow)s::text AND ", "WHERE ")],
    caught_by={"listing.filter_workflow"},
)
fault(
    "save-step-no-write-once",
    rule="checkpoints are written once",
    topic="write-once",
    methods=("save_step_result",),
    change="the upsert's DO UPDATE lost AND steps.status NOT IN (final statuses)",
    patches=[
        Patch(
            "save_step_result",
            "\n  AND steps.status NOT IN ('completed', 'completed-early', 'skipped');",
            ";",
        ),
        Patch(
            "save_step_results",
            "\n  AND steps.status NOT IN ('completed', 'completed-early', 'skipped')\nRETURNING",
            "\nRETURNING",
        ),
    ],
    caught_by={
        "checkpoints.completed_kept_without_lease",
        "checkpoints.skipped_kept_with_held_lease",
    },
)
fault(
    "save-step-unfenced",
    rule="save_step_result with a lease is a no-op unless held",
    topic="held: lease checks",
    methods=("save_step_result",),
    change="the lease check lost AND lease_id = %(lease_id)s",
    patches=[
        Patch(
            "save_step_result",
            "AND status = 'running' AND lease_id = %(lease_id)s::text",
            "AND status = 'running'",
        ),
        Patch(
            "save_step_results",
            "AND status = 'running' AND lease_id = b.lease_id",
            "AND status = 'running'",
        ),
    ],
    caught_by={"leases.fencing_save_step_result", "steps.stale_lease_refused"},
)
fault(
    "event-key-ignored",
    rule="events: a key already delivered stores nothing",
    topic="events and keys",
    methods=("deliver_event",),
    change="insert_event's WHERE key IS NULL OR EXISTS (keyed) became WHERE true",
    patches=[
        Patch(
            "insert_event",
            "WHERE %(key)s::text IS NULL OR EXISTS (SELECT 1 FROM keyed);",
            "WHERE true;",
        )
    ],
    caught_by={"events.key_dedupe_while_buffered", "events.key_dedupe_after_take"},
)
fault(
    "deliver-to-cancelled",
    rule="deliver_event refuses ended runs (completed, failed, cancelled)",
    topic="events and keys",
    methods=("deliver_event",),
    change="lock_run's ended list lost 'cancelled'",
    patches=[
        Patch(
            "lock_run",
            "status IN ('completed', 'failed', 'cancelled') AS ended",
            "status IN ('completed', 'failed') AS ended",
        )
    ],
    caught_by={"events.refused_for_cancelled"},
)
fault(
    "wake-any-name",
    rule="deliver_event wakes only a run waiting for that name",
    topic="events and keys",
    methods=("deliver_event",),
    change="wake_waiting_run lost AND waiting_for = %(event_name)s",
    patches=[Patch("wake_waiting_run", " AND runs.waiting_for = %(event_name)s;", ";")],
    caught_by={"events.other_name_does_not_wake"},
)
fault(
    "consume-newest-first-in-ms",
    rule="consume_event takes the oldest buffered event",
    topic="consume atomicity",
    methods=("consume_event",),
    change="consume_event's ORDER BY delivered_at, seq became delivered_at, seq DESC",
    patches=[
        Patch(
            "consume_event",
            "        ORDER BY delivered_at, seq\n",
            "        ORDER BY delivered_at, seq DESC\n",
        )
    ],
    caught_by={"consume.fifo"},
)
fault(
    "schedule-resets-cadence",
    rule="upsert_schedule keeps next_run_at when the recurrence is unchanged",
    topic="schedules",
    methods=("upsert_schedule",),
    change="next_run_at = CASE WHEN recurrence unchanged ... became EXCLUDED.next_run_at",
    patches=[
        Patch(
            "upsert_schedule",
            "next_run_at = CASE WHEN schedules.recurrence::text = EXCLUDED.recurrence::text\n"
            "                       THEN schedules.next_run_at ELSE EXCLUDED.next_run_at END",
            "next_run_at = EXCLUDED.next_run_at",
        )
    ],
    caught_by={
        "schedules.unchanged_interval_keeps_cadence",
        "schedules.unchanged_cron_keeps_cadence",
    },
)
fault(
    "schedule-due-lt",
    rule="store clock: a schedule is due once next_run_at <= now",
    topic="store clock",
    methods=("claim_due_schedule",),
    change="lock_due_schedule's next_run_at <= clock.now became <",
    patches=[
        Patch(
            "lock_due_schedule",
            "schedules.next_run_at <= clock.now",
            "schedules.next_run_at < clock.now",
        )
    ],
    caught_by={"schedules.not_due_ignored"},
)
fault(
    "idempotency-conflict-target",
    rule="idempotency: a reused key returns the existing run",
    topic="idempotency",
    methods=("create_run",),
    change="insert_run's ON CONFLICT (workflow, idempotency_key) became ON CONFLICT (id)",
    patches=[
        Patch(
            "insert_run",
            "ON CONFLICT (workflow, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING",
            "ON CONFLICT (id) DO NOTHING",
        )
    ],
    caught_by={"runs.idempotency_returns_existing", "runs.idempotency_any_status"},
)


# -- schema faults -------------------------------------------------------------------------

fault(
    "steps-no-unique-run-name",
    rule="(run_id, name) is unique: a second id for a pair is a StorageError",
    topic="steps",
    methods=("save_step_result",),
    change="steps lost CONSTRAINT steps_run_id_name_key UNIQUE (run_id, name)",
    migration=(
        1,
        "    wake_at    bigint,\n"
        "    -- Row identity must not depend on the engine reusing ids.\n"
        "    CONSTRAINT steps_run_id_name_key UNIQUE (run_id, name)\n);",
        "    wake_at    bigint\n);",
    ),
    caught_by={"steps.run_and_name_unique"},
)
fault(
    "run-id-locale-collation",
    rule='identifiers: ordered by code point (COLLATE "C"), never a locale',
    topic="identifiers",
    methods=("list_runs", "claim_next_run"),
    change='runs.id declared COLLATE "en-x-icu" instead of "C"',
    migration=(
        1,
        '    id              text    COLLATE "C" PRIMARY KEY,',
        '    id              text    COLLATE "en-x-icu" PRIMARY KEY,',
    ),
    caught_by={"listing.id_order_is_code_point_order"},
)
fault(
    "schedule-key-locale-collation",
    rule="list_schedules ordered by key in code point order",
    topic="schedules",
    methods=("list_schedules", "claim_due_schedule"),
    change='schedules.key declared COLLATE "en-x-icu" instead of "C"',
    migration=(
        1,
        '    key         text   COLLATE "C" PRIMARY KEY,',
        '    key         text   COLLATE "en-x-icu" PRIMARY KEY,',
    ),
    caught_by={"schedules.listed_by_key"},
)
fault(
    "next-run-at-real",
    rule="times are integer milliseconds (a float4 loses them)",
    topic="times are integers",
    methods=("upsert_schedule", "claim_due_schedule", "list_schedules"),
    change="schedules.next_run_at declared real instead of bigint",
    migration=(1, "    next_run_at bigint NOT NULL,", "    next_run_at real NOT NULL,"),
    caught_by={"schedules.claim_advances_and_reports_slot"},
)
fault(
    "lease-expiry-int4",
    rule="lease fields: lease_expires_at holds epoch milliseconds",
    topic="lease fields",
    methods=("claim_next_run",),
    change="runs.lease_expires_at declared integer (int4) instead of bigint",
    migration=(
        2,
        "    ADD COLUMN lease_expires_at bigint,",
        "    ADD COLUMN lease_expires_at integer,",
    ),
    caught_by={"claim.marks_running_with_lease"},
)
fault(
    "created-at-double",
    rule="times are integer milliseconds",
    topic="times are integers",
    methods=("create_run", "get_run", "list_runs"),
    change="runs.created_at declared double precision (read back as float)",
    migration=(
        1,
        "    created_at      bigint  NOT NULL,\n    updated_at      bigint  NOT NULL\n);",
        "    created_at      double precision NOT NULL,\n    updated_at      bigint  NOT NULL\n);",
    ),
    caught_by={"rules.times_are_ints"},
)


# -- method faults -------------------------------------------------------------------------
#
# The real method runs unchanged (identifier checks, encoding, transaction, notification);
# the fault replaces one of its statements by a handler that does what the careless
# adapter would have done at that point.

_NOTHING = "SELECT 1 WHERE false"
"""A statement that matches no row: rowcount 0, fetchone() None (a refused write)."""


class _NowClientClock(FaultPostgres):
    async def now(self) -> int:
        return system_clock()  # the fault: the client's clock, not the store's


fault(
    "now-client-clock",
    rule="store clock: now() is the store's clock, never the client's",
    topic="store clock",
    methods=("now",),
    change="now() returns the client's wall clock",
    cls=_NowClientClock,
    caught_by={"clock.now_is_injected"},
)


async def _claim_with_client_clock(s: FaultPostgres, conn: Any, params: dict[str, Any]) -> Any:
    # The fault: staleness judged by the claimer's own clock, sent as "now".
    return await conn.execute(_Q["claim_runs"], {**params, "now": system_clock()})


fault(
    "claim-client-clock",
    rule="store clock: no caller passes now in (staleness by the store's clock)",
    topic="store clock",
    methods=("claim_next_run",),
    change="claim_next_run sends the client's wall clock as now",
    handlers={
        ("claim_next_run", "claim_runs"): _claim_with_client_clock,
        ("claim_runs", "claim_runs"): _claim_with_client_clock,
    },
    caught_by={"clock.stale_at_expiry", "claim.sleeping_not_before_wake"},
)


async def _advance_by_client_clock(s: FaultPostgres, conn: Any, params: dict[str, Any]) -> Any:
    cur = await conn.execute("SELECT * FROM schedules WHERE key = %(key)s", params)
    due = to_schedule(await cur.fetchone())
    now = system_clock()  # the fault: the next firing from the client's clock
    next_run_at = next_fire_time(due.recurrence, params["slot"], now)
    return await conn.execute(
        _Q["advance_schedule"], {**params, "next_run_at": next_run_at, "now": now}
    )


fault(
    "schedule-client-clock",
    rule="store clock: the next firing is computed from the store's now",
    topic="store clock",
    methods=("claim_due_schedule",),
    change="claim_due_schedule computes next_run_at from the client's wall clock",
    handlers={("claim_due_schedule", "advance_schedule"): _advance_by_client_clock},
    caught_by={"rules.schedule_next_from_store_clock"},
    raced_by={"schedules.claim_advances_and_reports_slot"},  # by chance: wall time elapsed
)


class _DriverErrorsLeak(FaultPostgres):
    @staticmethod
    @contextlib.contextmanager
    def _translated(operation: str) -> Iterator[None]:
        try:
            yield
        except psycopg.OperationalError as exc:  # the fault: only connection failures
            raise StorageError(operation, str(exc)) from exc


fault(
    "driver-errors-untranslated",
    rule="a driver exception never escapes: it becomes StorageError",
    topic="driver errors",
    methods=("save_step_result", "every method"),
    change="_translated catches only psycopg.OperationalError: IntegrityError escapes",
    cls=_DriverErrorsLeak,
    caught_by={"steps.run_and_name_unique"},
)


class _ExpectedMembersOnly(FaultPostgres):
    async def update_run_status(
        self, run_id: str, status: RunStatus, *, expected: Collection[RunStatus] | None = None
    ) -> bool:
        # The fault: ``s.value`` assumes RunStatus members; their strings have no .value.
        members = None if expected is None else [RunStatus(s.value) for s in expected]
        return await super().update_run_status(run_id, status, expected=members)


fault(
    "expected-members-only",
    rule="status arguments: RunStatus members or their string values",
    topic="status arguments",
    methods=("update_run_status",),
    change="update_run_status reads s.value of each expected status: strings raise",
    cls=_ExpectedMembersOnly,
    caught_by={"rules.status_strings_accepted"},
)

for _operation, _killer, _what in [
    ("requeue_run", "rules.notifies_requeue", "a requeued run"),
    ("deliver_event", "rules.notifies_deliver_wakes", "a run woken by its event"),
    ("update_claimed_run_status", "rules.notifies_release", "a run released to pending"),
    ("wait_run", "rules.notifies_wait_with_buffered_event", "a wait that finds its event"),
    ("sleep_run", "rules.notifies_sleep", "a run put to sleep"),
    ("update_run_status", "rules.notifies_update_run_status", "a run set to pending"),
]:
    fault(
        f"silent-{_operation.replace('_', '-')}",
        rule="notify: on_work for every path that makes work claimable",
        topic="notifications",
        methods=(_operation, "listen_for_work"),
        change=f"{_operation} sends no work notification for {_what}",
        silent={_operation},
        caught_by={_killer},
    )


# -- split check-then-write faults -----------------------------------------------------------
#
# The check runs as a statement of its own on another pooled connection (autocommit, its
# own transaction, no row lock), and the write that follows on the method's connection no
# longer re-checks: another transaction can commit in between.

_IS_HELD = "SELECT 1 FROM runs WHERE id = %(id)s AND status = 'running' AND lease_id = %(lease_id)s"


async def _checked(s: FaultPostgres, operation: str, query: str, params: dict[str, Any]) -> Any:
    """The first row of ``query`` run as a statement of its own (the split-off check)."""
    async with s.other_connection(operation) as other:
        cur = await other.execute(query, params)
        return await cur.fetchone()


_CLAIM = _Q["claim_runs"]
_CLAIM_UNLOCKED = patched_text(_CLAIM, "FOR UPDATE SKIP LOCKED", "", 3, "query claim_runs")
_CLAIM_PICK = _CLAIM_UNLOCKED[: _CLAIM_UNLOCKED.index("UPDATE runs")] + "SELECT id FROM chosen"
_CLAIM_BY_ID = (
    "WITH clock AS MATERIALIZED (SELECT reflow_now(%(now)s::bigint) AS now),\n"
    "chosen AS (SELECT unnest(%(chosen)s::text[]) AS id)\n" + _CLAIM[_CLAIM.index("UPDATE runs") :]
)


async def _split_claim(s: FaultPostgres, conn: Any, params: dict[str, Any]) -> Any:
    async with s.other_connection("claim_next_run") as other:
        cur = await other.execute(_CLAIM_PICK, params)
        chosen = [row["id"] for row in await cur.fetchall()]
    if not chosen:
        return await conn.execute(_NOTHING)
    # The fault: the candidates were picked without a lock; this UPDATE does not re-check.
    return await conn.execute(_CLAIM_BY_ID, {**params, "chosen": chosen})


fault(
    "split-claim",
    rule="claim_next_run is atomic: one winner for a stale run, recoveries counted once",
    topic="claims",
    methods=("claim_next_run",),
    change="claim SELECTs the candidate without a lock, then UPDATEs it by id unconditionally",
    handlers={
        ("claim_next_run", "claim_runs"): _split_claim,
        ("claim_runs", "claim_runs"): _split_claim,
    },
    caught_by={"concurrency.claim_threads", "concurrency.stale_reclaim_threads"},
    race=True,
    raced_by={
        "concurrency.claim_coroutines",
        "concurrency.claim_processes",
        "concurrency.stale_reclaim_coroutines",
        "concurrency.stale_takeover_processes",
        "rules.race_paths_processes",
    },
)


async def _split_fenced_save(s: FaultPostgres, conn: Any, params: dict[str, Any]) -> Any:
    if params["lease_id"] is not None:
        held = await _checked(s, "save_step_result", _IS_HELD, {**params, "id": params["run_id"]})
        if held is None:
            return await conn.execute(_NOTHING)
    # The fault: the lease was checked by the previous statement; this upsert has none.
    return await conn.execute(_Q["save_step_result"], {**params, "lease_id": None})


fault(
    "split-fenced-save",
    rule="save_step_result: the lease check and the write are atomic",
    topic="held: lease checks",
    methods=("save_step_result",),
    change="save_step_result checks the lease in one statement and upserts without it next",
    handlers={("save_step_result", "save_step_result"): _split_fenced_save},
    caught_by={"concurrency.fenced_save_threads"},
    race=True,
    raced_by={"concurrency.fenced_save_coroutines", "rules.race_paths_processes"},
)


async def _split_conditional_cancel(s: FaultPostgres, conn: Any, params: dict[str, Any]) -> Any:
    if params["expected"] is not None:
        row = await _checked(
            s, "update_run_status", "SELECT status FROM runs WHERE id = %(id)s", params
        )
        if row is None or row["status"] not in params["expected"]:
            return await conn.execute(_NOTHING)
    # The fault: the status was read by the previous statement; this write is unconditional.
    return await conn.execute(_Q["update_run_status"], {**params, "expected": None})


fault(
    "split-conditional-cancel",
    rule="update_run_status(expected=...): check and write are one atomic step",
    topic="status updates",
    methods=("update_run_status",),
    change="update_run_status reads the status, then writes unconditionally in a second statement",
    handlers={("update_run_status", "update_run_status"): _split_conditional_cancel},
    caught_by={"concurrency.cancel_vs_complete_threads"},
    race=True,
    raced_by={"concurrency.cancel_vs_complete_coroutines", "rules.race_paths_processes"},
)

_SAVE_UNGUARDED = patched_text(
    _Q["save_step_result"],
    "\n  AND steps.status NOT IN ('completed', 'completed-early', 'skipped');",
    ";",
    1,
    "query save_step_result",
)


async def _split_write_once(s: FaultPostgres, conn: Any, params: dict[str, Any]) -> Any:
    row = await _checked(
        s, "save_step_result", "SELECT status FROM steps WHERE id = %(id)s", params
    )
    if row is not None and row["status"] in _FINAL:
        return await conn.execute(_NOTHING)
    # The fault: the final-row check was the previous statement; this upsert is unguarded.
    return await conn.execute(_SAVE_UNGUARDED, params)


fault(
    "split-write-once",
    rule="checkpoints are written once: the first writer wins",
    topic="write-once",
    methods=("save_step_result",),
    change="save_step_result looks for a final row, then upserts unguarded in a second statement",
    handlers={("save_step_result", "save_step_result"): _split_write_once},
    caught_by={"concurrency.write_once_threads"},
    race=True,
    raced_by={"concurrency.write_once_coroutines", "rules.race_paths_processes"},
)

_LOCK_RUN_UNLOCKED = patched_text(_Q["lock_run"], "\nFOR NO KEY UPDATE;", ";", 1, "lock_run")
_INSERT_EVENT_UNKEYED = (
    "WITH clock AS MATERIALIZED (SELECT reflow_now(%(now)s::bigint) AS now),\n"
    "keyed AS (INSERT INTO event_keys (run_id, key, delivered_at)\n"
    "          SELECT %(id)s, %(key)s::text, clock.now FROM clock\n"
    "          ON CONFLICT (run_id, key) DO NOTHING)\n"
    "INSERT INTO events (run_id, name, payload, delivered_at)\n"
    "SELECT %(id)s, %(event_name)s, %(payload)s::json, clock.now FROM clock"
)


async def _lock_run_unlocked(s: FaultPostgres, conn: Any, params: dict[str, Any]) -> Any:
    return await conn.execute(_LOCK_RUN_UNLOCKED, params)


async def _split_event_key(s: FaultPostgres, conn: Any, params: dict[str, Any]) -> Any:
    if params["key"] is None:
        return await conn.execute(_Q["insert_event"], params)
    if await _checked(s, "deliver_event", _Q["event_key_seen"], params) is not None:
        return await conn.execute(_NOTHING)  # "delivered before": True, nothing stored
    # The fault: the key was looked up by the previous statement, and the run row is not
    # locked, so two deliveries of one key both get here.
    return await conn.execute(_INSERT_EVENT_UNKEYED, params)


fault(
    "split-event-key",
    rule="events: one key, one delivery, atomically",
    topic="events and keys",
    methods=("deliver_event",),
    change="deliver_event reads the run without locking it and looks the key up in a statement "
    "of its own before storing the event",
    handlers={
        ("deliver_event", "lock_run"): _lock_run_unlocked,
        ("deliver_event", "insert_event"): _split_event_key,
    },
    caught_by={"concurrency.event_key_threads"},
    race=True,
    raced_by={"concurrency.event_key_coroutines", "rules.race_paths_processes"},
)

fault(
    "split-schedule",
    rule="claim_due_schedule: one occurrence fires once across all workers",
    topic="schedules",
    methods=("claim_due_schedule",),
    change="the due schedule is read without a lock and advanced without the slot guard",
    patches=[
        Patch("lock_due_schedule", "\nFOR UPDATE OF schedules SKIP LOCKED", ""),
        Patch("advance_schedule", " AND next_run_at = %(slot)s", ""),
    ],
    caught_by={"concurrency.schedule_once_threads"},
    race=True,
    raced_by={
        "concurrency.schedule_once_coroutines",
        "concurrency.schedule_once_processes",
        "rules.race_paths_processes",
    },
)

_LOCK_HELD_UNLOCKED = patched_text(
    _Q["lock_held_run"], "\nFOR NO KEY UPDATE;", ";", 1, "lock_held_run"
)
_WAIT = _Q["wait_run"]
_WAIT_FOUND = (
    _WAIT[: _WAIT.index("     (SELECT EXISTS (SELECT 1 FROM events")]
    + "     (SELECT %(found)s::boolean AS found) AS buffered"
    + _WAIT[_WAIT.index("AS buffered") + len("AS buffered") :]
)
_BUFFERED = (
    "SELECT EXISTS (SELECT 1 FROM events WHERE run_id = %(id)s AND name = %(event_name)s) AS found"
)


async def _held_unlocked(s: FaultPostgres, conn: Any, params: dict[str, Any]) -> Any:
    return await conn.execute(_LOCK_HELD_UNLOCKED, params)


async def _split_wait(s: FaultPostgres, conn: Any, params: dict[str, Any]) -> Any:
    row = await _checked(s, "wait_run", _BUFFERED, params)
    # The fault: the buffered check was a statement of its own and the run is not locked,
    # so a delivery in between neither wakes the run nor is seen here.
    return await conn.execute(_WAIT_FOUND, {**params, "found": bool(row and row["found"])})


fault(
    "split-wait",
    rule="wait_run: a buffered event makes the run pending, atomically (no lost wake-up)",
    topic="events and keys",
    methods=("wait_run",),
    change="wait_run does not lock the run and looks for a buffered event in a statement of "
    "its own",
    handlers={
        ("wait_run", "lock_held_run"): _held_unlocked,
        ("wait_run", "wait_run"): _split_wait,
    },
    caught_by={"rules.race_wait_vs_deliver_threads"},
    race=True,
    raced_by={"rules.race_paths_processes", "rules.race_wait_vs_deliver_coroutines"},
)

fault(
    "split-consume",
    rule="consume_event: lease check, take and checkpoint are one atomic step",
    topic="consume atomicity",
    methods=("consume_event",),
    change="consume_event checks the lease without locking the run (a takeover can commit "
    "before the consume statement)",
    handlers={("consume_event", "lock_held_run"): _held_unlocked},
    caught_by={"rules.race_consume_vs_takeover_threads"},
    race=True,
    raced_by={"rules.race_consume_vs_takeover_coroutines", "rules.race_paths_processes"},
)

_UPDATE_CLAIMED_BY_ID = patched_text(
    _Q["update_claimed_run_status"],
    "WHERE runs.id = %(id)s AND runs.status = 'running' AND runs.lease_id = %(lease_id)s;",
    "WHERE runs.id = %(id)s;",
    1,
    "update_claimed_run_status",
)


async def _split_complete(s: FaultPostgres, conn: Any, params: dict[str, Any]) -> Any:
    if await _checked(s, "update_claimed_run_status", _IS_HELD, params) is None:
        return await conn.execute(_NOTHING)
    # The fault: the lease was checked by the previous statement; this write is by id.
    return await conn.execute(_UPDATE_CLAIMED_BY_ID, params)


fault(
    "split-complete",
    rule="update_claimed_run_status: the lease check and the write are atomic",
    topic="held: lease checks",
    methods=("update_claimed_run_status",),
    change="update_claimed_run_status checks the lease, then writes by id in a second statement",
    handlers={("update_claimed_run_status", "update_claimed_run_status"): _split_complete},
    caught_by={"rules.race_complete_vs_takeover_threads"},
    race=True,
    raced_by={"rules.race_complete_vs_takeover_coroutines", "rules.race_paths_processes"},
)

_PG_HELD_CLAUSE = (
    "WHERE runs.id = %(id)s AND runs.status = 'running' AND runs.lease_id = %(lease_id)s;"
)


def _split_held_write(name: str) -> Handler:
    """A handler for query ``name``: the lease checked by a statement of its own, then
    the write by id."""
    by_id = patched_text(_Q[name], _PG_HELD_CLAUSE, "WHERE runs.id = %(id)s;", 1, name)

    async def handler(s: FaultPostgres, conn: Any, params: dict[str, Any]) -> Any:
        if await _checked(s, name, _IS_HELD, params) is None:
            return await conn.execute(_NOTHING)
        # The fault: the lease was checked by the previous statement; this write is by id.
        return await conn.execute(by_id, params)

    return handler


fault(
    "split-sleep",
    rule="sleep_run: the lease check and the write are atomic",
    topic="held: lease checks",
    methods=("sleep_run",),
    change="sleep_run checks the lease in one statement and suspends the run by id next",
    handlers={("sleep_run", "sleep_run"): _split_held_write("sleep_run")},
    caught_by={"rules.race_held_vs_takeover_threads", "rules.race_held_vs_cancel_threads"},
    race=True,
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
    change="heartbeat_run checks the lease in one statement and renews by id next",
    handlers={("heartbeat_run", "heartbeat_run"): _split_held_write("heartbeat_run")},
    # Coroutines: 20/20 and 40/40 measured; the threads race catches it 18/20 only.
    caught_by={"rules.race_held_vs_takeover_coroutines"},
    race=True,
    raced_by={"rules.race_held_vs_takeover_threads"},
)


# -- contract 2.1: claim_runs, purge_runs -------------------------------------------------

fault(
    "claim-runs-no-overall-limit",
    rule="claim_runs: at most limit runs, the oldest of all named workflows",
    topic="claims",
    methods=("claim_runs", "claim_next_run"),
    change="claim_runs' final choice lost LIMIT (each workflow's candidates are all taken)",
    patches=[
        Patch(
            "claim_runs",
            "    SELECT id FROM candidates\n    ORDER BY created_at, id\n    LIMIT %(limit)s\n",
            "    SELECT id FROM candidates\n    ORDER BY created_at, id\n",
        )
    ],
    caught_by={"rules.claim_runs_oldest_first_across_workflows"},
)
fault(
    "purge-inclusive",
    rule="purge_runs: only runs finished strictly before the cutoff",
    topic="lifecycle",
    methods=("purge_runs",),
    change="purge_runs tests updated_at <= before instead of <",
    patches=[
        Patch(
            "purge_runs",
            "updated_at < %(before)s::bigint",
            "updated_at <= %(before)s::bigint",
            4,
        )
    ],
    caught_by={"rules.purge_runs_finished_before_oldest_first"},
)
fault(
    "purge-status-flag",
    rule="purge_runs: only the statuses asked for",
    topic="lifecycle",
    methods=("purge_runs",),
    change="the cancelled branch of purge_runs tests the completed flag",
    patches=[
        Patch(
            "purge_runs",
            "WHERE %(cancelled)s::boolean AND status = 'cancelled'",
            "WHERE %(completed)s::boolean AND status = 'cancelled'",
        )
    ],
    caught_by={"rules.purge_runs_finished_before_oldest_first"},
)

FAULTS: tuple[Fault, ...] = tuple(_FAULTS)
