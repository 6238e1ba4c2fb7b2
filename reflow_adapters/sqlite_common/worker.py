"""Connection threads: a writer with group commit, and a plain reader.

SQLite calls block, so they never run on the event loop. Each :class:`Worker` is a
thread that owns one connection for its whole life and takes :class:`Job` objects from
a queue. The writer drains everything queued and runs it as one ``BEGIN IMMEDIATE ...
COMMIT``: under load, many callers share one fsync (group commit), which is what makes
``synchronous=FULL`` affordable. Each job runs inside its own SAVEPOINT, so a job that
fails is rolled back alone and reported only to its caller. No caller is answered
before the COMMIT returns, so every acknowledged write is durable.

Results go back to the event loop that submitted the job, one ``call_soon_threadsafe``
per batch (not per job), because each call writes to the loop's self-pipe.

Driver exceptions are translated to ``StorageError`` here, in :func:`translate`, and
nowhere else.

Beyond one call's error, three things can make the store unusable or full, and each
thread handles them so that no caller is ever left waiting:

* **A thread dies.** Whatever escapes a job's own error handling (a ``BaseException``
  such as ``SystemExit`` raised in a job, a bug here) ends the thread, but not silently:
  the batch in hand is rolled back, every caller it held and every job queued or
  submitted later gets ``StorageError`` (the exception as ``__cause__``), a stop is
  answered so that ``close()`` returns, and the adapter's :class:`Health` turns failed,
  so later calls fail at once.
* **The database file is deleted or replaced** while open (see ``files.py``). Before
  each commit, each batch of reads and when idle, a thread compares the path with the
  files it opened (throttled to one check per 10 ms); on a change the batch is rolled
  back and every call from then on fails, instead of committing to an orphan.
* **The disk is full.** The failing batch is rolled back and its callers get
  ``StorageError``. The writer then runs ``wal_checkpoint(TRUNCATE)``, which copies the
  WAL into the database and gives its space back, and retries it before later batches
  and when idle until it gets through: once space is freed the store recovers without
  a restart. Before that, the WAL is kept from filling a small volume: the writer sizes
  its ``wal_autocheckpoint`` and ``journal_size_limit`` to the volume's free space
  (``migrate.wal_limits``, looked at once a second at most), and runs a PASSIVE
  checkpoint once it has been idle for a second after writing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import queue
import random
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec

from reflow_adapters.sqlite_common import migrate
from reflow_adapters.sqlite_common.driver import Connection, Driver
from reflow_adapters.sqlite_common.files import DatabaseFiles
from reflow_core.errors import ReflowError, StorageError

__all__ = ["Health", "Job", "Worker", "WorkerStats", "retry_busy", "translate"]

T = TypeVar("T")

_BUSY_RETRIES = 5
"""Attempts at BEGIN IMMEDIATE when busy_timeout ran out (another process held the lock)."""
_BUSY_BACKOFF_S = 0.05
_IDLE_S = 1.0
"""How long a thread waits for work before its idle chores (a file check; on the writer
a checkpoint of what it wrote since the last one)."""
_TRUNCATE_RETRY_S = 0.1
"""Least time between two tries at ``wal_checkpoint(TRUNCATE)`` while the disk is full."""
_SIZE_WAL_EVERY_S = 1.0
"""Least time between two looks at the free space the writer sizes the WAL by."""

Outcome = tuple[bool, Any]
"""``(True, value)`` or ``(False, exception)``."""


class Job:
    """One storage call: ``fn`` runs on the worker's connection, its answer goes to ``future``."""

    __slots__ = ("fn", "future", "loop", "operation")

    def __init__(
        self,
        operation: str,
        fn: Callable[[Connection], Any],
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[Any],
    ) -> None:
        self.operation = operation
        self.fn = fn
        self.loop = loop
        self.future = future


def _uncancellable() -> concurrent.futures.Future[None]:
    """A future only the worker thread resolves.

    Marked running at once, so that cancelling an ``asyncio.wrap_future`` of it (a
    cancelled ``initialize()`` or ``close()``) cannot cancel it under the thread's feet.
    """
    future: concurrent.futures.Future[None] = concurrent.futures.Future()
    future.set_running_or_notify_cancel()
    return future


class _Stop:
    """Queue sentinel: finish what was queued before it, close, then resolve ``done``."""

    def __init__(self) -> None:
        self.done: concurrent.futures.Future[None] = _uncancellable()


class Health:
    """Whether one adapter's store is still usable: shared by the adapter and its threads.

    Failed once, by the first thread that finds the store unusable (its database file
    replaced, a thread dead); from then on every call fails with a ``StorageError``
    saying why, with the same cause.
    """

    __slots__ = ("_cause", "_reason", "files")

    def __init__(self, files: DatabaseFiles | None = None) -> None:
        self.files = files
        """The database's files as opened, or ``None`` for ``:memory:``."""
        self._cause: BaseException | None = None
        self._reason: str | None = None

    @property
    def failed(self) -> bool:
        """Whether the store was found unusable."""
        return self._reason is not None

    def fail(self, reason: str, cause: BaseException | None = None) -> None:
        """Mark the store unusable; the first reason stands."""
        if self._reason is None:
            self._cause = cause
            self._reason = reason

    def error(self, operation: str) -> StorageError:
        """The error every call gets once failed."""
        error = StorageError(operation, self._reason or "the storage is unusable")
        if self._cause is not None:
            error.__cause__ = self._cause
            error.__suppress_context__ = True
        return error

    def files_ok(self, *, force: bool = False) -> bool:
        """Check the database files (at most every 10 ms unless ``force``); ``False``, and
        failed, if they were deleted or replaced, or if the store had failed already."""
        if self._reason is None and self.files is not None:
            reason = self.files.changed(force=force)
            if reason is not None:
                self.fail(reason)
        return self._reason is None


class WorkerStats:
    """Counters a benchmark reads to see how well group commit batches."""

    __slots__ = ("batches", "jobs", "largest_batch")

    def __init__(self) -> None:
        self.batches = 0
        self.jobs = 0
        self.largest_batch = 0


def translate(operation: str, exc: BaseException, driver: Driver) -> BaseException:
    """The one place a driver exception becomes ``StorageError`` (cause kept, like ``from``).

    Undecodable stored values count as storage failures too, and so does running out of
    memory (the stdlib driver raises ``MemoryError`` for SQLITE_NOMEM). Reflow's own
    errors and programming errors pass through unchanged.
    """
    failures = (*driver.errors, MemoryError, msgspec.DecodeError, msgspec.ValidationError)
    if isinstance(exc, failures):
        error = StorageError(operation, f"{driver.name}: {type(exc).__name__}: {exc}")
        error.__cause__ = exc
        error.__suppress_context__ = True
        return error
    return exc


def retry_busy(driver: Driver, call: Callable[[], T]) -> T:
    """Run ``call``, retrying with jittered backoff while the database is locked.

    busy_timeout already waits inside SQLite; this covers the rarer case where it ran
    out (a long checkpoint, or another process's long transaction). Only safe for calls
    that leave nothing behind when they fail: a BEGIN, a read, a whole migration.
    """
    for attempt in range(_BUSY_RETRIES):
        try:
            return call()
        except driver.errors as exc:
            if attempt == _BUSY_RETRIES - 1 or not driver.is_busy(exc):
                raise
        time.sleep(_BUSY_BACKOFF_S * 2**attempt * (0.5 + random.random()))
    raise AssertionError("unreachable")  # pragma: no cover


def _resolve(pairs: list[tuple[asyncio.Future[Any], Outcome]]) -> None:
    for future, (ok, value) in pairs:
        if future.done():  # the caller was cancelled; the write still happened
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


class Worker(threading.Thread):
    """A thread owning one connection; ``transactional`` makes it the group-commit writer."""

    def __init__(
        self,
        driver: Driver,
        path: str,
        setup: Callable[[Connection], None],
        *,
        transactional: bool,
        name: str,
        health: Health | None = None,
    ) -> None:
        # Daemon: a process that forgets close() must still be able to exit. SQLite's
        # journal makes an interrupted transaction roll back on the next open.
        super().__init__(name=name, daemon=True)
        self._driver = driver
        self._path = path
        self._setup = setup
        self._transactional = transactional
        self._health = health if health is not None else Health()
        self._queue: queue.SimpleQueue[Job | _Stop] = queue.SimpleQueue()
        self.ready: concurrent.futures.Future[None] = _uncancellable()
        self.stats = WorkerStats()
        self._ended = False
        """Set once the thread serves no more: whoever queues after that answers."""
        self._current: list[Job] = []
        self._stops: list[_Stop] = []
        self._written = False
        self._truncate_due: float | None = None
        self._size_due = 0.0
        self._page_size = 0
        self._wal_limits: tuple[int, int] | None = None

    def submit(self, job: Job) -> None:
        """Queue a job; its future is resolved on its loop once done (and committed)."""
        self._queue.put(job)
        if self._ended:
            # The thread is gone or going and may have drained the queue already. Put,
            # then look: either the thread's last drain or this one takes the job.
            self._drain()

    def stop(self) -> concurrent.futures.Future[None]:
        """Ask the thread to finish queued jobs, close its connection and exit."""
        sentinel = _Stop()
        self._queue.put(sentinel)
        if self._ended:
            self._drain()
        return sentinel.done

    # -- thread body ------------------------------------------------------------

    def run(self) -> None:
        try:
            conn = self._driver.connect(self._path)
        except BaseException as exc:
            self._ended = True
            self.ready.set_exception(self._failure("initialize", exc))
            return
        try:
            self._setup(conn)
            if self._transactional and self._health.files is not None:
                self._health.files.record()
                self._size_wal(conn)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                conn.close()
            self._ended = True
            self.ready.set_exception(self._failure("initialize", exc))
            return
        self.ready.set_result(None)
        fault: BaseException | None = None
        try:
            self._serve(conn)
        except BaseException as exc:  # whatever ends this thread, nobody is left waiting
            fault = exc
        self._finish(conn, fault)

    def _failure(self, operation: str, exc: BaseException) -> BaseException:
        """``exc`` as the error a caller gets: a ``StorageError`` unless it is Reflow's own."""
        error = translate(operation, exc, self._driver)
        if isinstance(error, ReflowError):
            return error
        wrapped = StorageError(
            operation, f"the {self.name} thread failed: {type(exc).__name__}: {exc}"
        )
        wrapped.__cause__ = exc
        wrapped.__suppress_context__ = True
        return wrapped

    def _finish(self, conn: Connection, fault: BaseException | None) -> None:
        """End the thread: answer everyone, close the connection, then acknowledge stops."""
        if fault is not None:
            self._health.fail(
                f"the {self.name} thread died ({type(fault).__name__}: {fault}); every "
                f"call fails from now on: restart the worker",
                fault,
            )
            # Nothing of the batch in hand was committed: roll it back before saying so.
            with contextlib.suppress(BaseException):
                self._rollback(conn)
            current, self._current = self._current, []
            self._refuse(current)
        self._ended = True
        self._drain()
        with contextlib.suppress(BaseException):  # closing is best effort at this point
            conn.close()
        for stop in self._stops:
            stop.done.set_result(None)

    def _drain(self) -> None:
        """Answer everything queued with a refusal (runs on any thread, once ended)."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Stop):
                item.done.set_result(None)
            else:
                self._refuse([item])

    def _refuse(self, jobs: list[Job]) -> None:
        if jobs:
            self._send(jobs, [(False, self._refusal(job.operation)) for job in jobs])

    def _refusal(self, operation: str) -> StorageError:
        if self._health.failed:
            return self._health.error(operation)
        return StorageError(operation, "the storage is closed")

    def _serve(self, conn: Connection) -> None:
        while True:
            try:
                items = [self._queue.get(timeout=_IDLE_S)]
            except queue.Empty:
                self._idle(conn)
                continue
            # Everything queued while the last batch committed joins this batch.
            while True:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            jobs: list[Job] = []
            for item in items:
                if isinstance(item, _Stop):
                    self._stops.append(item)
                elif self._stops:  # submitted after close(): refuse rather than leave it hanging
                    self._refuse([item])
                else:
                    jobs.append(item)
            if jobs:
                self._current = jobs
                if self._transactional:
                    self._deliver(jobs, self._run_batch(conn, jobs))
                    self._maybe_truncate(conn)
                else:
                    self._deliver(jobs, self._run_each(conn, jobs))
                self._current = []
            if self._stops:
                return

    def _run_each(self, conn: Connection, jobs: list[Job]) -> list[Outcome]:
        if not self._health.files_ok():
            return [(False, self._health.error(job.operation)) for job in jobs]
        outcomes: list[Outcome] = []
        for job in jobs:
            try:
                outcomes.append((True, retry_busy(self._driver, functools.partial(job.fn, conn))))
            except Exception as exc:
                outcomes.append((False, translate(job.operation, exc, self._driver)))
        return outcomes

    def _run_batch(self, conn: Connection, jobs: list[Job]) -> list[Outcome]:
        if self._health.failed:
            return [(False, self._health.error(job.operation)) for job in jobs]
        self._size_wal(conn)
        self._maybe_truncate(conn)
        # Optimistic first pass without savepoints: they would triple the statements per
        # job, and each statement is a GIL hand-off. If a job fails, its partial writes
        # may be in the transaction, so roll it all back and run the batch again with a
        # savepoint per job. Nothing was committed or answered yet, and every job is a
        # pure function of its parameters and the database, so the re-run is exact.
        outcomes = self._attempt(conn, jobs, isolate=False)
        if outcomes is None:
            outcomes = self._attempt(conn, jobs, isolate=True)
        assert outcomes is not None
        self._written = True
        for ok, value in outcomes:
            if not ok and self._is_full(value):
                self._truncate_due = 0.0  # at once, once the answers are out
                self._size_due = 0.0
                break
        return outcomes

    def _attempt(self, conn: Connection, jobs: list[Job], *, isolate: bool) -> list[Outcome] | None:
        """One pass over the batch in one transaction; ``None`` asks for an isolated re-run."""
        try:
            retry_busy(self._driver, lambda: conn.execute("BEGIN IMMEDIATE"))
        except Exception as exc:
            return [(False, translate(job.operation, exc, self._driver)) for job in jobs]
        outcomes: list[Outcome] = []
        for job in jobs:
            try:
                if isolate:
                    conn.execute("SAVEPOINT reflow_job")
                value = job.fn(conn)
                if isolate:
                    conn.execute("RELEASE reflow_job")
                outcomes.append((True, value))
            except Exception as exc:
                failure = (False, translate(job.operation, exc, self._driver))
                if not isolate:
                    self._rollback(conn)
                    # A lone job is its own isolation: its failure is final.
                    return [failure] if len(jobs) == 1 else None
                outcomes.append(failure)
                if not self._undo_job(conn):
                    # SQLite rolled the whole transaction back (I/O error, disk full):
                    # the earlier jobs' writes are gone too, so none of them succeeded.
                    self._rollback(conn)
                    lost = [(False, translate(job.operation, exc, self._driver)) for job in jobs]
                    lost[len(outcomes) - 1] = failure
                    return lost
        if not self._health.files_ok():
            # The path holds another database now, or none: committing would write to an
            # orphan that no other process sees.
            self._rollback(conn)
            return [(False, self._health.error(job.operation)) for job in jobs]
        try:
            conn.execute("COMMIT")
        except Exception as exc:
            self._rollback(conn)
            return [(False, translate(job.operation, exc, self._driver)) for job in jobs]
        return outcomes

    def _undo_job(self, conn: Connection) -> bool:
        """Roll back the failed job's savepoint; False if the transaction itself is gone."""
        if not conn.in_transaction():
            return False
        try:
            conn.execute("ROLLBACK TO reflow_job")
            conn.execute("RELEASE reflow_job")
        except Exception:
            self._rollback(conn)
            return False
        return True

    def _rollback(self, conn: Connection) -> None:
        try:
            if conn.in_transaction():
                conn.execute("ROLLBACK")
        except Exception:  # nothing more to do here; the next BEGIN reports a dead connection
            pass

    # -- the WAL's size -----------------------------------------------------------

    def _is_full(self, error: object) -> bool:
        cause = error.__cause__ if isinstance(error, StorageError) else None
        return cause is not None and self._driver.is_full(cause)

    def _size_wal(self, conn: Connection) -> None:
        """Fit the WAL's checkpoint threshold and size limit to the volume's free space.

        At most once a second (and at once after a full disk); a ``statvfs`` and, only
        when the answer changes, two pragmas. Where there is room this is SQLite's own
        default threshold, set once.
        """
        files = self._health.files
        now = time.monotonic()
        if files is None or now < self._size_due:
            return
        self._size_due = now + _SIZE_WAL_EVERY_S
        free = files.free_bytes()
        if free is None:
            return
        try:  # best effort: the thresholds in force stay until the next look
            if not self._page_size:
                self._page_size = int(conn.execute("PRAGMA page_size")[0][0])
            limits = migrate.wal_limits(free, self._page_size)
            if limits != self._wal_limits:
                pages, size_limit = limits
                conn.execute(f"PRAGMA wal_autocheckpoint = {int(pages)}")
                conn.execute(f"PRAGMA journal_size_limit = {int(size_limit)}")
                self._wal_limits = limits
        except Exception:
            return

    def _maybe_truncate(self, conn: Connection) -> None:
        """After a full disk: copy the WAL into the database and cut it to zero bytes.

        Retried (at most every 100 ms) while it fails for lack of space; dropped on any
        other outcome, including a checkpoint that readers held back, since TRUNCATE
        waits up to busy_timeout for them and the autocheckpoint carries on anyway.
        """
        due = self._truncate_due
        if due is None or time.monotonic() < due or self._health.failed:
            return
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except Exception as exc:
            if self._driver.is_full(exc):
                self._truncate_due = time.monotonic() + _TRUNCATE_RETRY_S
                return
        self._truncate_due = None

    def _idle(self, conn: Connection) -> None:
        """No work for a second: check the files; on the writer, checkpoint what it wrote."""
        if not self._health.files_ok(force=True) or not self._transactional:
            return
        self._size_wal(conn)
        self._maybe_truncate(conn)
        if self._written:
            self._written = False
            # PASSIVE never waits for a lock; once the WAL is all copied, the next write
            # starts it over from the beginning (cut back to journal_size_limit).
            with contextlib.suppress(Exception):
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

    # -- answers --------------------------------------------------------------------

    def _deliver(self, jobs: list[Job], outcomes: list[Outcome]) -> None:
        stats = self.stats
        stats.batches += 1
        stats.jobs += len(jobs)
        stats.largest_batch = max(stats.largest_batch, len(jobs))
        self._send(jobs, outcomes)

    def _send(self, jobs: list[Job], outcomes: list[Outcome]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Outcome]]] = {}
        for job, outcome in zip(jobs, outcomes, strict=True):
            by_loop.setdefault(job.loop, []).append((job.future, outcome))
        for loop, pairs in by_loop.items():
            # A closed loop raises RuntimeError: nobody is waiting there any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve, pairs)
