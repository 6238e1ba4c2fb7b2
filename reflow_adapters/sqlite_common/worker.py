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

from reflow_adapters.sqlite_common.driver import Connection, Driver
from reflow_core.errors import StorageError

__all__ = ["Job", "Worker", "WorkerStats", "retry_busy", "translate"]

T = TypeVar("T")

_BUSY_RETRIES = 5
"""Attempts at BEGIN IMMEDIATE when busy_timeout ran out (another process held the lock)."""
_BUSY_BACKOFF_S = 0.05

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


class WorkerStats:
    """Counters a benchmark reads to see how well group commit batches."""

    __slots__ = ("batches", "jobs", "largest_batch")

    def __init__(self) -> None:
        self.batches = 0
        self.jobs = 0
        self.largest_batch = 0


def translate(operation: str, exc: BaseException, driver: Driver) -> BaseException:
    """The one place a driver exception becomes ``StorageError`` (cause kept, like ``from``).

    Undecodable stored values count as storage failures too. Reflow's own errors and
    programming errors pass through unchanged.
    """
    if isinstance(exc, (*driver.errors, msgspec.DecodeError, msgspec.ValidationError)):
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
    ) -> None:
        # Daemon: a process that forgets close() must still be able to exit. SQLite's
        # journal makes an interrupted transaction roll back on the next open.
        super().__init__(name=name, daemon=True)
        self._driver = driver
        self._path = path
        self._setup = setup
        self._transactional = transactional
        self._queue: queue.SimpleQueue[Job | _Stop] = queue.SimpleQueue()
        self.ready: concurrent.futures.Future[None] = _uncancellable()
        self.stats = WorkerStats()

    def submit(self, job: Job) -> None:
        """Queue a job; its future is resolved on its loop once done (and committed)."""
        self._queue.put(job)

    def stop(self) -> concurrent.futures.Future[None]:
        """Ask the thread to finish queued jobs, close its connection and exit."""
        sentinel = _Stop()
        self._queue.put(sentinel)
        return sentinel.done

    # -- thread body ------------------------------------------------------------

    def run(self) -> None:
        try:
            conn = self._driver.connect(self._path)
        except BaseException as exc:
            self.ready.set_exception(translate("initialize", exc, self._driver))
            return
        try:
            self._setup(conn)
        except BaseException as exc:
            conn.close()
            self.ready.set_exception(translate("initialize", exc, self._driver))
            return
        self.ready.set_result(None)
        stops: list[_Stop] = []
        try:
            stops = self._serve(conn)
        finally:
            with contextlib.suppress(Exception):  # closing is best effort at this point
                conn.close()
            for stop in stops:
                stop.done.set_result(None)

    def _serve(self, conn: Connection) -> list[_Stop]:
        while True:
            items = [self._queue.get()]
            # Everything queued while the last batch committed joins this batch.
            while True:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stops: list[_Stop] = []
            jobs: list[Job] = []
            for item in items:
                if isinstance(item, _Stop):
                    stops.append(item)
                elif stops:  # submitted after close(): refuse rather than leave it hanging
                    self._deliver([item], [(False, StorageError(item.operation, "closed"))])
                else:
                    jobs.append(item)
            if jobs:
                run = self._run_batch if self._transactional else self._run_each
                self._deliver(jobs, run(conn, jobs))
            if stops:
                return stops

    def _run_each(self, conn: Connection, jobs: list[Job]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for job in jobs:
            try:
                outcomes.append((True, retry_busy(self._driver, functools.partial(job.fn, conn))))
            except Exception as exc:
                outcomes.append((False, translate(job.operation, exc, self._driver)))
        return outcomes

    def _run_batch(self, conn: Connection, jobs: list[Job]) -> list[Outcome]:
        # Optimistic first pass without savepoints: they would triple the statements per
        # job, and each statement is a GIL hand-off. If a job fails, its partial writes
        # may be in the transaction, so roll it all back and run the batch again with a
        # savepoint per job. Nothing was committed or answered yet, and every job is a
        # pure function of its parameters and the database, so the re-run is exact.
        outcomes = self._attempt(conn, jobs, isolate=False)
        if outcomes is None:
            outcomes = self._attempt(conn, jobs, isolate=True)
        assert outcomes is not None
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

    def _deliver(self, jobs: list[Job], outcomes: list[Outcome]) -> None:
        stats = self.stats
        stats.batches += 1
        stats.jobs += len(jobs)
        stats.largest_batch = max(stats.largest_batch, len(jobs))
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Outcome]]] = {}
        for job, outcome in zip(jobs, outcomes, strict=True):
            by_loop.setdefault(job.loop, []).append((job.future, outcome))
        for loop, pairs in by_loop.items():
            # A closed loop raises RuntimeError: nobody is waiting there any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve, pairs)
