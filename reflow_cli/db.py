"""Opening a store for a command: never migrating unless asked, and errors mapped to
exit codes.

Every command but ``reflow db migrate`` opens its store with ``migrate=False``: the
schema version is read first (creating nothing: no SQLite file, no PostgreSQL schema),
and a store that is missing or not current is refused with the command to run. Only
then are connections opened. ``reflow db migrate`` calls the adapter's
``initialize()``, which is what migrates. An adapter takes part through the optional
:class:`~reflow_core.migrations.MigratableStorage` protocol; one without it has no
schema to manage and is simply initialized.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

from reflow_cli.common import BadConfig, Refused
from reflow_core.errors import AdapterError, ConfigError, ReflowError
from reflow_core.migrations import (
    MigratableStorage,
    SchemaNotCurrentError,
    SchemaStatus,
    open_without_migrating,
)
from reflow_core.registry import open_storage
from reflow_core.storage import StorageAdapter

__all__ = ["opened", "run_command", "schema_of"]

T = TypeVar("T")


@asynccontextmanager
async def opened(url: str, *, migrate: bool = False) -> AsyncIterator[StorageAdapter]:
    """The store at ``url``, ready for the contract methods; closed on exit.

    With ``migrate=False`` (every command but ``db migrate``) the schema is checked and
    never changed: :class:`SchemaNotCurrentError` when it is missing, older or newer.
    """
    storage = open_storage(url)
    try:
        if migrate:
            await storage.initialize()
        else:
            await open_without_migrating(storage)
        yield storage
    finally:
        await storage.close()


def schema_of(storage: StorageAdapter) -> MigratableStorage:
    """The store's schema handle; :class:`Refused` for an adapter without a schema."""
    if not isinstance(storage, MigratableStorage):
        raise Refused(
            f"{type(storage).__name__} has no schema to migrate or inspect "
            "(its adapter does not implement reflow_core.migrations.MigratableStorage)"
        )
    return storage


async def read_status(url: str) -> tuple[SchemaStatus, MigratableStorage]:
    """The schema status of ``url``, read without changing anything."""
    storage = open_storage(url)
    try:
        schema = schema_of(storage)
        return await schema.schema_status(), schema
    finally:
        await storage.close()


def run_command(work: Callable[[], Awaitable[T]]) -> T:
    """Run one command's coroutine; Reflow errors become one line and an exit code.

    2 for configuration (unknown scheme, invalid URL or identifier), 1 for everything
    refused (schema not current, storage unreachable or failing).
    """
    try:
        return asyncio.run(_call(work))
    except SchemaNotCurrentError as exc:
        raise Refused(str(exc)) from exc
    except (AdapterError, ConfigError) as exc:
        raise BadConfig(str(exc)) from exc
    except ReflowError as exc:
        raise Refused(str(exc)) from exc


async def _call(work: Callable[[], Awaitable[T]]) -> T:
    return await work()
