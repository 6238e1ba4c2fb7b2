"""The connection pool, transactions with deadlock retries, and driver-error translation.

Everything that touches asyncmy's connection objects is here, so the storage module reads
as one short method per contract row. :class:`Database` owns one asyncmy pool of
autocommit connections; :meth:`Database.run` executes a function on one connection,
inside ``BEGIN ... COMMIT`` when asked, and is THE place driver errors become
:class:`~reflow_core.errors.StorageError`.

InnoDB resolves a deadlock by rolling one transaction back (error 1213); that
transaction changed nothing, so it is simply run again, a few times, before the
deadlock is reported. A connection whose call failed, or was cancelled mid-statement,
is closed rather than returned to the pool: its protocol state is unknown.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import asyncmy
from asyncmy.constants import CLIENT
from asyncmy.cursors import DictCursor

from reflow_core.errors import StorageError

from .url import Target

__all__ = ["DRIVER_ERRORS", "Conn", "Database", "is_duplicate", "translated"]

T = TypeVar("T")
Conn = Any
"""An asyncmy connection (the driver's stubs are partial, so it stays untyped here)."""

DRIVER_ERRORS: tuple[type[BaseException], ...] = (
    asyncmy.errors.MySQLError,
    OSError,
    TimeoutError,
    RuntimeError,  # asyncmy: "Cannot acquire connection after closing pool"
)
_DEADLOCK = 1213
_LOCK_WAIT_TIMEOUT = 1205
_DUPLICATE_KEY = 1062
DEADLOCK_RETRIES = 5
ACQUIRE_TIMEOUT_S = 30.0
"""How long a call waits for a free pooled connection before failing."""


def _errno(exc: BaseException) -> int | None:
    if isinstance(exc, asyncmy.errors.MySQLError) and exc.args and isinstance(exc.args[0], int):
        return int(exc.args[0])
    return None


def is_duplicate(exc: BaseException, key: str) -> bool:
    """Whether ``exc`` is a duplicate-key error on index ``key`` (``PRIMARY`` or a name).

    MariaDB says ``for key 'NAME'``, MySQL 8 ``for key 'table.NAME'``.
    """
    if _errno(exc) != _DUPLICATE_KEY:
        return False
    message = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
    return message.endswith((f"'{key}'", f".{key}'"))


@contextlib.contextmanager
def translated(operation: str) -> Iterator[None]:
    """Driver exceptions raised inside become :class:`StorageError` (cause kept)."""
    try:
        yield
    except DRIVER_ERRORS as exc:
        if isinstance(exc, StorageError):  # pragma: no cover - StorageError is no driver error
            raise
        detail = " ".join(str(a) for a in exc.args) if exc.args else type(exc).__name__
        raise StorageError(operation, detail or type(exc).__name__) from exc


async def execute(
    conn: Conn, query: str, params: dict[str, Any]
) -> tuple[int, list[dict[str, Any]]]:
    """Run one statement; ``(rows matched or affected, rows returned)``."""
    async with conn.cursor(DictCursor) as cur:
        await cur.execute(query, params)
        rows = await cur.fetchall()
        return int(cur.rowcount), list(rows or ())


class Database:
    """One asyncmy pool onto one server, and the rules for using a connection."""

    def __init__(self, target: Target, *, min_size: int, max_size: int) -> None:
        self.target = target
        self._min_size, self._max_size = min_size, max_size
        self._pool: Any = None
        self.closed = False
        self.server_version = ""

    def connect_kwargs(self) -> dict[str, Any]:
        """What every connection is opened with (also used for one-off connections)."""
        t = self.target
        kwargs: dict[str, Any] = {
            "user": t.user,
            "password": t.password,
            "database": t.database,
            "charset": "utf8mb4",
            "autocommit": True,
            # Rows "affected" are rows matched: an UPDATE that writes the values a row
            # already has (a heartbeat in the same millisecond) still counts.
            "client_flag": CLIENT.FOUND_ROWS,
            "binary_prefix": True,
            "connect_timeout": t.connect_timeout,
            # Strict (an overlong value fails instead of being cut), backslash escapes
            # on (the driver escapes with them), and READ COMMITTED: every statement
            # reads the newest committed rows, which the locking protocol relies on.
            "init_command": _session_setup(self.server_version),
        }
        if t.unix_socket:
            kwargs["unix_socket"] = t.unix_socket
        else:
            kwargs["host"], kwargs["port"] = t.host, t.port
        return kwargs

    async def open(self, operation: str) -> None:
        """Check the server once, then open the pool (idempotent)."""
        if self.closed:
            raise StorageError(operation, "the MySQL adapter is closed")
        if self._pool is not None:
            return
        with translated(operation):
            # One direct connection first: a wrong URL or a server that is down fails
            # at once with the server's message, and an old server is refused clearly.
            probe = self.connect_kwargs()
            probe.pop("init_command")
            conn = await asyncmy.connect(**probe)
            try:
                _, rows = await execute(conn, "SELECT VERSION() AS version", {})
            finally:
                conn.close()
            self.server_version = str(rows[0]["version"])
            _check_version(operation, self.server_version)
            self._pool = await asyncmy.create_pool(
                minsize=self._min_size,
                maxsize=self._max_size,
                pool_recycle=3600,
                **self.connect_kwargs(),
            )

    async def close(self) -> None:
        """Close the pool and every connection in it. Safe twice."""
        self.closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
            with contextlib.suppress(*DRIVER_ERRORS):
                await pool.wait_closed()

    @contextlib.asynccontextmanager
    async def connection(self, operation: str) -> AsyncIterator[Conn]:
        """A pooled connection; one that saw an exception is closed, never reused."""
        if self._pool is None:
            state = "closed" if self.closed else "not initialized; call initialize() first"
            raise StorageError(operation, f"the MySQL adapter is {state}")
        pool = self._pool
        with translated(operation):
            async with asyncio.timeout(ACQUIRE_TIMEOUT_S):
                conn = await pool.acquire()
        try:
            yield conn
        except BaseException:
            conn.close()
            raise
        finally:
            pool.release(conn)

    async def run(
        self,
        operation: str,
        body: Callable[[Conn], Awaitable[T]],
        *,
        transaction: bool = False,
    ) -> T:
        """``body(conn)`` on a pooled connection, in one transaction if asked.

        An exception from ``body`` rolls the transaction back (the connection is then
        discarded); a deadlock reruns the whole transaction. Driver errors leave as
        :class:`StorageError`.
        """
        attempt = 0
        while True:
            try:
                with translated(operation):
                    async with self.connection(operation) as conn:
                        if not transaction:
                            return await body(conn)
                        await conn.begin()
                        result = await body(conn)
                        await conn.commit()
                        return result
            except StorageError as exc:
                if _errno(exc.__cause__ or exc) not in (_DEADLOCK,) or attempt >= DEADLOCK_RETRIES:
                    raise
            attempt += 1
            # Rerun after a short random pause, so the two parties do not collide again.
            await asyncio.sleep(random.uniform(0.001, 0.005 * attempt))


def _parse_version(version: str) -> tuple[bool, int, int]:
    """``(is MariaDB, major, minor)`` of a ``VERSION()`` string."""
    numbers = [int(part) for part in version.split("-")[0].split(".")[:2] if part.isdigit()]
    major, minor = [*numbers, 0, 0][:2]
    return "mariadb" in version.lower(), major, minor


def _session_setup(version: str) -> str:
    """One SET for every new connection (one statement: no multi-statement mode)."""
    mariadb, major, minor = _parse_version(version)
    # The isolation variable is tx_isolation before MariaDB 11.1, transaction_isolation
    # on MySQL 8 (which dropped the old name) and later MariaDB.
    variable = "tx_isolation" if mariadb and (major, minor) < (11, 1) else "transaction_isolation"
    return (
        "SET SESSION sql_mode = 'STRICT_ALL_TABLES,NO_ENGINE_SUBSTITUTION', "
        f"SESSION {variable} = 'READ-COMMITTED'"
    )


def _check_version(operation: str, version: str) -> None:
    """Refuse servers without ``SKIP LOCKED``: MariaDB < 10.6, MySQL < 8.0."""
    mariadb, major, minor = _parse_version(version)
    too_old = (major, minor) < (10, 6) if mariadb else (major, minor) < (8, 0)
    if too_old:
        need = "MariaDB 10.6" if mariadb else "MySQL 8.0"
        raise StorageError(
            operation,
            f"server version {version} is too old: Reflow needs {need} or newer "
            "(SELECT ... FOR UPDATE SKIP LOCKED)",
        )
