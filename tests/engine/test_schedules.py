"""Durable schedules through the engine, on every adapter, with a fake clock."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
from flow_support import open_engine
from helpers import FakeClock, run

from reflow_core import (
    ConfigError,
    Engine,
    StepContext,
    StorageError,
    ValidationError,
    Workflow,
    WorkflowRun,
)
from reflow_core.scheduling import occurrence_key

MIN_MS = 60_000


def _ticker(calls: list[Any]) -> Workflow[Any]:
    wf: Workflow[Any] = Workflow("ticker")

    @wf.step
    def tick(ctx: StepContext[Any]) -> Any:
        calls.append(ctx.input)
        return ctx.input

    return wf


async def _runs(engine: Engine) -> list[WorkflowRun]:
    return sorted(await engine.list_runs(limit=1000), key=lambda r: r.created_at)


def test_interval_fires_once_per_occurrence_and_skips_missed_ones(
    storage_factory: Any, clock: FakeClock
) -> None:
    calls: list[Any] = []
    wf = _ticker(calls)

    async def scenario() -> None:
        async with open_engine(storage_factory, [wf], clock) as engine:
            start = clock()
            key = await engine.schedule(wf, {"n": 1}, every="1m")
            [stored] = await engine.list_schedules()
            assert (stored.key, stored.next_run_at) == (key, start + MIN_MS)
            assert await engine.run_until_idle() == 0  # not immediate
            clock.advance(60)
            assert await engine.run_until_idle() == 1
            [first] = await _runs(engine)
            assert first.idempotency_key == occurrence_key(key, start + MIN_MS)
            assert first.output == {"n": 1}
            clock.advance(9 * 60 + 30)  # nine occurrences missed while nobody ran
            assert await engine.run_until_idle() == 1
            [after] = await engine.list_schedules()
            assert after.next_run_at == start + 11 * MIN_MS  # phase kept, strictly future
            assert len(await _runs(engine)) == 2

    run(scenario())
    assert calls == [{"n": 1}, {"n": 1}]


def test_catch_up_fires_every_missed_occurrence(storage_factory: Any, clock: FakeClock) -> None:
    calls: list[Any] = []
    wf = _ticker(calls)

    async def scenario() -> None:
        async with open_engine(storage_factory, [wf], clock) as engine:
            start = clock()
            key = await engine.schedule(wf, every="1m", catch_up=True)
            clock.advance(5 * 60)
            assert await engine.run_until_idle() == 5
            keys = sorted(r.idempotency_key or "" for r in await _runs(engine))
            assert keys == sorted(occurrence_key(key, start + i * MIN_MS) for i in range(1, 6))

    run(scenario())
    assert len(calls) == 5


def test_reregistering_keeps_cadence_and_a_key_allows_changes(
    storage_factory: Any, clock: FakeClock
) -> None:
    wf = _ticker([])

    async def scenario() -> None:
        async with open_engine(storage_factory, [wf], clock) as engine:
            start = clock()
            key = await engine.schedule(wf, {"n": 1}, every="1h")
            clock.advance(1800)
            assert await engine.schedule(wf, {"n": 1}, every="1h") == key  # a restart
            [same] = await engine.list_schedules()
            assert same.next_run_at == start + 60 * MIN_MS
            other = await engine.schedule(wf, {"n": 2}, every="1h")
            assert other != key  # a different input is a different schedule
            assert await engine.unschedule(other) is True
            assert await engine.unschedule(other) is False

            named = await engine.schedule(wf, {"v": 1}, every="1h", key="nightly")
            assert named == "nightly"
            await engine.schedule(wf, {"v": 2}, every="1h", key="nightly")  # input changes
            by_key = {s.key: s for s in await engine.list_schedules()}
            assert by_key["nightly"].input == {"v": 2}
            assert by_key["nightly"].next_run_at == clock() + 60 * MIN_MS
            await engine.schedule(wf, {"v": 2}, every="2h", key="nightly")  # cadence resets
            by_key = {s.key: s for s in await engine.list_schedules()}
            assert by_key["nightly"].next_run_at == clock() + 120 * MIN_MS

    run(scenario())


def test_two_workers_fire_one_occurrence_once(storage_factory: Any, clock: FakeClock) -> None:
    calls: list[Any] = []
    wf = _ticker(calls)

    async def scenario() -> None:
        storage = storage_factory(clock=clock)
        try:
            one = Engine(storage, [wf], clock=clock, use_plugins=False)
            two = Engine(storage, [wf], clock=clock, use_plugins=False)
            await one.schedule(wf, every="1m")
            await two.schedule(wf, every="1m")  # every worker registers at start-up
            clock.advance(60)
            counts = await asyncio.gather(one.run_until_idle(), two.run_until_idle())
            assert sum(counts) == 1
            await one.stop()
            await two.stop()
        finally:
            await storage.close()

    run(scenario())
    assert len(calls) == 1


class _CrashAfterEnqueue:
    """Storage proxy whose first schedule claim fails, as if the worker died right after
    enqueueing the occurrence's run."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.failed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def claim_due_schedule(self, names: Any) -> Any:
        if not self.failed:
            self.failed = True
            raise StorageError("claim_due_schedule", "connection lost")
        return await self._inner.claim_due_schedule(names)


def test_crash_between_enqueue_and_claim_still_yields_exactly_one_run(
    storage_factory: Any, clock: FakeClock
) -> None:
    calls: list[Any] = []
    errors: list[BaseException] = []
    wf = _ticker(calls)

    async def scenario() -> None:
        inner = storage_factory(clock=clock)
        proxy = _CrashAfterEnqueue(inner)
        async with open_engine(lambda clock: proxy, [wf], clock, on_error=errors.append) as engine:
            await engine.schedule(wf, every="1m")
            clock.advance(60)
            await engine.run_until_idle()  # enqueued, then the claim failed: still due
            assert proxy.failed and len(errors) == 1
            [due] = await engine.list_schedules()
            assert due.next_run_at <= clock()
            await engine.run_until_idle()  # fires again: finds the run by its key
            [after] = await engine.list_schedules()
            assert after.next_run_at > clock()
            assert len(await _runs(engine)) == 1

    run(scenario())
    assert len(calls) == 1


def test_cron_schedule_in_a_time_zone_across_the_spring_gap(
    storage_factory: Any, clock: FakeClock
) -> None:
    wf = _ticker([])
    clock.now = int(datetime(2024, 3, 9, 17, tzinfo=UTC).timestamp() * 1000)

    async def scenario() -> None:
        async with open_engine(storage_factory, [wf], clock) as engine:
            await engine.schedule(wf, cron="30 2 * * *", timezone="America/New_York")
            [stored] = await engine.list_schedules()
            # 02:30 does not exist on 2024-03-10 in New York: 03:00 EDT is 07:00 UTC.
            assert stored.next_run_at == int(
                datetime(2024, 3, 10, 7, tzinfo=UTC).timestamp() * 1000
            )
            clock.now = stored.next_run_at
            assert await engine.run_until_idle() == 1
            [advanced] = await engine.list_schedules()
            assert advanced.next_run_at == int(
                datetime(2024, 3, 11, 6, 30, tzinfo=UTC).timestamp() * 1000
            )

    run(scenario())


class Typed(msgspec.Struct):
    n: int


def test_registration_refuses_bad_schedules_and_stores_nothing(
    storage_factory: Any, clock: FakeClock
) -> None:
    wf: Workflow[Typed] = Workflow("typed", input=Typed)

    async def scenario() -> None:
        async with open_engine(storage_factory, [wf], clock) as engine:
            with pytest.raises(ConfigError, match="invalid"):
                await engine.schedule(wf, {"n": 1}, cron="0 0 30 2 *")
            with pytest.raises(ConfigError, match="5 fields"):
                await engine.schedule(wf, {"n": 1}, cron="0 0 * * * *")
            with pytest.raises(ConfigError, match="unknown time zone"):
                await engine.schedule(wf, {"n": 1}, cron="0 9 * * *", timezone="Nowhere/Land")
            with pytest.raises(ConfigError, match="exactly one"):
                await engine.schedule(wf, {"n": 1})
            with pytest.raises(ConfigError, match="exactly one"):
                await engine.schedule(wf, {"n": 1}, every="1m", cron="* * * * *")
            with pytest.raises(ValidationError, match="n"):
                await engine.schedule(wf, {"n": "one"}, every="1m")
            assert await engine.list_schedules() == []

    run(scenario())


def test_unusable_occurrence_is_reported_and_skipped(
    storage_factory: Any, clock: FakeClock
) -> None:
    """The stored input no longer suits the workflow (its input type changed)."""
    old: Workflow[Any] = Workflow("evolving")
    old.step(lambda ctx: None, name="s")
    new: Workflow[Typed] = Workflow("evolving", input=Typed)
    new.step(lambda ctx: None, name="s")
    errors: list[BaseException] = []

    async def scenario() -> None:
        storage = storage_factory(clock=clock)
        try:
            await Engine(storage, [old], clock=clock).schedule(old, {"n": "x"}, every="1m")
            engine = Engine(storage, [new], clock=clock, on_error=errors.append)
            clock.advance(60)
            assert await engine.run_until_idle() == 0
            assert [type(e) for e in errors] == [ValidationError]
            [advanced] = await engine.list_schedules()
            assert advanced.next_run_at > clock()  # skipped, not retried forever
            await engine.stop()
        finally:
            await storage.close()

    run(scenario())


def test_only_workers_with_the_workflow_fire_it(storage_factory: Any, clock: FakeClock) -> None:
    wf = _ticker([])
    unrelated: Workflow[Any] = Workflow("unrelated")
    unrelated.step(lambda ctx: None, name="s")

    async def scenario() -> None:
        storage = storage_factory(clock=clock)
        try:
            owner = Engine(storage, [wf], clock=clock)
            other = Engine(storage, [unrelated], clock=clock)
            await owner.schedule(wf, every="1m")
            clock.advance(60)
            assert await other.run_until_idle() == 0
            assert await owner.run_until_idle() == 1
            await owner.stop()
            await other.stop()
        finally:
            await storage.close()

    run(scenario())


class _NoticeScheduledRuns:
    """Storage proxy setting an event when a scheduled occurrence's run is created."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.created = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def create_run(self, run: WorkflowRun) -> Any:
        result = await self._inner.create_run(run)
        if (run.idempotency_key or "").startswith("reflow.schedule:"):
            self.created.set()
        return result


def test_a_busy_started_engine_still_fires_schedules(
    storage_factory: Any, clock: FakeClock
) -> None:
    holding = asyncio.Event()
    release = asyncio.Event()
    busy: Workflow[Any] = Workflow("busy")

    @busy.step
    async def hold(ctx: StepContext[Any]) -> None:
        holding.set()
        await release.wait()

    wf = _ticker([])

    async def scenario() -> None:
        proxy = _NoticeScheduledRuns(storage_factory(clock=clock))
        async with open_engine(lambda clock: proxy, [busy, wf], clock, concurrency=1) as engine:
            await engine.schedule(wf, every="1m")
            await engine.enqueue(busy)
            await engine.start()
            await asyncio.wait_for(holding.wait(), 10)  # the only slot is taken
            clock.advance(60)
            await engine.schedule(wf, every="1m")  # a registration pokes the loop now
            await asyncio.wait_for(proxy.created.wait(), 10)
            release.set()

    run(scenario())
