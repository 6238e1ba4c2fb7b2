"""Registers :class:`~reflow_mysql.storage.MySQLStorage` through the ``reflow`` entry-point
group, exactly as any third-party adapter does.

Importing this module does no I/O and does not import the driver (the factories do),
so discovery stays cheap in every process that uses Reflow.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import os
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from reflow_core.errors import ConfigError
from reflow_core.hookspecs import hookimpl
from reflow_core.registry import AdapterOption, AdapterSpec, Capability
from reflow_core.storage import CONTRACT_VERSION as CORE_CONTRACT
from reflow_core.storage import Clock, StorageAdapter
from reflow_mysql import CONTRACT_VERSION

__all__ = [
    "DEFAULT_TEST_URL",
    "TEST_URL_ENV",
    "create",
    "create_for_conformance",
    "reflow_adapters",
]

TEST_URL_ENV = "REFLOW_TEST_MYSQL_URL"
DEFAULT_TEST_URL = "mysql://root@127.0.0.1:3306/test"
"""The conformance kit's server when neither ``--reflow-option url=`` nor the variable is set."""


def _check_contract() -> None:
    # Same major version: the core's contract only adds methods within a major version
    # and this adapter implements every method of the minor it names.
    if CORE_CONTRACT.split(".")[0] != CONTRACT_VERSION.split(".")[0] or tuple(
        int(p) for p in CORE_CONTRACT.split(".")
    ) > tuple(int(p) for p in CONTRACT_VERSION.split(".")):
        raise ConfigError(
            f"reflow-mysql implements storage contract {CONTRACT_VERSION}, but the installed "
            f"reflow asks for {CORE_CONTRACT}; upgrade reflow-mysql"
        )


def create(url: str | None = None, **options: Any) -> StorageAdapter:
    """``mysql://`` / ``mariadb://`` URL, or ``url=`` among the options."""
    _check_contract()
    target = url or options.pop("url", None)
    if not target:
        raise ConfigError(
            "the mysql adapter needs a URL: open_storage('mysql://user@host:3306/db') "
            "or open_storage('mysql', url='mysql://...')"
        )
    from reflow_mysql.storage import MySQLStorage

    storage: StorageAdapter = MySQLStorage(target, **options)
    return storage


def create_for_conformance(
    tmp_path: Path, options: Mapping[str, str], *, clock: Clock | None = None
) -> Iterator[StorageAdapter]:
    """A fresh, empty store under a table prefix of its own, its tables dropped after the
    case (the ``atexit`` pass is a safety net for a run killed half-way).

    ``clock`` (the kit's) replaces the server's "now" in every statement. Tables are not
    dropped on ``close()``: the durability cases close a store and reopen its URL.
    """
    _check_contract()
    from reflow_mysql.storage import MySQLStorage

    url = options.get("url") or os.environ.get(TEST_URL_ENV) or DEFAULT_TEST_URL
    prefix = f"rk{uuid.uuid4().hex[:12]}_"
    storage = MySQLStorage(url, prefix=prefix, clock=clock)
    made = storage.url or url
    if not _test_stores:
        atexit.register(_drop_test_stores)
    _test_stores.append(made)
    yield storage
    _drop_store(made)
    _test_stores.remove(made)


_test_stores: list[str] = []


def _drop_store(url: str) -> None:
    """Drop one conformance store's tables (best effort: failures wait for atexit)."""
    from reflow_core.errors import StorageError
    from reflow_mysql.storage import MySQLStorage

    async def drop() -> None:
        storage = MySQLStorage(url, max_size=1)
        try:
            await storage.open_without_migrating()
            await storage.drop_tables()
        finally:
            await storage.close()

    # A thread of its own: the kit may run teardowns while an event loop is running.
    with concurrent.futures.ThreadPoolExecutor(1) as pool, contextlib.suppress(StorageError):
        pool.submit(asyncio.run, drop()).result()


def _drop_test_stores() -> None:
    for url in list(_test_stores):
        _drop_store(url)
    _test_stores.clear()


@hookimpl
def reflow_adapters() -> list[AdapterSpec]:
    """The MySQL / MariaDB adapter."""
    return [
        AdapterSpec(
            name="mysql",
            factory=create,
            schemes=("mysql", "mariadb"),
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
                    name="url",
                    meaning="the server and database to test against; each case gets a "
                    "table prefix of its own, dropped afterwards",
                    default=f"${TEST_URL_ENV}, else {DEFAULT_TEST_URL}",
                ),
            ),
            description="MySQL 8 / MariaDB 10.6+ via asyncmy: many workers on many machines",
        )
    ]
