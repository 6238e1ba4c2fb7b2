"""Bookkeeping for a run this engine is executing, and the services execution needs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import msgspec

from reflow_core.context import CancelSignal
from reflow_core.errors import ControlFlow, LeaseExpiredError, RunCancelledError
from reflow_core.lease import LeaseOptions
from reflow_core.observers import Observers
from reflow_core.storage import Clock, StorageAdapter

__all__ = ["FENCED", "ActiveRun", "FenceTimers", "Runtime"]

FENCED = "no heartbeat was confirmed within the lease; stopped before it could expire"
"""Why a run whose lease fence passed was stopped."""


def _running_loop_time() -> float:
    """The running loop's time: the fence clock of a run not armed yet."""
    return asyncio.get_running_loop().time()


class ActiveRun(msgspec.Struct, eq=False):
    """A run held by this engine: its lease, its fence, its task, and how to stop it.

    ``deadline`` is on the event loop's monotonic clock: past it the lease is not
    trusted, whatever storage would say, and the run is aborted by a timer without
    waiting for any answer from storage (see :mod:`reflow_core.lease`).

    A Struct (compared and hashed by identity, like the dataclass it was): one is built
    for every claim, and a Struct is built in C, a dataclass by a Python ``__init__``.
    """

    run_id: str
    workflow: str
    lease_id: str
    attempt: int
    """The run's stored claim counter under this lease: a later claim of the same run
    may take over this execution only if it is exactly one more (nobody in between)."""
    deadline: float
    task: asyncio.Task[None] | None = None
    abort_reason: ControlFlow | None = None
    signals: set[CancelSignal] = msgspec.field(default_factory=set)
    thread: asyncio.Future[Any] | None = None
    """A ``def`` step's thread while it runs: it cannot be interrupted, so the lease is
    kept (and heartbeated) until it returns, even when the engine stops."""
    beat: asyncio.Task[None] | None = None
    """The heartbeat call in flight, if any (never more than one per run)."""
    fences: FenceTimers | None = None
    """The timers this run's fence joins (the dispatcher's, shared by all its runs); a
    run given none gets timers of its own at :meth:`arm`."""
    _fenced_at: float | None = None
    """The deadline this run's fence is armed at (``None``: not armed)."""
    clock: Callable[[], float] = _running_loop_time
    """The loop's clock, read before every write (see :meth:`fenced`): the running
    loop's ``time`` until :meth:`arm` keeps the loop's own clock function here."""

    def arm(self) -> None:
        """Start the fence timer (on the running loop) at :attr:`deadline`."""
        fences = self.fences
        if fences is None:
            fences = self.fences = FenceTimers()
        if self._fenced_at is not None:
            fences.leave(self, self._fenced_at)
        self.clock = fences.join(self, self.deadline)
        self._fenced_at = self.deadline

    def renewed(self, sent_at: float, fence_after: float) -> None:
        """The store confirmed a renewal sent at ``sent_at`` (loop time): move the fence."""
        deadline = sent_at + fence_after
        if deadline > self.deadline and self.wants_lease():
            self.deadline = deadline
            self.arm()

    def engine_cancelled(self) -> bool:
        """Whether a ``CancelledError`` in the current task is the engine's own (abort,
        stop, timeout) rather than one user code raised or leaked (awaiting a task
        something else cancelled)."""
        task = asyncio.current_task()
        return self.abort_reason is not None or (task is not None and task.cancelling() > 0)

    def wants_lease(self) -> bool:
        """Whether the lease is still worth renewing: the run executes, or the engine
        stopped it while a ``def`` step still runs in its thread (the lease is kept until
        that returns). Not after the lease was lost or the run cancelled."""
        return not isinstance(self.abort_reason, (LeaseExpiredError, RunCancelledError))

    def fenced(self) -> bool:
        """True once the local deadline passed: write nothing more for this run."""
        # Read on every write: the clock is kept from arm() rather than looked up each time.
        return self.clock() >= self.deadline

    def guard(self) -> None:
        """Raise :class:`LeaseExpiredError` if the lease fence has passed: no write may be
        sent, and no step started, once this worker cannot be sure it still holds the run.
        """
        if self.fenced():
            raise LeaseExpiredError(self.run_id, FENCED)

    def fence_expired(self) -> None:
        """The fence timer fired: abort the run (called by :class:`FenceTimers`)."""
        self._fenced_at = None
        self.abort(LeaseExpiredError(self.run_id, FENCED))

    def disarm(self) -> None:
        """Stop the fence timer (the run's execution has ended)."""
        if self._fenced_at is not None and self.fences is not None:
            self.fences.leave(self, self._fenced_at)
            self._fenced_at = None

    def abort(self, reason: ControlFlow) -> None:
        """Stop executing the run for ``reason``: signal steps and cancel the run's task.

        Only the first reason counts, so a late heartbeat failure cannot turn a
        cancellation into a lease loss.
        """
        if self.abort_reason is not None:
            return
        self.abort_reason = reason
        for signal in self.signals:
            signal.set(reason)
        if self.task is not None and not self.task.done():
            self.task.cancel()

    async def settled(self) -> None:
        """Wait until this execution's task has ended and no step of it runs in a thread."""
        task = self.task
        if task is not None and not task.done() and task is not asyncio.current_task():
            await asyncio.wait([task])
        await self.thread_settled()

    async def thread_settled(self) -> None:
        """Wait until no ``def`` step of this run is running in a thread."""
        thread = self.thread
        if thread is not None and not thread.done():
            await asyncio.wait([thread])


class FenceTimers:
    """The fence timers of the runs one dispatcher holds: one loop timer per deadline,
    shared by every run fenced at it.

    Runs claimed in one batch share their deadline (it counts from the moment the batch
    was sent), so they share one timer: a loop timer costs a heap push, a cancel and a
    later heap pop, a measurable part of a short run. The timer is cancelled once its
    last run leaves; when it fires, it aborts every run still fenced at it.
    """

    __slots__ = ("_groups", "_loop", "clock")

    def __init__(self) -> None:
        self._groups: dict[float, tuple[asyncio.TimerHandle, dict[ActiveRun, None]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.clock: Callable[[], float] = time.monotonic
        """The loop's clock (known once the first run joined)."""

    def join(self, run: ActiveRun, deadline: float) -> Callable[[], float]:
        """Fence ``run`` at ``deadline`` (loop time); return the loop's clock."""
        group = self._groups.get(deadline)
        if group is not None:
            group[1][run] = None
            return self.clock
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # the first timer, or the engine runs on another loop now
            self._loop = loop
            # asyncio's own loops tell time by time.monotonic: call it without the method.
            plain = type(loop).time is asyncio.BaseEventLoop.time
            self.clock = time.monotonic if plain else loop.time
        timer = loop.call_at(deadline, self._expired, deadline)
        self._groups[deadline] = (timer, {run: None})
        return self.clock

    def leave(self, run: ActiveRun, deadline: float) -> None:
        """Unfence ``run`` from ``deadline``; the timer goes when no run is left on it."""
        group = self._groups.get(deadline)
        if group is None:
            return
        members = group[1]
        members.pop(run, None)
        if not members:
            group[0].cancel()
            del self._groups[deadline]

    def _expired(self, deadline: float) -> None:
        group = self._groups.pop(deadline, None)
        if group is not None:
            for run in list(group[1]):
                run.fence_expired()


@dataclass(slots=True)
class Runtime:
    """What run execution needs from its engine (and nothing more)."""

    storage: StorageAdapter
    clock: Clock
    observers: Observers
    threads: ThreadPoolExecutor
    lease: LeaseOptions
    note_wake: Callable[[int], None]
    """Tell the dispatcher a run of this engine becomes claimable in this many ms."""
    run_finished: Callable[[str], None]
    """Tell waiters that a run reached a terminal status or suspended."""
