"""Redis storage for Reflow (redis-py asyncio): many workers, many machines.

Install with ``pip install reflow-redis`` and open with a URL::

    storage = open_storage("redis://127.0.0.1:6379/0?reflow_prefix=orders")

The adapter registers itself through the ``reflow`` entry-point group (``plugin``);
``RedisStorage`` is imported lazily so discovering adapters does not import redis-py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from reflow_redis.storage import RedisStorage

__all__ = ["CONTRACT_VERSION", "RedisStorage"]

CONTRACT_VERSION = "2.1"
"""The storage contract this package implements (``reflow_core.CONTRACT_VERSION``)."""


def __getattr__(name: str) -> Any:
    if name == "RedisStorage":
        from reflow_redis.storage import RedisStorage

        return RedisStorage
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
