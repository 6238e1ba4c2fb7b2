"""Steps that raise what is not an ``Exception``: every one ends in a recorded failure.

``SystemExit`` from a library calling ``sys.exit()``, ``KeyboardInterrupt``,
``GeneratorExit``, a ``CancelledError`` the step's own code raised or leaked, and
``ctx.complete()`` inside a ``when=`` predicate: each fails its run with the cause
stored, runs ``on_failure``, and leaves the engine able to execute the next run.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Any

import pytest
from helpers import run

from reflow_core import Engine, RetryPolicy, RunStatus, StepContext, Workflow
from reflow_core.workflow import FailureContext


def _exit(ctx: StepContext[Any]) -> None:
    sys.exit(3)


def _interrupt(ctx: StepContext[Any]) -> None:
    raise KeyboardInterrupt


def _generator_exit(ctx: StepContext[Any]) -> None:
    raise GeneratorExit("closed")


async def _async_exit(ctx: StepContext[Any]) -> None:
    sys.exit("bye")


async def _own_cancel(ctx: StepContext[Any]) -> None:
    raise asyncio.CancelledError


async def _leaked_cancel(ctx: StepContext[Any]) -> None:
    # Awaiting a task that something else cancelled re-raises its CancelledError here.
    other = asyncio.create_task(asyncio.sleep(60))
    other.cancel()
    await other


RAISERS: dict[str, tuple[Callable[..., Any], str]] = {
    "sys.exit in a def step": (_exit, "SystemExit: 3"),
    "KeyboardInterrupt in a def step": (_interrupt, "KeyboardInterrupt"),
    "GeneratorExit in a def step": (_generator_exit, "GeneratorExit: closed"),
    "sys.exit in an async step": (_async_exit, "SystemExit: bye"),
    "its own CancelledError": (_own_cancel, "CancelledError"),
    "a CancelledError it awaited": (_leaked_cancel, "CancelledError"),
}


@pytest.mark.parametrize("kind", list(RAISERS))
def test_a_base_exception_in_a_step_fails_the_run_and_the_engine_goes_on(
    storage_factory: Any, kind: str
) -> None:
    fn, described = RAISERS[kind]
    wf: Workflow[Any] = Workflow("poison")
    handled: list[str] = []
    wf.step(fn, name="boom")

    @wf.on_failure
    def compensate(ctx: FailureContext) -> None:
        handled.append(ctx.error.message)

    good: Workflow[Any] = Workflow("good")

    @good.step
    def fine(ctx: StepContext[Any]) -> str:
        return "fine"

    async def scenario() -> None:
        storage = storage_factory()
        engine = Engine(storage, [wf, good], concurrency=1, use_plugins=False)
        try:
            bad = await engine.enqueue(wf)
            after = await engine.enqueue(good)
            await engine.start()
            failed = await engine.wait_for(bad.id, within=10)
            assert failed.status is RunStatus.FAILED
            assert failed.error is not None
            assert failed.error.code == "STEP_INTERRUPTED"
            assert failed.error.step == "boom"
            assert described in failed.error.message
            assert failed.error.traceback is not None and "boom" in failed.error.traceback
            assert (await engine.wait_for(after.id, within=10)).output == "fine"
        finally:
            await engine.stop()
            await storage.close()

    run(scenario())
    assert len(handled) == 1 and described in handled[0]


def test_complete_inside_a_when_predicate_fails_the_run(storage_factory: Any) -> None:
    wf: Workflow[Any] = Workflow("odd")

    def sneaky(ctx: StepContext[Any]) -> bool:
        ctx.complete("early")

    @wf.step(when=sneaky)
    def guarded(ctx: StepContext[Any]) -> str:
        return "ran"

    async def scenario() -> None:
        storage = storage_factory()
        engine = Engine(storage, [wf], use_plugins=False)
        try:
            run_ = await engine.enqueue(wf)
            await engine.run_until_idle()
            view = await engine.get_run(run_.id)
            assert view is not None and view.run.status is RunStatus.FAILED
            assert view.run.error is not None
            assert "when= predicate" in view.run.error.message
            assert view.run.error.step == "guarded"
        finally:
            await engine.stop()
            await storage.close()

    run(scenario())


def test_system_exit_in_a_when_predicate_fails_the_run(storage_factory: Any) -> None:
    wf: Workflow[Any] = Workflow("exiting")

    @wf.step(when=lambda ctx: sys.exit(2))
    def guarded(ctx: StepContext[Any]) -> str:
        return "ran"

    async def scenario() -> None:
        storage = storage_factory()
        engine = Engine(storage, [wf], use_plugins=False)
        try:
            run_ = await engine.enqueue(wf)
            await engine.run_until_idle()
            done = await engine.wait_for(run_.id, within=10)
            assert done.status is RunStatus.FAILED
            assert done.error is not None and done.error.code == "STEP_INTERRUPTED"
        finally:
            await engine.stop()
            await storage.close()

    run(scenario())


def test_an_interrupting_step_is_never_retried(storage_factory: Any) -> None:
    wf: Workflow[Any] = Workflow("no-retry")
    attempts: list[int] = []

    @wf.step(retry=RetryPolicy(max_attempts=5, backoff="fixed", initial_delay=0.001))
    def exits(ctx: StepContext[Any]) -> None:
        attempts.append(ctx.attempt)
        sys.exit(1)

    async def scenario() -> None:
        storage = storage_factory()
        engine = Engine(storage, [wf], use_plugins=False)
        try:
            run_ = await engine.enqueue(wf)
            await engine.run_until_idle()
            view = await engine.get_run(run_.id)
            assert view is not None and view.run.status is RunStatus.FAILED
            assert [s.attempts for s in view.steps] == [1]
        finally:
            await engine.stop()
            await storage.close()

    run(scenario())
    assert attempts == [1]
