"""The LISTEN side of work notifications: one dedicated connection per listener.

Writers send ``pg_notify(channel, '')`` inside the transaction that made a run
claimable (see ``queries.sql``), so a notification means "committed work may be
waiting". The listener cannot use a pooled connection: LISTEN belongs to a session,
and the session must stay idle in ``notifies()`` rather than be lent out.

Connection loss is normal (restarts, failovers, idle-killing proxies): the loop logs a
warning and reconnects at once when the lost connection had been listening (work
announced meanwhile must not wait), then with bounded exponential backoff while
connecting fails; it calls ``on_work`` once after reconnecting because notifications
sent while disconnected are lost. A silent network
loss is caught by probing the connection after ``probe_after_s`` without traffic.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import AsyncConnection, sql

__all__ = ["listen"]

logger = logging.getLogger("reflow.postgres")


async def listen(
    conninfo: str,
    channel: str,
    on_work: Callable[[], None],
    *,
    connections: set[AsyncConnection[Any]],
    stopped: Callable[[], bool],
    probe_after_s: float = 30.0,
    backoff_initial_s: float = 0.1,
    backoff_max_s: float = 10.0,
) -> None:
    """Call ``on_work()`` per notification on ``channel`` until cancelled.

    ``connections`` is the owner's registry of live listener connections, so that it can
    close them on shutdown; once ``stopped()`` is true, a lost connection ends the loop
    instead of being retried.
    """
    delay = backoff_initial_s
    connected_before = False
    while not stopped():
        conn: AsyncConnection[Any] | None = None
        listening = False
        try:
            conn = await AsyncConnection.connect(conninfo, autocommit=True)
            connections.add(conn)
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
            if connected_before:
                logger.info("reflow.postgres: listener on %s reconnected", channel)
                on_work()  # whatever was notified while we were away
            connected_before = listening = True
            delay = backoff_initial_s
            while True:
                async for _ in conn.notifies(timeout=probe_after_s):
                    on_work()
                # Quiet for a while: prove the connection still works (raises if not).
                await conn.execute("SELECT 1")
        except (psycopg.Error, OSError) as exc:
            if stopped():
                return  # the owner closed our connection: shutting down, not a failure
            logger.warning(
                "reflow.postgres: listener on %s lost its connection (%s); retrying in %.1fs",
                channel,
                exc,
                0.0 if listening else delay,
            )
        finally:
            if conn is not None:
                connections.discard(conn)
                await conn.close()
        if listening:
            continue  # it was up: a terminated backend or a restart; reconnect at once
        await asyncio.sleep(delay)
        delay = min(delay * 2, backoff_max_s)
