"""Durable sleep on every adapter: suspended without a lease, resumed when due, never
restarted by a reclaim; driven by a fake clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flow_support import Recorder, open_engine
from helpers import FakeClock, run

from reflow_core import (
    ConfigError,
    RunStatus,
    StepCompleted,
    StepContext,
    StepStarted,
    StepStatus,
    Workflow,
)

HOUR_MS = 3_600_000


def _napper(
    calls: list[str], *, duration: Any = "1h", until: datetime | None = None
) -> Workflow[Any]:
    wf: Workflow[Any] = Workflow("napper")

    @wf.step
    def before(ctx: StepContext[Any]) -> int:
        calls.append("before")
        return 7

    if until is None:
        wf.sleep("nap", duration)
    else:
        wf.sleep("nap", until=until)

    @wf.step
    def after(ctx: StepContext[Any]) -> dict[str, Any]:
        calls.append("after")
        return {"prev": ctx.prev, "steps": sorted(ctx.steps)}

    return wf


def test_sleep_suspends_and_resumes_exactly_when_due(
    storage_factory: Any, clock: FakeClock
) -> None:
    calls: list[str] = []
    recorder = Recorder()
    wf = _napper(calls)

    async def scenario() -> None:
        async with open_engine(storage_factory, [wf], clock, hooks=[recorder]) as engine:
            start = clock()
            run_ = await engine.enqueue(wf)
            assert await engine.run_until_idle() == 1
            view = await engine.get_run(run_.id)
            assert view is not None
            assert view.run.status is RunStatus.SLEEPING
            assert view.run.wake_at == start + HOUR_MS
            nap = next(s for s in view.steps if s.name == "nap")
            assert (nap.status, nap.wake_at) == (StepStatus.SLEEPING, start + HOUR_MS)

            clock.advance(3599.999)
            assert await engine.run_until_idle() == 0
            clock.advance(0.001)
            assert await engine.run_until_idle() == 1
            view = await engine.get_run(run_.id)
            assert view is not None
            assert view.run.status is RunStatus.COMPLETED
            # prev passes through the sleep, which is absent from ctx.steps.
            assert view.run.output == {"prev": 7, "steps": ["before"]}
            assert [(s.name, s.status) for s in view.steps] == [
                ("before", StepStatus.COMPLETED),
                ("nap", StepStatus.COMPLETED),
                ("after", StepStatus.COMPLETED),
            ]

    run(scenario())
    assert calls == ["before", "after"]
    assert recorder.steps(StepStarted) == ["before", "nap", "after"]
    naps = [e for e in recorder.events if isinstance(e, StepCompleted) and e.step == "nap"]
    assert [(e.output, e.attempts) for e in naps] == [(None, 0)]


def test_reclaim_never_restarts_the_clock(storage_factory: Any, clock: FakeClock) -> None:
    """An early claim (here: cancel, then resume) finds the stored wake time and sleeps on."""
    calls: list[str] = []
    recorder = Recorder()
    wf = _napper(calls)

    async def scenario() -> None:
        async with open_engine(storage_factory, [wf], clock, hooks=[recorder]) as engine:
            start = clock()
            run_ = await engine.enqueue(wf)
            await engine.run_until_idle()
            clock.advance(1800)
            assert await engine.cancel(run_.id)
            assert await engine.resume(run_.id)
            assert await engine.run_until_idle() == 1  # claimed early, suspended again
            view = await engine.get_run(run_.id)
            assert view is not None
            assert view.run.status is RunStatus.SLEEPING
            assert view.run.wake_at == start + HOUR_MS  # not start + 30 min + 1 h
            clock.advance(1800)
            assert await engine.run_until_idle() == 1
            done = await engine.get_run(run_.id)
            assert done is not None
            assert done.run.status is RunStatus.COMPLETED

    run(scenario())
    assert calls == ["before", "after"]
    assert recorder.steps(StepStarted).count("nap") == 1


@pytest.mark.parametrize(
    "options",
    [
        {"duration": 0},
        {"duration": timedelta(0)},
        {"until": datetime(2000, 1, 1, tzinfo=UTC)},
    ],
)
def test_due_sleep_continues_inline(
    storage_factory: Any, clock: FakeClock, options: dict[str, Any]
) -> None:
    calls: list[str] = []
    wf = _napper(calls, **options)

    async def scenario() -> None:
        async with open_engine(storage_factory, [wf], clock) as engine:
            run_ = await engine.enqueue(wf)
            assert await engine.run_until_idle() == 1
            view = await engine.get_run(run_.id)
            assert view is not None
            assert view.run.status is RunStatus.COMPLETED
            assert view.run.attempt == 1  # never suspended
            assert [s.status for s in view.steps if s.name == "nap"] == [StepStatus.COMPLETED]

    run(scenario())
    assert calls == ["before", "after"]


def test_sleep_until_an_aware_datetime(storage_factory: Any, clock: FakeClock) -> None:
    until = datetime.fromtimestamp(clock() / 1000, tz=UTC) + timedelta(minutes=90, milliseconds=5)
    wf = _napper([], until=until)

    async def scenario() -> None:
        async with open_engine(storage_factory, [wf], clock) as engine:
            run_ = await engine.enqueue(wf)
            await engine.run_until_idle()
            view = await engine.get_run(run_.id)
            assert view is not None
            assert view.run.wake_at == clock() + 90 * 60_000 + 5
            clock.advance(90 * 60 + 0.005)
            assert await engine.run_until_idle() == 1
            done = await engine.get_run(run_.id)
            assert done is not None
            assert done.run.status is RunStatus.COMPLETED

    run(scenario())


def test_cancelled_sleeping_run_is_never_resumed(storage_factory: Any, clock: FakeClock) -> None:
    calls: list[str] = []
    wf = _napper(calls)

    async def scenario() -> None:
        async with open_engine(storage_factory, [wf], clock) as engine:
            run_ = await engine.enqueue(wf)
            await engine.run_until_idle()
            assert await engine.cancel(run_.id) is True
            clock.advance(2 * 3600)
            assert await engine.run_until_idle() == 0
            view = await engine.get_run(run_.id)
            assert view is not None
            assert view.run.status is RunStatus.CANCELLED

    run(scenario())
    assert calls == ["before"]


def test_started_engine_wakes_at_the_wake_time_not_the_next_poll(storage_factory: Any) -> None:
    """Real clock: with a 60 s poll interval only the engine's own wake-up can finish this."""
    wf = _napper([], duration="100ms")

    async def scenario() -> None:
        async with open_engine(storage_factory, [wf], poll_interval=60) as engine:
            await engine.start()
            run_ = await engine.enqueue(wf)
            done = await engine.wait_for(run_.id, within=10)
            assert done.status is RunStatus.COMPLETED
            assert done.attempt == 2  # suspended once, claimed again when due

    run(scenario())


def test_sleep_definition_errors() -> None:
    wf: Workflow[Any] = Workflow("bad")
    with pytest.raises(ConfigError, match="exactly one"):
        wf.sleep("both", "1s", until=datetime(2030, 1, 1, tzinfo=UTC))
    with pytest.raises(ConfigError, match="exactly one"):
        wf.sleep("neither")
    with pytest.raises(ConfigError, match="timezone-aware"):
        wf.sleep("naive", until=datetime(2030, 1, 1))
    with pytest.raises(ConfigError, match="invalid sleep"):
        wf.sleep("soon", "soon")
    assert wf.units == ()
