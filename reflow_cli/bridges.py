"""Temporary :class:`~reflow_core.migrations.MigratableStorage` for the bundled SQLite
and PostgreSQL adapters, until they implement the protocol themselves.

This is the one module of the application layer that knows adapter internals (the
SQLite file path, the PostgreSQL pool and schema, each adapter's migration files); the
architecture test allows it here only. :func:`migratable` prefers an adapter's own
implementation, so a bridge goes unused, and can be deleted, as soon as its adapter
gains ``connect``, ``schema_status`` and ``migration_sql``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from typing import Any
from urllib.parse import quote

from reflow_core.errors import StorageError
from reflow_core.migrations import MigratableStorage, PendingMigration, SchemaStatus
from reflow_core.storage import StorageAdapter

__all__ = ["migratable"]


def migratable(storage: StorageAdapter) -> MigratableStorage | None:
    """``storage`` itself if it implements the protocol, else a bridge for a bundled
    adapter with a schema, else ``None`` (no schema to manage: initialize as usual)."""
    if isinstance(storage, MigratableStorage):
        return storage
    module = type(storage).__module__
    if module.startswith(("reflow_adapters.sqlite", "reflow_adapters.apsw")):
        path = getattr(storage, "_path", None)
        if isinstance(path, str) and path != ":memory:":
            return _SQLiteBridge(storage, path)
        return None
    if module.startswith("reflow_adapters.postgres"):
        return _PostgresBridge(storage)
    return None


def _pending(available: list[tuple[int, str]], current: int) -> tuple[PendingMigration, ...]:
    return tuple(PendingMigration(version=v, name=n) for v, n in available if v > current)


_SQLITE_NOW_MS = "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)"
"""Epoch milliseconds in SQLite SQL that works back to 3.35 (``unixepoch`` is 3.38+)."""


def _sqlite_version(path: str) -> int:
    """The highest applied migration of the file at ``path``, opened read-only."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{quote(path)}?mode=ro", uri=True)) as conn:
            has_table = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' "
                "AND name = 'reflow_schema_version'"
            ).fetchone()
            if not has_table:
                return 0
            row = conn.execute("SELECT coalesce(max(version), 0) FROM reflow_schema_version")
            return int(row.fetchone()[0])
    except sqlite3.Error as exc:
        raise StorageError("schema_status", f"{path}: {exc}") from exc


class _SQLiteBridge:
    """Reads the version with the standard library's sqlite3 in read-only mode, so a
    missing file is not created and an old one is not locked for writing."""

    def __init__(self, storage: StorageAdapter, path: str) -> None:
        self.storage = storage
        self.url = storage.url
        self.path = path

    @staticmethod
    def _migrations() -> list[tuple[int, str, str]]:
        from reflow_adapters.sqlite_common import sql

        return [(m.version, m.name, m.script) for m in sql.migrations()]

    async def connect(self) -> None:
        # The adapter has no connect-only path yet: initialize() on a current store takes
        # the write lock for an instant and applies nothing (CREATE TABLE IF NOT EXISTS
        # on the version table is a no-op), so the schema is unchanged.
        await self.storage.initialize()

    async def schema_status(self) -> SchemaStatus:
        available = [(v, n) for v, n, _ in self._migrations()]
        latest = available[-1][0] if available else 0
        if not await asyncio.to_thread(os.path.exists, self.path):
            return SchemaStatus(
                current=0, latest=latest, pending=_pending(available, 0), exists=False,
                location=f"SQLite file {self.path}",
            )  # fmt: skip
        current = await asyncio.to_thread(_sqlite_version, self.path)
        return SchemaStatus(
            current=current, latest=latest, pending=_pending(available, current),
            location=f"SQLite file {self.path}",
        )  # fmt: skip

    def migration_sql(self, from_version: int = 0) -> str:
        from reflow_adapters.sqlite_common import sql

        todo = [m for m in self._migrations() if m[0] > from_version]
        if not todo:
            return ""
        parts = [
            "BEGIN IMMEDIATE;",
            sql.queries()["create_schema_version_table"].rstrip().rstrip(";") + ";",
        ]
        for version, name, script in todo:
            parts.append(f"-- migration {version:04d}_{name}")
            parts.append(script.strip())
            parts.append(
                "INSERT INTO reflow_schema_version (version, name, applied_at) "
                f"VALUES ({version}, '{name}', {_SQLITE_NOW_MS});"
            )
        parts.append("COMMIT;")
        return "\n\n".join(parts) + "\n"


class _PostgresBridge:
    """Reads the version through the adapter's own pool (so the DSN, TLS and search
    path are exactly the adapter's) with catalog queries that create nothing."""

    def __init__(self, storage: Any) -> None:
        self.storage = storage
        self.url: str | None = storage.url
        self.schema: str = storage.schema

    @staticmethod
    def _migrations() -> list[tuple[int, str, str]]:
        from reflow_adapters.postgres.sql import migrations

        return [(m.version, m.name, str(m.sql)) for m in migrations()]

    async def connect(self) -> None:
        await self.storage._open_pool()

    async def schema_status(self) -> SchemaStatus:
        from psycopg import sql

        available = [(v, n) for v, n, _ in self._migrations()]
        latest = available[-1][0] if available else 0
        location = f"PostgreSQL schema {self.schema!r}"
        await self.connect()
        async with self.storage._connection("schema_status") as conn:
            cur = await conn.execute(
                "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = %s) AS found",
                (self.schema,),
            )
            row = await cur.fetchone()
            if not row["found"]:
                return SchemaStatus(
                    current=0, latest=latest, pending=_pending(available, 0), exists=False,
                    location=location,
                )  # fmt: skip
            cur = await conn.execute(
                "SELECT to_regclass(%s) IS NOT NULL AS found",
                (f'"{self.schema}".schema_version',),
            )
            row = await cur.fetchone()
            current = 0
            if row["found"]:
                query = sql.SQL("SELECT coalesce(max(version), 0) AS v FROM {}.schema_version")
                cur = await conn.execute(query.format(sql.Identifier(self.schema)))
                row = await cur.fetchone()
                current = int(row["v"])
        return SchemaStatus(
            current=current, latest=latest, pending=_pending(available, current),
            location=location,
        )  # fmt: skip

    def migration_sql(self, from_version: int = 0) -> str:
        from reflow_adapters.postgres.sql import queries

        todo = [m for m in self._migrations() if m[0] > from_version]
        if not todo:
            return ""
        parts = [
            "BEGIN;",
            f'CREATE SCHEMA IF NOT EXISTS "{self.schema}";',
            f'SET LOCAL search_path TO "{self.schema}";',
            str(queries()["create_schema_version"]).rstrip().rstrip(";") + ";",
        ]
        for version, name, script in todo:
            parts.append(f"-- migration {version:04d}_{name}")
            parts.append(script.strip())
            parts.append(
                f"INSERT INTO schema_version (version, name) VALUES ({version}, '{name}');"
            )
        parts.append("COMMIT;")
        return "\n\n".join(parts) + "\n"
