"""Bookkeeping for a run this engine is executing, and the services execution needs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from reflow_core.context import CancelSignal
from reflow_core.errors import ControlFlow
from reflow_core.lease import LeaseOptions
from reflow_core.observers import Observers
from reflow_core.storage import Clock, StorageAdapter

__all__ = ["ActiveRun", "Runtime"]


@dataclass(slots=True)
class ActiveRun:
    """A run held by this engine: its lease, its task, and how to stop it."""

    run_id: str
    workflow: str
    lease_id: str
    last_renewed: int
    task: asyncio.Task[None] | None = None
    abort_reason: ControlFlow | None = None
    signals: set[CancelSignal] = field(default_factory=set)

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


@dataclass(slots=True)
class Runtime:
    """What run execution needs from its engine (and nothing more)."""

    storage: StorageAdapter
    clock: Clock
    observers: Observers
    threads: ThreadPoolExecutor
    lease: LeaseOptions
    note_wake: Callable[[int], None]
    """Tell the dispatcher a run of this engine becomes claimable at this time (ms)."""
    run_finished: Callable[[str], None]
    """Tell waiters that a run reached a terminal status or suspended."""
