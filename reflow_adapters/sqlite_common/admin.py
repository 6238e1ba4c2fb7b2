"""Schema administration of a SQLite store without migrating it.

The pieces behind :class:`reflow_core.migrations.MigratableStorage` for both SQLite
adapters: whether the file exists (so ``connect()`` never creates one), which version a
file is at (read through a separate read-only connection, so a missing file is not
created and an old one is not locked for writing), and the migration script a DBA can
apply by hand. The SQL is in ``admin.sql``; the migrations are the numbered files in
``migrations/``, read when asked, so a new one is picked up without code changes.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
from importlib import resources
from urllib.parse import quote

from reflow_adapters.sqlite_common import migrate, sql
from reflow_adapters.sqlite_common.driver import Driver
from reflow_adapters.sqlite_common.worker import retry_busy, translate
from reflow_core.errors import ConfigError, StorageError
from reflow_core.migrations import PendingMigration, SchemaStatus

_PACKAGE = "reflow_adapters.sqlite_common"

__all__ = ["memory_status", "migrate_file", "migration_sql", "read_status", "require_file"]


@functools.cache
def _admin_queries() -> dict[str, str]:
    text = resources.files(_PACKAGE).joinpath("admin.sql").read_text("utf-8")
    return sql.parse_queries(text)


def _latest() -> int:
    available = sql.migrations()
    return available[-1].version if available else 0


def _pending(current: int) -> tuple[PendingMigration, ...]:
    return tuple(
        PendingMigration(version=m.version, name=m.name)
        for m in sql.migrations()
        if m.version > current
    )


def _location(path: str) -> str:
    return f"SQLite file {path}"


def require_file(path: str, url: str | None) -> None:
    """Refuse to open ``path`` without migrating when no file is there: opening would
    create an empty database, which is never what a mistyped path should do."""
    if os.path.exists(path):
        return
    target = f" --storage '{url}'" if url else ""
    raise StorageError(
        "connect",
        f"{_location(path)} does not exist (no Reflow store there); check the path for a "
        f"typo, or create it with initialize() or: reflow db migrate{target}",
    )


def memory_status() -> SchemaStatus:
    """A private in-memory database: nobody else can see it, so ``connect()`` creates it
    at the latest version and it is always current."""
    latest = _latest()
    return SchemaStatus(
        current=latest, latest=latest, location="SQLite in-memory database"
    )  # fmt: skip


def read_status(path: str) -> SchemaStatus:
    """The schema status of the file at ``path``, read-only (blocking: run in a thread)."""
    latest = _latest()
    if not os.path.exists(path):
        return SchemaStatus(
            current=0, latest=latest, pending=_pending(0), exists=False,
            location=_location(path),
        )  # fmt: skip
    current = _read_version(path)
    return SchemaStatus(
        current=current, latest=latest, pending=_pending(current), location=_location(path)
    )


def _read_version(path: str) -> int:
    queries = _admin_queries()
    # mode=ro: a file removed since the existence check is not re-created, and nothing
    # here can take the write lock.
    uri = f"file:{quote(os.path.abspath(path))}?mode=ro"
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
            if conn.execute(queries["version_table_exists"]).fetchone() is None:
                return 0
            row = conn.execute(queries["current_version"]).fetchone()
            return int(row[0])
    except sqlite3.Error as exc:
        raise StorageError("schema_status", f"{_location(path)}: {exc}") from exc


def migration_sql(from_version: int = 0) -> str:
    """The script ``initialize()`` would run on a file at ``from_version``: one
    ``BEGIN IMMEDIATE`` transaction creating the version table, applying each pending
    migration and recording it. Empty when nothing is pending."""
    if isinstance(from_version, bool) or not isinstance(from_version, int) or from_version < 0:
        raise ConfigError(f"from_version must be an int >= 0, got {from_version!r}")
    todo = [m for m in sql.migrations() if m.version > from_version]
    if not todo:
        return ""
    queries = _admin_queries()
    parts = [queries["script_begin"], _statement(sql.queries()["create_schema_version_table"])]
    for migration in todo:
        parts.append(f"-- migration {migration.version:04d}_{migration.name}")
        parts.append(migration.script.strip())
        parts.append(
            queries["script_record_version"].format(version=migration.version, name=migration.name)
        )
    parts.append(queries["script_commit"])
    return "\n\n".join(parts) + "\n"


def _statement(text: str) -> str:
    return text.rstrip().rstrip(";") + ";"


def migrate_file(driver: Driver, path: str, *, busy_timeout_ms: int, now: int) -> None:
    """Migrate the file at ``path`` on a connection of its own (blocking: run in a thread).

    For ``initialize()`` after ``connect()``: the writer thread runs jobs inside its
    group-commit transaction, where a migration's own ``BEGIN IMMEDIATE`` cannot go. The
    adapter's open connections see the new schema at their next statement (SQLite
    re-prepares on a schema change).
    """
    try:
        conn = driver.connect(path)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            retry_busy(driver, lambda: migrate.migrate(conn, now))
        finally:
            conn.close()
    except BaseException as exc:
        error = translate("initialize", exc, driver)  # keeps exc as the cause
        if error is exc:
            raise
        raise error from exc
