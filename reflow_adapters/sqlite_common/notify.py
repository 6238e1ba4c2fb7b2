"""Cross-process "new work" wake-ups for SQLite: a cheap watch on ``PRAGMA data_version``.

SQLite has no push channel between processes. What it has is ``PRAGMA data_version``: a
number that changes, for one connection, whenever *another* connection commits to the
file. In WAL mode reading it costs a look at the shared-memory WAL index (no disk I/O,
no lock held afterwards), so a thread can read it every few milliseconds for a fraction
of a percent of a core, and an idle worker in another process hears of a commit within
that period instead of at its next poll (the engine's default poll is 1 s).

The watch runs on a thread of its own with a private read-only connection: SQLite calls
block, so they never run on the event loop, and the thread sleeps on an
``threading.Event`` between reads, so stopping it is immediate. When the number changed
it reads ``reflow_work_signal``, a counter that every write which may make a run
claimable bumps in its own transaction (creating a run, releasing or requeueing one,
waking a waiter, putting one to sleep: where the PostgreSQL adapter sends NOTIFY), and
only if that moved does it schedule ``on_work`` on the listener's loop (one
``call_soon_threadsafe``, which wakes the loop only then). Heartbeats, step saves and
completions change the file but not the counter, so they wake no one. The signal may
come from this process's own writer too; the engine then finds nothing and waits again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable

from reflow_adapters.sqlite_common import sql
from reflow_adapters.sqlite_common.driver import Connection, Driver

__all__ = ["DEFAULT_WATCH_MS", "watch_data_version"]

logger = logging.getLogger("reflow.sqlite")

DEFAULT_WATCH_MS = 10
"""How often the watch reads ``data_version``: the added wake-up latency is at most this
(half of it on average). Its cost is one thread wake-up and one pragma per period: an
idle store's process measured 0.93% of a core at 10 ms and 1.08% at 5 ms (0.03% with no
watch) on two cores shared with a load average of 30, where every wake-up costs several
times what it does on a quiet machine (``bench/latency_cross_process.py`` prints the
idle worker's share)."""

_SIGNAL = sql.queries()["work_signal"]

_RETRY_S = 1.0
"""Pause before reopening the watch connection after an error (a locked or vanished
file): the engine's poll still finds work meanwhile."""


def _version(conn: Connection) -> int:
    return int(conn.execute("PRAGMA data_version")[0][0])


def _signal(conn: Connection) -> int:
    return int(conn.execute(_SIGNAL)[0][0])


def _watch(
    driver: Driver,
    path: str,
    period_s: float,
    stop: threading.Event,
    poke: Callable[[], None],
) -> None:
    """The watch thread's body: read, compare, poke, sleep, until ``stop`` is set."""
    reopened = False
    while not stop.is_set():
        conn: Connection | None = None
        try:
            conn = driver.connect(path)
            conn.execute("PRAGMA query_only = ON")
            version, signal = _version(conn), _signal(conn)
            if reopened:
                poke()  # commits while the watch was broken went unseen: look once
            reopened = True
            while not stop.wait(period_s):
                seen = _version(conn)
                if seen == version:
                    continue  # nobody committed: the common case costs one pragma
                version = seen
                moved = _signal(conn)
                if moved != signal:
                    signal = moved
                    poke()
        except Exception as exc:  # keep watching: a wake-up channel must not die quietly
            logger.warning(
                "reflow.sqlite: wake-up watch on %s failed (%s); retrying in %.1fs",
                path,
                exc,
                _RETRY_S,
            )
            stop.wait(_RETRY_S)
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):  # closing a broken connection
                    conn.close()


async def watch_data_version(
    driver: Driver, path: str, on_work: Callable[[], None], *, period_ms: int = DEFAULT_WATCH_MS
) -> None:
    """Call ``on_work`` on this loop whenever another connection committed to ``path``
    (within ``period_ms``), until cancelled; the watch thread ends with it."""
    loop = asyncio.get_running_loop()
    stop = threading.Event()

    def poke() -> None:
        try:
            loop.call_soon_threadsafe(on_work)
        except RuntimeError:  # the loop closed under a watch still winding down
            stop.set()

    thread = threading.Thread(
        target=_watch,
        args=(driver, path, period_ms / 1000, stop, poke),
        name="reflow-sqlite-watch",
        daemon=True,
    )
    thread.start()
    try:
        await loop.create_future()  # until cancelled
    finally:
        stop.set()
        # The thread is between reads (sleeping on stop) or inside one (microseconds).
        await asyncio.shield(asyncio.to_thread(thread.join))
