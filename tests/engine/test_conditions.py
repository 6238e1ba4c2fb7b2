"""Conditional steps on every adapter: the decision is made once, stored, and replayed."""

from __future__ import annotations

from typing import Any

from flow_support import Recorder, open_engine
from helpers import FakeClock, run

from reflow_core import (
    RunStatus,
    StepContext,
    StepSkipped,
    StepStarted,
    StepStatus,
    Workflow,
)


def _flow(decisions: list[bool], calls: list[str], *, later_fails_once: bool) -> Workflow[Any]:
    """``maybe`` runs when the next queued decision says so; ``later`` may fail once."""
    wf: Workflow[Any] = Workflow("conditional")

    @wf.step
    def first(ctx: StepContext[Any]) -> str:
        calls.append("first")
        return "from-first"

    async def decide(ctx: StepContext[Any]) -> bool:
        calls.append(f"decide(prev={ctx.prev})")
        return decisions.pop(0)

    @wf.step(when=decide)
    def maybe(ctx: StepContext[Any]) -> str:
        calls.append("maybe")
        return "from-maybe"

    @wf.step
    def later(ctx: StepContext[Any]) -> dict[str, Any]:
        calls.append("later")
        if later_fails_once and calls.count("later") == 1:
            raise RuntimeError("transient")
        return {"prev": ctx.prev, "steps": sorted(ctx.steps)}

    return wf


def test_false_predicate_skips_and_passes_prev_through(
    storage_factory: Any, clock: FakeClock
) -> None:
    calls: list[str] = []
    recorder = Recorder()
    wf = _flow([False], calls, later_fails_once=False)

    async def scenario() -> None:
        async with open_engine(storage_factory, [wf], clock, hooks=[recorder]) as engine:
            run_ = await engine.enqueue(wf)
            await engine.run_until_idle()
            view = await engine.get_run(run_.id)
            assert view is not None
            assert view.run.output == {"prev": "from-first", "steps": ["first"]}
            skipped = next(s for s in view.steps if s.name == "maybe")
            assert (skipped.status, skipped.output, skipped.attempts) == (
                StepStatus.SKIPPED,
                None,
                0,
            )

    run(scenario())
    assert calls == ["first", "decide(prev=from-first)", "later"]
    assert recorder.steps(StepSkipped) == ["maybe"]
    assert "maybe" not in recorder.steps(StepStarted)


def test_skip_decision_is_never_reevaluated_on_replay(
    storage_factory: Any, clock: FakeClock
) -> None:
    calls: list[str] = []
    # A second evaluation would say True and run the step: it must never happen.
    wf = _flow([False, True], calls, later_fails_once=True)

    async def scenario() -> None:
        async with open_engine(storage_factory, [wf], clock) as engine:
            run_ = await engine.enqueue(wf)
            await engine.run_until_idle()
            failed = await engine.get_run(run_.id)
            assert failed is not None
            assert failed.run.status is RunStatus.FAILED
            assert await engine.resume(run_.id)
            await engine.run_until_idle()
            done = await engine.get_run(run_.id)
            assert done is not None
            assert done.run.status is RunStatus.COMPLETED
            assert done.run.output == {"prev": "from-first", "steps": ["first"]}

    run(scenario())
    assert calls == ["first", "decide(prev=from-first)", "later", "later"]


def test_run_decision_is_never_reevaluated_on_replay(
    storage_factory: Any, clock: FakeClock
) -> None:
    calls: list[str] = []
    wf = _flow([True, False], calls, later_fails_once=True)

    async def scenario() -> None:
        async with open_engine(storage_factory, [wf], clock) as engine:
            run_ = await engine.enqueue(wf)
            await engine.run_until_idle()
            assert await engine.resume(run_.id)
            await engine.run_until_idle()
            done = await engine.get_run(run_.id)
            assert done is not None
            assert done.run.output == {"prev": "from-maybe", "steps": ["first", "maybe"]}

    run(scenario())
    assert calls == ["first", "decide(prev=from-first)", "maybe", "later", "later"]


def test_predicate_error_fails_the_run_at_that_step(storage_factory: Any, clock: FakeClock) -> None:
    wf: Workflow[Any] = Workflow("broken-predicate")

    def explode(ctx: StepContext[Any]) -> bool:
        raise KeyError("no such field")

    @wf.step(when=explode)
    def guarded(ctx: StepContext[Any]) -> int:
        return 1

    async def scenario() -> None:
        async with open_engine(storage_factory, [wf], clock) as engine:
            run_ = await engine.enqueue(wf)
            await engine.run_until_idle()
            view = await engine.get_run(run_.id)
            assert view is not None
            assert view.run.status is RunStatus.FAILED
            assert view.run.error is not None
            assert view.run.error.step == "guarded"
            assert view.run.error.type == "KeyError"
            assert view.steps == []  # no decision was made, so nothing is recorded

    run(scenario())


def test_predicate_sees_input_prev_and_earlier_steps(
    storage_factory: Any, clock: FakeClock
) -> None:
    seen: list[Any] = []
    wf: Workflow[Any] = Workflow("inputs")

    @wf.step
    def amount(ctx: StepContext[Any]) -> int:
        return int(ctx.input["amount"])

    def large(ctx: StepContext[Any]) -> bool:
        seen.append((ctx.input, ctx.prev, dict(ctx.steps)))
        return bool(ctx.prev > 100)

    @wf.step(when=large)
    def review(ctx: StepContext[Any]) -> str:
        return "reviewed"

    async def scenario() -> None:
        async with open_engine(storage_factory, [wf], clock) as engine:
            small = await engine.enqueue(wf, {"amount": 5})
            big = await engine.enqueue(wf, {"amount": 500})
            await engine.run_until_idle()
            small_view = await engine.get_run(small.id)
            big_view = await engine.get_run(big.id)
            assert small_view is not None and big_view is not None
            assert small_view.run.output == 5
            assert big_view.run.output == "reviewed"

    run(scenario())
    assert sorted(seen, key=lambda s: s[1]) == [
        ({"amount": 5}, 5, {"amount": 5}),
        ({"amount": 500}, 500, {"amount": 500}),
    ]
