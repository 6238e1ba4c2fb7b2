"""``PostgresStorage``: the storage contract on PostgreSQL, for many workers on many machines.

Design in brief (the queries themselves are in ``queries.sql``):

* One ``psycopg_pool`` pool of autocommit connections (configured in ``pool.py``: a
  checkout costs no round trip). A method that is one SQL
  statement runs as that statement, prepared, with no BEGIN/COMMIT and no health-check
  round trip; a method that needs several runs them in one explicit transaction (sent
  as one pipeline where no answer decides the next statement). Either way a failed
  call leaves nothing half-written. A connection lost mid-call fails that call; an
  idempotent one (reads, claims, heartbeats) is retried once on a fresh connection,
  and lease-checked writes are retried by the engine, which asks whether they landed.
* Checkpoints and run endings, the writes every run makes, are coalesced
  (``coalesce.py``): those made at the same moment by different runs share one
  statement and one commit, each row guarded as if it were alone. Alone, a write goes
  at once; under load, one commit serves dozens. An error that is one row's (an insert
  race, a deadlock) sends that batch's writes again one by one.
* The adapter's schema is every connection's ``search_path`` (a ``-c`` option in the
  conninfo), so ``queries.sql`` is schema-agnostic and readable. Schema names are
  restricted to lowercase identifiers, which makes that option safe without quoting.
* The server's clock is the store's clock. Every statement that needs "now" reads
  ``clock_timestamp()`` once, in epoch milliseconds, through the ``reflow_now`` SQL
  function (``migrations/0002``); no client clock decides a lease, a wake-up or a due
  schedule, so workers whose clocks disagree still agree on what is stale. Leases are
  stored with the run (``lease_ms``, ``lease_expires_at``) and judged against that one
  clock. A ``clock`` given to the constructor is a test-only override: its value is sent
  as each statement's ``now`` instead (``reflow_now(%(now)s)`` is
  ``coalesce(param, server time)``), so tests can move time by hand; without one the
  parameter is NULL and the server decides.
* Values go through :mod:`reflow_core.codec` *before* any SQL and are stored in
  ``json`` columns, which keep the codec's text byte for byte; json columns are loaded
  back as text (a connection-level loader) and decoded by the codec.
* Driver errors are translated in exactly one place, :func:`_storage_error` (called by
  :meth:`PostgresStorage._translated` and by the one-statement fast path).
* Work notifications (``pg_notify``) are sent inside the transaction that made a run
  claimable, so they arrive on commit only; :mod:`.notify` listens for them.

The module runs past the ~400-line guide because it holds one short method per contract
row and nothing else: DSN handling is in ``conninfo.py``, row mapping in ``records.py``,
the listener in ``notify.py``, SQL in ``queries.sql``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterator,
    Mapping,
    Sequence,
)
from typing import Any, LiteralString

import psycopg
import psycopg_pool
from psycopg import AsyncConnection, pq, sql
from psycopg.adapt import AdaptersMap
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import DictRow, dict_row
from psycopg.types.string import TextLoader

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
from reflow_core.migrations import SchemaStatus
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

from . import admin
from .coalesce import Coalescer
from .conninfo import advisory_key, split_dsn, with_schema_param
from .notify import listen
from .pool import POOL_ERRORS, PooledConnection, new_pool
from .records import (
    dump_error,
    dump_holder,
    dump_recurrence,
    dump_value,
    load_value,
    to_run,
    to_schedule,
    to_step,
)
from .sql import migrations, queries

__all__ = ["PostgresStorage"]

_MAX_BIGINT = 2**63 - 1
"""The bound of a listing's first page (see list_runs in queries.sql)."""
_RACE_RETRIES = 3
"""How often a statement that lost an insert race on a secondary unique index is retried."""
_BATCH_MAX = 64
"""The most checkpoints (or run completions) one coalesced statement carries."""
_BATCH_LANES = 3
"""Coalesced statements in flight at once, per kind: one that waits on a row lock holds
up only its own batch."""


_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,49}")
# What a call may raise when the server, the network or the pool fails. PoolTimeout and
# PoolClosed derive from psycopg.OperationalError; listed for the reader.
_DRIVER_ERRORS = (psycopg.Error, *POOL_ERRORS, OSError)
_TUPLES_OK = pq.ExecStatus.TUPLES_OK
_DEFAULT_MAX_SIZE = 25
"""The pool's default bound. A caller that finds every connection in use queues in
psycopg_pool (a lock, a condition and a timed wait: several times a statement's own
client CPU), so the bound sits above a worker's usual concurrency plus its dispatcher.
Connections above ``min_size`` open only when callers queue and close after idling."""
_CONNECT_TIMEOUT_S = 5
"""libpq's connect_timeout unless the DSN sets one: a replacement connection after churn
must fail fast, not hang on an unreachable server."""


AsyncCursorRows = tuple[list[DictRow], int]
"""A statement's rows (empty if it returns none) and its row count."""


def _storage_error(operation: str, exc: BaseException) -> StorageError:
    """THE translation of a driver error into :class:`StorageError`; raise the result
    ``from exc`` so the driver error stays its cause."""
    return StorageError(operation, str(exc) or type(exc).__name__)


def _connection_lost(cause: BaseException) -> bool:
    """``True`` if the driver error ``cause`` means the connection died (terminated
    backend, restart, network), not that the statement or the pool failed."""
    if isinstance(cause, OSError):
        return True
    if isinstance(cause, POOL_ERRORS):
        return False
    if isinstance(cause, psycopg.errors.AdminShutdown | psycopg.errors.CrashShutdown):
        return True
    # libpq's own failures (socket closed, connection closed) carry no SQLSTATE.
    return isinstance(cause, psycopg.OperationalError) and cause.sqlstate is None


class _KeptFinalRow(Exception):
    """Rolls back a ``consume_event`` transaction that found its checkpoint already
    final; never escapes the adapter."""


def _by_id(params: Mapping[str, Any]) -> Any:
    return params["id"]


def _columns(batch: Sequence[Mapping[str, Any]], *names: str) -> dict[str, list[Any]]:
    """One array per column, for a statement that ``unnest``s a batch of rows."""
    return {name: [params[name] for params in batch] for name in names}


def _q(name: str) -> LiteralString:
    """The named query from queries.sql (parsed once, on first use)."""
    return queries()[name]


class PostgresStorage:
    """Reflow storage on PostgreSQL (psycopg 3, async), shared by any number of workers.

    ``dsn`` is a libpq connection string or ``postgresql://`` URL. ``schema`` (a lowercase
    identifier) holds the tables; by default the DSN's ``reflow_schema`` query parameter,
    else ``"reflow"``. Nothing connects until :meth:`initialize`. ``drop_schema_on_close``
    drops the whole schema in :meth:`close` (for tests). ``min_size`` and ``max_size``
    bound the connection pool; keep ``max_size`` above the engine's ``concurrency``.

    Time is the server's (``clock_timestamp()``). ``clock`` is for tests only: when
    given, its value replaces the server's "now" in every statement.
    """

    listen_timeout_s: float = 30.0
    """How long the listener waits for a notification before probing its connection."""
    close_wait_s: float = 5.0
    """How long :meth:`close` lets coalesced writes already sent finish before it cancels
    them (one can wait on a row lock that is never released)."""
    reconnect_initial_s: float = 0.1
    reconnect_max_s: float = 10.0
    """Bounds of the listener's exponential reconnection backoff."""

    def __init__(
        self,
        dsn: str,
        *,
        schema: str | None = None,
        clock: Clock | None = None,
        min_size: int = 1,
        max_size: int = _DEFAULT_MAX_SIZE,
        drop_schema_on_close: bool = False,
    ) -> None:
        base_dsn, dsn_schema = split_dsn(dsn)
        self.schema = schema or dsn_schema or "reflow"
        if not _SCHEMA_NAME.fullmatch(self.schema):
            raise ConfigError(
                f"schema name {self.schema!r} is not allowed; use 1-50 lowercase letters, "
                "digits and underscores, not starting with a digit"
            )
        if not 0 <= min_size <= max_size or max_size < 1:
            raise ConfigError(
                f"need 0 <= min_size <= max_size, max_size >= 1; got "
                f"min_size={min_size}, max_size={max_size}"
            )
        try:
            params = conninfo_to_dict(base_dsn)
        except psycopg.ProgrammingError as exc:
            raise ConfigError(f"invalid PostgreSQL DSN: {exc}") from None
        options = f"{params.get('options') or ''} -c search_path={self.schema}".strip()
        self._conninfo = make_conninfo(
            base_dsn,
            options=options,
            application_name=str(params.get("application_name") or f"reflow:{self.schema}"),
            connect_timeout=str(params.get("connect_timeout") or _CONNECT_TIMEOUT_S),
        )
        self.url: str | None = with_schema_param(base_dsn, self.schema)
        self.channel = f"{self.schema}_work"
        """The LISTEN/NOTIFY channel: one per schema, so separate stores never cross-talk."""
        self._clock = clock
        self._min_size, self._max_size = min_size, max_size
        self._drop_schema_on_close = drop_schema_on_close
        # json columns load as their exact text; the codec, not psycopg, decodes them.
        self._adapters = AdaptersMap(psycopg.adapters)
        self._adapters.register_loader("json", TextLoader)
        self._pool: psycopg_pool.AsyncConnectionPool[PooledConnection] | None = None
        self._closed = False
        self._listeners: set[AsyncConnection[Any]] = set()
        # Concurrent checkpoints and run completions share statements and commits.
        self._step_writes = Coalescer(
            self._save_steps,
            key=_by_id,
            max_batch=_BATCH_MAX,
            lanes=_BATCH_LANES,
            stopped=lambda: self._unavailable("save_step_result"),
        )
        self._run_endings = Coalescer(
            self._end_runs,
            key=_by_id,
            max_batch=_BATCH_MAX,
            lanes=_BATCH_LANES,
            stopped=lambda: self._unavailable("update_claimed_run_status"),
        )

    def __repr__(self) -> str:
        return f"PostgresStorage(schema={self.schema!r})"

    # -- plumbing ---------------------------------------------------------------------

    @staticmethod
    @contextlib.contextmanager
    def _translated(operation: str) -> Iterator[None]:
        """Driver errors raised inside become :class:`StorageError` (see :func:`_storage_error`)."""
        try:
            yield
        except _DRIVER_ERRORS as exc:
            raise _storage_error(operation, exc) from exc

    @contextlib.asynccontextmanager
    async def _connection(
        self, operation: str, *, transaction: bool = False
    ) -> AsyncIterator[AsyncConnection[DictRow]]:
        """A pooled connection, in a transaction if asked. A broken connection is
        discarded by the pool on return, and the next call gets a fresh one."""
        if self._pool is None:
            raise self._unavailable(operation)
        with self._translated(operation):
            async with self._pool.connection() as conn:
                if transaction:
                    async with conn.transaction():
                        yield conn
                else:
                    yield conn

    async def _once_more(
        self,
        operation: str,
        query: LiteralString,
        params: Mapping[str, Any],
        *,
        idempotent: bool,
    ) -> AsyncCursorRows:
        """Run one statement (prepared) in autocommit; if it is ``idempotent`` and its
        connection was lost, run it once more on a fresh connection.

        Only idempotent statements are retried here: a write whose answer was lost may
        have committed, and the engine retries those itself, asking whether the first
        attempt landed (see ``execution/run.py``). A second loss is reported.
        """
        for attempt in (1, 2):
            # The hot path: the pool is used directly and errors are caught here, without
            # _connection's and _translated's context-manager layers (a few µs a call).
            pool = self._pool
            if pool is None:
                raise self._unavailable(operation)
            try:
                conn = await pool.getconn()
                try:
                    cur = await conn.kept_cursor().execute(query, params, prepare=True)
                    result = cur.pgresult
                    # TUPLES_OK: the statement returns rows (SELECT, RETURNING); cheaper
                    # than building cur.description.
                    rows = (
                        await cur.fetchall()
                        if result is not None and result.status == _TUPLES_OK
                        else []
                    )
                    return rows, cur.rowcount
                finally:
                    # Discards a broken connection (a replacement is opened).
                    await pool.putconn(conn)
            except _DRIVER_ERRORS as exc:
                if attempt == 2 or not idempotent or not _connection_lost(exc):
                    raise _storage_error(operation, exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _unavailable(self, operation: str) -> StorageError:
        state = "closed" if self._closed else "not initialized; call initialize() first"
        return StorageError(operation, f"the PostgreSQL adapter is {state}")

    async def _fetch_one(
        self,
        operation: str,
        query: LiteralString,
        params: Mapping[str, Any],
        *,
        idempotent: bool = False,
    ) -> DictRow | None:
        rows, _ = await self._once_more(operation, query, params, idempotent=idempotent)
        return rows[0] if rows else None

    async def _fetch_all(
        self,
        operation: str,
        query: LiteralString,
        params: Mapping[str, Any],
        *,
        idempotent: bool = False,
    ) -> list[DictRow]:
        rows, _ = await self._once_more(operation, query, params, idempotent=idempotent)
        return rows

    async def _write(
        self,
        operation: str,
        query: LiteralString,
        params: Mapping[str, Any],
        *,
        idempotent: bool = False,
    ) -> bool:
        """One statement; ``True`` if it touched a row."""
        _, touched = await self._once_more(operation, query, params, idempotent=idempotent)
        return touched > 0

    def _now(self) -> int | None:
        """The ``%(now)s`` parameter: ``None`` (the server's clock decides) unless a
        test clock was given."""
        return None if self._clock is None else self._clock()

    async def _notify(self, conn: AsyncConnection[DictRow]) -> None:
        await conn.execute(_q("notify_work"), {"channel": self.channel}, prepare=True)

    # -- lifecycle --------------------------------------------------------------------

    async def initialize(self) -> None:
        """Open the pool (once) and apply pending migrations under an advisory lock."""
        await self._open_pool()
        await self._migrate()

    async def _open_pool(self) -> None:
        if self._closed:
            raise StorageError("initialize", "the PostgreSQL adapter is closed")
        if self._pool is not None:
            return
        # A connection killed while idle (server restart, failover, a terminated
        # backend) is noticed and replaced at checkout without a round trip: see pool.py.
        pool = new_pool(
            self._conninfo,
            kwargs={"autocommit": True, "row_factory": dict_row, "context": self._adapters},
            min_size=self._min_size,
            max_size=self._max_size,
            name=f"reflow:{self.schema}",
        )
        try:
            with self._translated("initialize"):
                # One direct connection first: a wrong DSN or a server that is down fails
                # here at once with libpq's message, not after the pool's timeout.
                await (await AsyncConnection.connect(self._conninfo)).close()
                await pool.open(wait=True)
        except StorageError:
            await pool.close()
            raise
        self._pool = pool

    async def _migrate(self, *, up_to: int | None = None) -> None:
        """Apply the migrations not yet recorded, all in one transaction.

        The transaction-level advisory lock makes workers that start together queue up:
        the first creates everything, the others then find every version recorded.
        """
        async with self._connection("initialize", transaction=True) as conn:
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (advisory_key(self.schema),))
            await conn.execute(
                sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema))
            )
            await conn.execute(_q("create_schema_version"))
            cur = await conn.execute(_q("applied_versions"))
            applied = {row["version"] for row in await cur.fetchall()}
            for migration in migrations():
                if migration.version in applied or (
                    up_to is not None and migration.version > up_to
                ):
                    continue
                await conn.execute(migration.sql)
                await conn.execute(
                    _q("record_version"), {"version": migration.version, "name": migration.name}
                )

    async def close(self) -> None:
        """Close listeners and the pool (dropping the schema first if asked). Safe twice."""
        if self._closed:
            return
        self._closed = True
        # Writes already sent finish (and answer their callers) before the pool closes;
        # one stuck on a lock nobody releases is cancelled after close_wait_s.
        await self._step_writes.idle(self.close_wait_s)
        await self._run_endings.idle(self.close_wait_s)
        for conn in list(self._listeners):
            await conn.close()  # ends that listen_for_work loop (it sees _closed)
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            if self._drop_schema_on_close:
                with self._translated("close"):
                    async with pool.connection() as conn:
                        drop = sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE")
                        await conn.execute(drop.format(sql.Identifier(self.schema)))
        finally:
            await pool.close()

    async def listen_for_work(self, on_work: Callable[[], None]) -> None:
        """Call ``on_work`` for each work notification until cancelled (``WorkNotifier``)."""
        if self._closed:
            raise StorageError("listen_for_work", "the PostgreSQL adapter is closed")
        await listen(
            self._conninfo,
            self.channel,
            on_work,
            connections=self._listeners,
            stopped=lambda: self._closed,
            probe_after_s=self.listen_timeout_s,
            backoff_initial_s=self.reconnect_initial_s,
            backoff_max_s=self.reconnect_max_s,
        )

    async def now(self) -> int:
        """The server's current time in epoch milliseconds (or the test clock's)."""
        row = await self._fetch_one("now", _q("now"), {"now": self._now()}, idempotent=True)
        if row is None:  # pragma: no cover - a SELECT of one value returns one row
            raise StorageError("now", "the server returned no time")
        return int(row["now"])

    # -- schema administration (reflow_core.migrations.MigratableStorage) -------------

    async def connect(self) -> None:
        """Open the pool like :meth:`initialize`, but create and migrate nothing: a schema
        that does not exist stays absent. Idempotent; :meth:`initialize` may follow."""
        await self._open_pool()

    async def schema_status(self) -> SchemaStatus:
        """The schema's applied migrations, read from the catalogs only (connects the
        pool if needed); a schema that does not exist answers ``exists=False``."""
        await self._open_pool()
        async with self._connection("schema_status") as conn:
            return await admin.read_status(conn, self.schema)

    def migration_sql(self, from_version: int = 0) -> str:
        """The script :meth:`initialize` would run on this schema at ``from_version`` (one
        transaction, creating the schema if needed); empty when nothing is pending."""
        return admin.migration_sql(self.schema, from_version)

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
        async with self._connection("create_run") as conn:
            # One round trip: BEGIN, INSERT, NOTIFY and COMMIT go out together. An
            # insert that lost to an existing idempotency key notifies too; a spurious
            # wake-up costs a worker one empty claim.
            async with conn.pipeline():
                async with conn.transaction():
                    cur = await conn.execute(_q("insert_run"), params, prepare=True)
                    await self._notify(conn)
                row = await cur.fetchone()
            if row is not None:
                return CreateRunResult(to_run(row), created=True)
            # ON CONFLICT waited for any concurrent inserter to commit, and this new
            # statement's snapshot sees its row.
            cur = await conn.execute(_q("get_run_by_idempotency_key"), params)
            row = await cur.fetchone()
        if row is None:  # pragma: no cover - the conflicting row cannot vanish in between
            raise StorageError("create_run", "idempotency key conflict but no run found")
        return CreateRunResult(to_run(row), created=False)

    async def get_run(self, run_id: str) -> WorkflowRun | None:
        """The run, or ``None``."""
        check_identifier(run_id, "run id")
        row = await self._fetch_one("get_run", _q("get_run"), {"id": run_id}, idempotent=True)
        return None if row is None else to_run(row)

    async def list_runs(self, filter: RunFilter) -> list[WorkflowRun]:
        """Newest first by ``(created_at, id)``, filtered, keyset-paged."""
        if filter.workflow is not None:
            check_identifier(filter.workflow, "workflow name")
        if filter.before_id is not None:
            check_identifier(filter.before_id, "run id")
        status = None if filter.status is None else RunStatus(filter.status).value
        if status is not None and filter.workflow is not None:
            name = "list_runs_by_workflow_and_status"
        elif status is not None:
            name = "list_runs_by_status"
        elif filter.workflow is not None:
            name = "list_runs_by_workflow"
        else:
            name = "list_runs"
        params = {
            "status": status,
            "workflow": filter.workflow,
            # Always a row bound (see queries.sql): "" sorts before every id.
            "before": _MAX_BIGINT if filter.before is None else filter.before,
            "before_id": "" if filter.before is None else (filter.before_id or ""),
            "limit": max(filter.limit, 0),
        }
        rows = await self._fetch_all("list_runs", _q(name), params, idempotent=True)
        return [to_run(row) for row in rows]

    async def claim_next_run(
        self,
        workflow_names: Collection[str],
        *,
        lease_ms: int,
        holder: LeaseHolder | None = None,
    ) -> ClaimedRun | None:
        """Claim the oldest claimable run in one ``UPDATE ... FOR UPDATE SKIP LOCKED``;
        staleness is ``lease_expires_at <= now`` on the server's clock."""
        claimed = await self._claim("claim_next_run", workflow_names, lease_ms, holder, 1)
        return claimed[0] if claimed else None

    async def claim_runs(
        self,
        workflow_names: Collection[str],
        *,
        lease_ms: int,
        holder: LeaseHolder | None = None,
        limit: int,
    ) -> list[ClaimedRun]:
        """Claim up to ``limit`` runs, oldest first, in one statement (``FOR UPDATE SKIP
        LOCKED ... LIMIT n`` per workflow and kind)."""
        check_limit(limit, "claim_runs")
        return await self._claim("claim_runs", workflow_names, lease_ms, holder, limit)

    async def _claim(
        self,
        operation: str,
        workflow_names: Collection[str],
        lease_ms: int,
        holder: LeaseHolder | None,
        limit: int,
    ) -> list[ClaimedRun]:
        check_names(workflow_names)
        check_holder(holder)
        names = list(workflow_names)
        if not names:
            return []
        params = {
            "names": names,
            "limit": limit,
            "lease_ms": lease_ms,
            "holder": dump_holder(holder),
            "now": self._now(),
        }
        # Retried on a lost connection: a claim whose answer was lost leaves that run
        # leased to nobody until its lease ends, retried or not; the retry claims others.
        rows = await self._fetch_all(operation, _q("claim_runs"), params, idempotent=True)
        claimed = [ClaimedRun(to_run(row), row["lease_id"]) for row in rows]
        if len(claimed) > 1:
            # RETURNING has no order; str order is code point order, as COLLATE "C".
            claimed.sort(key=lambda c: (c.run.created_at, c.run.id))
        return claimed

    async def purge_runs(
        self,
        *,
        finished_before: int,
        limit: int,
        statuses: Collection[RunStatus] | None = None,
    ) -> int:
        """Delete up to ``limit`` finished runs last updated before ``finished_before``,
        oldest first, with their steps, events and event keys, in one statement."""
        chosen = check_purge_args(finished_before, limit, statuses)
        if not chosen:
            return 0
        params = {
            "before": finished_before,
            "limit": limit,
            "completed": RunStatus.COMPLETED in chosen,
            "failed": RunStatus.FAILED in chosen,
            "cancelled": RunStatus.CANCELLED in chosen,
        }
        async with self._connection("purge_runs") as conn:
            cur = await conn.execute(_q("purge_runs"), params)
            return max(cur.rowcount, 0)

    async def heartbeat_run(self, run_id: str, lease_id: str) -> bool:
        """Renew a held lease by its stored length, from the server's now."""
        check_identifier(run_id, "run id")
        if not is_identifier(lease_id):
            return False  # never issued, so never held
        params = {"id": run_id, "lease_id": lease_id, "now": self._now()}
        return await self._write("heartbeat_run", _q("heartbeat_run"), params, idempotent=True)

    async def sleep_run(self, run_id: str, lease_id: str, wake_at: int) -> bool:
        """Held run to sleeping; notifies so idle workers recompute their next wake time."""
        check_identifier(run_id, "run id")
        if not is_identifier(lease_id):
            return False  # never issued, so never held
        params = {"id": run_id, "lease_id": lease_id, "wake_at": wake_at, "now": self._now()}
        async with self._connection("sleep_run", transaction=True) as conn:
            cur = await conn.execute(_q("sleep_run"), params)
            if cur.rowcount == 0:
                return False
            await self._notify(conn)
            return True

    async def wait_run(
        self, run_id: str, lease_id: str, event_name: str, wake_at: int | None
    ) -> bool:
        """Held run to waiting, or straight to pending if a matching event is buffered."""
        check_identifier(run_id, "run id")
        check_identifier(event_name, "event name")
        if not is_identifier(lease_id):
            return False  # never issued, so never held
        params = {
            "id": run_id,
            "lease_id": lease_id,
            "event_name": event_name,
            "wake_at": wake_at,
            "now": self._now(),
        }
        async with self._connection("wait_run", transaction=True) as conn:
            cur = await conn.execute(_q("lock_held_run"), params)
            if await cur.fetchone() is None:
                return False
            cur = await conn.execute(_q("wait_run"), params)
            row = await cur.fetchone()
            if row is not None and row["status"] == RunStatus.PENDING.value:
                await self._notify(conn)
            return row is not None

    async def update_run_status(
        self,
        run_id: str,
        status: RunStatus,
        *,
        expected: Collection[RunStatus] | None = None,
    ) -> bool:
        """Set a status without a lease check; ``expected`` makes it conditional, atomically."""
        check_identifier(run_id, "run id")
        params = {
            "id": run_id,
            "status": RunStatus(status).value,
            "expected": None if expected is None else [RunStatus(s).value for s in expected],
            "now": self._now(),
        }
        async with self._connection("update_run_status", transaction=True) as conn:
            cur = await conn.execute(_q("update_run_status"), params)
            if cur.rowcount == 0:
                return False
            if status in (RunStatus.PENDING, RunStatus.RUNNING):  # claimable at once
                await self._notify(conn)
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
        if status != RunStatus.PENDING:  # nothing to announce: coalesced with others
            return await self._run_endings.submit(params)
        async with self._connection("update_claimed_run_status", transaction=True) as conn:
            cur = await conn.execute(_q("update_claimed_run_status"), params)
            if cur.rowcount == 0:
                return False
            await self._notify(conn)
            return True

    async def _end_runs(self, batch: Sequence[Mapping[str, Any]]) -> list[bool | BaseException]:
        """update_claimed_run_status for a batch of concurrent callers (not 'pending')."""
        if len(batch) == 1:
            return await self._one_by_one(batch, self._end_run)
        params: dict[str, Any] = {
            **_columns(batch, "id", "lease_id", "status", "output", "error"),
            "now": self._now(),
        }
        try:
            rows, _ = await self._once_more(
                "update_claimed_run_status",
                _q("update_claimed_run_statuses"),
                params,
                idempotent=False,
            )
        except StorageError as exc:
            return await self._after_batch_error(exc, batch, self._end_run)
        written = {row["id"] for row in rows}
        return [params["id"] in written for params in batch]

    async def _end_run(self, params: Mapping[str, Any]) -> bool:
        """One run's update_claimed_run_status alone; ``True`` if it was written."""
        operation = "update_claimed_run_status"
        return await self._write(operation, _q(operation), params)

    async def requeue_run(self, run_id: str) -> bool:
        """A failed or cancelled run back to pending, dropping only its failed steps."""
        check_identifier(run_id, "run id")
        params = {"id": run_id, "now": self._now()}
        async with self._connection("requeue_run", transaction=True) as conn:
            cur = await conn.execute(_q("requeue_run"), params)
            if cur.rowcount == 0:
                return False
            await conn.execute(_q("delete_failed_steps"), params)
            await self._notify(conn)
            return True

    # -- steps ------------------------------------------------------------------------

    async def save_step_result(self, result: StepResult, lease_id: str | None = None) -> bool:
        """Upsert a step row by id; lease-checked in the same statement when given. A
        stored final row is never overwritten (the statement's guard): ``False``."""
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
        # Coalesced with the checkpoints other runs save at the same moment: one prepared
        # autocommit statement for all. Not retried on a lost connection: the engine
        # retries step writes, asking whether the first landed.
        if await self._step_writes.submit(params):
            return True
        # Nothing written: lease not held, a final row kept, or the id is another step's.
        owner = await self._fetch_one(
            "save_step_result", _q("get_step_owner"), params, idempotent=True
        )
        if owner is not None and (owner["run_id"], owner["name"]) != (result.run_id, result.name):
            raise StorageError(
                "save_step_result",
                f"step id {result.id!r} already belongs to run {owner['run_id']!r}, "
                f"step {owner['name']!r}; it cannot be reused for run {result.run_id!r}, "
                f"step {result.name!r}",
            )
        return False

    async def _save_steps(self, batch: Sequence[Mapping[str, Any]]) -> list[bool | BaseException]:
        """save_step_result's write for a batch of concurrent callers."""
        if len(batch) == 1:
            return await self._one_by_one(batch, self._save_step)
        params = _columns(batch, *batch[0])
        try:
            rows, _ = await self._once_more(
                "save_step_result", _q("save_step_results"), params, idempotent=False
            )
        except StorageError as exc:
            return await self._after_batch_error(exc, batch, self._save_step)
        written = {row["id"] for row in rows}
        return [params["id"] in written for params in batch]

    async def _save_step(self, params: Mapping[str, Any]) -> bool:
        """One step's write alone; ``True`` if it was written."""
        for attempt in range(_RACE_RETRIES + 1):
            try:
                return await self._write("save_step_result", _q("save_step_result"), params)
            except StorageError as exc:
                # ON CONFLICT (id) arbitrates only the primary key: a writer racing an
                # insert of the same new row can hit the (run_id, name) index instead.
                # Once the other insert has committed, the same statement takes the
                # conflict path; a real clash fails every time.
                cause = exc.__cause__
                if (
                    not isinstance(cause, psycopg.errors.UniqueViolation)
                    or cause.diag.constraint_name != "steps_run_id_name_key"
                    or attempt == _RACE_RETRIES
                ):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    async def _one_by_one(
        batch: Sequence[Mapping[str, Any]],
        write: Callable[[Mapping[str, Any]], Awaitable[bool]],
    ) -> list[bool | BaseException]:
        """Each write of ``batch`` alone, each with its own answer or error."""
        outcomes: list[bool | BaseException] = []
        for params in batch:
            try:
                outcomes.append(await write(params))
            except StorageError as exc:
                outcomes.append(exc)
        return outcomes

    async def _after_batch_error(
        self,
        exc: StorageError,
        batch: Sequence[Mapping[str, Any]],
        write: Callable[[Mapping[str, Any]], Awaitable[bool]],
    ) -> list[bool | BaseException]:
        """The outcomes of a batch whose statement failed.

        A lost connection may have committed the batch: every caller is told so, and the
        engine asks whether its write landed (as for a single write). Any other failure
        rolled the whole statement back, so each write is sent again alone, for its own
        answer: one row's error (an insert race, a deadlock, a bad value) is not its
        neighbours'.
        """
        cause = exc.__cause__
        if cause is None:  # the adapter closed under the batch
            return [self._unavailable(exc.operation) for _ in batch]
        if _connection_lost(cause) or isinstance(cause, POOL_ERRORS):
            # One error each: an exception object is not shared between tasks.
            fresh: list[bool | BaseException] = []
            for _ in batch:
                error = _storage_error(exc.operation, cause)
                error.__cause__ = cause
                fresh.append(error)
            return fresh
        return await self._one_by_one(batch, write)

    async def get_step_results(self, run_id: str) -> list[StepResult]:
        """The run's steps by ``(created_at, id)``."""
        check_identifier(run_id, "run id")
        rows = await self._fetch_all(
            "get_step_results", _q("get_step_results"), {"run_id": run_id}, idempotent=True
        )
        return [to_step(row) for row in rows]

    # -- events -----------------------------------------------------------------------

    async def deliver_event(
        self, run_id: str, event_name: str, payload: Any, *, key: str | None = None
    ) -> bool:
        """Buffer an event for a run that has not ended and wake the run if it waits for
        that name, in one transaction; a repeated ``key`` stores nothing.

        A key already delivered answers ``True`` even if the run has ended since (that
        delivery did land); a refused delivery does not take its key.
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
        async with self._connection("deliver_event", transaction=True) as conn:
            cur = await conn.execute(_q("lock_run"), params)
            run = await cur.fetchone()
            if run is None:
                return False
            if run["ended"]:  # and stays so: the row is locked until commit
                if key is None:
                    return False
                cur = await conn.execute(_q("event_key_seen"), params)
                return await cur.fetchone() is not None
            cur = await conn.execute(_q("insert_event"), params)
            if cur.rowcount == 0:
                return True  # this key was delivered before: stored once, woken then
            cur = await conn.execute(_q("wake_waiting_run"), params)
            if cur.rowcount > 0:
                await self._notify(conn)
            return True

    async def take_event(self, run_id: str, event_name: str) -> EventRecord | None:
        """Remove and return the oldest buffered event of that name (one DELETE)."""
        check_identifier(run_id, "run id")
        check_identifier(event_name, "event name")
        params = {"id": run_id, "event_name": event_name}
        row = await self._fetch_one("take_event", _q("take_event"), params)
        return None if row is None else EventRecord(load_value(row["payload"]), row["delivered_at"])

    async def consume_event(
        self, event_name: str, checkpoint: StepResult, lease_id: str
    ) -> ConsumeResult:
        """Take the oldest event and checkpoint its payload, in one transaction.

        The run row is locked first (as ``wait_run`` and ``deliver_event`` do), so the
        lease cannot be reclaimed between the check and the writes, and a concurrent
        consumer of the same run waits, then sees the event gone. A final row already
        standing for ``checkpoint`` makes the statement take and write nothing
        (``held=False``): checkpoints are written once.
        """
        check_identifier(event_name, "event name")
        check_step(checkpoint)
        if not is_identifier(lease_id):
            return ConsumeResult(held=False)  # never issued, so never held
        params = {
            "id": checkpoint.run_id,
            "lease_id": lease_id,
            "event_name": event_name,
            "step_id": checkpoint.id,
            "name": checkpoint.name,
            "status": StepStatus(checkpoint.status).value,
            "error": dump_error(checkpoint.error),
            "attempts": checkpoint.attempts,
            "created_at": checkpoint.created_at,
            "updated_at": checkpoint.updated_at,
            "wake_at": checkpoint.wake_at,
        }
        try:
            async with self._connection("consume_event", transaction=True) as conn:
                cur = await conn.execute(_q("lock_held_run"), params)
                if await cur.fetchone() is None:
                    return ConsumeResult(held=False)
                cur = await conn.execute(_q("consume_event"), params)
                row = await cur.fetchone()
                if row is None or row["done"]:  # the statement always returns one row
                    return ConsumeResult(held=False)
                if not row["found"]:
                    return ConsumeResult(held=True)
                if row["saved"] == 0:
                    cur = await conn.execute(_q("get_step_owner"), {"id": checkpoint.id})
                    owner = await cur.fetchone()
                    if owner is not None and (owner["run_id"], owner["name"]) == (
                        checkpoint.run_id,
                        checkpoint.name,
                    ):
                        # A lease-less save_step_result made the row final after this
                        # statement's snapshot: the first writer wins; undo the DELETE.
                        raise _KeptFinalRow
                    where = f"run {owner['run_id']!r}, step {owner['name']!r}" if owner else "?"
                    # Raised inside the transaction: it rolls back, so the event stays.
                    raise StorageError(
                        "consume_event",
                        f"step id {checkpoint.id!r} already belongs to {where}; it cannot be "
                        f"reused for run {checkpoint.run_id!r}, step {checkpoint.name!r}",
                    )
        except _KeptFinalRow:  # the transaction rolled back: nothing consumed
            return ConsumeResult(held=False)
        event = EventRecord(load_value(row["payload"]), row["delivered_at"])
        return ConsumeResult(held=True, event=event)

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
        row = await self._fetch_one("upsert_schedule", _q("upsert_schedule"), params)
        if row is None:  # pragma: no cover - an upsert always returns its row
            raise StorageError("upsert_schedule", "upsert returned no row")
        return to_schedule(row)

    async def claim_due_schedule(self, workflow_names: Collection[str]) -> ClaimedSchedule | None:
        """Lock the earliest due schedule (by the server's now) and advance it from that
        same now, in one transaction."""
        check_names(workflow_names)
        names = list(workflow_names)
        if not names:
            return None
        async with self._connection("claim_due_schedule", transaction=True) as conn:
            cur = await conn.execute(_q("lock_due_schedule"), {"names": names, "now": self._now()})
            row = await cur.fetchone()
            if row is None:
                return None
            due, now = to_schedule(row), int(row["now"])
            params = {
                "key": due.key,
                "slot": due.next_run_at,
                "next_run_at": next_fire_time(due.recurrence, due.next_run_at, now),
                "now": now,
            }
            cur = await conn.execute(_q("advance_schedule"), params)
            advanced = await cur.fetchone()
        if advanced is None:  # pragma: no cover - the row is locked, so the guard holds
            return None
        return ClaimedSchedule(to_schedule(advanced), due.next_run_at)

    async def delete_schedule(self, key: str) -> bool:
        """Remove a schedule; ``False`` if none."""
        check_identifier(key, "schedule key", MAX_SCHEDULE_KEY_LENGTH)
        return await self._write("delete_schedule", _q("delete_schedule"), {"key": key})

    async def list_schedules(self) -> list[Schedule]:
        """All schedules by key."""
        rows = await self._fetch_all("list_schedules", _q("list_schedules"), {}, idempotent=True)
        return [to_schedule(row) for row in rows]
