"""Cross-process "new work" wake-ups for SQLite: file events, then ``PRAGMA data_version``.

SQLite has no push channel between processes. What it has is ``PRAGMA data_version``: a
number that changes, for one connection, whenever *another* connection commits to the
file. In WAL mode reading it costs a look at the shared-memory WAL index (no disk I/O,
no lock held afterwards). Every commit also writes to the WAL file, so on Linux the watch
blocks on an inotify event for that file (``_WalEvents``) and reads the number only when
something was written: an idle worker uses no CPU for the watch, and hears of a commit
within a millisecond of it. Elsewhere (or without inotify) it reads the number every
``watch_ms``, which costs one thread wake-up per period (0.4-1% of a core at 10 ms on a
loaded two-core machine, most of it the wake-up itself).

The watch runs on a thread of its own with a private read-only connection: SQLite calls
block, so they never run on the event loop, and stopping it sets an ``threading.Event``
and writes to a pipe the thread also waits on, so stopping is immediate. When the number
changed it reads ``reflow_work_signal``, a counter that every write which may make a run
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
import ctypes
import logging
import os
import select
import struct
import sys
import threading
import time
from collections.abc import Callable

from reflow_adapters.sqlite_common import sql
from reflow_adapters.sqlite_common.driver import Connection, Driver

__all__ = ["DEFAULT_WATCH_MS", "watch_data_version"]

logger = logging.getLogger("reflow.sqlite")

DEFAULT_WATCH_MS = 10
"""Where file events are unavailable, how often the watch reads ``data_version`` (the
added wake-up latency is at most this, half of it on average); with them, how often it
reads it from 10 to 100 ms after a write (``_SETTLE_FOR_S``). An idle store's process
measured 0.93% of a core polling at 10 ms on two cores shared with a load average of 30,
and no measurable CPU for the watch with file events (``bench/latency_cross_process.py``
prints the idle worker's share)."""

_SIGNAL = sql.queries()["work_signal"]

_RETRY_S = 1.0
"""Pause before reopening the watch connection after an error (a locked or vanished
file): the engine's poll still finds work meanwhile."""

_SETTLE_FOR_S = 0.1
_FAST_FOR_S = 0.01
"""After a write to the WAL, ``data_version`` is read every millisecond for 10 ms, then
every ``watch_ms`` until 100 ms have passed; then the watch waits for the next write. A
write event comes with a commit's first frame, and the commit becomes visible only once
its writer updated the WAL index (after its fsync, for a ``FULL`` commit); and one batch
of events may hold the writes of several commits, so the looks go on after a change was
seen. While commits keep coming this is about 200 looks a second; idle, none."""

_LOOK_ANYWAY_S = 1.0
"""With file events, ``data_version`` is still read once a second without one."""

# inotify(7): mask bits and the fixed part of struct inotify_event (wd, mask, cookie, len).
_IN_MODIFY = 0x002
_IN_MOVE_SELF = 0x800
_IN_DELETE_SELF = 0x400
_IN_IGNORED = 0x8000
_EVENT = struct.Struct("iIII")


class _WalEvents:
    """inotify on the database's WAL (Linux): readable when any process writes to it.

    Every commit appends frames to the WAL, so an idle watch can block here instead of
    waking every ``watch_ms``: no CPU at all while nothing is written. Elsewhere, or if
    inotify is unavailable (no libc symbol, the per-user watch limit reached), the watch
    falls back to reading ``data_version`` every ``watch_ms``.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._poller = select.poll()
        self._poller.register(fd, select.POLLIN)

    @classmethod
    def open(cls, database: str, wake_fd: int) -> _WalEvents | None:
        """Watch ``database``'s WAL, or ``None`` where that is not possible."""
        if not sys.platform.startswith("linux"):
            return None
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        except (OSError, AttributeError):
            return None
        if fd < 0:
            return None
        wal = os.fsencode(os.path.realpath(database) + "-wal")
        if libc.inotify_add_watch(fd, wal, _IN_MODIFY | _IN_MOVE_SELF | _IN_DELETE_SELF) < 0:
            os.close(fd)
            return None
        events = cls(fd)
        events._poller.register(wake_fd, select.POLLIN)
        return events

    def wait(self, timeout_s: float) -> None:
        """Block until the WAL is written to, the watch is stopped, or ``timeout_s``.

        Raises ``OSError`` if the WAL was deleted or moved: the caller reopens."""
        if not self._poller.poll(timeout_s * 1000):
            return
        while True:
            try:
                data = os.read(self._fd, 4096)
            except BlockingIOError:
                return
            for offset in range(0, len(data), _EVENT.size):
                if len(data) - offset < _EVENT.size:
                    break
                mask = _EVENT.unpack_from(data, offset)[1]
                if mask & (_IN_MOVE_SELF | _IN_DELETE_SELF | _IN_IGNORED):
                    raise OSError("the WAL file was deleted or moved")

    def close(self) -> None:
        """Stop watching."""
        os.close(self._fd)


def _version(conn: Connection) -> int:
    return int(conn.execute("PRAGMA data_version")[0][0])


def _signal(conn: Connection) -> int:
    return int(conn.execute(_SIGNAL)[0][0])


def _look(conn: Connection, version: int, signal: int, poke: Callable[[], None]) -> tuple[int, int]:
    """One look: if another connection committed and the work signal moved, poke."""
    seen = _version(conn)
    if seen == version:
        return version, signal  # nobody committed: the common case costs one pragma
    moved = _signal(conn)
    if moved != signal:
        poke()
    return seen, moved


def _watch(
    driver: Driver,
    path: str,
    period_s: float,
    stop: threading.Event,
    wake_fd: int,
    poke: Callable[[], None],
) -> None:
    """The watch thread's body: wait for a write, compare, poke, until ``stop`` is set."""
    reopened = False
    while not stop.is_set():
        conn: Connection | None = None
        events: _WalEvents | None = None
        try:
            conn = driver.connect(path)
            conn.execute("PRAGMA query_only = ON")
            # Watch first, read second: a commit in between is then seen twice at worst.
            events = _WalEvents.open(path, wake_fd)
            version, signal = _version(conn), _signal(conn)
            if reopened:
                poke()  # commits while the watch was broken went unseen: look once
            reopened = True
            while not stop.is_set():
                if events is None:
                    if stop.wait(period_s):
                        break
                    version, signal = _look(conn, version, signal, poke)
                    continue
                events.wait(_LOOK_ANYWAY_S)
                started = time.monotonic()
                while not stop.is_set():
                    version, signal = _look(conn, version, signal, poke)
                    elapsed = time.monotonic() - started
                    if elapsed >= _SETTLE_FOR_S:
                        break
                    stop.wait(0.001 if elapsed < _FAST_FOR_S else period_s)
        except Exception as exc:  # keep watching: a wake-up channel must not die quietly
            logger.warning(
                "reflow.sqlite: wake-up watch on %s failed (%s); retrying in %.1fs",
                path,
                exc,
                _RETRY_S,
            )
            stop.wait(_RETRY_S)
        finally:
            if events is not None:
                events.close()
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
    wake_r, wake_w = os.pipe()  # wakes a watch blocked on file events when stopping

    def poke() -> None:
        try:
            loop.call_soon_threadsafe(on_work)
        except RuntimeError:  # the loop closed under a watch still winding down
            stop.set()

    thread = threading.Thread(
        target=_watch,
        args=(driver, path, period_ms / 1000, stop, wake_r, poke),
        name="reflow-sqlite-watch",
        daemon=True,
    )
    thread.start()
    try:
        await loop.create_future()  # until cancelled
    finally:
        stop.set()
        os.write(wake_w, b"\0")
        # The thread is between reads (sleeping on stop or the pipe) or inside one.
        try:
            await asyncio.shield(asyncio.to_thread(thread.join))
        finally:
            os.close(wake_r)
            os.close(wake_w)
