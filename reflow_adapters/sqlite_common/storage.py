"""The storage contract for SQLite, shared by the sqlite3 and APSW adapters.

:class:`SQLiteStorageBase` implements :class:`reflow_core.StorageAdapter` against the
:class:`~reflow_adapters.sqlite_common.driver.Driver` shim; an adapter subclasses it
and names its driver and URL scheme. Each method encodes its values on the caller's
side (so a ``SerializationError`` writes nothing), then hands one job to a worker
thread and awaits its answer:

* writes and point reads (``get_run``, ``get_step_results``) go to the writer thread,
  which commits them in groups (see ``worker.py``). A point read rides in the next
  batch: on a two-core machine that measured 10-35% more runs/s than a separate reader
  thread, whose GIL hand-offs cost more than the read itself;
* listings (``list_runs``, ``list_schedules``), which may read many rows, go to a reader
  thread with its own connection, so they never hold the write lock (WAL lets it read
  while the writer commits). A ``:memory:`` database has no reader: a second
  connection would see a different, empty database.

A job's future belongs to the event loop that called the method.

Both threads share one :class:`~reflow_adapters.sqlite_common.worker.Health`: once a
thread finds the store unusable (its database file deleted or replaced under it, or a
thread dead), every call fails at once with a ``StorageError`` saying why, and
``close()`` still returns promptly. See ``worker.py`` and ``files.py``.

The store's clock (contract 2.0) is the adapter's ``clock``: every process sharing a
file is on one host, so one wall clock judges leases, wake-ups and due schedules. Each
method reads it once, on the caller's side, and binds it as ``:now``; a job queued
behind a batch therefore runs with a "now" a little in the past, which only ever makes
it see a lease or a wake-up as due later, never sooner.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import weakref
from collections.abc import Callable, Collection
from typing import Any, ClassVar, TypeVar, cast

import msgspec

from reflow_adapters.sqlite_common import admin, migrate, ops
from reflow_adapters.sqlite_common.driver import Connection, Driver
from reflow_adapters.sqlite_common.files import DatabaseFiles
from reflow_adapters.sqlite_common.notify import DEFAULT_WATCH_MS, watch_data_version
from reflow_adapters.sqlite_common.rows import (
    error_text,
    holder_text,
    run_params,
    schedule_params,
    step_params,
    value_text,
)
from reflow_adapters.sqlite_common.worker import Health, Job, Worker, retry_busy
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

__all__ = ["SQLiteStorageBase"]

T = TypeVar("T")
MEMORY = ":memory:"
_STOP_POLL_S = 0.1
"""How often ``close()`` looks whether a thread it waits for is still alive."""


def _names(names: Collection[str]) -> str:
    """A list of names as the JSON array the queries expand with json_each."""
    return msgspec.json.encode(list(names)).decode()


async def _stopped(worker: Worker, done: concurrent.futures.Future[None]) -> None:
    """Wait until ``worker`` acknowledges a stop, or its thread is gone without doing so."""
    waiter = asyncio.wrap_future(done)
    while not waiter.done() and worker.is_alive():
        await asyncio.wait([waiter], timeout=_STOP_POLL_S)


def _stop_workers(*workers: Worker | None) -> None:
    """Finalizer for an adapter dropped without close(): let its threads end."""
    for worker in workers:
        if worker is not None and worker.is_alive():
            worker.stop()


class SQLiteStorageBase:
    """A SQLite-backed storage adapter; subclasses set ``driver`` and ``scheme``.

    The constructor does no I/O; :meth:`initialize` opens connections, sets pragmas and
    migrates. ``synchronous="FULL"`` (the default) makes every acknowledged write
    survive power loss; ``"NORMAL"`` survives a process crash only, but is faster.
    """

    driver: ClassVar[Driver]
    scheme: ClassVar[str]

    url: str | None
    """``<scheme>:///<path>`` for a file; ``None`` for ``:memory:`` (nothing to share)."""

    _unmigrated: bool = False
    """Set by :meth:`connect`: the writer opened the file without migrating it, so a
    later :meth:`initialize` still has to."""

    def __init__(
        self,
        path: str | os.PathLike[str] = MEMORY,
        *,
        clock: Clock | None = None,
        busy_timeout_ms: int = 5000,
        synchronous: str = "FULL",
        watch_ms: int = DEFAULT_WATCH_MS,
    ) -> None:
        self._path = os.fspath(path)
        if not self._path:
            raise ConfigError("a SQLite path is needed (':memory:' for an in-memory database)")
        if not isinstance(busy_timeout_ms, int) or busy_timeout_ms < 0:
            raise ConfigError(f"busy_timeout_ms must be an int >= 0, got {busy_timeout_ms!r}")
        if isinstance(watch_ms, bool) or not isinstance(watch_ms, int) or watch_ms < 1:
            raise ConfigError(f"watch_ms must be an int >= 1, got {watch_ms!r}")
        self._watch_ms = watch_ms
        self._synchronous = migrate.check_synchronous(synchronous)
        self._busy_timeout_ms = busy_timeout_ms
        self._clock: Clock = clock or system_clock
        self._in_memory = self._path == MEMORY
        self.url = None if self._in_memory else f"{self.scheme}:///{self._path}"
        self._writer: Worker | None = None
        self._reader: Worker | None = None
        self._health = Health(None if self._in_memory else DatabaseFiles(self._path))
        self._closed = False
        self._finalizer: weakref.finalize[Any, Any] | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._path!r})"

    # -- lifecycle --------------------------------------------------------------

    async def initialize(self) -> None:
        """Open connections, set pragmas, migrate. Idempotent; safe from many processes."""
        if self._closed:
            raise StorageError("initialize", "the storage is closed")
        if self._health.failed:
            raise self._health.error("initialize")
        if self._writer is not None:
            await asyncio.wrap_future(self._writer.ready)
            if self._unmigrated:
                await asyncio.to_thread(
                    admin.migrate_file, self.driver, self._path,
                    busy_timeout_ms=self._busy_timeout_ms, now=self._clock(),
                )  # fmt: skip
                self._unmigrated = False
            return
        migrate.check_version(self.driver)
        self._writer = self._start(self._setup_writer, transactional=True, role="writer")
        try:
            await asyncio.wrap_future(self._writer.ready)
            if not self._in_memory:
                self._reader = self._start(self._setup_reader, transactional=False, role="reader")
                await asyncio.wrap_future(self._reader.ready)
        except BaseException:
            await self._shutdown()
            raise
        self._finalizer = weakref.finalize(self, _stop_workers, self._writer, self._reader)

    def _start(
        self, setup: Callable[[Connection], None], *, transactional: bool, role: str
    ) -> Worker:
        worker = Worker(
            self.driver,
            self._path,
            setup,
            transactional=transactional,
            name=f"reflow-{self.scheme}-{role}",
            health=self._health,
        )
        worker.start()
        return worker

    def _setup_writer(self, conn: Connection) -> None:
        migrate.configure(
            conn,
            busy_timeout_ms=self._busy_timeout_ms,
            synchronous=self._synchronous,
            wal=not self._in_memory,
            retry=functools.partial(retry_busy, self.driver),
        )
        if self._unmigrated:
            return
        now = self._clock()
        retry_busy(self.driver, lambda: migrate.migrate(conn, now))

    def _setup_reader(self, conn: Connection) -> None:
        migrate.configure(
            conn,
            busy_timeout_ms=self._busy_timeout_ms,
            synchronous=self._synchronous,
            wal=False,
            query_only=True,
        )

    async def close(self) -> None:
        """Finish queued work, stop the threads and close the connections. Safe twice."""
        if self._closed:
            return
        self._closed = True
        if self._finalizer is not None:
            self._finalizer.detach()
        await self._shutdown()

    async def _shutdown(self) -> None:
        for worker in (self._reader, self._writer):
            if worker is None:
                continue
            # A worker whose set-up failed has exited (or is exiting) without serving its
            # queue, so it must not be sent a stop it would never answer.
            ready = asyncio.wrap_future(worker.ready)
            await asyncio.wait([ready])
            if ready.exception() is None and worker.is_alive():
                # A thread that died has answered its queue and any stop (worker.py);
                # should one ever end without doing so, is_alive() ends the wait.
                await _stopped(worker, worker.stop())
            worker.join()
        self._reader = self._writer = None

    def group_commit_stats(self) -> dict[str, int]:
        """How the writer batched its jobs (writes and point reads): ``batches``, ``writes``
        (jobs run), ``largest_batch``."""
        stats = self._writer.stats if self._writer is not None else None
        if stats is None:
            return {"batches": 0, "writes": 0, "largest_batch": 0}
        return {
            "batches": stats.batches,
            "writes": stats.jobs,
            "largest_batch": stats.largest_batch,
        }

    # -- schema administration (reflow_core.migrations.MigratableStorage) --------

    async def connect(self) -> None:
        """Open connections and set pragmas like :meth:`initialize`, but migrate nothing.

        Idempotent. A file that does not exist is not created: :class:`StorageError`. A
        private ``:memory:`` database, which nobody else can see, is created at the latest
        version as :meth:`initialize` does. :meth:`initialize` may still follow, to migrate.
        """
        if self._writer is not None and not self._closed:
            await asyncio.wrap_future(self._writer.ready)
            return
        if not self._in_memory and not self._closed:
            await asyncio.to_thread(admin.require_file, self._path, self.url)
            self._unmigrated = True
        try:
            await self.initialize()
        except BaseException:
            self._unmigrated = False
            raise

    async def schema_status(self) -> SchemaStatus:
        """The file's applied migrations, read through a read-only connection of its own:
        a missing file is not created (``exists=False``) and nothing is locked."""
        if self._in_memory:
            return admin.memory_status()
        return await asyncio.to_thread(admin.read_status, self._path)

    def migration_sql(self, from_version: int = 0) -> str:
        """The script :meth:`initialize` would run on a file at ``from_version`` (one
        ``BEGIN IMMEDIATE`` transaction); empty when nothing is pending."""
        return admin.migration_sql(from_version)

    # -- plumbing ---------------------------------------------------------------

    def _worker(self, operation: str, *, scan: bool) -> Worker:
        if self._closed:
            raise StorageError(operation, "the storage is closed")
        if self._writer is None:
            raise StorageError(operation, "the storage is not initialized; call initialize()")
        if self._health.failed:
            raise self._health.error(operation)
        if not scan or self._reader is None:
            return self._writer
        return self._reader

    async def _call(
        self, operation: str, fn: Callable[[Connection], T], *, scan: bool = False
    ) -> T:
        """Run ``fn`` on the writer, or on the reader when ``scan`` (a listing) is set."""
        worker = self._worker(operation, scan=scan)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        worker.submit(Job(operation, fn, loop, future))
        return cast(T, await future)

    async def _changed(
        self, operation: str, query: str, *, signal: bool = False, **params: Any
    ) -> bool:
        """A single-row write through the named query; True if a row changed. With
        ``signal``, a change also wakes other processes' watches (``notify.py``)."""
        return await self._call(
            operation,
            functools.partial(ops.changed, query=query, params=params, signal=signal),
        )

    async def listen_for_work(self, on_work: Callable[[], None]) -> None:
        """Call ``on_work`` soon after another connection (another process, or another
        handle on the file) commits, until cancelled: a watch on ``PRAGMA data_version``,
        read when the WAL is written to (inotify, on Linux) or else every ``watch_ms``
        (see ``notify.py``). An in-memory database has no other connection, so nothing
        is ever notified."""
        if self._closed:
            raise StorageError("listen_for_work", "the storage is closed")
        if self._in_memory:
            await asyncio.get_running_loop().create_future()
            return
        await watch_data_version(self.driver, self._path, on_work, period_ms=self._watch_ms)

    # -- clock ------------------------------------------------------------------

    async def now(self) -> int:
        """The store's current time in epoch milliseconds: the adapter's clock."""
        return self._clock()

    # -- runs -------------------------------------------------------------------

    async def create_run(self, run: WorkflowRun) -> CreateRunResult:
        """Persist a new run, or return the run already holding its idempotency key."""
        check_run(run)
        params = run_params(run)
        return await self._call(
            "create_run", functools.partial(ops.create_run, run=run, params=params)
        )

    async def get_run(self, run_id: str) -> WorkflowRun | None:
        """The run, or ``None``."""
        check_identifier(run_id, "run id")
        return await self._call("get_run", functools.partial(ops.get_run, run_id=run_id))

    async def list_runs(self, filter: RunFilter) -> list[WorkflowRun]:
        """Runs newest first by ``(created_at, id)`` with exact keyset paging."""
        if filter.workflow is not None:
            check_identifier(filter.workflow, "workflow name")
        if filter.before_id is not None:
            check_identifier(filter.before_id, "run id")
        if filter.limit <= 0:
            return []
        return await self._call(
            "list_runs", functools.partial(ops.list_runs, filter=filter), scan=True
        )

    async def claim_next_run(
        self,
        workflow_names: Collection[str],
        *,
        lease_ms: int,
        holder: LeaseHolder | None = None,
    ) -> ClaimedRun | None:
        """Claim the oldest claimable run of the named workflows (one BEGIN IMMEDIATE).

        A running run is claimable once its stored ``lease_expires_at`` has passed by
        this adapter's clock; the claim stores ``lease_ms`` and ``holder`` with it.
        """
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
        """Claim up to ``limit`` runs, oldest first, each as ``claim_next_run`` would, in
        one writer job (one transaction)."""
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
        if isinstance(lease_ms, bool) or not isinstance(lease_ms, int) or lease_ms < 0:
            raise ValueError(f"lease_ms must be an int >= 0, got {lease_ms!r}")
        # Distinct names: each one is an index lookup, and a repeat would only find the
        # same candidates again.
        names = list(dict.fromkeys(workflow_names))
        if not names:
            return []
        params = {
            "now": self._clock(),
            "lease_ms": lease_ms,
            "holder": holder_text(holder),
        }
        return await self._call(
            operation,
            functools.partial(ops.claim_runs, workflow_names=names, limit=limit, params=params),
        )

    async def heartbeat_run(self, run_id: str, lease_id: str) -> bool:
        """Renew a held lease by its stored length; ``False`` once it is lost."""
        check_identifier(run_id, "run id")
        if not is_identifier(lease_id):
            return False  # never issued, so never held
        return await self._changed(
            "heartbeat_run", "heartbeat_run", run_id=run_id, lease_id=lease_id, now=self._clock()
        )

    async def sleep_run(self, run_id: str, lease_id: str, wake_at: int) -> bool:
        """Held run to ``sleeping`` until ``wake_at``, lease released."""
        check_identifier(run_id, "run id")
        if not is_identifier(lease_id):
            return False  # never issued, so never held
        return await self._changed(
            "sleep_run",
            "sleep_run",
            signal=True,  # idle workers elsewhere look again, as on PostgreSQL
            run_id=run_id,
            lease_id=lease_id,
            wake_at=wake_at,
            now=self._clock(),
        )

    async def wait_run(
        self, run_id: str, lease_id: str, event_name: str, wake_at: int | None
    ) -> bool:
        """Held run to ``waiting`` (or ``pending`` if the event is already buffered)."""
        check_identifier(run_id, "run id")
        check_identifier(event_name, "event name")
        if not is_identifier(lease_id):
            return False  # never issued, so never held
        return await self._changed(
            "wait_run",
            "wait_run",
            signal=True,  # it may have gone straight to pending
            run_id=run_id,
            lease_id=lease_id,
            event_name=event_name,
            wake_at=wake_at,
            now=self._clock(),
        )

    async def update_run_status(
        self, run_id: str, status: RunStatus, *, expected: Collection[RunStatus] | None = None
    ) -> bool:
        """Set a status without a lease check; with ``expected``, atomically conditional."""
        check_identifier(run_id, "run id")
        status = RunStatus(status)
        return await self._changed(
            "update_run_status",
            "update_run_status",
            signal=status in (RunStatus.PENDING, RunStatus.RUNNING),  # claimable at once
            run_id=run_id,
            status=status.value,
            expected=None if expected is None else _names([RunStatus(s).value for s in expected]),
            now=self._clock(),
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
        """Set a held run's status with its output and error; lease kept only if running."""
        check_identifier(run_id, "run id")
        if not is_identifier(lease_id):
            return False  # never issued, so never held
        status = RunStatus(status)
        return await self._changed(
            "update_claimed_run_status",
            "update_claimed_run_status",
            signal=status is RunStatus.PENDING,  # released for any worker
            run_id=run_id,
            lease_id=lease_id,
            status=status.value,
            output=None if output is None else value_text(output),
            error=error_text(error),
            now=self._clock(),
        )

    async def requeue_run(self, run_id: str) -> bool:
        """A failed or cancelled run back to pending, dropping only its failed steps;
        ``recoveries`` back to 0."""
        check_identifier(run_id, "run id")
        return await self._call(
            "requeue_run", functools.partial(ops.requeue_run, run_id=run_id, now=self._clock())
        )

    async def purge_runs(
        self,
        *,
        finished_before: int,
        limit: int,
        statuses: Collection[RunStatus] | None = None,
    ) -> int:
        """Delete up to ``limit`` finished runs last updated before ``finished_before``,
        oldest first, with their steps, events and event keys (one statement)."""
        chosen = check_purge_args(finished_before, limit, statuses)
        if not chosen:
            return 0
        params = {
            "before": finished_before,
            "limit": limit,
            "completed": int(RunStatus.COMPLETED in chosen),
            "failed": int(RunStatus.FAILED in chosen),
            "cancelled": int(RunStatus.CANCELLED in chosen),
        }
        return await self._call("purge_runs", functools.partial(ops.purge_runs, params=params))

    # -- steps ------------------------------------------------------------------

    async def save_step_result(self, result: StepResult, lease_id: str | None = None) -> bool:
        """Upsert a step row by id; with a lease, only while the lease is held. A final
        row (completed, completed-early, skipped) is never changed: ``False``."""
        check_step(result)
        if lease_id is not None and not is_identifier(lease_id):
            return False  # never issued, so never held
        params = step_params(result, lease_id)
        return await self._call(
            "save_step_result", functools.partial(ops.save_step_result, params=params)
        )

    async def get_step_results(self, run_id: str) -> list[StepResult]:
        """The run's steps ordered by ``(created_at, id)``."""
        check_identifier(run_id, "run id")
        return await self._call(
            "get_step_results", functools.partial(ops.get_step_results, run_id=run_id)
        )

    # -- events -----------------------------------------------------------------

    async def deliver_event(
        self, run_id: str, event_name: str, payload: Any, *, key: str | None = None
    ) -> bool:
        """Buffer an event for a run that has not ended; wake it if it waits for that name.

        ``False`` (nothing stored) for a missing, completed, failed or cancelled run. A
        ``key`` already delivered to the run stores nothing and answers ``True``.
        """
        check_identifier(run_id, "run id")
        check_identifier(event_name, "event name")
        if key is not None:
            check_identifier(key, "event key")
        params = {
            "run_id": run_id,
            "event_name": event_name,
            "payload": value_text(payload),
            "key": key,
            "now": self._clock(),
        }
        return await self._call(
            "deliver_event", functools.partial(ops.deliver_event, params=params)
        )

    async def take_event(self, run_id: str, event_name: str) -> EventRecord | None:
        """Remove and return the oldest buffered event of that name."""
        check_identifier(run_id, "run id")
        check_identifier(event_name, "event name")
        return await self._call(
            "take_event", functools.partial(ops.take_event, run_id=run_id, event_name=event_name)
        )

    async def consume_event(
        self, event_name: str, checkpoint: StepResult, lease_id: str
    ) -> ConsumeResult:
        """Take the oldest event and checkpoint its payload in one writer job (one commit);
        ``held=False`` if the lease is not held or the checkpoint's row is already final."""
        check_identifier(event_name, "event name")
        check_step(checkpoint)
        if not is_identifier(lease_id):
            return ConsumeResult(held=False)  # never issued, so never held
        # The checkpoint's own output is replaced by the payload, so it is never encoded.
        row = msgspec.structs.replace(checkpoint, output=None)
        params = {**step_params(row, lease_id), "event_name": event_name}
        return await self._call(
            "consume_event", functools.partial(ops.consume_event, params=params)
        )

    # -- schedules --------------------------------------------------------------

    async def upsert_schedule(self, schedule: Schedule) -> Schedule:
        """Insert or update a schedule; keeps created_at, and next_run_at if unchanged."""
        check_schedule(schedule)
        params = schedule_params(schedule)
        return await self._call(
            "upsert_schedule", functools.partial(ops.upsert_schedule, params=params)
        )

    async def claim_due_schedule(self, workflow_names: Collection[str]) -> ClaimedSchedule | None:
        """Claim the earliest schedule due by the adapter's clock and advance it in the same
        transaction."""
        check_names(workflow_names)
        if not workflow_names:
            return None
        return await self._call(
            "claim_due_schedule",
            functools.partial(
                ops.claim_due_schedule, workflow_names=_names(workflow_names), now=self._clock()
            ),
        )

    async def delete_schedule(self, key: str) -> bool:
        """Remove a schedule; ``False`` if there was none."""
        check_identifier(key, "schedule key", MAX_SCHEDULE_KEY_LENGTH)
        return await self._changed("delete_schedule", "delete_schedule", key=key)

    async def list_schedules(self) -> list[Schedule]:
        """All schedules by key."""
        return await self._call("list_schedules", ops.list_schedules, scan=True)
