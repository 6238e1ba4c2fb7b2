"""The event stream never holds a run back: a slow or abandoned consumer loses events
(counted and reported), and leaving the stream in any way unsubscribes it.

Each scenario runs a real engine whose runs emit events into a stream nobody drains; on
a stream that paused runs when its buffer was full (the old backpressure), these runs
would stay blocked, still heartbeating, until ``wait_for`` gave up.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import weakref
from typing import Any

import pytest
from flow_support import open_engine
from helpers import run

from reflow_core import (
    Engine,
    EventStream,
    HookError,
    RunCompleted,
    RunStarted,
    RunStatus,
    StepContext,
    StepStarted,
    Workflow,
)

RUNS = 50
EVENTS_PER_RUN = 6  # RunStarted, 2 x (StepStarted, StepCompleted), RunCompleted


def _workflow() -> Workflow[Any]:
    wf: Workflow[Any] = Workflow("streamed")

    @wf.step
    async def first(ctx: StepContext[Any]) -> int:
        return int(ctx.input)

    @wf.step
    async def second(ctx: StepContext[Any]) -> int:
        return int(ctx.prev) + 1

    return wf


class Counter:
    """Hooks see every event before the streams do: counts them, and tells when ``at``
    events have been emitted (so the streams were offered at least ``at - 1``)."""

    def __init__(self, at: int = 3) -> None:
        self.count = 0
        self.at = at
        self.reached = asyncio.Event()

    def _seen(self, event: Any) -> None:
        self.count += 1
        if self.count >= self.at:
            self.reached.set()

    reflow_run_started = _seen
    reflow_step_started = _seen
    reflow_step_completed = _seen
    reflow_run_completed = _seen
    reflow_run_failed = _seen


async def _enqueue(engine: Engine, wf: Workflow[Any]) -> list[str]:
    return [(await engine.enqueue(wf, i)).id for i in range(RUNS)]


async def _all_complete(engine: Engine, ids: list[str]) -> None:
    done = await asyncio.gather(*(engine.wait_for(i, within=10) for i in ids))
    assert [r.status for r in done] == [RunStatus.COMPLETED] * len(ids)
    assert sorted(r.output for r in done) == [i + 1 for i in range(len(ids))]


async def _left(stream: EventStream) -> list[Any]:
    """What a left stream still yields: nothing, since nothing is buffered for it."""
    return [e async for e in stream]


def test_break_after_the_first_event_unsubscribes_and_runs_complete(
    storage_factory: Any,
) -> None:
    wf = _workflow()

    async def scenario() -> None:
        async with open_engine(storage_factory, [wf]) as engine:
            stream = engine.events(buffer=4)
            ids = await _enqueue(engine, wf)
            await engine.start()
            seen = []
            async for event in stream:
                seen.append(event)
                break
            assert isinstance(seen[0], RunStarted)
            await _all_complete(engine, ids)
            assert stream.closed
            assert engine.observers.streams == []
            assert await _left(stream) == []

    run(scenario())


def test_a_consumer_that_never_reads_loses_events_not_runs(
    storage_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    wf = _workflow()
    counter = Counter()
    caplog.set_level(logging.WARNING, logger="reflow.events")

    async def scenario() -> tuple[EventStream, list[Any]]:
        async with open_engine(storage_factory, [wf], hooks=[counter]) as engine:
            stream = engine.events(buffer=1)
            ids = await _enqueue(engine, wf)
            await engine.start()
            await _all_complete(engine, ids)
            await engine.stop(grace=10)  # lets every run emit its last event
            return stream, [e async for e in stream]  # what was buffered, then the end

    stream, received = run(scenario())
    assert counter.count == RUNS * EVENTS_PER_RUN
    assert len(received) == 1
    assert isinstance(received[0], RunStarted)
    assert stream.dropped == counter.count - 1
    assert stream.missed == 0
    # One gap (it never closed): reported once.
    warnings = [r for r in caplog.records if r.name == "reflow.events"]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    assert "dropping events" in warnings[0].getMessage()


def test_gaps_are_counted_where_they_happen_and_reported_once_each(
    storage_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="reflow.events")

    def started(n: int) -> StepStarted:
        return StepStarted(run_id="r", workflow="w", step=f"s{n}")

    async def scenario() -> None:
        async with open_engine(storage_factory, [_workflow()]) as engine:
            stream = engine.events(buffer=2)

            async def emit(n: int) -> None:  # never waits for the consumer
                await asyncio.wait_for(engine.observers.emit(started(n)), 10)

            for n in range(1, 6):  # s1, s2 buffered; s3..s5 lost
                await emit(n)
            assert stream.dropped == 3
            assert (await anext(stream)).step == "s1"
            assert stream.missed == 0
            await emit(6)  # buffered after the gap
            await emit(7)  # lost: a second gap
            assert (await anext(stream)).step == "s2"
            assert stream.missed == 0
            assert (await anext(stream)).step == "s6"
            assert stream.missed == 3
            await emit(8)
            assert (await anext(stream)).step == "s8"
            assert stream.missed == 1
            assert stream.dropped == 4

    run(scenario())
    warnings = [r for r in caplog.records if r.name == "reflow.events"]
    assert len(warnings) == 2


def test_aclose_with_a_full_buffer_frees_the_runs(storage_factory: Any) -> None:
    wf = _workflow()
    counter = Counter(at=3)

    async def scenario() -> None:
        async with open_engine(storage_factory, [wf], hooks=[counter]) as engine:
            stream = engine.events(buffer=1)
            ids = await _enqueue(engine, wf)
            await engine.start()
            await asyncio.wait_for(counter.reached.wait(), 10)  # the buffer is full
            await stream.aclose()
            await _all_complete(engine, ids)
            assert stream.closed
            assert engine.observers.streams == []
            assert await _left(stream) == []

    run(scenario())


def test_async_with_exit_unsubscribes(storage_factory: Any) -> None:
    wf = _workflow()

    async def scenario() -> None:
        async with open_engine(storage_factory, [wf]) as engine:
            ids = await _enqueue(engine, wf)
            async with engine.events(buffer=1) as stream:
                await engine.start()
                assert isinstance(await anext(stream), RunStarted)
            await _all_complete(engine, ids)
            assert engine.observers.streams == []
            assert await _left(stream) == []

    run(scenario())


def test_cancelling_the_consumer_unsubscribes(storage_factory: Any) -> None:
    wf = _workflow()

    async def scenario() -> None:
        async with open_engine(storage_factory, [wf]) as engine:
            stream = engine.events(buffer=1)
            got_one = asyncio.Event()

            async def consume() -> None:
                async for _ in stream:
                    got_one.set()

            consumer = asyncio.create_task(consume())
            ids = await _enqueue(engine, wf)
            await engine.start()
            await asyncio.wait_for(got_one.wait(), 10)
            consumer.cancel()
            with pytest.raises(asyncio.CancelledError):
                await consumer
            await _all_complete(engine, ids)
            assert stream.closed
            assert engine.observers.streams == []
            assert await _left(stream) == []

    run(scenario())


def test_a_garbage_collected_stream_is_unsubscribed(storage_factory: Any) -> None:
    wf = _workflow()
    counter = Counter(at=3)

    async def scenario() -> None:
        async with open_engine(storage_factory, [wf], hooks=[counter]) as engine:
            stream: EventStream | None = engine.events(buffer=1)
            gone = weakref.ref(stream)
            ids = await _enqueue(engine, wf)
            await engine.start()
            await asyncio.wait_for(counter.reached.wait(), 10)  # its buffer is full
            stream = None
            gc.collect()
            assert gone() is None
            await _all_complete(engine, ids)
            assert engine.observers.streams == []

    run(scenario())


def test_stop_ends_every_stream(storage_factory: Any) -> None:
    wf = _workflow()

    async def scenario() -> None:
        async with open_engine(storage_factory, [wf]) as engine:
            idle = engine.events(buffer=1)  # full and never read
            reader = engine.events(buffer=RUNS * EVENTS_PER_RUN)

            async def consume() -> list[Any]:
                return [e async for e in reader]

            consumer = asyncio.create_task(consume())
            ids = await _enqueue(engine, wf)
            await engine.start()
            await _all_complete(engine, ids)
            await asyncio.wait_for(engine.stop(grace=10), 10)
            received = await asyncio.wait_for(consumer, 10)
            assert len(received) == RUNS * EVENTS_PER_RUN
            assert sum(isinstance(e, RunCompleted) for e in received) == RUNS
            leftover = await asyncio.wait_for(_left(idle), 10)
            assert len(leftover) == 1  # what was buffered, then the end
            assert idle.dropped == RUNS * EVENTS_PER_RUN - 1
            late = engine.events()  # after stop: already ended
            assert await asyncio.wait_for(_left(late), 10) == []

    run(scenario())


def test_a_hook_that_never_returns_is_cut_off_and_reported(storage_factory: Any) -> None:
    wf = _workflow()
    errors: list[BaseException] = []
    calls: list[str] = []

    class Stuck:
        async def reflow_step_started(self, event: StepStarted) -> None:
            calls.append(event.step)
            await asyncio.Event().wait()  # never set

    async def scenario() -> RunStatus:
        async with open_engine(
            storage_factory, [wf], hooks=[Stuck()], on_error=errors.append
        ) as engine:
            engine.observers.hook_timeout = 0.05
            run_ = await engine.enqueue(wf, 1)
            await engine.start()
            return (await engine.wait_for(run_.id, within=10)).status

    assert run(scenario()) is RunStatus.COMPLETED
    assert calls == ["first", "second"]
    assert len(errors) == 2
    assert all(isinstance(e, HookError) for e in errors)
    assert all("reflow_step_started hook" in str(e) for e in errors)
    assert all("TimeoutError" in str(e) and "0.05s" in str(e) for e in errors)


def test_a_hook_raising_its_own_timeout_is_reported_as_raised(storage_factory: Any) -> None:
    wf = _workflow()
    errors: list[BaseException] = []

    class Raises:
        async def reflow_run_completed(self, event: RunCompleted) -> None:
            raise TimeoutError("upstream timed out")

    async def scenario() -> None:
        async with open_engine(
            storage_factory, [wf], hooks=[Raises()], on_error=errors.append
        ) as engine:
            run_ = await engine.enqueue(wf, 1)
            await engine.start()
            assert (await engine.wait_for(run_.id, within=10)).status is RunStatus.COMPLETED
            await engine.stop(grace=10)

    run(scenario())
    assert len(errors) == 1
    assert "upstream timed out" in str(errors[0])
