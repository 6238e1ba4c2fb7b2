"""Registers :class:`~reflow_redis.storage.RedisStorage` through the ``reflow`` entry-point
group, exactly as any third-party adapter does (the core never imports this package).

Importing this module does no I/O and does not import redis-py.

``durable`` is declared only when ``REFLOW_REDIS_DURABLE=1``: whether Redis keeps what it
acknowledged depends on the server's configuration (AOF with fsync), not on this code,
and a capability is a promise made before any server is seen. Whoever sets the variable
vouches for their server, and the adapter checks the claim: conformance stores are
opened with ``require_durable=True``, so a server without AOF fsync fails every case
with that reason instead of passing durability cases it would not survive.
"""

from __future__ import annotations

import atexit
import os
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from reflow_core import CONTRACT_VERSION as REFLOW_CONTRACT
from reflow_core.errors import ConfigError
from reflow_core.hookspecs import hookimpl
from reflow_core.registry import AdapterOption, AdapterSpec, Capability
from reflow_core.storage import Clock, StorageAdapter

from reflow_redis import CONTRACT_VERSION

__all__ = ["DURABLE_ENV", "TEST_URL_ENV", "create", "create_for_conformance", "reflow_adapters"]

TEST_URL_ENV = "REFLOW_TEST_REDIS_URL"
DURABLE_ENV = "REFLOW_REDIS_DURABLE"
DEFAULT_TEST_URL = "redis://127.0.0.1:6379/0"

if REFLOW_CONTRACT.partition(".")[0] != CONTRACT_VERSION.partition(".")[0]:
    # A major version changes method signatures or guarantees: registering anyway would
    # hand the engine an adapter that breaks the contract it relies on.
    raise ImportError(
        f"reflow-redis implements storage contract {CONTRACT_VERSION}, but the installed "
        f"reflow speaks contract {REFLOW_CONTRACT}; install a matching reflow-redis"
    )


def _storage_class() -> Any:
    try:
        from reflow_redis.storage import RedisStorage
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError(
            f"the redis adapter needs redis-py: pip install 'redis>=5' ({exc})"
        ) from exc
    return RedisStorage


def _durable_declared() -> bool:
    return os.environ.get(DURABLE_ENV) == "1"


def create(url: str | None = None, **options: Any) -> StorageAdapter:
    """``redis://host:port/db?reflow_prefix=NAME`` (or ``rediss://``), or ``url=`` as an option."""
    url = url or options.pop("url", None)
    if not url:
        raise ConfigError(
            "the redis adapter needs a URL: open_storage('redis://127.0.0.1:6379/0') or "
            "open_storage('redis', url='redis://...')"
        )
    storage: StorageAdapter = _storage_class()(url, **options)
    return storage


def create_for_conformance(
    tmp_path: Path, options: Mapping[str, str], *, clock: Clock | None = None
) -> Iterator[StorageAdapter]:
    """A fresh, empty store under a prefix of its own, whose keys are deleted after the case.

    A generator factory: the kit runs the code after ``yield`` once the case has closed
    every handle (an ``atexit`` pass stays as a safety net for a killed run). ``clock``
    (the kit's) overrides the server's "now" in every script. Keys are not deleted on
    ``close()``: the durability cases close a store and reopen its URL.
    """
    url = options.get("url") or os.environ.get(TEST_URL_ENV) or DEFAULT_TEST_URL
    prefix = f"reflow_test_{uuid.uuid4().hex[:12]}"
    storage: StorageAdapter = _storage_class()(
        url, prefix=prefix, clock=clock, require_durable=_durable_declared()
    )
    if not _test_prefixes:
        atexit.register(_drop_test_prefixes)
    made = (url, prefix)
    _test_prefixes.append(made)
    yield storage
    drop_prefix(*made)
    _test_prefixes.remove(made)


_test_prefixes: list[tuple[str, str]] = []


def drop_prefix(url: str, prefix: str) -> None:
    """Delete every key of one prefix (best effort: a failure leaves it for the atexit pass)."""
    import redis

    from reflow_redis.keys import prefix_pattern
    from reflow_redis.url import split_url

    try:
        client = redis.Redis.from_url(split_url(url)[0], socket_connect_timeout=5)
        try:
            batch = []
            for key in client.scan_iter(match=prefix_pattern(prefix), count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    client.unlink(*batch)
                    batch.clear()
            if batch:
                client.unlink(*batch)
        finally:
            client.close()
    except (redis.RedisError, OSError):
        pass


def _drop_test_prefixes() -> None:
    for url, prefix in _test_prefixes:
        drop_prefix(url, prefix)
    _test_prefixes.clear()


@hookimpl
def reflow_adapters() -> list[AdapterSpec]:
    """The Redis adapter."""
    capabilities = {Capability.CROSS_PROCESS, Capability.THREADS, Capability.NOTIFY}
    if _durable_declared():
        capabilities.add(Capability.DURABLE)
    return [
        AdapterSpec(
            name="redis",
            factory=create,
            schemes=("redis", "rediss"),
            capabilities=frozenset(capabilities),
            conformance_factory=create_for_conformance,
            options=(
                AdapterOption(
                    name="url",
                    meaning="the server to test against; each case gets a key prefix of its own",
                    default=f"${TEST_URL_ENV}, else {DEFAULT_TEST_URL}",
                ),
            ),
            description=(
                "Redis via redis-py asyncio: one Lua script per atomic step, server TIME, "
                "pub/sub wake-ups; durable only with AOF fsync "
                f"(declared when {DURABLE_ENV}=1)"
            ),
        )
    ]
