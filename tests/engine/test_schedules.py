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
    Recurrence,
    StepContext,
    StorageError,
    ValidationError,
    Workflow,
    WorkflowRun,
)
from reflow_core.schedule import next_fire_time
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
            for huge in (10**30, 1e17, "99999999w"):  # not a raw OverflowError
                with pytest.raises(ConfigError, match="100 years"):
                    await engine.schedule(wf, {"n": 1}, every=huge)
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

    errors: list[BaseException] = []

    async def scenario() -> None:
        proxy = _NoticeScheduledRuns(storage_factory(clock=clock))
        async with open_engine(
            lambda clock: proxy, [busy, wf], clock, concurrency=1, on_error=errors.append
        ) as engine:
            try:
                await engine.schedule(wf, every="1m")
                await engine.enqueue(busy)
                await engine.start()
                await asyncio.wait_for(holding.wait(), 10)  # the only slot is taken
                clock.advance(60)
                await engine.schedule(wf, every="1m")  # a registration pokes the loop now
                await asyncio.wait_for(proxy.created.wait(), 10)
            except TimeoutError:
                raise AssertionError(f"no occurrence fired; errors reported: {errors!r}") from None
            finally:
                release.set()  # else stopping waits for the held run forever

    run(scenario())


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


class _Spinning(Exception):
    """Raised by :class:`_ClaimBudget` when the scheduler claims far more than it should."""


class _ClaimBudget:
    """Storage proxy that counts schedule claims and fails them past a budget, so a
    scheduler that spins ends (with a reported error) instead of hanging the test."""

    def __init__(self, inner: Any, budget: int) -> None:
        self._inner = inner
        self.budget = budget
        self.claims = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def claim_due_schedule(self, names: Any) -> Any:
        self.claims += 1
        if self.claims > self.budget:
            raise _Spinning(f"{self.claims} schedule claims")
        return await self._inner.claim_due_schedule(names)


async def _slots(engine: Engine, key: str) -> list[int]:
    prefix = occurrence_key(key, 0)[:-1]
    keys = [r.idempotency_key or "" for r in await _runs(engine)]
    return sorted(int(k[len(prefix) :]) for k in keys if k.startswith(prefix))


def test_cron_registered_in_the_repeated_hour_fires_each_slot_once(
    storage_factory: Any, clock: FakeClock
) -> None:
    """The issue: registered at 01:10 EST on 2024-11-03, the second pass of New York's
    repeated hour, ``30 1 * * *`` fired at once (01:30 EDT had passed) and then stayed
    due, claimed again and again, starving the other schedules."""
    errors: list[BaseException] = []
    wf = _ticker([])
    registered = _ms(datetime(2024, 11, 3, 6, 10, tzinfo=UTC))  # 01:10 EST
    until = _ms(datetime(2024, 11, 4, 7, 0, tzinfo=UTC))  # 02:00 EST the next day
    clock.now = registered

    async def scenario() -> None:
        proxy = _ClaimBudget(storage_factory(clock=clock), budget=500)
        async with open_engine(lambda clock: proxy, [wf], clock, on_error=errors.append) as engine:
            nightly = await engine.schedule(
                wf, {"s": "nightly"}, cron="30 1 * * *", timezone="America/New_York"
            )
            quarter = await engine.schedule(
                wf, {"s": "quarter"}, cron="*/15 * * * *", timezone="America/New_York"
            )
            by_key = {s.key: s for s in await engine.list_schedules()}
            tomorrow = _ms(datetime(2024, 11, 4, 6, 30, tzinfo=UTC))  # 01:30 EST
            assert by_key[nightly].next_run_at == tomorrow  # not 01:30 EDT, gone
            assert await engine.run_until_idle() == 0  # nothing fires on registration
            while clock.now < until:
                clock.advance(5 * 60)
                await engine.run_until_idle()
                assert errors == []
            assert await _slots(engine, nightly) == [tomorrow]
            step = 15 * MIN_MS
            first = registered - registered % step + step
            assert await _slots(engine, quarter) == list(range(first, until + 1, step))
            assert proxy.claims == len(await _runs(engine))  # one claim per occurrence

    run(scenario())


def test_cron_across_the_fall_back_fires_the_repeated_time_once(
    storage_factory: Any, clock: FakeClock
) -> None:
    errors: list[BaseException] = []
    wf = _ticker([])
    clock.now = _ms(datetime(2024, 11, 3, 4, 0, tzinfo=UTC))  # 00:00 EDT

    async def scenario() -> None:
        proxy = _ClaimBudget(storage_factory(clock=clock), budget=100)
        async with open_engine(lambda clock: proxy, [wf], clock, on_error=errors.append) as engine:
            nightly = await engine.schedule(
                wf, {"s": "nightly"}, cron="30 1 * * *", timezone="America/New_York"
            )
            hourly = await engine.schedule(
                wf, {"s": "hourly"}, cron="0 * * * *", timezone="America/New_York"
            )
            while clock.now < _ms(datetime(2024, 11, 3, 9, 0, tzinfo=UTC)):
                clock.advance(5 * 60)
                await engine.run_until_idle()
            assert errors == []
            # 01:30 EDT only; the second pass (01:30 EST, 06:30 UTC) does not fire it.
            assert await _slots(engine, nightly) == [_ms(datetime(2024, 11, 3, 5, 30, tzinfo=UTC))]
            # Real hours: 01:00 EDT and 01:00 EST both fire, one hour apart.
            assert await _slots(engine, hourly) == [
                _ms(datetime(2024, 11, 3, h, tzinfo=UTC)) for h in range(5, 10)
            ]
            [stored] = [s for s in await engine.list_schedules() if s.key == nightly]
            assert stored.next_run_at == _ms(datetime(2024, 11, 4, 6, 30, tzinfo=UTC))

    run(scenario())


def test_an_adapter_that_does_not_advance_a_schedule_is_reported_not_spun_on(
    storage_factory: Any, clock: FakeClock, adapter_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defence in depth: whatever an adapter's arithmetic does, the loop never claims
    the same slot over and over, and the other workflows' schedules keep firing."""
    if adapter_name == "postgres":
        pytest.skip("the broken arithmetic is patched into the in-process adapters")

    def stays(recurrence: Recurrence, slot: int, now: int) -> int:
        if recurrence.every_ms == MIN_MS:  # the schedule of workflow "ticker"
            return slot  # the defect's symptom: "advanced" to the slot that just fired
        return next_fire_time(recurrence, slot, now)

    monkeypatch.setattr("reflow_adapters.memory.schedules.next_fire_time", stays)
    monkeypatch.setattr("reflow_adapters.sqlite_common.ops.next_fire_time", stays)
    errors: list[BaseException] = []
    stuck = _ticker([])
    other: Workflow[Any] = Workflow("other")
    other.step(lambda ctx: None, name="s")

    async def scenario() -> None:
        proxy = _ClaimBudget(storage_factory(clock=clock), budget=50)
        async with open_engine(
            lambda clock: proxy, [stuck, other], clock, on_error=errors.append
        ) as engine:
            key = await engine.schedule(stuck, every="1m")
            clock.advance(60)
            assert await engine.run_until_idle() == 1  # its one occurrence ran
            assert proxy.claims == 1
            [error] = errors
            assert isinstance(error, StorageError)
            assert "not past it" in str(error)
            await engine.schedule(other, every="2m")
            clock.advance(120)
            assert await engine.run_until_idle() == 1  # the other workflow, not starved
            assert proxy.claims == 2 and len(errors) == 1  # the stuck one left alone
            assert await _slots(engine, key) == [clock() - 120_000]
            [left] = [s for s in await engine.list_schedules() if s.key == key]
            assert left.next_run_at == clock() - 120_000  # still due, and left alone

    run(scenario())
