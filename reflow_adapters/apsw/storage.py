"""``APSWStorage``: the SQLite storage on APSW, for a newer bundled SQLite.

APSW ships its own, recent SQLite (independent of the one Python was built with) and
wraps it closely. All SQL, transactions, group commit and migrations live in
:mod:`reflow_adapters.sqlite_common`; this module is the APSW driver glue.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import apsw

from reflow_adapters.sqlite_common import Connection, SQLiteStorageBase
from reflow_adapters.sqlite_common.driver import Params, Row

__all__ = ["APSWStorage"]


class _APSWConnection:
    """An APSW connection (autocommit unless a BEGIN is issued), reusing one cursor."""

    def __init__(self, path: str) -> None:
        # A statement cache larger than the default 32 holds every named query.
        self._conn: Any = apsw.Connection(path, statementcachesize=256)
        self._cursor: Any = self._conn.cursor()

    def execute(self, sql: str, params: Params | None = None) -> list[Row]:
        return list(self._cursor.execute(sql, params or {}))

    def changes(self) -> int:
        return int(self._conn.changes())

    def in_transaction(self) -> bool:
        return bool(self._conn.in_transaction)

    def close(self) -> None:
        self._conn.close()


class _APSWDriver:
    """The APSW driver: its errors, busy and disk-full detection, and version."""

    name = "apsw"
    errors: tuple[type[BaseException], ...] = (apsw.Error,)

    def connect(self, path: str) -> Connection:
        return _APSWConnection(path)

    def is_busy(self, exc: BaseException) -> bool:
        return isinstance(exc, (apsw.BusyError, apsw.LockedError))

    def is_full(self, exc: BaseException) -> bool:
        return isinstance(exc, apsw.FullError)

    def library_version(self) -> Sequence[int]:
        return tuple(int(part) for part in apsw.sqlite_lib_version().split("."))


class APSWStorage(SQLiteStorageBase):
    """Durable storage in one SQLite file (or ``:memory:``), through APSW.

    Same schema, queries and behaviour as :class:`~reflow_adapters.sqlite.SQLiteStorage`
    (the two can open the same file); URLs use the ``apsw`` scheme:

    >>> APSWStorage("/var/lib/app/reflow.db").url
    'apsw:////var/lib/app/reflow.db'
    """

    driver = _APSWDriver()
    scheme = "apsw"
