"""The adapter's ``psycopg_pool.AsyncConnectionPool``, configured for cheap checkouts and
fast recovery from connection churn.

* **Checkout costs no round trip.** The pool's ``check`` is :func:`is_alive`, a
  non-blocking ``poll`` of the idle socket, not ``check_connection`` (a query per
  checkout).
* **One dead idle connection drains the pool.** Whatever kills one idle session (a
  server restart, a failover, an operator's ``pg_terminate_backend``) usually killed
  its neighbours too. Without draining, one checkout would meet them one by one, and
  psycopg_pool sleeps between consecutive failed checks (1 s, then doubling): the
  freeze of minutes seen under churn. ``drain()`` closes every idle connection at once
  (and those in use when they come back) and opens replacements in the workers, so the
  caller waits for one fresh connection instead.
* **Replacements start without delay** (several workers open them in parallel); a
  server that stays unreachable is retried with backoff for ``reconnect_timeout``.
"""

from __future__ import annotations

import select
from collections.abc import Mapping
from typing import Any

import psycopg
import psycopg_pool
from psycopg import AsyncConnection, AsyncCursor, pq
from psycopg.rows import DictRow

__all__ = ["POOL_ERRORS", "DeadConnection", "PooledConnection", "is_alive", "new_pool"]

POOL_ERRORS = (psycopg_pool.PoolTimeout, psycopg_pool.PoolClosed, psycopg_pool.TooManyRequests)
"""Failures of the pool itself, not of a connection: never retried as a lost connection."""

_WAIT_TIMEOUT_S = 30.0
"""How long a call waits for a connection when all ``max_size`` are in use."""
_RECONNECT_TIMEOUT_S = 60.0
"""How long the workers keep retrying (with backoff) to open a replacement."""
_MAX_WORKERS = 8
_IDLE = pq.TransactionStatus.IDLE


class DeadConnection(psycopg.OperationalError):
    """An idle connection failed :func:`is_alive`; the pool discards it."""


class PooledConnection(AsyncConnection[DictRow]):
    """The pool's connections: each keeps one cursor for the one-statement fast path.

    ``conn.execute`` builds a cursor (and its adapters map and transformer) per
    statement; a kept cursor builds them once per connection, and reuses its
    transformer while the same query text repeats. A connection is used by one caller
    at a time (it is checked out), so its cursor is too; it dies with the connection.
    It holds its last result until the connection's next statement: at most one result
    per pooled connection stays in memory.
    """

    _kept_cursor: AsyncCursor[DictRow] | None = None

    def kept_cursor(self) -> AsyncCursor[DictRow]:
        """This connection's reusable cursor (created on first use)."""
        cur = self._kept_cursor
        if cur is None or cur.closed:
            cur = self._kept_cursor = self.cursor()
        return cur


def is_alive(conn: AsyncConnection[Any]) -> bool:
    """``True`` if an idle connection is usable, judged without a round trip.

    The server sends nothing unasked to an idle session that does not LISTEN, except
    when it ends it: a terminated backend leaves its last error (then end-of-stream) on
    the socket. So an idle connection whose socket is readable is not trusted; one
    ``poll`` with no timeout tells, and a false alarm only costs a new connection.
    """
    pgconn = conn.pgconn
    # libpq answers UNKNOWN for a closed or broken connection, so this one test also
    # covers conn.closed and pgconn.status.
    if pgconn.transaction_status != _IDLE:
        return False
    try:
        fd = pgconn.socket
    except psycopg.OperationalError:
        return False
    probe = select.poll()
    probe.register(fd, select.POLLIN)
    return not probe.poll(0)


def new_pool(
    conninfo: str,
    *,
    kwargs: Mapping[str, Any],
    min_size: int,
    max_size: int,
    name: str,
) -> psycopg_pool.AsyncConnectionPool[PooledConnection]:
    """An unopened pool of :class:`PooledConnection` (call ``await pool.open()``)."""
    pool: psycopg_pool.AsyncConnectionPool[PooledConnection]

    async def check(conn: PooledConnection) -> None:
        if is_alive(conn):
            return
        # Closed here, so the pool counts it lost and opens a replacement (a connection
        # that merely fails the check would go back to the idle list).
        await conn.close()
        await pool.drain()
        raise DeadConnection("idle connection found dead at checkout")

    pool = psycopg_pool.AsyncConnectionPool(
        conninfo,
        connection_class=PooledConnection,
        kwargs=dict(kwargs),
        min_size=min_size,
        max_size=max_size,
        open=False,
        check=check,
        name=name,
        timeout=_WAIT_TIMEOUT_S,
        reconnect_timeout=_RECONNECT_TIMEOUT_S,
        num_workers=min(max_size, _MAX_WORKERS),
    )
    return pool
