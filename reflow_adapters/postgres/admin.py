"""Schema administration of a PostgreSQL store without migrating it.

The pieces behind :class:`reflow_core.migrations.MigratableStorage`: which migrations a
schema has (catalog reads that create nothing, so a mistyped schema name is not
created) and the script a DBA can apply by hand (``reflow db sql``), equal to what
``initialize()`` runs. The SQL is in ``admin.sql``; the migrations are the numbered
files in ``migrations/``, so a new one is picked up without code changes.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import LiteralString

from psycopg import AsyncConnection, sql
from psycopg.rows import DictRow

from reflow_core.errors import ConfigError
from reflow_core.migrations import PendingMigration, SchemaStatus

from .sql import migrations, parse_queries, queries

__all__ = ["migration_sql", "read_status"]

_PACKAGE = "reflow_adapters.postgres"


@functools.cache
def _admin_queries() -> dict[str, LiteralString]:
    return parse_queries(resources.files(_PACKAGE).joinpath("admin.sql").read_text("utf-8"))


def _pending(current: int) -> tuple[PendingMigration, ...]:
    return tuple(
        PendingMigration(version=m.version, name=m.name)
        for m in migrations()
        if m.version > current
    )


async def read_status(conn: AsyncConnection[DictRow], schema: str) -> SchemaStatus:
    """The status of ``schema``, read on ``conn`` (dict rows) from the catalogs only.

    Driver errors propagate: the adapter's caller translates them.
    """
    available = migrations()
    latest = available[-1].version if available else 0
    location = f"PostgreSQL schema {schema!r}"
    admin = _admin_queries()
    cur = await conn.execute(admin["schema_state"], {"schema": schema})
    state = await cur.fetchone()
    if state is None or not state["schema_found"]:
        return SchemaStatus(
            current=0, latest=latest, pending=_pending(0), exists=False, location=location
        )
    current = 0
    if state["table_found"]:
        query = sql.SQL(admin["current_version"]).format(schema=sql.Identifier(schema))
        cur = await conn.execute(query)
        row = await cur.fetchone()
        current = int(row["version"]) if row is not None else 0
    return SchemaStatus(
        current=current, latest=latest, pending=_pending(current), location=location
    )


def migration_sql(schema: str, from_version: int = 0) -> str:
    """The script ``initialize()`` would run on ``schema`` at ``from_version``: one
    transaction creating the schema and the version table, applying each pending
    migration and recording it. Empty when nothing is pending."""
    if isinstance(from_version, bool) or not isinstance(from_version, int) or from_version < 0:
        raise ConfigError(f"from_version must be an int >= 0, got {from_version!r}")
    todo = [m for m in migrations() if m.version > from_version]
    if not todo:
        return ""
    admin = _admin_queries()
    quoted = f'"{schema}"'  # the adapter allows only lowercase identifiers: no quote inside
    parts = [
        admin["script_begin"].format(schema=quoted),
        queries()["create_schema_version"].rstrip().rstrip(";") + ";",
    ]
    for migration in todo:
        parts.append(f"-- migration {migration.version:04d}_{migration.name}")
        parts.append(migration.sql.strip())
        parts.append(
            admin["script_record_version"].format(version=migration.version, name=migration.name)
        )
    parts.append(admin["script_commit"])
    return "\n\n".join(parts) + "\n"
