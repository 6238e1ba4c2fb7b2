"""Stores for the operator-command tests: a SQLite file and a PostgreSQL schema, each
prepared through the storage contract (real stores, real clocks), and a CliRunner
helper that parses ``--json`` output back."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from click.testing import CliRunner, Result

from reflow_cli.app import build_cli
from reflow_core import open_storage
from reflow_core.storage import StorageAdapter
from reflow_core.types import RunStatus, WorkflowRun

T = TypeVar("T")

STORES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def pg_url(dsn: str, schema: str) -> str:
    return f"{dsn}{'&' if '?' in dsn else '?'}reflow_schema={schema}"


def make_store_url(kind: str, tmp_path: Path) -> Iterator[str]:
    """A URL for a new, empty store of ``kind``; a PostgreSQL schema is dropped after."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'cli.db'}"
        return
    from postgres_fixtures import drop_schema, postgres_dsn

    dsn = postgres_dsn()
    schema = f"reflow_cli_{uuid.uuid4().hex[:12]}"
    try:
        yield pg_url(dsn, schema)
    finally:
        drop_schema(dsn, schema)


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(build_cli(), list(args), catch_exceptions=False, env=env)


def invoke_json(*args: str) -> Any:
    """Run a command with ``--json``; its exit code must be 0 and its stdout JSON."""
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def with_store(url: str, work: Callable[[StorageAdapter], Awaitable[T]]) -> T:
    """Run ``work`` on the store at ``url`` (created and migrated), then close it."""

    async def go() -> T:
        storage = open_storage(url)
        try:
            await storage.initialize()
            return await work(storage)
        finally:
            await storage.close()

    return asyncio.run(go())


async def new_run(
    storage: StorageAdapter,
    workflow: str = "orders",
    input: Any = None,
    *,
    age_ms: int = 0,
) -> WorkflowRun:
    """A pending run created ``age_ms`` before the store's now."""
    at = await storage.now() - age_ms
    run = WorkflowRun(
        id=str(uuid.uuid4()),
        workflow=workflow,
        input=input,
        status=RunStatus.PENDING,
        created_at=at,
        updated_at=at,
    )
    return (await storage.create_run(run)).run
