"""Is the database at the configured path still the one this adapter has open?

SQLite keeps a file open by descriptor. If the file is deleted, or another file is
moved to its path (a restore, a "cleanup" script, a volume remounted), an open
connection in WAL mode goes on committing to the orphan: every write is acknowledged
and lost, while other processes write to the new file at the path and nobody works on
what they enqueue there. (SQLite refuses such writes only in rollback-journal mode.)

:class:`DatabaseFiles` records the identity (``st_dev``, ``st_ino``) of the database
file and of its ``-wal`` and ``-shm`` companions once the writer has them open, and
:meth:`DatabaseFiles.changed` compares them with what the path holds now. A check is
three ``stat`` calls, run at most once per :data:`CHECK_INTERVAL_S` (the worker threads
ask before each commit, before each batch of reads and when idle), so under load it
costs nothing measurable while a quiet store is still checked on every commit.

An open file's inode number cannot be reused while it is open, so a changed identity
always means another file. Closing the orphan is safe: SQLite itself skips the
checkpoint on close, and so deletes no ``-wal`` or ``-shm`` by name, when the database
file has moved (``databaseIsUnmoved`` in ``pager.c``).
"""

from __future__ import annotations

import os
import time

__all__ = ["CHECK_INTERVAL_S", "DatabaseFiles"]

CHECK_INTERVAL_S = 0.01
"""Least time between two identity checks of one adapter's files."""

_COMPANIONS = (("-wal", "its write-ahead log"), ("-shm", "its shared-memory index"))


def _identity(path: str) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


class DatabaseFiles:
    """The identity of one database's files as opened, and a cheap check of it."""

    __slots__ = ("_due", "_opened", "path")

    def __init__(self, path: str) -> None:
        self.path = path
        self._opened: list[tuple[str, str, tuple[int, int]]] = []
        self._due = 0.0

    def record(self) -> None:
        """Note what the path holds now; called on the writer thread right after it opened
        the database (and so its ``-wal`` and ``-shm``).

        Relative paths are made absolute now, as SQLite did at open, so that a later
        ``chdir`` is not mistaken for a replaced file. SQLite names the companions after
        the database's real path (symlinks resolved), so they are looked up there.
        """
        self.path = os.path.abspath(self.path)
        real = os.path.realpath(self.path)
        opened = []
        for name, what in [(self.path, ""), *((real + s, w) for s, w in _COMPANIONS)]:
            identity = _identity(name)
            if identity is not None:  # a companion not there yet is not checked
                opened.append((name, what, identity))
        self._opened = opened
        self._due = time.monotonic() + CHECK_INTERVAL_S

    def changed(self, *, force: bool = False) -> str | None:
        """Why the database at the path is no longer the one open, or ``None``.

        Without ``force``, answers ``None`` without looking if the last check was less
        than :data:`CHECK_INTERVAL_S` ago. A ``stat`` that fails for another reason than
        a missing file (a permission, an I/O error) is no verdict: the next check retries.
        """
        now = time.monotonic()
        if now < self._due and not force:
            return None
        self._due = now + CHECK_INTERVAL_S
        for name, what, identity in self._opened:
            try:
                stat = os.stat(name)
            except (FileNotFoundError, NotADirectoryError):
                detail = f"{what} {name!r} is gone" if what else "nothing is at that path now"
            except OSError:
                continue
            else:
                if (stat.st_dev, stat.st_ino) == identity:
                    continue
                detail = f"{what} {name!r} is another file" if what else "another file is there"
            return (
                f"the database file {self.path!r} was deleted or replaced while open "
                f"({detail.strip()}); writes would go to a file no other process sees, so "
                f"this storage refuses every call: restart the worker"
            )
        return None

    def free_bytes(self) -> int | None:
        """Bytes free for this process on the database's volume, or ``None`` if unknown."""
        try:
            stat = os.statvfs(os.path.dirname(os.path.realpath(self.path)) or ".")
        except OSError:
            return None
        return stat.f_bavail * stat.f_frsize
