"""Helpers for the control-flow engine tests (sleep, wait, parallel, schedules, history)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from reflow_core import (
    Engine,
    EngineEvent,
    RunCompleted,
    RunFailed,
    RunStarted,
    StepCompleted,
    StepSkipped,
    StepStarted,
    Workflow,
)


class Recorder:
    """A hooks object keeping every engine event, in order."""

    def __init__(self) -> None:
        self.events: list[EngineEvent] = []

    def reflow_run_started(self, event: RunStarted) -> None:
        self.events.append(event)

    def reflow_step_started(self, event: StepStarted) -> None:
        self.events.append(event)

    def reflow_step_completed(self, event: StepCompleted) -> None:
        self.events.append(event)

    def reflow_step_skipped(self, event: StepSkipped) -> None:
        self.events.append(event)

    def reflow_run_completed(self, event: RunCompleted) -> None:
        self.events.append(event)

    def reflow_run_failed(self, event: RunFailed) -> None:
        self.events.append(event)

    def steps(self, kind: type[Any]) -> list[str]:
        """Step names of the recorded events of ``kind``, in order."""
        return [e.step for e in self.events if isinstance(e, kind)]


@contextlib.asynccontextmanager
async def open_engine(
    make_storage: Callable[..., Any],
    workflows: Iterable[Workflow[Any]],
    clock: Callable[[], int] | None = None,
    **options: Any,
) -> AsyncIterator[Engine]:
    """An engine on a fresh store (sharing ``clock``); stops it and closes the store after."""
    storage = make_storage(clock=clock)
    engine = Engine(storage, list(workflows), clock=clock, use_plugins=False, **options)
    try:
        yield engine
    finally:
        await engine.stop()
        await storage.close()
