"""No command but ``reflow db migrate`` changes a schema.

On PostgreSQL an event trigger aborts any DDL issued by a connection of the store under
test (the adapter names its connections ``reflow:<schema>``), so a command that tried
to create or alter anything would fail, not merely leave traces; the test first proves
the trigger does catch the adapter's own DDL. On SQLite the file must stay byte for byte
as it was, and a mistyped path must not become a new file.
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from cli_stores import invoke, invoke_json, pg_url
from postgres_fixtures import drop_schema, postgres_dsn
from psycopg import sql

ANY_RUN = "7d1c5a3e-0000-4000-8000-000000000000"

EVERY_COMMAND_BUT_MIGRATE = [
    ("runs", "list"),
    ("runs", "show", ANY_RUN),
    ("runs", "explain", ANY_RUN),
    ("runs", "purge", "--older-than", "30d", "--dry-run"),
    ("runs", "purge", "--older-than", "30d"),
    ("runs", "cancel", ANY_RUN),
    ("runs", "resume", ANY_RUN),
    ("runs", "retry", ANY_RUN),
    ("events", "send", ANY_RUN, "approved", "--payload", "1"),
    ("schedules", "list"),
    ("schedules", "delete", "nightly"),
]


def refused_everywhere(url: str, expected: str) -> None:
    for command in EVERY_COMMAND_BUT_MIGRATE:
        result = invoke(*command, "--storage", url)
        assert result.exit_code == 1, (command, result.output)
        assert expected in result.output, (command, result.output)
        assert "reflow db migrate" in result.output or "upgrade" in result.output
    # These two only read the version, and say where the store stands.
    status = invoke_json("db", "status", "--storage", url)
    assert not status["up_to_date"]
    assert invoke("db", "sql", "--storage", url).exit_code == 0


# -- PostgreSQL ---------------------------------------------------------------------------


@pytest.fixture
def guarded_schema() -> Iterator[tuple[str, str]]:
    """A schema name nobody created, and a trigger aborting DDL from its connections."""
    pg_dsn = postgres_dsn()
    schema = f"reflow_typo_{uuid.uuid4().hex[:10]}"
    name = f"reflow_no_ddl_{uuid.uuid4().hex[:10]}"
    body = (
        "BEGIN IF current_setting('application_name') = 'reflow:" + schema + "' THEN "
        "RAISE EXCEPTION 'DDL % issued for schema " + schema + "', tg_tag; END IF; END"
    )
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                "CREATE FUNCTION public.{}() RETURNS event_trigger LANGUAGE plpgsql AS {}"
            ).format(sql.Identifier(name), sql.Literal(body))
        )
        conn.execute(
            sql.SQL("CREATE EVENT TRIGGER {} ON ddl_command_start EXECUTE FUNCTION public.{}()")
            .format(sql.Identifier(name), sql.Identifier(name))
        )  # fmt: skip
    try:
        yield pg_dsn, schema
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP EVENT TRIGGER IF EXISTS {}").format(sql.Identifier(name)))
            conn.execute(
                sql.SQL("DROP FUNCTION IF EXISTS public.{}()").format(sql.Identifier(name))
            )
        drop_schema(pg_dsn, schema)


def schema_exists(dsn: str, schema: str) -> bool:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone()
        return row is not None


@pytest.mark.postgres
def test_no_command_creates_a_mistyped_postgres_schema(guarded_schema: tuple[str, str]) -> None:
    dsn, schema = guarded_schema
    url = pg_url(dsn, schema)
    refused_everywhere(url, f"PostgreSQL schema '{schema}' does not exist")
    assert not schema_exists(dsn, schema)
    # The guard is real: the adapter's own migration is aborted by it.
    blocked = invoke("db", "migrate", "--storage", url)
    assert blocked.exit_code == 1 and "DDL" in blocked.output
    assert not schema_exists(dsn, schema)


@pytest.mark.postgres
def test_an_older_postgres_schema_is_refused_and_left_as_it_was(
    guarded_schema: tuple[str, str],
) -> None:
    dsn, schema = guarded_schema
    url = pg_url(dsn, schema)
    with psycopg.connect(dsn, autocommit=True) as conn:  # version 2, by hand, as an old Reflow
        conn.execute(sql.SQL("SET application_name = 'setup'"))
        script = invoke("db", "sql", "--storage", url, "--from", "0").stdout
        upto2 = script.split("-- migration 0003")[0] + "COMMIT;"
        conn.execute(upto2.encode())
    status = invoke_json("db", "status", "--storage", url)
    assert status["current"] == 2 and status["latest"] > 2
    refused_everywhere(url, "is at schema version 2 but this Reflow needs")
    assert invoke_json("db", "status", "--storage", url)["current"] == 2


# -- SQLite -------------------------------------------------------------------------------


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_no_command_creates_a_mistyped_sqlite_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'typo.db'}"
    refused_everywhere(url, "does not exist")
    assert list(tmp_path.iterdir()) == []


def test_an_older_sqlite_file_is_refused_and_left_byte_for_byte(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    url = f"sqlite:///{path}"
    script = invoke("db", "sql", "--storage", url, "--from", "0").stdout
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.executescript(script.split("-- migration 0003")[0] + "COMMIT;")
    before = _digest(path)
    refused_everywhere(url, "is at schema version 2 but this Reflow needs")
    assert _digest(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.db"]
    migrated = invoke_json("db", "migrate", "--storage", url)
    assert migrated["from"] == 2 and migrated["applied"][0]["version"] == 3
