"""Run history and operations: exact keyset paging, resume, the event stream with
backpressure, and cancellation that reaches a run executing in another engine."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from flow_support import open_engine
from helpers import FakeClock, run

from reflow_adapters.sqlite import SQLiteStorage
from reflow_core import (
    ConfigError,
    Engine,
    LeaseOptions,
    RunCancelledError,
    RunStarted,
    RunStatus,
    StepCompleted,
    StepContext,
    StepStarted,
    Workflow,
)
from reflow_core.events import RunInterrupted


def _noop(name: str, *, fail: bool = False) -> Workflow[Any]:
    wf: Workflow[Any] = Workflow(name)

    @wf.step
    def only(ctx: StepContext[Any]) -> None:
        if fail:
            raise RuntimeError("boom")

    return wf


def test_list_runs_pages_exactly_with_ties(storage_factory: Any, clock: FakeClock) -> None:
    alpha, beta = _noop("alpha"), _noop("beta", fail=True)

    async def scenario() -> None:
        async with open_engine(storage_factory, [alpha, beta], clock) as engine:
            for i in range(11):
                if i % 4 == 0:
                    clock.advance(0.001)  # several runs share each created_at millisecond
                await engine.enqueue(alpha if i % 3 else beta, {"i": i})
            await engine.run_until_idle()
            everything = await engine.list_runs(limit=100)
            assert len(everything) == 11
            keys = [(r.created_at, r.id) for r in everything]
            assert keys == sorted(keys, reverse=True)  # newest first, ids break ties

            for status, workflow in [(None, None), (RunStatus.FAILED, None), (None, "alpha")]:
                expected = [
                    r.id
                    for r in everything
                    if (status is None or r.status is status)
                    and (workflow is None or r.workflow == workflow)
                ]
                pages: list[list[str]] = []
                before: tuple[int, str] | None = None
                while True:
                    page = await engine.list_runs(
                        status=status,
                        workflow=workflow,
                        limit=2,
                        before=before[0] if before else None,
                        before_id=before[1] if before else None,
                    )
                    if not page:
                        break
                    pages.append([r.id for r in page])
                    before = (page[-1].created_at, page[-1].id)
                assert [i for p in pages for i in p] == expected
                assert all(len(p) == 2 for p in pages[:-1])

    run(scenario())


def test_list_runs_refuses_bad_filters(storage_factory: Any) -> None:
    async def scenario() -> None:
        async with open_engine(storage_factory, [_noop("a")]) as engine:
            with pytest.raises(ConfigError, match="limit"):
                await engine.list_runs(limit=0)
            with pytest.raises(ConfigError, match="before_id needs before"):
                await engine.list_runs(before_id="x")
            with pytest.raises(ConfigError, match="unknown run status"):
                await engine.list_runs(status="exploded")

    run(scenario())


def test_resume_restarts_at_the_failed_step_keeping_completed_ones(
    storage_factory: Any, clock: FakeClock
) -> None:
    calls: list[str] = []
    wf: Workflow[Any] = Workflow("three")

    @wf.step
    def one(ctx: StepContext[Any]) -> int:
        calls.append("one")
        return 1

    @wf.step
    def two(ctx: StepContext[Any]) -> int:
        calls.append("two")
        if calls.count("two") < 3:
            raise RuntimeError("not yet")
        return int(ctx.prev) + 1

    @wf.step
    def three(ctx: StepContext[Any]) -> int:
        calls.append("three")
        return int(ctx.prev) + 1

    async def scenario() -> None:
        async with open_engine(storage_factory, [wf], clock) as engine:
            run_ = await engine.enqueue(wf)
            await engine.run_until_idle()
            assert await engine.resume(run_.id) is True
            await engine.run_until_idle()  # fails again at two
            failed = await engine.get_run(run_.id)
            assert failed is not None
            assert failed.run.status is RunStatus.FAILED
            assert await engine.resume(run_.id) is True
            await engine.run_until_idle()
            done = await engine.get_run(run_.id)
            assert done is not None
            assert (done.run.status, done.run.output) == (RunStatus.COMPLETED, 3)
            assert await engine.resume(run_.id) is False  # completed runs are not resumable
            assert await engine.resume("missing") is False

    run(scenario())
    assert calls == ["one", "two", "two", "two", "three"]


def _three_steps(calls: list[str]) -> Workflow[Any]:
    wf: Workflow[Any] = Workflow("streamed")
    for name in ("s1", "s2", "s3"):

        def step(ctx: StepContext[Any], name: str = name) -> str:
            calls.append(name)
            return name

        wf.step(step, name=name)
    return wf


def test_stream_ends_cleanly_when_the_engine_stops(storage_factory: Any) -> None:
    """Even with the run blocked on a full buffer, stop() ends the run and the stream."""
    calls: list[str] = []
    wf = _three_steps(calls)

    async def scenario() -> None:
        storage = storage_factory()
        try:
            engine = Engine(storage, [wf], use_plugins=False)
            stream = engine.events(buffer=1)
            await engine.enqueue(wf)
            await engine.start()
            first = await asyncio.wait_for(anext(stream), 10)
            assert isinstance(first, RunStarted)
            await asyncio.wait_for(engine.stop(), 10)
            rest = [e async for e in stream]  # ends: no hang, no error
            # What was buffered before the stop, and the stop's own RunInterrupted.
            assert all(isinstance(e, StepStarted | StepCompleted | RunInterrupted) for e in rest)
            assert len(rest) <= 1
        finally:
            await storage.close()

    run(scenario())


def test_stream_buffer_must_be_positive(storage_factory: Any) -> None:
    async def scenario() -> None:
        async with open_engine(storage_factory, [_noop("a")]) as engine:
            with pytest.raises(ConfigError, match="buffer"):
                engine.events(buffer=0)

    run(scenario())


def test_cancel_reaches_a_run_executing_in_another_engine(tmp_path: Path) -> None:
    """Two engines on one SQLite file: B cancels; A's step stops at A's next heartbeat."""
    started = asyncio.Event()
    stopped = asyncio.Event()
    reasons: list[Any] = []
    wf: Workflow[Any] = Workflow("remote")

    @wf.step
    async def long(ctx: StepContext[Any]) -> str:
        started.set()
        try:
            await ctx.cancel.wait_async()
        finally:
            reasons.append(ctx.cancel.reason)
            stopped.set()
        return "unreachable"

    async def scenario() -> None:
        path = tmp_path / "shared.db"
        lease = LeaseOptions(duration=1, heartbeat_interval=0.05)
        store_a, store_b = SQLiteStorage(path), SQLiteStorage(path)
        a = Engine(store_a, [wf], lease=lease, use_plugins=False)
        b = Engine(store_b, [wf], lease=lease, use_plugins=False)
        try:
            run_ = await b.enqueue(wf)
            await a.start()
            await asyncio.wait_for(started.wait(), 10)
            assert await b.cancel(run_.id) is True
            await asyncio.wait_for(stopped.wait(), 10)
            done = await b.wait_for(run_.id, within=10)
            assert done.status is RunStatus.CANCELLED
            view = await b.get_run(run_.id)
            assert view is not None and view.steps == []
        finally:
            await a.stop()
            await b.stop()
            await store_a.close()
            await store_b.close()

    run(scenario())
    assert len(reasons) == 1
    assert isinstance(reasons[0], RunCancelledError)
