"""Lifecycle hooks: direct hook objects and plugins see every event; raising hooks are
reported and never change a run's outcome."""

from __future__ import annotations

from typing import Any

from helpers import run

from reflow_core import (
    Engine,
    HookError,
    RunCompleted,
    RunStarted,
    StepCompleted,
    StepContext,
    StepStarted,
    Workflow,
    hookimpl,
)
from reflow_core.registry import plugin_manager


class Recorder:
    def __init__(self) -> None:
        self.events: list[Any] = []

    def reflow_run_started(self, event: RunStarted) -> None:
        self.events.append(event)

    def reflow_step_started(self, event: StepStarted) -> None:
        self.events.append(event)

    async def reflow_step_completed(self, event: StepCompleted) -> None:
        self.events.append(event)

    def reflow_run_completed(self, event: RunCompleted) -> None:
        self.events.append(event)


class Exploding:
    def reflow_step_completed(self, event: StepCompleted) -> None:
        raise RuntimeError("observer bug")


def _workflow() -> Workflow[Any]:
    wf: Workflow[Any] = Workflow("observed")

    @wf.step
    def one(ctx: StepContext[Any]) -> int:
        return 1

    @wf.step
    async def two(ctx: StepContext[Any]) -> int:
        return int(ctx.prev) + 1

    return wf


def test_hooks_see_every_event_and_errors_are_isolated(storage_factory: Any) -> None:
    recorder = Recorder()
    errors: list[BaseException] = []
    wf = _workflow()

    async def scenario() -> str:
        storage = storage_factory()
        engine = Engine(storage, [wf], hooks=[Exploding(), recorder], on_error=errors.append)
        try:
            run_ = await engine.enqueue(wf)
            await engine.run_until_idle()
            view = await engine.get_run(run_.id)
            assert view is not None
            return view.run.status.value
        finally:
            await engine.stop()
            await storage.close()

    assert run(scenario()) == "completed"
    kinds = [(type(e).__name__, getattr(e, "step", None)) for e in recorder.events]
    assert kinds == [
        ("RunStarted", None),
        ("StepStarted", "one"),
        ("StepCompleted", "one"),
        ("StepStarted", "two"),
        ("StepCompleted", "two"),
        ("RunCompleted", None),
    ]
    assert recorder.events[-1].output == 2
    assert len(errors) == 2
    assert all(isinstance(e, HookError) and "observer bug" in str(e) for e in errors)


def test_plugin_hooks_observe_every_engine(storage_factory: Any) -> None:
    seen: list[str] = []

    class Plugin:
        @hookimpl
        def reflow_run_completed(self, event: RunCompleted) -> None:
            seen.append(event.run_id)

    pm = plugin_manager()
    plugin = Plugin()
    pm.register(plugin, name="test-observer")
    wf = _workflow()

    async def scenario() -> str:
        storage = storage_factory()
        engine = Engine(storage, [wf])
        try:
            run_ = await engine.enqueue(wf)
            await engine.run_until_idle()
            return run_.id
        finally:
            await engine.stop()
            await storage.close()

    try:
        run_id = run(scenario())
    finally:
        pm.unregister(plugin)
    assert seen == [run_id]
