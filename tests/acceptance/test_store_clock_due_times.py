"""Sleep wake-ups, wait timeouts, retry times and schedule due times follow the store's
clock (the lease authority), with an engine whose own clock is an hour off the store's.

Every other engine test shares one clock between the engine and the store, so a due
time computed from the engine's clock instead of the store's passed them all (checked
by mutation: ``now = ex.runtime.clock()`` in ``execution/sleep.py``, ``wait.py`` or
``attempts.py`` survived ``tests/engine``). Here the store's clock (``clock``, injected
into the adapter: a real SQLite file, PostgreSQL's test override of its server time) and
the engine's (``clock`` plus or minus an hour) disagree by far more than any due time,
so a deadline stamped from the wrong one is off by an hour: in the future for an engine
ahead (the run never wakes when due), in the past for one behind (it never suspends).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from flow_support import open_engine
from helpers import FakeClock, run

from reflow_core import Engine, RetryPolicy, RunStatus, StepContext, StepStatus, Workflow

HOUR_MS = 3_600_000
DUE_S = 600
"""Every due time here is ten minutes after the store's "now", far less than the skew."""
IDLE_BOUND_S = 10.0
"""How long one ``run_until_idle`` may take (each does a few storage calls)."""


@pytest.fixture(params=[HOUR_MS, -HOUR_MS], ids=["engine-ahead", "engine-behind"])
def skew_ms(request: pytest.FixtureRequest) -> int:
    """How far the engine's clock is off the store's."""
    offset: int = request.param
    return offset


async def _idle(engine: Engine) -> int:
    # Bounded: a due time judged by the wrong clock can make the engine re-claim and
    # re-suspend a run forever; that must fail here, not hang the suite.
    return await asyncio.wait_for(engine.run_until_idle(), IDLE_BOUND_S)


def _engine_clock(store: FakeClock, skew_ms: int) -> Any:
    return lambda: store() + skew_ms


def _opened(
    storage_factory: Any, workflows: list[Workflow[Any]], clock: FakeClock, skew: int
) -> Any:
    """An engine whose clock is ``skew`` ms off ``clock``, on a fresh store reading
    ``clock`` (``open_engine`` would give both the engine's clock)."""

    def on_store_clock(clock: Any = None) -> Any:
        return storage_factory(clock=store_clock)

    store_clock = clock
    return open_engine(on_store_clock, workflows, _engine_clock(clock, skew))


def test_sleep_wakes_by_the_store_clock(
    storage_factory: Any, clock: FakeClock, skew_ms: int
) -> None:
    """A ten-minute sleep is stored as due ten minutes after the store's now, is not
    resumed a millisecond earlier by the store's clock, and is resumed at that instant,
    whichever way the engine's clock is off."""
    wf: Workflow[Any] = Workflow("napper")
    calls: list[str] = []

    @wf.step
    def before(ctx: StepContext[Any]) -> int:
        calls.append("before")
        return 1

    wf.sleep("nap", f"{DUE_S}s")

    @wf.step
    def after(ctx: StepContext[Any]) -> int:
        calls.append("after")
        return 2

    async def scenario() -> None:
        async with _opened(storage_factory, [wf], clock, skew_ms) as engine:
            start = clock()
            run_ = await engine.enqueue(wf)
            await _idle(engine)
            view = await engine.get_run(run_.id)
            assert view is not None
            assert view.run.status is RunStatus.SLEEPING, "never suspended: wake time in the past"
            assert view.run.wake_at == start + DUE_S * 1000, (
                f"wake time {view.run.wake_at - start:+d} ms from the store's now"
            )
            clock.advance(DUE_S - 0.001)
            assert await _idle(engine) == 0
            assert calls == ["before"]
            clock.advance(0.001)
            assert await _idle(engine) == 1
            done = await engine.get_run(run_.id)
            assert done is not None and done.run.status is RunStatus.COMPLETED

    run(scenario())
    assert calls == ["before", "after"]


def test_wait_timeout_is_due_by_the_store_clock(
    storage_factory: Any, clock: FakeClock, skew_ms: int
) -> None:
    """A wait with a ten-minute timeout stores its deadline ten minutes after the store's
    now, still waits a millisecond before it (an event then still wins), and continues
    with its default at that instant."""
    wf: Workflow[Any] = Workflow("approval")
    seen: list[Any] = []

    @wf.step
    def ask(ctx: StepContext[Any]) -> str:
        return "asked"

    wf.wait_for_event("approved", timeout=f"{DUE_S}s", default="nobody")

    @wf.step
    def act(ctx: StepContext[Any]) -> str:
        seen.append(ctx.prev)
        return "done"

    async def scenario() -> None:
        async with _opened(storage_factory, [wf], clock, skew_ms) as engine:
            start = clock()
            run_ = await engine.enqueue(wf)
            await _idle(engine)
            view = await engine.get_run(run_.id)
            assert view is not None
            assert view.run.status is RunStatus.WAITING, view.run
            [row] = [s for s in view.steps if s.name == "approved"]
            assert row.wake_at == start + DUE_S * 1000, (
                f"deadline {row.wake_at - start if row.wake_at else None} ms from the store's now"
            )
            clock.advance(DUE_S - 0.001)
            await _idle(engine)
            still = await engine.get_run(run_.id)
            assert still is not None and still.run.status is RunStatus.WAITING, still.run
            clock.advance(0.001)
            assert await _idle(engine) == 1
            done = await engine.get_run(run_.id)
            assert done is not None and done.run.status is RunStatus.COMPLETED

    run(scenario())
    assert seen == ["nobody"]


def test_retry_backoff_is_due_by_the_store_clock(
    storage_factory: Any, clock: FakeClock, skew_ms: int
) -> None:
    """A ten-minute retry backoff (spent asleep in storage) is due ten minutes after the
    store's now: the second attempt starts at that instant by the store's clock, not an
    hour early or late."""
    wf: Workflow[Any] = Workflow("patient")
    attempts: list[int] = []

    @wf.step(retry=RetryPolicy(max_attempts=2, backoff="fixed", initial_delay=DUE_S))
    def call_api(ctx: StepContext[Any]) -> str:
        attempts.append(ctx.attempt)
        if ctx.attempt < 2:
            raise ConnectionError("later")
        return "ok"

    async def scenario() -> None:
        async with _opened(storage_factory, [wf], clock, skew_ms) as engine:
            start = clock()
            run_ = await engine.enqueue(wf)
            await _idle(engine)
            view = await engine.get_run(run_.id)
            assert view is not None
            assert view.run.status is RunStatus.SLEEPING, view.run
            [row] = view.steps
            assert row.status is StepStatus.RUNNING
            assert row.wake_at == view.run.wake_at == start + DUE_S * 1000, (
                f"next attempt due {row.wake_at - start if row.wake_at else None} ms "
                "from the store's now"
            )
            clock.advance(DUE_S - 0.001)
            assert await _idle(engine) == 0
            assert attempts == [1]
            clock.advance(0.001)
            assert await _idle(engine) == 1
            done = await engine.get_run(run_.id)
            assert done is not None and done.run.status is RunStatus.COMPLETED

    run(scenario())
    assert attempts == [1, 2]


def test_schedule_fires_by_the_store_clock(
    storage_factory: Any, clock: FakeClock, skew_ms: int
) -> None:
    """A schedule every ten minutes first fires ten minutes after the store's now: no run
    is enqueued a millisecond earlier by the store's clock (an engine an hour ahead would
    think it long due), and exactly one at that instant."""
    wf: Workflow[Any] = Workflow("ticker")

    @wf.step
    def tick(ctx: StepContext[Any]) -> Any:
        return ctx.input

    async def scenario() -> None:
        async with _opened(storage_factory, [wf], clock, skew_ms) as engine:
            start = clock()
            await engine.schedule(wf, {"n": 1}, every=f"{DUE_S}s")
            [stored] = await engine.list_schedules()
            assert stored.next_run_at == start + DUE_S * 1000
            await _idle(engine)
            clock.advance(DUE_S - 0.001)
            await _idle(engine)
            assert await engine.list_runs(limit=10) == [], "fired before it was due"
            clock.advance(0.001)
            await _idle(engine)
            runs = await engine.list_runs(limit=10)
            assert len(runs) == 1 and runs[0].status is RunStatus.COMPLETED, runs

    run(scenario())
