"""Engine behaviour on every adapter: steps, replay, idempotency, cancellation, leases."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from typing import Any

import msgspec
import pytest
from helpers import FakeClock, run

from reflow_core import (
    Engine,
    IdempotencyConflictError,
    LeaseOptions,
    RunStatus,
    SerializationError,
    StepContext,
    StepStatus,
    ValidationError,
    Workflow,
    WorkflowNotFoundError,
)
from reflow_core.execution import step_id


class Order(msgspec.Struct):
    sku: str
    qty: int


@dataclasses.dataclass
class Receipt:
    total: float
    lines: list[str]


def _pipeline(calls: list[str]) -> Workflow[Any]:
    wf: Workflow[Any] = Workflow("pipeline")

    @wf.step
    async def first(ctx: StepContext[Any]) -> int:
        calls.append("first")
        return int(ctx.input["n"]) + 1

    @wf.step
    def second(ctx: StepContext[Any]) -> int:
        calls.append("second")
        return int(ctx.prev) * 10

    @wf.step
    async def third(ctx: StepContext[Any]) -> dict[str, int]:
        calls.append("third")
        return {"first": ctx.steps["first"], "second": ctx.prev}

    return wf


def test_run_completes_with_output_and_checkpoints(storage_factory: Any) -> None:
    calls: list[str] = []
    wf = _pipeline(calls)

    async def scenario() -> None:
        storage = storage_factory()
        engine = Engine(storage, [wf], poll_interval=0.01)
        try:
            run_ = await engine.enqueue("pipeline", {"n": 1})
            assert await engine.run_until_idle() == 1
            view = await engine.get_run(run_.id)
            assert view is not None
            assert view.run.status is RunStatus.COMPLETED
            assert view.run.output == {"first": 2, "second": 20}
            assert [(s.name, s.status, s.attempts) for s in view.steps] == [
                ("first", StepStatus.COMPLETED, 1),
                ("second", StepStatus.COMPLETED, 1),
                ("third", StepStatus.COMPLETED, 1),
            ]
            assert calls == ["first", "second", "third"]
        finally:
            await engine.stop()
            await storage.close()

    run(scenario())


def test_started_engine_executes_enqueued_run(storage_factory: Any) -> None:
    wf = _pipeline([])

    async def scenario() -> None:
        storage = storage_factory()
        async with Engine(storage, [wf], poll_interval=5) as engine:
            # poll_interval is long: only the enqueue's wake-up can start it quickly.
            run_ = await engine.enqueue(wf, {"n": 4})
            done = await engine.wait_for(run_.id, within=10)
        await storage.close()
        assert done.status is RunStatus.COMPLETED
        assert done.output == {"first": 5, "second": 50}

    run(scenario())


def test_typed_input_and_outputs_round_trip_as_their_types(storage_factory: Any) -> None:
    wf: Workflow[Order] = Workflow("typed", input=Order)
    seen: list[Any] = []

    @wf.step
    def price(ctx: StepContext[Order]) -> Receipt:
        seen.append(ctx.input)
        return Receipt(total=ctx.input.qty * 2.5, lines=[ctx.input.sku])

    @wf.step
    def check(ctx: StepContext[Order]) -> float:
        seen.append(ctx.prev)
        return float(ctx.prev.total)

    async def scenario() -> None:
        storage = storage_factory()
        engine = Engine(storage, [wf])
        try:
            with pytest.raises(ValidationError, match="qty"):
                await engine.enqueue(wf, {"sku": "x", "qty": "three"})
            run_ = await engine.enqueue(wf, Order(sku="tea", qty=4))
            await engine.run_until_idle()
            view = await engine.get_run(run_.id)
            assert view is not None
            assert view.run.output == 10.0
            assert view.run.input == {"sku": "tea", "qty": 4}
        finally:
            await engine.stop()
            await storage.close()

    run(scenario())
    assert seen == [Order(sku="tea", qty=4), Receipt(total=10.0, lines=["tea"])]


def test_replay_never_reruns_completed_steps(storage_factory: Any, clock: FakeClock) -> None:
    """A run abandoned after its first checkpoint resumes at the second step elsewhere."""
    calls: list[str] = []
    wf = _pipeline(calls)

    async def scenario() -> None:
        storage = storage_factory(clock=clock)
        first_engine = Engine(storage, [wf], clock=clock, lease=LeaseOptions(duration=30))
        second_engine = Engine(storage, [wf], clock=clock, lease=LeaseOptions(duration=30))
        try:
            run_ = await first_engine.enqueue(wf, {"n": 1})
            # A worker claims it, checkpoints step one, then dies without a trace.
            claimed = await storage.claim_next_run(["pipeline"], lease_ms=30_000)
            assert claimed is not None
            from reflow_core import StepResult

            saved = await storage.save_step_result(
                StepResult(
                    id=step_id(run_.id, "first"),
                    run_id=run_.id,
                    name="first",
                    status=StepStatus.COMPLETED,
                    output=2,
                    attempts=1,
                    created_at=clock(),
                    updated_at=clock(),
                ),
                claimed.lease_id,
            )
            assert saved
            assert await second_engine.run_until_idle() == 0  # lease still fresh
            clock.advance(31)
            assert await second_engine.run_until_idle() == 1
            view = await second_engine.get_run(run_.id)
            assert view is not None
            assert view.run.status is RunStatus.COMPLETED
            assert view.run.output == {"first": 2, "second": 20}
            assert view.run.attempt == 2
            assert calls == ["second", "third"]
            assert [s.name for s in view.steps] == ["first", "second", "third"]
        finally:
            await first_engine.stop()
            await second_engine.stop()
            await storage.close()

    run(scenario())


def test_idempotent_enqueue_and_conflict(storage_factory: Any) -> None:
    wf = _pipeline([])

    async def scenario() -> None:
        storage = storage_factory()
        engine = Engine(storage, [wf])
        try:
            a = await engine.enqueue(wf, {"n": 1, "tags": ["x"]}, idempotency_key="order-7")
            b = await engine.enqueue(wf, {"tags": ["x"], "n": 1}, idempotency_key="order-7")
            assert a.id == b.id
            with pytest.raises(IdempotencyConflictError, match="order-7") as info:
                await engine.enqueue(wf, {"n": 1.0, "tags": ["x"]}, idempotency_key="order-7")
            assert info.value.run_id == a.id
            assert len(await engine.list_runs()) == 1
            c = await engine.enqueue(wf, {"n": 1, "tags": ["x"]}, idempotency_key="order-8")
            assert c.id != a.id
        finally:
            await engine.stop()
            await storage.close()

    run(scenario())


def test_non_persistable_input_stores_nothing(storage_factory: Any) -> None:
    wf = _pipeline([])

    async def scenario() -> None:
        storage = storage_factory()
        engine = Engine(storage, [wf])
        try:
            with pytest.raises(SerializationError) as info:
                await engine.enqueue(wf, {"n": 1, "weights": [1.0, float("nan")]})
            assert info.value.path == "$.weights[1]"
            with pytest.raises(SerializationError, match="tuple"):
                await engine.enqueue(wf, {"n": (1, 2)})
            assert await engine.list_runs() == []
            with pytest.raises(WorkflowNotFoundError, match="pipeline"):
                await engine.enqueue("nope", {})
        finally:
            await engine.stop()
            await storage.close()

    run(scenario())


def test_non_persistable_step_output_fails_run_keeping_checkpoints(storage_factory: Any) -> None:
    wf: Workflow[Any] = Workflow("bad-output")

    @wf.step
    def good(ctx: StepContext[Any]) -> dict[str, int]:
        return {"ok": 1}

    @wf.step
    def bad(ctx: StepContext[Any]) -> Any:
        return {"items": [{"price": 1.0}, {"price": 2.0}, {"price": float("inf")}]}

    @wf.step
    def never(ctx: StepContext[Any]) -> None:
        raise AssertionError("must not run after a failed step")

    async def scenario() -> None:
        storage = storage_factory()
        engine = Engine(storage, [wf])
        try:
            run_ = await engine.enqueue(wf)
            await engine.run_until_idle()
            view = await engine.get_run(run_.id)
            assert view is not None
            assert view.run.status is RunStatus.FAILED
            assert view.run.error is not None
            assert view.run.error.code == "SERIALIZATION"
            assert view.run.error.step == "bad"
            assert "$.items[2].price" in view.run.error.message
            statuses = {s.name: (s.status, s.output) for s in view.steps}
            assert statuses == {
                "good": (StepStatus.COMPLETED, {"ok": 1}),
                "bad": (StepStatus.FAILED, None),
            }
        finally:
            await engine.stop()
            await storage.close()

    run(scenario())


def test_sync_steps_run_in_threads_without_blocking_the_loop(storage_factory: Any) -> None:
    """A blocking ``def`` step holds a thread while an ``async`` run on the loop finishes."""
    release = threading.Event()
    blocking: Workflow[Any] = Workflow("blocking")
    thread_names: list[str] = []

    @blocking.step
    def hold(ctx: StepContext[Any]) -> str:
        thread_names.append(threading.current_thread().name)
        assert release.wait(10), "never released"
        return "released"

    quick: Workflow[Any] = Workflow("quick")

    @quick.step
    async def go(ctx: StepContext[Any]) -> str:
        return "quick done"

    async def scenario() -> None:
        storage = storage_factory()
        async with Engine(storage, [blocking, quick], concurrency=2, poll_interval=0.01) as engine:
            slow = await engine.enqueue(blocking)
            fast = await engine.enqueue(quick)
            assert (await engine.wait_for(fast.id, within=10)).output == "quick done"
            release.set()
            assert (await engine.wait_for(slow.id, within=10)).output == "released"
        await storage.close()

    run(scenario())
    assert thread_names and thread_names[0].startswith("reflow-step")


def test_early_completion_ends_the_run(storage_factory: Any) -> None:
    wf: Workflow[Any] = Workflow("early")
    calls: list[str] = []

    @wf.step
    def check(ctx: StepContext[Any]) -> None:
        calls.append("check")
        if ctx.input["cached"]:
            ctx.complete({"from": "cache"})

    @wf.step
    def compute(ctx: StepContext[Any]) -> dict[str, str]:
        calls.append("compute")
        return {"from": "compute"}

    async def scenario() -> None:
        storage = storage_factory()
        engine = Engine(storage, [wf])
        try:
            cached = await engine.enqueue(wf, {"cached": True})
            fresh = await engine.enqueue(wf, {"cached": False})
            await engine.run_until_idle()
            c = await engine.get_run(cached.id)
            f = await engine.get_run(fresh.id)
            assert c is not None and f is not None
            assert c.run.output == {"from": "cache"}
            assert [(s.name, s.status) for s in c.steps] == [("check", StepStatus.COMPLETED_EARLY)]
            assert f.run.output == {"from": "compute"}
        finally:
            await engine.stop()
            await storage.close()

    run(scenario())
    assert sorted(calls) == ["check", "check", "compute"]


def test_cancel_running_run_stops_it_and_refuses_its_writes(storage_factory: Any) -> None:
    wf: Workflow[Any] = Workflow("cancellable")
    started = asyncio.Event()
    after: list[str] = []

    @wf.step
    async def wait_forever(ctx: StepContext[Any]) -> str:
        started.set()
        await asyncio.Event().wait()
        return "unreachable"

    @wf.step
    def later(ctx: StepContext[Any]) -> None:
        after.append("later")

    async def scenario() -> None:
        storage = storage_factory()
        async with Engine(storage, [wf], poll_interval=0.01) as engine:
            run_ = await engine.enqueue(wf)
            await asyncio.wait_for(started.wait(), 10)
            assert await engine.cancel(run_.id) is True
            done = await engine.wait_for(run_.id, within=10)
            assert done.status is RunStatus.CANCELLED
            assert await engine.cancel(run_.id) is False
            view = await engine.get_run(run_.id)
            assert view is not None and view.steps == []
        await storage.close()

    run(scenario())
    assert after == []


def test_cancel_never_overwrites_a_completed_run(storage_factory: Any) -> None:
    wf = _pipeline([])

    async def scenario() -> None:
        storage = storage_factory()
        engine = Engine(storage, [wf])
        try:
            run_ = await engine.enqueue(wf, {"n": 1})
            await engine.run_until_idle()
            assert await engine.cancel(run_.id) is False
            view = await engine.get_run(run_.id)
            assert view is not None and view.run.status is RunStatus.COMPLETED
            assert await engine.cancel("no-such-run") is False
        finally:
            await engine.stop()
            await storage.close()

    run(scenario())


def test_cancel_races_completion_without_mixed_outcome(storage_factory: Any) -> None:
    """Cancel issued while the last step's result is being written: exactly one wins."""
    wf: Workflow[Any] = Workflow("race")
    in_step = asyncio.Event()
    go = asyncio.Event()

    @wf.step
    async def last(ctx: StepContext[Any]) -> str:
        in_step.set()
        await go.wait()
        return "done"

    async def scenario() -> None:
        storage = storage_factory()
        async with Engine(storage, [wf], poll_interval=0.01) as engine:
            run_ = await engine.enqueue(wf)
            await asyncio.wait_for(in_step.wait(), 10)
            go.set()
            cancelled = await engine.cancel(run_.id)
            final = await engine.wait_for(run_.id, within=10)
        await storage.close()
        if cancelled:
            assert final.status is RunStatus.CANCELLED and final.output is None
        else:
            assert final.status is RunStatus.COMPLETED and final.output == "done"

    run(scenario())


def test_stop_releases_leases_for_immediate_takeover(storage_factory: Any) -> None:
    wf: Workflow[Any] = Workflow("long")
    started = asyncio.Event()

    @wf.step
    async def slow(ctx: StepContext[Any]) -> str:
        started.set()
        await asyncio.Event().wait()
        return "never"

    async def scenario() -> None:
        storage = storage_factory()
        engine = Engine(storage, [wf], lease=LeaseOptions(duration=3600), poll_interval=0.01)
        await engine.start()
        run_ = await engine.enqueue(wf)
        await asyncio.wait_for(started.wait(), 10)
        await engine.stop()
        stored = await storage.get_run(run_.id)
        assert stored is not None and stored.status is RunStatus.PENDING
        # Another worker can claim it now, without waiting an hour for the lease.
        claimed = await storage.claim_next_run(["long"], lease_ms=30_000)
        assert claimed is not None and claimed.run.id == run_.id
        await storage.close()

    run(scenario())


def test_failure_records_error_and_runs_on_failure_handler(storage_factory: Any) -> None:
    wf: Workflow[Any] = Workflow("failing")
    compensations: list[tuple[str | None, str]] = []
    errors: list[BaseException] = []

    @wf.step
    def explode(ctx: StepContext[Any]) -> None:
        raise KeyError("missing sku")

    @wf.on_failure
    def compensate(failure: Any) -> None:
        compensations.append((failure.step, failure.error.type))
        raise RuntimeError("compensation also broke")

    async def scenario() -> None:
        storage = storage_factory()
        engine = Engine(storage, [wf], on_error=errors.append, use_plugins=False)
        try:
            run_ = await engine.enqueue(wf)
            await engine.run_until_idle()
            view = await engine.get_run(run_.id)
            assert view is not None and view.run.status is RunStatus.FAILED
            assert view.run.error is not None
            assert view.run.error.type == "KeyError"
            assert "missing sku" in view.run.error.message
            assert view.run.error.traceback is not None
            assert "explode" in view.run.error.traceback
            assert view.steps[0].status is StepStatus.FAILED
        finally:
            await engine.stop()
            await storage.close()

    run(scenario())
    assert compensations == [("explode", "KeyError")]
    assert len(errors) == 1 and "compensation also broke" in str(errors[0])


def test_resume_restarts_at_failed_step(storage_factory: Any) -> None:
    wf: Workflow[Any] = Workflow("flaky")
    calls: list[str] = []
    broken = {"yes": True}

    @wf.step
    def one(ctx: StepContext[Any]) -> int:
        calls.append("one")
        return 1

    @wf.step
    def two(ctx: StepContext[Any]) -> int:
        calls.append("two")
        if broken["yes"]:
            raise RuntimeError("down")
        return ctx.prev + 1

    async def scenario() -> None:
        storage = storage_factory()
        engine = Engine(storage, [wf])
        try:
            run_ = await engine.enqueue(wf)
            await engine.run_until_idle()
            broken["yes"] = False
            assert await engine.resume(run_.id) is True
            assert await engine.resume(run_.id) is False  # pending now, not resumable
            await engine.run_until_idle()
            view = await engine.get_run(run_.id)
            assert view is not None
            assert view.run.status is RunStatus.COMPLETED and view.run.output == 2
            assert view.run.error is None
        finally:
            await engine.stop()
            await storage.close()

    run(scenario())
    assert calls == ["one", "two", "two"]


class GatedClaims:
    """Wraps an adapter so that a claim, once committed, waits at a gate before it answers:
    a claim that has taken a run but not yet told the engine, on demand."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.gated = False
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def claim_next_run(self, names: Any, **lease: Any) -> Any:
        claimed = await self._inner.claim_next_run(names, **lease)
        if self.gated and claimed is not None:
            self.entered.set()
            await self.gate.wait()
        return claimed

    async def claim_runs(self, names: Any, **lease: Any) -> Any:
        batch = await self._inner.claim_runs(names, **lease)
        if self.gated and batch:
            self.entered.set()
            await self.gate.wait()
        return batch


def test_claim_landing_during_stop_is_released_not_started(storage_factory: Any) -> None:
    """stop() while a claim is in flight: the run it claims is released, never executed."""
    wf: Workflow[Any] = Workflow("late")
    executed: list[str] = []

    @wf.step
    def work(ctx: StepContext[Any]) -> None:
        executed.append(ctx.run_id)

    async def scenario() -> None:
        inner = storage_factory()
        storage = GatedClaims(inner)
        engine = Engine(storage, [wf], poll_interval=60)  # type: ignore[arg-type]
        await engine.start()
        storage.gated = True
        run_ = await engine.enqueue(wf)
        await asyncio.wait_for(storage.entered.wait(), 10)
        stopping = asyncio.create_task(engine.stop())
        await asyncio.sleep(0)  # let stop() begin: it must now wait for the claim
        storage.gate.set()
        await asyncio.wait_for(stopping, 10)
        stored = await inner.get_run(run_.id)
        assert stored is not None and stored.status is RunStatus.PENDING
        await inner.close()

    run(scenario())
    assert executed == []
