"""MySQL/MariaDB test fixtures: skip without a server, fail without one when servers are required.

``REFLOW_TEST_MYSQL_URL`` names the server (e.g. ``mysql://root@127.0.0.1:3306/test``).
Without it the tests skip; with ``REFLOW_REQUIRE_SERVERS=1`` (CI) a missing URL, an
unreachable server or a missing ``reflow-mysql`` package fails them instead, so a
misconfigured CI job cannot pass by skipping everything. Mirrors
``tests/postgres_fixtures.py``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import uuid
from collections.abc import Iterator

import pytest

__all__ = ["REQUIRE_ENV", "URL_ENV", "drop_store", "mysql_url", "require_package", "store_url"]

URL_ENV = "REFLOW_TEST_MYSQL_URL"
REQUIRE_ENV = "REFLOW_REQUIRE_SERVERS"


def _skip_or_fail(message: str) -> None:
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def require_package() -> None:
    """Skip (fail when servers are required) unless ``reflow-mysql`` is installed."""
    if importlib.util.find_spec("reflow_mysql") is None:
        _skip_or_fail(
            "reflow-mysql is not installed: pip install ./packages/reflow-mysql "
            "(non-editable, as a user would)"
        )


def mysql_url() -> str:
    """The test server's URL after a connection check; skips or fails as described above."""
    require_package()
    url = os.environ.get(URL_ENV)
    if not url:
        _skip_or_fail(f"set {URL_ENV} (e.g. mysql://root@127.0.0.1:3306/test) to run MySQL tests")
        raise AssertionError("unreachable")  # pragma: no cover - skip/fail raise
    from reflow_mysql import MySQLStorage

    from reflow_core.errors import StorageError

    async def probe() -> None:
        storage = MySQLStorage(url, max_size=1)
        try:
            await storage.open_without_migrating()
        finally:
            await storage.close()

    try:
        asyncio.run(probe())
    except StorageError as exc:
        _skip_or_fail(f"MySQL from {URL_ENV} is unreachable: {exc}")
    return url


def drop_store(url: str) -> None:
    """Drop every table of the store ``url`` names (its prefix)."""
    from reflow_mysql import MySQLStorage

    async def drop() -> None:
        storage = MySQLStorage(url, max_size=1)
        try:
            await storage.open_without_migrating()
            await storage.drop_tables()
        finally:
            await storage.close()

    asyncio.run(drop())


def store_url(base_url: str) -> Iterator[str]:
    """A URL of a fresh store (a unique table prefix) in the server's database; its
    tables are dropped afterwards. Use from a fixture: ``yield from store_url(url)``."""
    from reflow_mysql import MySQLStorage

    url = MySQLStorage(base_url, prefix=f"rt{uuid.uuid4().hex[:12]}_").url
    assert url is not None
    try:
        yield url
    finally:
        drop_store(url)
