"""Connection set-up: pragmas, the SQLite version check and schema migrations.

Migrations are the numbered files in ``migrations/``; ``reflow_schema_version`` records
each one applied. A new database gets ``schema.sql`` in one go (equal, by test, to all
migrations in order). Checking the version and applying what is missing happen in one
``BEGIN IMMEDIATE`` transaction, so processes starting together on one file apply each
migration exactly once: the others wait on the lock and then find nothing to do. SQLite
DDL is transactional, so a migration that fails leaves the schema as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from reflow_adapters.sqlite_common import sql
from reflow_adapters.sqlite_common.driver import Connection, Driver
from reflow_core.errors import ConfigError, StorageError

__all__ = [
    "MIN_SQLITE",
    "SYNCHRONOUS_MODES",
    "WAL_AUTOCHECKPOINT_PAGES",
    "configure",
    "migrate",
    "wal_limits",
]

MIN_SQLITE = (3, 35, 0)
"""Oldest SQLite with everything the queries use (RETURNING, UPDATE ... FROM, UPSERT)."""

SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")

WAL_AUTOCHECKPOINT_PAGES = 1000
"""The most WAL pages the writer lets a commit leave before it checkpoints (SQLite's
default, about 4 MiB): where the volume has room, checkpoints stay as rare as SQLite
makes them, since each one syncs the WAL and the database file."""

MIN_WAL_AUTOCHECKPOINT_PAGES = 16

WAL_SHARE_OF_FREE_SPACE = 8
"""On a volume with little room the WAL may take at most 1/8 of the free space before
it is checkpointed: on a 3 MB volume SQLite's default would let the WAL alone fill it
before its first checkpoint."""


def wal_limits(free_bytes: int, page_size: int) -> tuple[int, int]:
    """``(wal_autocheckpoint, journal_size_limit)`` for a volume with ``free_bytes`` free.

    The autocheckpoint (in pages) is a share of the free space, between 16 pages and
    :data:`WAL_AUTOCHECKPOINT_PAGES`. The size limit (bytes a WAL is cut back to when it
    starts over after a checkpoint) is twice that: a WAL reused in place is never cut and
    regrown, while one that outgrew it (a burst, a long reader holding checkpoints back,
    a full disk) gives its space back.
    """
    share = free_bytes // max(page_size, 512) // WAL_SHARE_OF_FREE_SPACE
    pages = max(MIN_WAL_AUTOCHECKPOINT_PAGES, min(WAL_AUTOCHECKPOINT_PAGES, share))
    return pages, 2 * pages * (page_size + 24)  # each WAL frame has a 24-byte header


def check_synchronous(value: str) -> str:
    """Normalise a ``synchronous`` option; :class:`ConfigError` for an unknown mode."""
    mode = value.upper()
    if mode not in SYNCHRONOUS_MODES:
        raise ConfigError(
            f"synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}, got {value!r}"
        )
    return mode


def check_version(driver: Driver) -> None:
    """Refuse a SQLite library too old for the queries, naming what was found."""
    found = tuple(driver.library_version())
    if found < MIN_SQLITE:
        have = ".".join(map(str, found))
        need = ".".join(map(str, MIN_SQLITE))
        raise StorageError(
            "initialize",
            f"{driver.name} is linked against SQLite {have}; Reflow needs {need} or newer",
        )


def configure(
    conn: Connection,
    *,
    busy_timeout_ms: int,
    synchronous: str,
    wal: bool,
    query_only: bool = False,
    retry: Callable[[Callable[[], Any]], Any] = lambda call: call(),
) -> None:
    """Set the pragmas every connection needs.

    PRAGMA takes no bound parameters, so values are formatted in; both are validated
    (an int, and a member of :data:`SYNCHRONOUS_MODES`) before they get here. ``wal``
    marks the writer's connection; the writer thread then sizes the WAL to the volume
    (:func:`wal_limits`, applied by ``worker.py``).
    """
    # busy_timeout first: the journal-mode change below may have to wait for a lock.
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    if wal:
        # WAL: readers never block the writer and commits append to one file. The mode
        # is stored in the file, so only the writer sets it.
        retry(lambda: conn.execute("PRAGMA journal_mode = WAL"))
    conn.execute(f"PRAGMA synchronous = {check_synchronous(synchronous)}")
    conn.execute("PRAGMA foreign_keys = ON")
    if query_only:
        conn.execute("PRAGMA query_only = ON")


def _run_script(conn: Connection, script: str) -> None:
    for statement in sql.split_statements(script):
        conn.execute(statement)


def migrate(conn: Connection, now: int, *, use_schema: bool = True) -> int:
    """Bring the schema up to date; return the version now in force.

    ``use_schema=False`` applies the migrations one by one even on a new database (the
    migration test compares both paths).
    """
    queries = sql.queries()
    available = sql.migrations()
    latest = available[-1].version if available else 0
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(queries["create_schema_version_table"])
        current = int(conn.execute(queries["schema_version"])[0][0])
        if current > latest:
            raise StorageError(
                "initialize",
                f"the database has schema version {current} but this Reflow knows only up "
                f"to {latest}; upgrade Reflow to use this database",
            )
        if current == 0 and use_schema:
            _run_script(conn, sql.schema())
        else:
            for migration in available[current:]:
                _run_script(conn, migration.script)
        for migration in available[current:]:
            conn.execute(
                queries["record_migration"],
                {"version": migration.version, "name": migration.name, "applied_at": now},
            )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction():
            conn.execute("ROLLBACK")
        raise
    return latest
