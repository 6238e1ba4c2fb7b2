"""``MySQLStorage``: the storage contract on MySQL 8 / MariaDB 10.6+, for many workers.

Design in brief (the queries are in ``queries.sql``, the pool in ``connections.py``):

* A method that is one SQL statement runs as that statement on an autocommit
  connection; one that needs several runs them in one ``BEGIN ... COMMIT`` (rerun
  whole if InnoDB picks it as a deadlock victim). A failed call leaves nothing
  half-written.
* The server's clock is the store's clock: ``{now}`` in ``queries.sql`` reads the
  server's ``UTC_TIMESTAMP(6)`` in epoch milliseconds, once per statement. A
  transaction that must judge and stamp with one value (a claim) reads it first and
  passes it on. ``clock`` given to the constructor is a test-only override sent as
  every statement's ``now``.
* Claims lock rows with ``FOR UPDATE SKIP LOCKED``; lease-checked writes put the lease
  in the ``WHERE`` clause of one statement, or lock the held run row first.
* Identifiers are VARBINARY (exact bytes, code-point order); values LONGBLOB (the
  codec's bytes, byte for byte).
* Tables carry a prefix (``reflow_prefix`` URL parameter), so stores can share a
  database; migrations run under ``GET_LOCK``.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Collection
from typing import Any

from reflow_core.errors import ConfigError, StorageError
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
from reflow_core.storage import Clock, check_limit, check_purge_args
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

from .connections import Conn, Database, execute, is_duplicate
from .notify import poll_for_work
from .records import (
    Row,
    dump_error,
    dump_holder,
    dump_recurrence,
    dump_value,
    load_value,
    text,
    to_run,
    to_schedule,
    to_step,
)
from .sql import migrations, queries
from .url import parse_url

__all__ = ["MySQLStorage"]

_FINAL = frozenset(s.value for s in StepStatus if s.is_done)
_ENDED = frozenset({RunStatus.COMPLETED.value, RunStatus.FAILED.value, RunStatus.CANCELLED.value})
_EXTRA_CANDIDATES = 4
"""Candidates read beyond the number wanted, for those other claimers take meanwhile."""
_CANDIDATE_READS = 8
"""Bound on re-reading candidates within one claim (each read is one round trip)."""
_INSERT_RACE_RETRIES = 3
"""How often an insert that lost a race on the primary key is retried as an update."""


class _KeptFinalRow(Exception):
    """Rolls back a transaction that found its checkpoint already final; never escapes."""


class MySQLStorage:
    """Reflow storage on MySQL 8 / MariaDB 10.6+ (asyncmy), shared by any number of workers.

    ``url`` is ``mysql://user:password@host:3306/database`` (or ``mariadb://``), with an
    optional ``reflow_prefix`` query parameter (default ``reflow_``) that ``prefix``
    overrides. Nothing connects until :meth:`initialize`. ``drop_tables_on_close`` drops
    this store's tables in :meth:`close` (for tests).

    Time is the server's. ``clock`` is for tests only: when given, its value replaces the
    server's "now" in every statement.
    """

    poll_interval_s: float = 0.05
    """How often :meth:`listen_for_work` looks for new work (MySQL has no LISTEN)."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str | None = None,
        clock: Clock | None = None,
        min_size: int = 1,
        max_size: int = 10,
        drop_tables_on_close: bool = False,
    ) -> None:
        if not 0 <= min_size <= max_size or max_size < 1:
            raise ConfigError(
                f"need 0 <= min_size <= max_size, max_size >= 1; got "
                f"min_size={min_size}, max_size={max_size}"
            )
        self.target = parse_url(url, prefix=prefix)
        self.prefix = self.target.prefix
        self.url: str | None = self.target.url
        self._clock = clock
        self._db = Database(self.target, min_size=min_size, max_size=max_size)
        self._q = queries(self.prefix)
        self._drop_tables_on_close = drop_tables_on_close

    def __repr__(self) -> str:
        return f"MySQLStorage({self.target.redacted()!r})"

    # -- plumbing ---------------------------------------------------------------------

    def _now(self) -> int | None:
        """The ``%(now)s`` parameter: ``None`` (the server decides) unless a test clock."""
        return None if self._clock is None else self._clock()

    async def _all(self, conn: Conn, name: str, params: dict[str, Any]) -> list[Row]:
        return (await execute(conn, self._q[name], params))[1]

    async def _one(self, conn: Conn, name: str, params: dict[str, Any]) -> Row | None:
        rows = await self._all(conn, name, params)
        return rows[0] if rows else None

    async def _count(self, conn: Conn, name: str, params: dict[str, Any]) -> int:
        return (await execute(conn, self._q[name], params))[0]

    async def _server_now(self, conn: Conn) -> int:
        row = await self._one(conn, "now", {"now": self._now()})
        if row is None:  # pragma: no cover - a SELECT of one value returns one row
            raise StorageError("now", "the server returned no time")
        return int(row["now"])

    async def _single(self, operation: str, name: str, params: dict[str, Any]) -> int:
        """One statement on its own; rows matched."""

        async def body(conn: Conn) -> int:
            return await self._count(conn, name, params)

        return await self._db.run(operation, body)

    async def _select(self, operation: str, name: str, params: dict[str, Any]) -> list[Row]:
        async def body(conn: Conn) -> list[Row]:
            return await self._all(conn, name, params)

        return await self._db.run(operation, body)

    # -- lifecycle --------------------------------------------------------------------

    async def initialize(self) -> None:
        """Open the pool (once) and apply pending migrations under ``GET_LOCK``."""
        await self._db.open("initialize")
        await self._migrate()

    def _lock_name(self) -> str:
        # GET_LOCK names are at most 64 characters: a digest of the namespace.
        digest = hashlib.blake2b(self.target.namespace.encode(), digest_size=16).hexdigest()
        return f"reflow-migrate:{digest}"

    async def _migrate(self) -> None:
        """Apply the migrations not yet recorded, holding the namespace's named lock.

        DDL commits on its own in MySQL, so each migration's statements are re-runnable
        and its version is recorded after them: a migration cut short is completed by
        the next ``initialize``.
        """
        lock = {"lock": self._lock_name()}

        async def body(conn: Conn) -> None:
            got = await self._one(conn, "migration_lock", lock)
            if got is None or got["got"] != 1:
                raise StorageError(
                    "initialize",
                    f"could not take the migration lock of {self.target.namespace} within "
                    "60 s; another process is migrating it or holds the lock",
                )
            try:
                # Looked up first: CREATE TABLE IF NOT EXISTS on an existing table raises a
                # note, which the driver would log as a warning on every start-up.
                found = await self._all(
                    conn, "existing_tables", {"names": (f"{self.prefix}schema_version",)}
                )
                if not found:
                    await self._count(conn, "create_schema_version", {})
                applied = {r["version"] for r in await self._all(conn, "applied_versions", {})}
                for migration in migrations(self.prefix):
                    if migration.version in applied:
                        continue
                    for statement in migration.statements:
                        await execute(conn, statement.replace("%", "%%"), {})
                    await self._count(
                        conn,
                        "record_version",
                        {"version": migration.version, "name": migration.name, "now": None},
                    )
            finally:
                await self._one(conn, "migration_unlock", lock)

        await self._db.run("initialize", body)

    async def close(self) -> None:
        """Close the pool (dropping this store's tables first if asked). Safe twice."""
        if self._db.closed:
            return
        try:
            if self._drop_tables_on_close and not self._db.closed:
                await self.drop_tables()
        finally:
            await self._db.close()

    async def open_without_migrating(self) -> None:
        """Connect without creating or migrating tables (to drop them, or to inspect)."""
        await self._db.open("initialize")

    async def drop_tables(self) -> None:
        """Drop every table of this store (its prefix), data included. For tests."""
        wanted = tuple(f"{self.prefix}{t}" for t in _TABLES)

        async def body(conn: Conn) -> None:
            # Only the tables that exist: IF EXISTS on a missing one raises a note, which
            # the driver would log as a warning.
            rows = await self._all(conn, "existing_tables", {"names": wanted})
            existing = {text(row["name"]) for row in rows}
            names = ", ".join(f"`{name}`" for name in wanted if name in existing)
            if names:
                await execute(conn, f"DROP TABLE {names}", {})

        await self._db.run("drop_tables", body)

    async def listen_for_work(self, on_work: Callable[[], None]) -> None:
        """Call ``on_work`` when work may have become claimable, until cancelled
        (``WorkNotifier``).

        MySQL has no LISTEN/NOTIFY: writers append to a signal table and this polls its
        newest row every :attr:`poll_interval_s` (see ``notify.py``).
        """
        if self._db.closed:
            raise StorageError("listen_for_work", "the MySQL adapter is closed")
        await poll_for_work(self._db, self._q, on_work, interval_s=self.poll_interval_s)

    async def _signal(self, conn: Conn) -> None:
        await self._count(conn, "signal_work", {})

    async def _signalled(
        self, operation: str, name: str, params: dict[str, Any], signal: bool
    ) -> bool:
        """One statement; if it matched a row and ``signal``, a work signal with it.

        One transaction when signalling: each commit costs the server a log flush, and
        two commits would cost two.
        """
        if not signal:
            return await self._single(operation, name, params) > 0

        async def body(conn: Conn) -> bool:
            if await self._count(conn, name, params) == 0:
                return False
            await self._signal(conn)
            return True

        return await self._db.run(operation, body, transaction=True)

    async def now(self) -> int:
        """The server's current time in epoch milliseconds (or the test clock's)."""

        async def body(conn: Conn) -> int:
            return await self._server_now(conn)

        return await self._db.run("now", body)

    # -- runs -------------------------------------------------------------------------

    async def create_run(self, run: WorkflowRun) -> CreateRunResult:
        """Insert a pending run; an existing idempotency key returns that run instead."""
        check_run(run)
        params = {
            "id": run.id,
            "workflow": run.workflow,
            "status": RunStatus(run.status).value,
            "input": dump_value(run.input),
            "output": dump_value(run.output),
            "error": dump_error(run.error),
            "idempotency_key": run.idempotency_key,
            "wake_at": run.wake_at,
            "waiting_for": run.waiting_for,
            "heartbeat_at": run.heartbeat_at,
            "attempt": run.attempt,
            "created_at": run.created_at,
            "updated_at": run.updated_at,
            "recoveries": run.recoveries,
            "claimed_at": run.claimed_at,
            "lease_ms": run.lease_ms,
            "lease_expires_at": run.lease_expires_at,
            "holder": dump_holder(run.holder),
        }

        async def body(conn: Conn) -> CreateRunResult:
            try:
                await self._count(conn, "insert_run", params)
            except Exception as exc:
                if run.idempotency_key is None or not is_duplicate(exc, "runs_idempotency"):
                    raise
                # The insert waited for the other inserter to commit; READ COMMITTED
                # lets this next statement see its row.
                row = await self._one(conn, "get_run_by_idempotency_key", params)
                if row is None:  # pragma: no cover - the conflicting row cannot vanish
                    raise StorageError(
                        "create_run", "idempotency key conflict but no run found"
                    ) from exc
                return CreateRunResult(to_run(row), created=False)
            await self._signal(conn)
            row = await self._one(conn, "get_run", params)
            if row is None:  # pragma: no cover - just inserted
                raise StorageError("create_run", "the inserted run is missing")
            return CreateRunResult(to_run(row), created=True)

        return await self._db.run("create_run", body, transaction=True)

    async def get_run(self, run_id: str) -> WorkflowRun | None:
        """The run, or ``None``."""
        check_identifier(run_id, "run id")
        rows = await self._select("get_run", "get_run", {"id": run_id})
        return to_run(rows[0]) if rows else None

    async def list_runs(self, filter: RunFilter) -> list[WorkflowRun]:
        """Newest first by ``(created_at, id)``, filtered, keyset-paged."""
        if filter.workflow is not None:
            check_identifier(filter.workflow, "workflow name")
        if filter.before_id is not None:
            check_identifier(filter.before_id, "run id")
        params = {
            "status": None if filter.status is None else RunStatus(filter.status).value,
            "workflow": filter.workflow,
            "before": filter.before,
            "before_id": filter.before_id,
            "limit": max(filter.limit, 0),
        }
        return [to_run(row) for row in await self._select("list_runs", "list_runs", params)]

    async def _claim(
        self,
        conn: Conn,
        names: tuple[str, ...],
        now: int,
        limit: int,
        lease_ms: int,
        holder: bytes | None,
    ) -> list[ClaimedRun]:
        """Claim up to ``limit`` claimable runs, oldest first, in the caller's
        transaction, all stamped with ``now``.

        Candidates are read without locks, then locked one by one (``SKIP LOCKED``,
        re-checked), so only rows this claim takes are ever locked. A candidate that
        another claimer took meanwhile is passed over; when every candidate was, the
        candidates are read again, so a claimable run that nobody holds is never missed.
        """
        claimed: list[ClaimedRun] = []
        tried: set[bytes] = set()
        params: dict[str, Any] = {"names": names, "now": now}
        for _ in range(_CANDIDATE_READS):
            # Past the ones already tried, which may still head the list (held by others).
            params["k"] = limit - len(claimed) + len(tried) + _EXTRA_CANDIDATES
            rows = await self._all(conn, "claim_candidates", params)
            fresh = [row["id"] for row in rows if bytes(row["id"]) not in tried]
            if not fresh:
                break
            for run_id in fresh:
                tried.add(bytes(run_id))
                if await self._one(conn, "lock_claimable", {**params, "id": run_id}) is None:
                    continue  # held by another claimer, or no longer claimable
                lease_id = str(uuid.uuid4())
                update = {
                    "id": run_id,
                    "lease_id": lease_id,
                    "lease_ms": lease_ms,
                    "holder": holder,
                    "now": now,
                }
                await self._count(conn, "claim_run", update)
                row = await self._one(conn, "get_run", update)
                if row is None:  # pragma: no cover - the row is locked by this transaction
                    raise StorageError("claim_next_run", "a locked run vanished")
                claimed.append(ClaimedRun(to_run(row), lease_id))
                if len(claimed) == limit:
                    return claimed
        return claimed

    async def claim_next_run(
        self,
        workflow_names: Collection[str],
        *,
        lease_ms: int,
        holder: LeaseHolder | None = None,
    ) -> ClaimedRun | None:
        """Claim the oldest claimable run (``FOR UPDATE SKIP LOCKED``); staleness is
        ``lease_expires_at <= now`` on the server's clock."""
        claimed = await self._claim_batch("claim_next_run", workflow_names, lease_ms, holder, 1)
        return claimed[0] if claimed else None

    async def claim_runs(
        self,
        workflow_names: Collection[str],
        *,
        lease_ms: int,
        holder: LeaseHolder | None = None,
        limit: int,
    ) -> list[ClaimedRun]:
        """Claim up to ``limit`` runs, oldest first, in one transaction with one "now"."""
        check_limit(limit, "claim_runs")
        return await self._claim_batch("claim_runs", workflow_names, lease_ms, holder, limit)

    async def _claim_batch(
        self,
        operation: str,
        workflow_names: Collection[str],
        lease_ms: int,
        holder: LeaseHolder | None,
        limit: int,
    ) -> list[ClaimedRun]:
        check_names(workflow_names)
        check_holder(holder)
        names = tuple(workflow_names)
        if not names:
            return []
        dumped = dump_holder(holder)

        async def body(conn: Conn) -> list[ClaimedRun]:
            now = await self._server_now(conn)
            return await self._claim(conn, names, now, limit, lease_ms, dumped)

        return await self._db.run(operation, body, transaction=True)

    async def purge_runs(
        self,
        *,
        finished_before: int,
        limit: int,
        statuses: Collection[RunStatus] | None = None,
    ) -> int:
        """Delete up to ``limit`` finished runs (oldest ``(updated_at, id)`` first) with
        everything stored for them, in one statement (steps, events and event keys go by
        ``ON DELETE CASCADE``)."""
        chosen = check_purge_args(finished_before, limit, statuses)
        if not chosen:
            return 0
        params = {
            "statuses": tuple(sorted(s.value for s in chosen)),
            "finished_before": finished_before,
            "limit": limit,
        }
        return await self._single("purge_runs", "purge_runs", params)

    async def heartbeat_run(self, run_id: str, lease_id: str) -> bool:
        """Renew a held lease by its stored length, from the server's now."""
        check_identifier(run_id, "run id")
        if not is_identifier(lease_id):
            return False  # never issued, so never held
        params = {"id": run_id, "lease_id": lease_id, "now": self._now()}
        return await self._single("heartbeat_run", "heartbeat_run", params) > 0

    async def sleep_run(self, run_id: str, lease_id: str, wake_at: int) -> bool:
        """Held run to sleeping until ``wake_at``; lease released."""
        check_identifier(run_id, "run id")
        if not is_identifier(lease_id):
            return False  # never issued, so never held
        params = {"id": run_id, "lease_id": lease_id, "wake_at": wake_at, "now": self._now()}
        # Signalled so idle workers recompute their next wake-up.
        return await self._signalled("sleep_run", "sleep_run", params, True)

    async def wait_run(
        self, run_id: str, lease_id: str, event_name: str, wake_at: int | None
    ) -> bool:
        """Held run to waiting, or straight to pending if a matching event is buffered."""
        check_identifier(run_id, "run id")
        check_identifier(event_name, "event name")
        if not is_identifier(lease_id):
            return False  # never issued, so never held
        params: dict[str, Any] = {
            "id": run_id,
            "lease_id": lease_id,
            "event_name": event_name,
            "wake_at": wake_at,
            "now": self._now(),
        }

        async def body(conn: Conn) -> bool:
            if await self._one(conn, "lock_held_run", params) is None:
                return False
            found = await self._one(conn, "event_buffered", params)
            params["found"] = 1 if found is not None and found["found"] else 0
            await self._count(conn, "wait_run", params)
            if params["found"]:
                await self._signal(conn)
            return True

        return await self._db.run("wait_run", body, transaction=True)

    async def update_run_status(
        self,
        run_id: str,
        status: RunStatus,
        *,
        expected: Collection[RunStatus] | None = None,
    ) -> bool:
        """Set a status without a lease check; ``expected`` makes it conditional, atomically."""
        check_identifier(run_id, "run id")
        params: dict[str, Any] = {
            "id": run_id,
            "status": RunStatus(status).value,
            "now": self._now(),
        }
        claimable = RunStatus(status) in (RunStatus.PENDING, RunStatus.RUNNING)
        if expected is None:
            return await self._signalled(
                "update_run_status", "update_run_status", params, claimable
            )
        params["expected"] = tuple(RunStatus(s).value for s in expected)
        if not params["expected"]:
            return False  # no status is expected, so no run is in one
        return await self._signalled(
            "update_run_status", "update_run_status_expected", params, claimable
        )

    async def update_claimed_run_status(
        self,
        run_id: str,
        lease_id: str,
        status: RunStatus,
        *,
        output: Any = None,
        error: ErrorInfo | None = None,
    ) -> bool:
        """Set a held run's status with its output and error; releases unless running."""
        check_identifier(run_id, "run id")
        if not is_identifier(lease_id):
            return False  # never issued, so never held
        params = {
            "id": run_id,
            "lease_id": lease_id,
            "status": RunStatus(status).value,
            "output": dump_value(output),
            "error": dump_error(error),
            "now": self._now(),
        }
        return await self._signalled(
            "update_claimed_run_status",
            "update_claimed_run_status",
            params,
            RunStatus(status) == RunStatus.PENDING,
        )

    async def requeue_run(self, run_id: str) -> bool:
        """A failed or cancelled run back to pending, dropping only its failed steps."""
        check_identifier(run_id, "run id")
        params = {"id": run_id, "now": self._now()}

        async def body(conn: Conn) -> bool:
            if await self._count(conn, "requeue_run", params) == 0:
                return False
            await self._count(conn, "delete_failed_steps", params)
            await self._signal(conn)
            return True

        return await self._db.run("requeue_run", body, transaction=True)

    # -- steps ------------------------------------------------------------------------

    async def _upsert_step(self, conn: Conn, params: dict[str, Any], operation: str) -> bool:
        """Write a step row inside the caller's transaction, under the write-once and
        row-identity rules; ``False`` if a final row stands for it."""
        stored = await self._one(conn, "lock_step", params)
        if stored is None:
            try:
                await self._count(conn, "insert_step", params)
                return True
            except Exception as exc:
                if is_duplicate(exc, "steps_run_name"):
                    owner = await self._one(conn, "step_by_run_name", params)
                    other = text(owner["id"]) if owner else "?"
                    raise StorageError(
                        operation,
                        f"run {params['run_id']!r} already has step {params['name']!r} "
                        f"under id {other!r}; it cannot be stored again as {params['id']!r}",
                    ) from exc
                raise
        if (text(stored["run_id"]), text(stored["name"])) != (params["run_id"], params["name"]):
            raise StorageError(
                operation,
                f"step id {params['id']!r} already belongs to run {text(stored['run_id'])!r}, "
                f"step {text(stored['name'])!r}; it cannot be reused for run "
                f"{params['run_id']!r}, step {params['name']!r}",
            )
        if stored["status"] in _FINAL:
            return False  # checkpoints are written once: the first writer wins
        await self._count(conn, "update_step", params)
        return True

    async def save_step_result(self, result: StepResult, lease_id: str | None = None) -> bool:
        """Upsert a step row by id, in one transaction with the lease check when given.
        A stored final row is never overwritten: ``False``."""
        check_step(result)
        if lease_id is not None and not is_identifier(lease_id):
            return False  # never issued, so never held
        params = {
            "id": result.id,
            "run_id": result.run_id,
            "name": result.name,
            "status": StepStatus(result.status).value,
            "output": dump_value(result.output),
            "error": dump_error(result.error),
            "attempts": result.attempts,
            "created_at": result.created_at,
            "updated_at": result.updated_at,
            "wake_at": result.wake_at,
            "lease_id": lease_id,
        }

        async def body(conn: Conn) -> bool:
            if lease_id is not None and await self._one(conn, "share_held_run", params) is None:
                return False
            return await self._upsert_step(conn, params, "save_step_result")

        # The common case, a new row, is one statement (one round trip, one commit); an
        # existing row (a duplicate key) needs the transaction below to judge it.
        fast = "insert_step" if lease_id is None else "insert_step_if_held"
        try:
            return await self._single("save_step_result", fast, params) > 0
        except StorageError as exc:
            cause = exc.__cause__ or exc
            if not (is_duplicate(cause, "PRIMARY") or is_duplicate(cause, "steps_run_name")):
                raise
        for attempt in range(_INSERT_RACE_RETRIES + 1):
            try:
                return await self._db.run("save_step_result", body, transaction=True)
            except StorageError as exc:
                # Two writers of one new row: the loser's insert hits the primary key
                # after the winner commits; run again, it then finds and judges the row.
                if not is_duplicate(exc.__cause__ or exc, "PRIMARY") or (
                    attempt == _INSERT_RACE_RETRIES
                ):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def get_step_results(self, run_id: str) -> list[StepResult]:
        """The run's steps by ``(created_at, id)``."""
        check_identifier(run_id, "run id")
        rows = await self._select("get_step_results", "get_step_results", {"run_id": run_id})
        return [to_step(row) for row in rows]

    # -- events -----------------------------------------------------------------------

    async def deliver_event(
        self, run_id: str, event_name: str, payload: Any, *, key: str | None = None
    ) -> bool:
        """Buffer an event for a run that has not ended and wake the run if it waits for
        that name, in one transaction; a repeated ``key`` stores nothing and answers
        ``True`` (even if the run has ended since); a refused delivery keeps its key free.
        """
        check_identifier(run_id, "run id")
        check_identifier(event_name, "event name")
        if key is not None:
            check_identifier(key, "event key")
        params = {
            "id": run_id,
            "event_name": event_name,
            "payload": dump_value(payload),
            "key": key,
            "now": self._now(),
        }

        async def body(conn: Conn) -> bool:
            run = await self._one(conn, "lock_run", params)
            if run is None:
                return False
            seen = key is not None and await self._one(conn, "event_key_seen", params) is not None
            if seen:
                return True  # delivered before: stored once, woken then
            if run["status"] in _ENDED:  # and stays so: the row is locked until commit
                return False
            if key is not None:
                await self._count(conn, "insert_event_key", params)
            await self._count(conn, "insert_event", params)
            if await self._count(conn, "wake_waiting_run", params) > 0:
                await self._signal(conn)
            return True

        return await self._db.run("deliver_event", body, transaction=True)

    async def take_event(self, run_id: str, event_name: str) -> EventRecord | None:
        """Remove and return the oldest buffered event of that name, in one transaction."""
        check_identifier(run_id, "run id")
        check_identifier(event_name, "event name")
        params = {"id": run_id, "event_name": event_name}

        async def body(conn: Conn) -> EventRecord | None:
            row = await self._one(conn, "oldest_event", params)
            if row is None:
                return None
            await self._count(conn, "delete_event", {"seq": row["seq"]})
            return EventRecord(_payload(row["payload"]), row["delivered_at"])

        return await self._db.run("take_event", body, transaction=True)

    async def consume_event(
        self, event_name: str, checkpoint: StepResult, lease_id: str
    ) -> ConsumeResult:
        """Take the oldest event and checkpoint its payload, in one transaction.

        The held run row is locked first (as ``wait_run`` and ``deliver_event`` lock
        it), so the lease cannot be reclaimed between check and writes, and a concurrent
        consumer of the same run waits, then sees the event gone. A final row already
        standing for ``checkpoint`` takes and writes nothing (``held=False``).
        """
        check_identifier(event_name, "event name")
        check_step(checkpoint)
        if not is_identifier(lease_id):
            return ConsumeResult(held=False)  # never issued, so never held
        params: dict[str, Any] = {
            "id": checkpoint.id,
            "run_id": checkpoint.run_id,
            "name": checkpoint.name,
            "status": StepStatus(checkpoint.status).value,
            "error": dump_error(checkpoint.error),
            "attempts": checkpoint.attempts,
            "created_at": checkpoint.created_at,
            "updated_at": checkpoint.updated_at,
            "wake_at": checkpoint.wake_at,
        }
        run = {"id": checkpoint.run_id, "lease_id": lease_id, "event_name": event_name}

        async def body(conn: Conn) -> ConsumeResult:
            if await self._one(conn, "lock_held_run", run) is None:
                return ConsumeResult(held=False)
            stored = await self._one(conn, "lock_step", params)
            if (
                stored is not None
                and stored["status"] in _FINAL
                and (text(stored["run_id"]), text(stored["name"]))
                == (checkpoint.run_id, checkpoint.name)
            ):
                return ConsumeResult(held=False)  # written once, never again
            event = await self._one(conn, "oldest_event", run)
            if event is None:
                return ConsumeResult(held=True)
            await self._count(conn, "delete_event", {"seq": event["seq"]})
            # The event's stored bytes become the checkpoint's output, byte for byte.
            params["output"] = bytes(event["payload"])
            if not await self._upsert_step(conn, params, "consume_event"):
                raise _KeptFinalRow  # pragma: no cover - checked above under the lock
            return ConsumeResult(
                held=True, event=EventRecord(_payload(event["payload"]), event["delivered_at"])
            )

        try:
            return await self._db.run("consume_event", body, transaction=True)
        except _KeptFinalRow:  # pragma: no cover - rolled back: nothing consumed
            return ConsumeResult(held=False)

    # -- schedules --------------------------------------------------------------------

    async def upsert_schedule(self, schedule: Schedule) -> Schedule:
        """Insert or update by key, keeping created_at and (same recurrence) next_run_at."""
        check_schedule(schedule)
        params = {
            "key": schedule.key,
            "workflow": schedule.workflow,
            "input": dump_value(schedule.input),
            "recurrence": dump_recurrence(schedule.recurrence),
            "next_run_at": schedule.next_run_at,
            "created_at": schedule.created_at,
            "updated_at": schedule.updated_at,
        }

        async def body(conn: Conn) -> Schedule:
            await self._count(conn, "upsert_schedule", params)
            row = await self._one(conn, "get_schedule", params)
            if row is None:  # pragma: no cover - written by this transaction
                raise StorageError("upsert_schedule", "the upserted schedule is missing")
            return to_schedule(row)

        return await self._db.run("upsert_schedule", body, transaction=True)

    async def claim_due_schedule(self, workflow_names: Collection[str]) -> ClaimedSchedule | None:
        """Lock the earliest due schedule (by the server's now) and advance it from that
        same now, in one transaction."""
        check_names(workflow_names)
        names = tuple(workflow_names)
        if not names:
            return None

        async def body(conn: Conn) -> ClaimedSchedule | None:
            now = await self._server_now(conn)
            row = await self._one(conn, "lock_due_schedule", {"names": names, "now": now})
            if row is None:
                return None
            due = to_schedule(row)
            params = {
                "key": due.key,
                "slot": due.next_run_at,
                "next_run_at": next_fire_time(due.recurrence, due.next_run_at, now),
                "now": now,
            }
            if await self._count(conn, "advance_schedule", params) == 0:
                return None  # pragma: no cover - the row is locked, so the guard holds
            advanced = await self._one(conn, "get_schedule", params)
            if advanced is None:  # pragma: no cover - locked by this transaction
                return None
            return ClaimedSchedule(to_schedule(advanced), due.next_run_at)

        return await self._db.run("claim_due_schedule", body, transaction=True)

    async def delete_schedule(self, key: str) -> bool:
        """Remove a schedule; ``False`` if none."""
        check_identifier(key, "schedule key", MAX_SCHEDULE_KEY_LENGTH)
        return await self._single("delete_schedule", "delete_schedule", {"key": key}) > 0

    async def list_schedules(self) -> list[Schedule]:
        """All schedules by key (code-point order)."""
        return [to_schedule(r) for r in await self._select("list_schedules", "list_schedules", {})]


_TABLES = ("event_keys", "events", "steps", "runs", "schedules", "work_signals", "schema_version")
"""Every table of a store, children first (foreign keys)."""


def _payload(raw: Any) -> Any:
    return load_value(bytes(raw))
