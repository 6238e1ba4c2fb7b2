"""Hot-path shortcuts keep their meaning: one encode per value, events per kind, lazy
cancel events, and ``ctx.steps`` as of the step's start."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from reflow_core import Engine, Workflow, codec
from reflow_core.context import CancelSignal, StepOutputs
from reflow_core.errors import RunCancelledError
from reflow_core.events import RunCompleted, StepCompleted, StepStarted
from reflow_core.observers import Observers


def test_encoded_as_answers_for_that_object_only_until_forgotten() -> None:
    value = {"a": [1, 2]}
    other = {"a": [1, 2]}
    token = codec.encoded_as(value, b"SENTINEL")
    try:
        assert codec.encode(value) == b"SENTINEL"
        assert codec.encode(other) == b'{"a":[1,2]}'
    finally:
        codec.forget(token)
    assert codec.encode(value) == b'{"a":[1,2]}'


def test_observers_want_only_the_kinds_hooked() -> None:
    class OnlyCompleted:
        def reflow_run_completed(self, event: Any) -> None:
            pass

    observers = Observers([OnlyCompleted()], None, None)
    assert observers.wants(RunCompleted)
    assert not observers.wants(StepStarted)
    stream = observers.subscribe(10)
    assert observers.wants(StepStarted)  # a stream takes every kind
    observers.unsubscribe(stream)
    assert not observers.wants(StepStarted)


def test_signal_set_on_the_loop_wakes_a_thread_waiting_first() -> None:
    signal = CancelSignal()
    waiting = threading.Event()
    woke: list[bool] = []

    def waiter() -> None:
        waiting.set()
        woke.append(signal.wait(30))

    thread = threading.Thread(target=waiter)
    thread.start()
    waiting.wait(5)
    assert not signal.is_set
    signal.set(RunCancelledError("r"))
    thread.join(30)
    assert woke == [True]
    assert signal.is_set
    assert signal.wait(0)  # set before the wait: answers at once


def test_steps_view_holds_what_was_recorded_when_made() -> None:
    order: dict[str, int] = {"a": 0}
    view = StepOutputs(order, lambda name: name.upper(), 1)
    order["b"] = 1  # recorded after the view was made
    assert list(view) == ["a"]
    assert len(view) == 1
    assert "b" not in view
    assert view["a"] == "A"
    with pytest.raises(KeyError, match="completed: a"):
        view["b"]


def test_step_outputs_are_stored_and_passed_on_once_encoded() -> None:
    seen: list[Any] = []
    completed: list[Any] = []
    wf = Workflow("hot")

    @wf.step
    async def first(ctx: Any) -> dict[str, Any]:
        return {"n": 1, "$k": [1.5, None]}

    @wf.step
    async def second(ctx: Any) -> list[Any]:
        seen.append((ctx.prev, dict(ctx.steps)))
        return [ctx.prev]

    class Hook:
        def reflow_step_completed(self, event: StepCompleted) -> None:
            completed.append((event.step, event.output))

    async def scenario() -> Any:
        engine = Engine("memory://", [wf], hooks=[Hook()], use_plugins=False)
        try:
            run = await engine.enqueue(wf, None)
            await engine.run_until_idle()
            return await engine.get_run(run.id)
        finally:
            await engine.storage.close()

    view = asyncio.run(scenario())
    assert view is not None
    assert view.run.output == [{"n": 1, "$k": [1.5, None]}]
    assert view.outputs == {"first": {"n": 1, "$k": [1.5, None]}, "second": view.run.output}
    assert seen == [({"n": 1, "$k": [1.5, None]}, {"first": {"n": 1, "$k": [1.5, None]}})]
    assert completed == [("first", {"n": 1, "$k": [1.5, None]}), ("second", view.run.output)]
