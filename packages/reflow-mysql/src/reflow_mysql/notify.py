"""Work notifications without LISTEN: a tiny append-only signal table, polled.

MySQL and MariaDB have no LISTEN/NOTIFY. Every write that makes a run claimable (or
changes when one becomes due) appends a row to ``{p}work_signals`` in the same
transaction, or right after its single statement committed, so a signal is never seen
before the change it announces. A listener polls the newest ``seq`` (one primary-key
lookup) every ``interval_s`` and calls ``on_work`` when it moved. Appending contends on
nothing but InnoDB's auto-increment counter, unlike bumping one shared row.

The listener also trims old signals now and then, so the table stays a few rows long.
A failed poll (a server restart, a network loss) is retried with bounded exponential
backoff and followed by one ``on_work``, since signals may have been missed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from reflow_core.errors import StorageError

from .connections import Conn, Database, execute

__all__ = ["poll_for_work"]

logger = logging.getLogger("reflow.mysql")

KEEP_SIGNALS = 1000
"""Signals older than the newest by more than this are deleted by listeners."""
TRIM_EVERY = 200
"""Polls between two trims."""


def _trimmer(queries: dict[str, str], below: int) -> Callable[[Conn], Awaitable[None]]:
    async def trim(conn: Conn) -> None:
        await execute(conn, queries["trim_work_signals"], {"below": below})

    return trim


async def poll_for_work(
    db: Database,
    queries: dict[str, str],
    on_work: Callable[[], None],
    *,
    interval_s: float,
    backoff_max_s: float = 10.0,
) -> None:
    """Call ``on_work()`` whenever a new work signal appears, until cancelled."""
    last: int | None = None
    delay = interval_s
    polls = 0
    failed = False

    async def newest(conn: Conn) -> int:
        _, rows = await execute(conn, queries["newest_work_signal"], {})
        value: Any = rows[0]["seq"] if rows else None
        return int(value or 0)

    while True:
        try:
            seq = await db.run("listen_for_work", newest)
            polls += 1
            if polls % TRIM_EVERY == 0 and seq > KEEP_SIGNALS:
                await db.run("listen_for_work", _trimmer(queries, seq - KEEP_SIGNALS))
        except StorageError as exc:
            if db.closed:
                return  # the owner closed the adapter: shutting down, not a failure
            logger.warning(
                "reflow.mysql: polling for work failed (%s); retrying in %.1fs", exc, delay
            )
            failed = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, backoff_max_s)
            continue
        if failed or (last is not None and seq != last):
            on_work()  # after a failure: whatever was signalled meanwhile
        failed = False
        delay = interval_s
        last = seq
        await asyncio.sleep(interval_s)
