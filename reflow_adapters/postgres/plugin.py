"""Registers :class:`PostgresStorage` through the ``reflow`` entry-point group.

This module is named in ``pyproject.toml`` exactly as a third-party adapter's would be;
importing it does no I/O and does not import psycopg (the factories do, lazily), so a
missing ``postgres`` extra is reported when the adapter is used, not at discovery.
"""

from __future__ import annotations

import atexit
import os
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from reflow_core.errors import ConfigError
from reflow_core.hookspecs import hookimpl
from reflow_core.registry import AdapterOption, AdapterSpec, Capability
from reflow_core.storage import Clock, StorageAdapter

__all__ = ["create", "create_for_conformance", "reflow_adapters"]

TEST_DSN_ENV = "REFLOW_TEST_POSTGRES_DSN"


def _storage_class() -> Any:
    try:
        from reflow_adapters.postgres.storage import PostgresStorage
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError(
            f"the postgres adapter needs psycopg: pip install 'reflow[postgres]' ({exc})"
        ) from exc
    return PostgresStorage


def create(url: str | None = None, **options: Any) -> StorageAdapter:
    """``postgresql://...`` URL (``reflow_schema`` query parameter optional) or ``dsn=``."""
    dsn = url or options.pop("dsn", None)
    if not dsn:
        raise ConfigError(
            "the postgres adapter needs a DSN: open_storage('postgresql://user@host/db') "
            "or open_storage('postgres', dsn='...')"
        )
    storage: StorageAdapter = _storage_class()(dsn, **options)
    return storage


def create_for_conformance(
    tmp_path: Path, options: Mapping[str, str], *, clock: Clock | None = None
) -> Iterator[StorageAdapter]:
    """A fresh, empty store in a schema of its own, dropped after the case.

    A generator factory: the kit runs the code after ``yield`` once the case has closed
    every handle, so a server-backed run leaves no schema behind (the ``atexit`` drop
    stays as a safety net for a killed run). ``clock`` (the kit's) overrides the server's
    "now" in every statement, so the kit can move time by hand. Not dropped on
    ``close()``: the kit's durability cases close a store and reopen its URL, expecting
    the data to be there.
    """
    dsn = options.get("dsn") or os.environ.get(TEST_DSN_ENV)
    if not dsn:
        raise ConfigError(
            "the postgres conformance run needs a server: pass --reflow-option dsn=... "
            f"or set {TEST_DSN_ENV}"
        )
    schema = f"reflow_test_{uuid.uuid4().hex[:12]}"
    storage: StorageAdapter = _storage_class()(dsn, schema=schema, clock=clock)
    if not _test_schemas:
        atexit.register(_drop_test_schemas)
    made = (storage.url or dsn, schema)
    _test_schemas.append(made)
    yield storage
    _drop_schema(*made)
    _test_schemas.remove(made)


_test_schemas: list[tuple[str, str]] = []


def _drop_schema(url: str, schema: str) -> None:
    """Drop one conformance schema (best effort: a failure leaves it for the atexit pass)."""
    import psycopg
    from psycopg import sql

    from reflow_adapters.postgres.conninfo import split_dsn

    try:
        with psycopg.connect(split_dsn(url)[0], autocommit=True, connect_timeout=5) as conn:
            drop = sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE")
            conn.execute(drop.format(sql.Identifier(schema)))
    except psycopg.Error:
        pass


def _drop_test_schemas() -> None:
    """Drop the conformance schemas this process made and did not drop yet."""
    for url, schema in list(_test_schemas):
        _drop_schema(url, schema)
    _test_schemas.clear()


@hookimpl
def reflow_adapters() -> list[AdapterSpec]:
    """The PostgreSQL adapter."""
    return [
        AdapterSpec(
            name="postgres",
            factory=create,
            schemes=("postgresql", "postgres"),
            capabilities=frozenset(
                {
                    Capability.DURABLE,
                    Capability.CROSS_PROCESS,
                    Capability.THREADS,
                    Capability.NOTIFY,
                }
            ),
            conformance_factory=create_for_conformance,
            options=(
                AdapterOption(
                    name="dsn",
                    meaning="the server to test against; each case gets a schema of its own",
                    default=f"${TEST_DSN_ENV}",
                ),
            ),
            description="PostgreSQL via psycopg 3: many workers on many machines, LISTEN/NOTIFY",
        )
    ]
