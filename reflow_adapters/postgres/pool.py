"""A small connection pool for :class:`PostgresStorage`: cheap checkouts, fast recovery.

Why not ``psycopg_pool``: its health check costs a round trip on every checkout (or,
without it, a connection killed while idle fails the next call), and it replaces
broken connections in background workers with a backoff of its own, so under
connection churn callers waited for its timeout (30 s) instead of a new connection.
This pool keeps only what the adapter needs:

* **Checkout is local.** An idle connection is probed without a round trip: a
  terminated backend leaves its last error and end-of-stream on the socket, so a
  readable idle socket means a dead (or doubtful) connection, dropped on the spot.
  The most recently returned connection is handed out first (it is the warmest).
* **Replacement is inline.** Below ``max_size``, a caller that finds no idle
  connection opens one itself, with libpq's ``connect_timeout``; there is no backoff
  between a lost connection and its replacement, and a server that is down fails the
  call at once with libpq's message instead of after a pool timeout.
* **Return discards anything doubtful**: a closed or broken connection, or one left in
  a transaction, is closed and its slot freed (a waiter is told to open a new one).

The pool is single-event-loop, like the adapter; errors are psycopg's (the adapter
translates them in one place).
"""

from __future__ import annotations

import asyncio
import contextlib
import select
from collections import deque
from collections.abc import AsyncIterator, Mapping
from typing import Any, Generic, TypeVar

import psycopg
from psycopg import AsyncConnection, pq

__all__ = ["ConnectionPool", "PoolTimeout", "is_alive"]

C = TypeVar("C", bound=AsyncConnection[Any])


class PoolTimeout(psycopg.OperationalError):
    """No connection came free within the pool's ``wait_timeout_s``."""


def is_alive(conn: AsyncConnection[Any]) -> bool:
    """``True`` if an idle connection is usable, judged without a round trip.

    The server sends nothing unasked to an idle session that does not LISTEN, except
    when it ends it: a terminated backend leaves its last error (then end-of-stream) on
    the socket. So an idle connection whose socket is readable is not trusted; one
    ``poll`` with no timeout tells, and a false alarm only costs a new connection.
    """
    pgconn = conn.pgconn
    if (
        conn.closed
        or pgconn.status != pq.ConnStatus.OK
        or pgconn.transaction_status != pq.TransactionStatus.IDLE
    ):
        return False
    try:
        fd = pgconn.socket
    except psycopg.OperationalError:
        return False
    probe = select.poll()
    probe.register(fd, select.POLLIN)
    return not probe.poll(0)


class ConnectionPool(Generic[C]):
    """Up to ``max_size`` connections of ``connection_class``, opened with ``kwargs``."""

    def __init__(
        self,
        conninfo: str,
        *,
        connection_class: type[C],
        kwargs: Mapping[str, Any],
        min_size: int,
        max_size: int,
        wait_timeout_s: float = 30.0,
    ) -> None:
        self._conninfo = conninfo
        self._class = connection_class
        self._kwargs = dict(kwargs)
        self._min_size, self._max_size = min_size, max_size
        self.wait_timeout_s = wait_timeout_s
        self._idle: deque[C] = deque()
        self._size = 0  # connections open or being opened
        # Each waiter gets a connection, or None meaning "a slot came free: open one".
        self._waiters: deque[asyncio.Future[C | None]] = deque()
        self._closed = False

    @property
    def closed(self) -> bool:
        """``True`` once :meth:`close` has run."""
        return self._closed

    async def open(self) -> None:
        """Open ``min_size`` connections (at least one: a bad DSN fails here, at once)."""
        opened = [await self._connect() for _ in range(max(self._min_size, 1))]
        for conn in opened:
            self._put(conn)

    async def close(self) -> None:
        """Close every idle connection; connections in use are closed when returned."""
        self._closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(psycopg.OperationalError("the connection pool is closed"))
        while self._idle:
            conn = self._idle.pop()
            self._size -= 1
            await conn.close()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[C]:
        """A connection for the block; returned (or discarded if doubtful) afterwards."""
        conn = await self.acquire()
        try:
            yield conn
        finally:
            self.release(conn)

    async def acquire(self) -> C:
        """A connection; the caller must :meth:`release` it (see :meth:`connection`)."""
        return await self._get()

    def release(self, conn: C) -> None:
        """Give back a connection from :meth:`acquire` (a doubtful one is closed)."""
        self._put(conn)

    # -- internals ------------------------------------------------------------------

    async def _connect(self) -> C:
        self._size += 1
        try:
            return await self._class.connect(self._conninfo, **self._kwargs)
        except BaseException:
            self._size -= 1
            self._slot_freed()
            raise

    async def _get(self) -> C:
        while True:
            if self._closed:
                raise psycopg.OperationalError("the connection pool is closed")
            while self._idle:
                conn = self._idle.pop()
                if is_alive(conn):
                    return conn
                self._drop(conn)
            if self._size < self._max_size:
                return await self._connect()
            handed = await self._wait()
            if handed is not None:
                return handed

    async def _wait(self) -> C | None:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[C | None] = loop.create_future()
        self._waiters.append(waiter)
        # A plain timer, not asyncio.timeout(): waiting is frequent when the engine runs
        # more runs than the pool has connections, and this is the cheap way.
        timer = loop.call_later(self.wait_timeout_s, self._expire, waiter)
        try:
            return await waiter
        except BaseException:
            # Cancelled after being handed a connection: pass it on, do not leak it.
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                handed = waiter.result()
                if handed is not None:
                    self._put(handed)
                else:
                    self._slot_freed()
            raise
        finally:
            timer.cancel()
        # A waiter that gave up stays queued, done: _put and _slot_freed skip it. Not
        # removed here: deque.remove compares, and a miss formats every entry's repr.

    def _expire(self, waiter: asyncio.Future[C | None]) -> None:
        if not waiter.done():
            waiter.set_exception(
                PoolTimeout(
                    f"no PostgreSQL connection came free within {self.wait_timeout_s:g}s "
                    f"({self._max_size} in use); raise max_size or shorten the work per call"
                )
            )

    def _put(self, conn: C) -> None:
        pgconn = conn.pgconn
        if (
            self._closed
            or conn.closed
            or pgconn.status != pq.ConnStatus.OK
            or pgconn.transaction_status != pq.TransactionStatus.IDLE
        ):
            self._drop(conn)
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self._idle.append(conn)

    def _drop(self, conn: C) -> None:
        # finish() closes the socket synchronously: no await, so _put stays sync.
        conn.pgconn.finish()
        self._size -= 1
        self._slot_freed()

    def _slot_freed(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
