"""The subscribing side of work notifications: Redis pub/sub on one channel per prefix.

Scripts ``PUBLISH <prefix>:work ''`` when they make a run claimable (created, woken,
released, put to sleep). Pub/sub is fire-and-forget: a message sent while the listener
is disconnected is lost, so after every reconnect ``on_work`` is called once. A silent
network loss is caught by pinging after ``probe_after_s`` without a message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError

__all__ = ["listen"]

logger = logging.getLogger("reflow.redis")


async def listen(
    make_client: Callable[[], Any],
    channel: bytes,
    on_work: Callable[[], None],
    *,
    stopped: Callable[[], bool],
    pubsubs: set[Any],
    probe_after_s: float = 30.0,
    backoff_initial_s: float = 0.1,
    backoff_max_s: float = 10.0,
) -> None:
    """Call ``on_work()`` per message on ``channel`` until cancelled or ``stopped()``.

    ``pubsubs`` is the owner's registry of live subscriptions, so that closing the owner
    ends the loop (a closed subscription raises, and ``stopped()`` is then true).
    """
    delay = backoff_initial_s
    connected_before = False
    while not stopped():
        client = make_client()
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        pubsubs.add(pubsub)
        try:
            await pubsub.subscribe(channel)
            if connected_before:
                logger.info("reflow.redis: listener on %r reconnected", channel)
                on_work()  # whatever was published while we were away
            connected_before = True
            delay = backoff_initial_s
            while not stopped():
                message = await pubsub.get_message(timeout=probe_after_s)
                if message is None:
                    await pubsub.ping()  # quiet for a while: prove the connection works
                elif message.get("type") == "message":
                    on_work()
            return
        except Exception as exc:
            if stopped():
                return  # the owner closed our subscription: shutting down, not a failure
            if not isinstance(exc, (RedisError, OSError)):
                raise
            logger.warning(
                "reflow.redis: listener on %r lost its connection (%s); retrying in %.1fs",
                channel,
                exc,
                delay,
            )
        finally:
            pubsubs.discard(pubsub)
            await pubsub.aclose()
            await client.aclose()
        await asyncio.sleep(delay)
        delay = min(delay * 2, backoff_max_s)
