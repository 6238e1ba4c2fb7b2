"""The minimal driver shim both SQLite adapters implement.

Everything else in this package (queries, transactions, group commit, migrations) is
written against these two protocols, so the stdlib and APSW adapters are each a page
of driver glue. A :class:`Connection` is used by exactly one thread: the one that
opened it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

__all__ = ["Connection", "Driver", "Params", "Row"]

Row = tuple[Any, ...]
Params = Mapping[str, Any]


class Connection(Protocol):
    """One open SQLite connection in autocommit mode (transactions are explicit)."""

    def execute(self, sql: str, params: Params | None = None) -> list[Row]:
        """Run one statement to completion and return all its rows.

        Running to completion matters for ``RETURNING`` statements, whose writes are
        applied as their rows are stepped.
        """
        ...

    def changes(self) -> int:
        """Rows changed by the last INSERT, UPDATE or DELETE run by :meth:`execute`."""
        ...

    def in_transaction(self) -> bool:
        """Whether a transaction is open (SQLite may roll one back on some errors)."""
        ...

    def close(self) -> None:
        """Close the connection."""
        ...


class Driver(Protocol):
    """What differs between sqlite3 and APSW, in one object per adapter.

    ``errors``, :meth:`is_busy` and :meth:`is_full` let the shared code catch and
    translate driver exceptions in one place without importing the driver.
    """

    name: str
    """Human name of the driver, e.g. ``"sqlite3"``, used in messages."""

    errors: tuple[type[BaseException], ...]
    """Exception classes the driver raises; all of them become ``StorageError``."""

    def connect(self, path: str) -> Connection:
        """Open ``path`` (``":memory:"`` for a private in-memory database), autocommit."""
        ...

    def is_busy(self, exc: BaseException) -> bool:
        """True for SQLITE_BUSY / SQLITE_LOCKED: another connection holds the lock."""
        ...

    def is_full(self, exc: BaseException) -> bool:
        """True for SQLITE_FULL: the disk (or the database's size limit) is full."""
        ...

    def library_version(self) -> Sequence[int]:
        """The SQLite library version as ``(major, minor, patch)``."""
        ...
