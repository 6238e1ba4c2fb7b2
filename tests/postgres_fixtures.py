"""PostgreSQL test fixtures: skip without a server, fail without one when servers are required.

``REFLOW_TEST_POSTGRES_DSN`` names the server. Without it the tests skip; with
``REFLOW_REQUIRE_SERVERS=1`` (CI) a missing DSN or an unreachable server fails them
instead, so a misconfigured CI job cannot pass by skipping everything.

Import the fixtures into a test module (``from postgres_fixtures import pg_dsn, ...``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

__all__ = ["DSN_ENV", "REQUIRE_ENV", "drop_schema", "pg_dsn", "pg_schema", "postgres_dsn"]

DSN_ENV = "REFLOW_TEST_POSTGRES_DSN"
REQUIRE_ENV = "REFLOW_REQUIRE_SERVERS"


def postgres_dsn() -> str:
    """The test server's DSN after a connection check; skips or fails as described above."""
    required = os.environ.get(REQUIRE_ENV) == "1"
    dsn = os.environ.get(DSN_ENV)
    if not dsn:
        if required:
            pytest.fail(f"{REQUIRE_ENV}=1 but {DSN_ENV} is not set", pytrace=False)
        pytest.skip(f"set {DSN_ENV} to run PostgreSQL tests")
    try:
        psycopg.connect(dsn, connect_timeout=5).close()
    except psycopg.Error as exc:
        message = f"PostgreSQL from {DSN_ENV} is unreachable: {exc}"
        if required:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return dsn


def drop_schema(dsn: str, schema: str) -> None:
    """Drop a test schema and everything in it."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture(scope="session")
def pg_dsn() -> str:
    """DSN of the test server (checked once per session)."""
    return postgres_dsn()


@pytest.fixture
def pg_schema(pg_dsn: str) -> Iterator[str]:
    """A fresh, unique schema name for one test; the schema is dropped afterwards."""
    schema = f"reflow_t_{uuid.uuid4().hex[:12]}"
    yield schema
    drop_schema(pg_dsn, schema)
