"""Redis test fixtures: skip without a server or the package, fail instead when required.

``REFLOW_TEST_REDIS_URL`` names the server (e.g. ``redis://127.0.0.1:6379/0``). Without
it the tests skip; with ``REFLOW_REQUIRE_SERVERS=1`` (CI) a missing URL, an unreachable
server or a missing ``reflow-redis`` installation fails them instead, so a misconfigured
CI job cannot pass by skipping everything. Mirrors ``tests/postgres_fixtures.py``.

The package is tested as installed (``pip install ./packages/reflow-redis``), never from
the source tree: that is how its entry point is found.
"""

from __future__ import annotations

import importlib.metadata
import os
import uuid
from collections.abc import Iterator

import pytest

__all__ = ["REQUIRE_ENV", "URL_ENV", "drop_prefix", "redis_prefix", "redis_url", "require_package"]

URL_ENV = "REFLOW_TEST_REDIS_URL"
REQUIRE_ENV = "REFLOW_REQUIRE_SERVERS"


def _skip_or_fail(message: str) -> None:
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but {message}", pytrace=False)
    pytest.skip(message)


def require_package() -> None:
    """Skip (fail when servers are required) unless reflow-redis is installed."""
    try:
        importlib.metadata.distribution("reflow-redis")
    except importlib.metadata.PackageNotFoundError:
        _skip_or_fail("reflow-redis is not installed (pip install ./packages/reflow-redis)")


def redis_url() -> str:
    """The test server's URL after a PING; skips or fails as described above."""
    require_package()
    url = os.environ.get(URL_ENV)
    if not url:
        _skip_or_fail(
            f"{URL_ENV} is not set; set it (e.g. redis://127.0.0.1:6379/0) to run Redis tests"
        )
        raise AssertionError("unreachable")  # pytest.skip raised
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=5)
        try:
            client.ping()
        finally:
            client.close()
    except (redis.RedisError, OSError) as exc:
        _skip_or_fail(f"Redis from {URL_ENV} is unreachable: {exc}")
    return url


def drop_prefix(url: str, prefix: str) -> None:
    """Delete every key of a test prefix."""
    from reflow_redis.plugin import drop_prefix as drop

    drop(url, prefix)


@pytest.fixture(scope="session")
def redis_server_url() -> str:
    """URL of the test server (checked once per session)."""
    return redis_url()


@pytest.fixture
def redis_prefix(redis_server_url: str) -> Iterator[str]:
    """A fresh, unique key prefix for one test; its keys are deleted afterwards."""
    prefix = f"reflow_t_{uuid.uuid4().hex[:12]}"
    yield prefix
    drop_prefix(redis_server_url, prefix)
