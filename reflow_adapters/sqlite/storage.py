"""``SQLiteStorage``: the default storage, on the standard library's ``sqlite3``.

All SQL, transactions, group commit and migrations live in
:mod:`reflow_adapters.sqlite_common`; this module is the sqlite3 driver glue.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from reflow_adapters.sqlite_common import Connection, SQLiteStorageBase
from reflow_adapters.sqlite_common.driver import Params, Row

__all__ = ["SQLiteStorage"]

_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_SQLITE_FULL = 13


class _Sqlite3Connection:
    """A sqlite3 connection in autocommit mode, reusing one cursor."""

    def __init__(self, path: str) -> None:
        # isolation_level=None: sqlite3 must not open transactions behind our back; the
        # worker issues BEGIN IMMEDIATE itself. The connection stays on the thread that
        # opened it, so sqlite3's same-thread check stays on.
        self._conn = sqlite3.connect(path, isolation_level=None, cached_statements=256)
        self._cursor = self._conn.cursor()

    def execute(self, sql: str, params: Params | None = None) -> list[Row]:
        return self._cursor.execute(sql, params or {}).fetchall()

    def changes(self) -> int:
        return self._cursor.rowcount

    def in_transaction(self) -> bool:
        return self._conn.in_transaction

    def close(self) -> None:
        self._cursor.close()
        self._conn.close()


class _Sqlite3Driver:
    """The stdlib driver: its errors, busy and disk-full detection, and version."""

    name = "sqlite3"
    errors: tuple[type[BaseException], ...] = (sqlite3.Error, sqlite3.Warning)

    def connect(self, path: str) -> Connection:
        return _Sqlite3Connection(path)

    def is_busy(self, exc: BaseException) -> bool:
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None:
            return code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)
        return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)

    def is_full(self, exc: BaseException) -> bool:
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None:
            return bool(code & 0xFF == _SQLITE_FULL)
        return isinstance(exc, sqlite3.OperationalError) and "is full" in str(exc)

    def library_version(self) -> Sequence[int]:
        return sqlite3.sqlite_version_info


class SQLiteStorage(SQLiteStorageBase):
    """Durable storage in one SQLite file (or ``:memory:``), through stdlib ``sqlite3``.

    >>> storage = SQLiteStorage("reflow.db")   # no I/O until initialize()
    >>> storage.url
    'sqlite:///reflow.db'

    Writes from all coroutines are committed in groups by one writer thread with
    ``synchronous=FULL``: every acknowledged write survives power loss. Several
    processes may share the file (``BEGIN IMMEDIATE`` plus ``busy_timeout``).
    """

    driver = _Sqlite3Driver()
    scheme = "sqlite"
