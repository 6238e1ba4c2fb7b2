"""Parallel groups on every adapter: concurrency, per-branch checkpoints, fail-fast, resume.

Synchronisation is by events (barriers between branches, a branch parked on its cancel
signal), never by sleeping.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import msgspec
import pytest
from flow_support import Recorder, open_engine
from helpers import FakeClock, run

from reflow_core import (
    Branch,
    ConfigError,
    LeaseOptions,
    RetryPolicy,
    RunStatus,
    StepCompleted,
    StepContext,
    StepStarted,
    StepStatus,
    Workflow,
)
from reflow_core.types import RunFilter


class Price(msgspec.Struct):
    amount: int


def _rows(view: Any) -> dict[str, StepStatus]:
    return {s.name: s.status for s in view.steps}


def test_branches_run_concurrently_and_merge_by_name(
    storage_factory: Any, clock: FakeClock
) -> None:
    a_running, b_running = asyncio.Event(), asyncio.Event()
    recorder = Recorder()
    seen: list[Any] = []
    wf: Workflow[Any] = Workflow("fan")

    @wf.step
    def start(ctx: StepContext[Any]) -> int:
        return 10

    async def a(ctx: StepContext[Any]) -> int:
        a_running.set()
        await b_running.wait()  # only completes if b runs at the same time
        return int(ctx.prev) + 1

    async def b(ctx: StepContext[Any]) -> Price:
        b_running.set()
        await a_running.wait()
        return Price(amount=int(ctx.prev) * 2)

    wf.parallel("group", {"a": a, "b": b})

    @wf.step
    def join(ctx: StepContext[Any]) -> int:
        seen.extend([ctx.prev, ctx.steps["b"], sorted(ctx.steps)])
        return int(ctx.prev["a"]) + ctx.prev["b"].amount

    async def scenario() -> None:
        async with open_engine(storage_factory, [wf], clock, hooks=[recorder]) as engine:
            run_ = await engine.enqueue(wf)
            await asyncio.wait_for(engine.run_until_idle(), 10)
            view = await engine.get_run(run_.id)
            assert view is not None
            assert view.run.output == 31
            assert _rows(view) == {
                "start": StepStatus.COMPLETED,
                "a": StepStatus.COMPLETED,
                "b": StepStatus.COMPLETED,
                "join": StepStatus.COMPLETED,
            }  # the group itself has no row

    run(scenario())
    assert seen == [
        {"a": 11, "b": Price(amount=20)},
        Price(amount=20),
        ["a", "b", "group", "start"],
    ]
    assert recorder.steps(StepStarted) == ["start", "a", "b", "join"]
    assert sorted(recorder.steps(StepCompleted)) == ["a", "b", "join", "start"]


def test_a_branch_is_checkpointed_as_soon_as_it_finishes(
    storage_factory: Any, clock: FakeClock
) -> None:
    release = asyncio.Event()
    wf: Workflow[Any] = Workflow("early")

    async def fast(ctx: StepContext[Any]) -> str:
        return "fast"

    async def slow(ctx: StepContext[Any]) -> str:
        await release.wait()
        return "slow"

    wf.parallel("group", {"fast": fast, "slow": slow})
    observed: list[Any] = []

    class Watch:
        async def reflow_step_completed(self, event: StepCompleted) -> None:
            if event.step == "fast":
                # The row is already stored while the sibling still runs.
                observed.extend(await engine_ref[0].storage.get_step_results(event.run_id))
                release.set()

    engine_ref: list[Any] = []

    async def scenario() -> None:
        async with open_engine(storage_factory, [wf], clock, hooks=[Watch()]) as engine:
            engine_ref.append(engine)
            run_ = await engine.enqueue(wf)
            await asyncio.wait_for(engine.run_until_idle(), 10)
            done = await engine.get_run(run_.id)
            assert done is not None
            assert done.run.output == {"fast": "fast", "slow": "slow"}

    run(scenario())
    assert [(r.name, r.status) for r in observed] == [("fast", StepStatus.COMPLETED)]


def test_fail_fast_cancels_siblings_and_reports_only_the_cause(
    storage_factory: Any, clock: FakeClock
) -> None:
    parked = threading.Event()
    reasons: list[Any] = []
    wf: Workflow[Any] = Workflow("failfast")

    def waits(ctx: StepContext[Any]) -> str:
        parked.set()
        ctx.cancel.wait(10)  # a plain def branch learns of the cancellation via its signal
        reasons.append(ctx.cancel.reason)
        return "unreachable"

    async def fails(ctx: StepContext[Any]) -> str:
        await asyncio.get_running_loop().run_in_executor(None, parked.wait, 10)
        raise RuntimeError("card declined")

    async def async_waits(ctx: StepContext[Any]) -> str:
        await asyncio.Event().wait()
        return "unreachable"

    wf.parallel("group", {"waits": waits, "fails": fails, "async_waits": async_waits})

    async def scenario() -> None:
        async with open_engine(storage_factory, [wf], clock) as engine:
            run_ = await engine.enqueue(wf)
            await asyncio.wait_for(engine.run_until_idle(), 10)
            view = await engine.get_run(run_.id)
            assert view is not None
            assert view.run.status is RunStatus.FAILED
            assert view.run.error is not None
            assert view.run.error.step == "fails"
            assert "card declined" in view.run.error.message
            assert _rows(view) == {"fails": StepStatus.FAILED}  # cancelled siblings: no rows

    run(scenario())
    assert len(reasons) == 1
    assert "'fails'" in str(reasons[0])


class _Checkpointed:
    """Hook: an asyncio event per step, set once that step's row is stored."""

    def __init__(self) -> None:
        self.saved: dict[str, asyncio.Event] = {}

    def __getitem__(self, step: str) -> asyncio.Event:
        return self.saved.setdefault(step, asyncio.Event())

    def reflow_step_completed(self, event: StepCompleted) -> None:
        self[event.step].set()


def test_resume_after_a_sibling_failed_never_reruns_completed_branches(
    storage_factory: Any, clock: FakeClock
) -> None:
    calls: list[str] = []
    checkpointed = _Checkpointed()
    wf: Workflow[Any] = Workflow("resumable")

    def good(ctx: StepContext[Any]) -> str:
        calls.append("good")
        return "g"

    async def flaky(ctx: StepContext[Any]) -> str:
        calls.append("flaky")
        if calls.count("flaky") == 1:
            await checkpointed["good"].wait()  # fail only after good's row is stored
            raise RuntimeError("first time fails")
        return "f"

    wf.parallel("group", {"good": good, "flaky": flaky})

    async def scenario() -> None:
        async with open_engine(storage_factory, [wf], clock, hooks=[checkpointed]) as engine:
            run_ = await engine.enqueue(wf)
            await asyncio.wait_for(engine.run_until_idle(), 10)
            failed = await engine.get_run(run_.id)
            assert failed is not None
            assert failed.run.status is RunStatus.FAILED
            assert _rows(failed) == {"good": StepStatus.COMPLETED, "flaky": StepStatus.FAILED}
            assert await engine.resume(run_.id)
            await asyncio.wait_for(engine.run_until_idle(), 10)
            done = await engine.get_run(run_.id)
            assert done is not None
            assert done.run.status is RunStatus.COMPLETED
            assert done.run.output == {"good": "g", "flaky": "f"}

    run(scenario())
    assert calls.count("good") == 1
    assert calls.count("flaky") == 2


def test_without_fail_fast_all_branches_finish_and_the_first_failure_counts(
    storage_factory: Any, clock: FakeClock
) -> None:
    first_failed = asyncio.Event()
    second_failed = asyncio.Event()
    wf: Workflow[Any] = Workflow("patient")

    async def fails_first(ctx: StepContext[Any]) -> str:
        first_failed.set()
        raise ValueError("first")

    async def fails_second(ctx: StepContext[Any]) -> str:
        await first_failed.wait()
        second_failed.set()
        raise ValueError("second")

    async def succeeds_last(ctx: StepContext[Any]) -> str:
        await second_failed.wait()
        return "ok"

    wf.parallel(
        "group",
        {"one": fails_first, "two": fails_second, "three": succeeds_last},
        fail_fast=False,
    )

    async def scenario() -> None:
        async with open_engine(storage_factory, [wf], clock) as engine:
            run_ = await engine.enqueue(wf)
            await asyncio.wait_for(engine.run_until_idle(), 10)
            view = await engine.get_run(run_.id)
            assert view is not None
            assert view.run.status is RunStatus.FAILED
            assert view.run.error is not None
            assert (view.run.error.step, view.run.error.message) == ("one", "first")
            assert _rows(view) == {
                "one": StepStatus.FAILED,
                "two": StepStatus.FAILED,
                "three": StepStatus.COMPLETED,
            }

    run(scenario())


def test_branch_retry_policy_and_early_completion_refused(
    storage_factory: Any, clock: FakeClock
) -> None:
    attempts: list[int] = []
    wf: Workflow[Any] = Workflow("retrying")

    def flaky(ctx: StepContext[Any]) -> int:
        attempts.append(ctx.attempt)
        if ctx.attempt < 3:
            raise RuntimeError("not yet")
        return ctx.attempt

    wf.parallel(
        "group",
        {"flaky": Branch(flaky, retry=RetryPolicy(max_attempts=3, initial_delay=0))},
    )
    ender: Workflow[Any] = Workflow("ender")
    completes: list[int] = []

    def ends(ctx: StepContext[Any]) -> None:
        completes.append(ctx.attempt)
        ctx.complete("nope")

    ender.parallel("group", {"ends": Branch(ends, retry=RetryPolicy(max_attempts=3))})

    async def scenario() -> None:
        async with open_engine(storage_factory, [wf, ender], clock) as engine:
            ok = await engine.enqueue(wf)
            bad = await engine.enqueue(ender)
            await asyncio.wait_for(engine.run_until_idle(), 10)
            done = await engine.get_run(ok.id)
            assert done is not None
            assert done.run.output == {"flaky": 3}
            assert done.steps[0].attempts == 3
            refused = await engine.get_run(bad.id)
            assert refused is not None
            assert refused.run.status is RunStatus.FAILED
            assert refused.run.error is not None
            assert refused.run.error.code == "CONFIG"
            assert "not allowed in parallel branch 'ends'" in refused.run.error.message

    run(scenario())
    assert attempts == [1, 2, 3]
    assert completes == [1]  # not retried


def test_branch_timeout_is_its_own(storage_factory: Any, clock: FakeClock) -> None:
    wf: Workflow[Any] = Workflow("timed")

    async def hangs(ctx: StepContext[Any]) -> None:
        await asyncio.Event().wait()

    wf.parallel("group", {"hangs": Branch(hangs, timeout="50ms"), "quick": lambda ctx: 1})

    async def scenario() -> None:
        async with open_engine(storage_factory, [wf], clock) as engine:
            run_ = await engine.enqueue(wf)
            await asyncio.wait_for(engine.run_until_idle(), 10)
            view = await engine.get_run(run_.id)
            assert view is not None
            assert view.run.error is not None
            assert (view.run.error.step, view.run.error.code) == ("hangs", "STEP_TIMEOUT")

    run(scenario())


def test_stopped_worker_mid_group_resumes_without_rerunning_finished_branches(
    storage_factory: Any, clock: FakeClock
) -> None:
    """A worker stops (its lease released) while one branch is done and one still runs;
    another worker resumes the group and runs only the unfinished branch."""
    calls: list[str] = []
    parked = asyncio.Event()
    checkpointed = _Checkpointed()
    wf: Workflow[Any] = Workflow("handover")

    async def done_soon(ctx: StepContext[Any]) -> str:
        calls.append("done_soon")
        return "x"

    async def long(ctx: StepContext[Any]) -> str:
        calls.append("long")
        if calls.count("long") == 1:
            parked.set()
            await asyncio.Event().wait()
        return "y"

    wf.parallel("group", {"done_soon": done_soon, "long": long})

    async def scenario() -> None:
        storage = storage_factory(clock=clock)
        lease = LeaseOptions(duration=30)
        async with open_engine(
            lambda clock: storage, [wf], clock, lease=lease, hooks=[checkpointed]
        ) as first:
            run_ = await first.enqueue(wf)
            await first.start()
            await asyncio.wait_for(parked.wait(), 10)
            await asyncio.wait_for(checkpointed["done_soon"].wait(), 10)
            await first.stop()
            async with open_engine(lambda clock: storage, [wf], clock, lease=lease) as second:
                await asyncio.wait_for(second.run_until_idle(), 10)
                done = await second.get_run(run_.id)
                assert done is not None
                assert done.run.output == {"done_soon": "x", "long": "y"}

    run(scenario())
    assert calls == ["done_soon", "long", "long"]


def test_cancelling_the_run_stops_every_branch(storage_factory: Any, clock: FakeClock) -> None:
    both = asyncio.Barrier(3)
    wf: Workflow[Any] = Workflow("cancelme")

    async def park(ctx: StepContext[Any]) -> None:
        await both.wait()
        await asyncio.Event().wait()

    wf.parallel("group", {"p1": park, "p2": park})

    async def scenario() -> None:
        async with open_engine(storage_factory, [wf], clock) as engine:
            run_ = await engine.enqueue(wf)
            drain = asyncio.create_task(engine.run_until_idle())
            await asyncio.wait_for(both.wait(), 10)
            assert await engine.cancel(run_.id)
            await asyncio.wait_for(drain, 10)
            view = await engine.get_run(run_.id)
            assert view is not None
            assert view.run.status is RunStatus.CANCELLED
            assert view.steps == []
            assert await engine.storage.list_runs(RunFilter(status=RunStatus.RUNNING)) == []

    run(scenario())


def test_parallel_definition_errors() -> None:
    wf: Workflow[Any] = Workflow("bad")
    with pytest.raises(ConfigError, match="at least one branch"):
        wf.parallel("empty", {})
    wf.step(lambda ctx: 1, name="taken")
    with pytest.raises(ConfigError, match="taken"):
        wf.parallel("g", {"taken": lambda ctx: 2})
