"""``Engine.stop()`` ends even when a background task will not: an adapter's listener
that swallows a cancellation (a driver's read loop can) is cancelled again; one that
never ends is reported and left behind, and ``stop()`` returns."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from helpers import run

from reflow_adapters.memory import MemoryStorage
from reflow_core import Engine, ReflowError, StepContext, Workflow
from reflow_core.storage import WorkNotifier


class StubbornListener(MemoryStorage):
    """A memory store with a listener that swallows ``swallow`` cancellations."""

    def __init__(self, swallow: int) -> None:
        super().__init__()
        self.swallow = swallow
        self.listening = asyncio.Event()
        self.cancellations = 0

    async def listen_for_work(self, on_work: Callable[[], None]) -> None:
        self.listening.set()
        while True:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancellations += 1
                if self.cancellations > self.swallow:
                    raise
                current = asyncio.current_task()
                assert current is not None
                current.uncancel()  # the bug being survived: the cancel is lost


def _workflow() -> Workflow[Any]:
    wf: Workflow[Any] = Workflow("one")

    @wf.step
    async def only(ctx: StepContext[Any]) -> int:
        return 1

    return wf


def test_a_listener_that_swallows_a_cancel_is_cancelled_again() -> None:
    errors: list[BaseException] = []

    async def scenario() -> int:
        storage = StubbornListener(swallow=2)
        assert isinstance(storage, WorkNotifier)
        engine = Engine(storage, [_workflow()], use_plugins=False, on_error=errors.append)
        await engine.start()
        await asyncio.wait_for(storage.listening.wait(), 10)
        await asyncio.wait_for(engine.stop(), 30)
        await storage.close()
        return storage.cancellations

    assert run(scenario()) == 3
    assert errors == []


def test_a_listener_that_never_ends_is_reported_and_stop_returns() -> None:
    errors: list[BaseException] = []

    async def scenario() -> None:
        storage = StubbornListener(swallow=10**9)
        engine = Engine(storage, [_workflow()], use_plugins=False, on_error=errors.append)
        await engine.start()
        await asyncio.wait_for(storage.listening.wait(), 10)
        await asyncio.wait_for(engine.stop(), 60)
        storage.swallow = 0  # let the test's loop shut down
        await storage.close()

    run(scenario())
    assert len(errors) == 1
    assert isinstance(errors[0], ReflowError)
    assert "reflow-notify" in str(errors[0]) and "did not end" in str(errors[0])
