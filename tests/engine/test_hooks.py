"""Lifecycle hooks: direct hook objects and plugins see every event; raising hooks are
reported and never change a run's outcome; every claim ends with exactly one event; events
carry timestamps and durations; nothing is built when nobody listens; outcomes are logged
on named loggers with structured fields."""

from __future__ import annotations

import asyncio
import logging
import typing
from typing import Any

import pytest
from flow_support import open_engine
from helpers import FakeClock, run

from reflow_core import (
    Engine,
    HookError,
    LeaseOptions,
    RetryPolicy,
    RunCompleted,
    RunStarted,
    RunStatus,
    StepCompleted,
    StepContext,
    StepStarted,
    Workflow,
    hookimpl,
)
from reflow_core.events import (
    EngineEvent,
    LeaseLost,
    RetryScheduled,
    RunCancelled,
    RunFailed,
    RunInterrupted,
    RunSuspended,
    StepFailed,
)
from reflow_core.execution.run import RunExecution
from reflow_core.observers import _HOOK_NAMES
from reflow_core.registry import plugin_manager

HOUR = 3600.0


class Recorder:
    def __init__(self) -> None:
        self.events: list[Any] = []

    def reflow_run_started(self, event: RunStarted) -> None:
        self.events.append(event)

    def reflow_step_started(self, event: StepStarted) -> None:
        self.events.append(event)

    async def reflow_step_completed(self, event: StepCompleted) -> None:
        self.events.append(event)

    def reflow_run_completed(self, event: RunCompleted) -> None:
        self.events.append(event)


class Everything:
    """Records every engine event through every lifecycle hook there is."""

    def __init__(self) -> None:
        self.events: list[EngineEvent] = []
        for name in _HOOK_NAMES.values():
            setattr(self, name, self.events.append)

    def of(self, kind: type[Any]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


class Exploding:
    def reflow_step_completed(self, event: StepCompleted) -> None:
        raise RuntimeError("observer bug")


def _workflow() -> Workflow[Any]:
    wf: Workflow[Any] = Workflow("observed")

    @wf.step
    def one(ctx: StepContext[Any]) -> int:
        return 1

    @wf.step
    async def two(ctx: StepContext[Any]) -> int:
        return int(ctx.prev) + 1

    return wf


def test_hooks_see_every_event_and_errors_are_isolated(storage_factory: Any) -> None:
    recorder = Recorder()
    errors: list[BaseException] = []
    wf = _workflow()

    async def scenario() -> str:
        storage = storage_factory()
        engine = Engine(storage, [wf], hooks=[Exploding(), recorder], on_error=errors.append)
        try:
            run_ = await engine.enqueue(wf)
            await engine.run_until_idle()
            view = await engine.get_run(run_.id)
            assert view is not None
            return view.run.status.value
        finally:
            await engine.stop()
            await storage.close()

    assert run(scenario()) == "completed"
    kinds = [(type(e).__name__, getattr(e, "step", None)) for e in recorder.events]
    assert kinds == [
        ("RunStarted", None),
        ("StepStarted", "one"),
        ("StepCompleted", "one"),
        ("StepStarted", "two"),
        ("StepCompleted", "two"),
        ("RunCompleted", None),
    ]
    assert recorder.events[-1].output == 2
    assert len(errors) == 2
    assert all(isinstance(e, HookError) and "observer bug" in str(e) for e in errors)


@pytest.mark.parametrize(
    "fatal",
    [SystemExit(3), KeyboardInterrupt(), asyncio.CancelledError(), GeneratorExit()],
    ids=["SystemExit", "KeyboardInterrupt", "own-CancelledError", "GeneratorExit"],
)
def test_a_hook_raising_a_base_exception_is_reported_and_the_run_completes(
    storage_factory: Any, fatal: BaseException
) -> None:
    """A hook that calls sys.exit() (or raises any BaseException of its own) is a hook
    error like any other: the run's task, the engine and the process go on."""

    class Fatal:
        def reflow_step_completed(self, event: StepCompleted) -> None:
            raise fatal

        def reflow_error(self, error: BaseException) -> None:
            raise fatal  # the error hook itself is guarded too

    reported: list[BaseException] = []
    wf = _workflow()

    async def scenario() -> list[str]:
        storage = storage_factory()
        engine = Engine(storage, [wf], hooks=[Fatal()], on_error=reported.append)
        try:
            first, second = await engine.enqueue(wf), await engine.enqueue(wf)
            await engine.run_until_idle()
            views = [await engine.get_run(r.id) for r in (first, second)]
            return [v.run.status.value for v in views if v is not None]
        finally:
            await engine.stop()
            await storage.close()

    assert run(scenario()) == ["completed", "completed"]
    assert len(reported) == 4  # two steps per run, each hook call reported once
    assert all(isinstance(e, HookError) and type(fatal).__name__ in str(e) for e in reported)


def test_plugin_hooks_observe_every_engine(storage_factory: Any) -> None:
    seen: list[str] = []

    class Plugin:
        @hookimpl
        def reflow_run_completed(self, event: RunCompleted) -> None:
            seen.append(event.run_id)

    pm = plugin_manager()
    plugin = Plugin()
    pm.register(plugin, name="test-observer")
    wf = _workflow()

    async def scenario() -> str:
        storage = storage_factory()
        engine = Engine(storage, [wf])
        try:
            run_ = await engine.enqueue(wf)
            await engine.run_until_idle()
            return run_.id
        finally:
            await engine.stop()
            await storage.close()

    try:
        run_id = run(scenario())
    finally:
        pm.unregister(plugin)
    assert seen == [run_id]


def test_every_event_kind_has_a_hook_specification() -> None:
    import reflow_core.hookspecs as specs

    for kind, name in _HOOK_NAMES.items():
        spec = getattr(specs, name, None)
        assert spec is not None, f"{kind.__name__} has no hook specification {name}"
        assert hasattr(spec, f"{specs.PROJECT}_spec"), f"{name} is not marked @hookspec"
    assert set(_HOOK_NAMES) == set(typing.get_args(EngineEvent))


def _journey(failures: dict[str, int]) -> Workflow[Any]:
    """A retry in place, a retry left to storage, a sleep, a wait, then a failure."""
    wf: Workflow[Any] = Workflow("journey")

    def fail_once(name: str) -> None:
        failures[name] = failures.get(name, 0) + 1
        if failures[name] == 1:
            raise ConnectionError(f"{name}: first attempt fails")

    @wf.step(retry=RetryPolicy(max_attempts=2, backoff="fixed", initial_delay=0))
    def flaky(ctx: StepContext[Any]) -> str:
        fail_once("flaky")
        return "ok"

    @wf.step(retry=RetryPolicy(max_attempts=2, backoff="fixed", initial_delay=60))
    async def patient(ctx: StepContext[Any]) -> str:
        fail_once("patient")
        return "ok"

    wf.sleep("nap", "1h")
    wf.wait_for_event("approved")

    @wf.step
    def doomed(ctx: StepContext[Any]) -> None:
        raise ValueError("no way")

    return wf


def _shape(event: Any) -> tuple[Any, ...]:
    kind = type(event).__name__
    if isinstance(event, RunStarted):
        return (kind, event.attempt)
    if isinstance(event, StepStarted):
        return (kind, event.step, event.attempt)
    if isinstance(event, StepCompleted | StepFailed):
        return (kind, event.step, event.attempts)
    if isinstance(event, RetryScheduled):
        return (kind, event.step, event.attempt, event.durable)
    if isinstance(event, RunSuspended):
        return (kind, event.reason, event.step, event.attempt)
    return (kind,)


def test_a_journey_is_announced_event_by_event_with_times(
    storage_factory: Any, clock: FakeClock
) -> None:
    """Every kind of claim ending but the abnormal ones, in order, stamped by the engine's
    clock, with durations measured where something ends."""
    hooks = Everything()
    wf = _journey({})

    async def scenario() -> dict[str, int]:
        marks: dict[str, int] = {}
        async with open_engine(storage_factory, [wf], clock, hooks=[hooks]) as engine:
            run_ = await engine.enqueue(wf)
            marks["enqueued"] = clock()
            assert await engine.run_until_idle() == 1  # flaky, patient fails: retry later
            clock.advance(60)
            marks["retried"] = clock()
            assert await engine.run_until_idle() == 1  # patient, then nap sleeps
            clock.advance(HOUR)
            marks["woke"] = clock()
            assert await engine.run_until_idle() == 1  # nap done, waits for approved
            clock.advance(5)
            assert await engine.send_event(run_.id, "approved", {"by": "ada"})
            marks["approved"] = clock()
            assert await engine.run_until_idle() == 1  # approved, doomed fails
            done = await engine.get_run(run_.id)
            assert done is not None
            assert done.run.status is RunStatus.FAILED
        return marks

    marks = run(scenario())
    assert [_shape(e) for e in hooks.events] == [
        ("RunStarted", 1),
        ("StepStarted", "flaky", 1),
        ("RetryScheduled", "flaky", 1, False),
        ("StepCompleted", "flaky", 2),
        ("StepStarted", "patient", 1),
        ("RetryScheduled", "patient", 1, True),
        ("RunSuspended", "retry", "patient", 1),
        ("RunStarted", 2),
        ("StepStarted", "patient", 2),
        ("StepCompleted", "patient", 2),
        ("StepStarted", "nap", 1),
        ("RunSuspended", "sleep", "nap", 2),
        ("RunStarted", 3),
        ("StepCompleted", "nap", 0),
        ("StepStarted", "approved", 1),
        ("RunSuspended", "wait", "approved", 3),
        ("RunStarted", 4),
        ("StepCompleted", "approved", 0),
        ("StepStarted", "doomed", 1),
        ("StepFailed", "doomed", 1),
        ("RunFailed",),
    ]
    run_id = hooks.events[0].run_id
    assert all(e.run_id == run_id and e.workflow == "journey" for e in hooks.events)
    # Stamped by the engine's clock; the monotonic clock only goes forward.
    starts = hooks.of(RunStarted)
    assert [e.at for e in starts] == [
        marks["enqueued"],
        marks["retried"],
        marks["woke"],
        marks["approved"],
    ]
    stamps = [e.monotonic for e in hooks.events]
    assert stamps == sorted(stamps)
    assert starts[0].claim_latency == 0.0  # claimed at the enqueue's (fake) instant
    assert [e.claim_latency for e in starts[1:]] == [None, None, None]
    assert [e.claimed_at for e in starts] == [e.at for e in starts]

    retry_later = hooks.of(RetryScheduled)[1]
    assert (retry_later.delay, retry_later.retry_at) == (60, marks["enqueued"] + 60_000)
    assert retry_later.error.type == "ConnectionError"
    sleep, wait = hooks.of(RunSuspended)[1:]
    assert (sleep.wake_at, sleep.event) == (marks["retried"] + 3_600_000, None)
    assert (wait.wake_at, wait.event) == (None, "approved")
    # A sleep's and a wait's duration is how long they lasted (the fake clock's hour).
    nap, approved = (e for e in hooks.of(StepCompleted) if e.step in ("nap", "approved"))
    assert nap.duration == HOUR
    assert approved.duration == 5.0
    failed = hooks.of(StepFailed)[0]
    assert failed.error.type == "ValueError" and failed.error.step == "doomed"
    assert hooks.of(RunFailed)[0].error == failed.error
    for event in hooks.events:
        duration = getattr(event, "duration", None)
        if isinstance(event, RunSuspended | RunFailed | StepFailed) or (
            isinstance(event, StepCompleted) and event.step in ("flaky", "patient")
        ):
            assert duration is not None and duration >= 0, event


def test_nothing_is_built_when_nobody_listens(
    storage_factory: Any, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An engine without hooks or streams never builds an event, on any path."""
    built: list[Any] = []
    original = RunExecution.emit

    async def spy(self: RunExecution, kind: type[Any], **fields: Any) -> None:
        built.append(kind)
        await original(self, kind, **fields)

    monkeypatch.setattr(RunExecution, "emit", spy)
    wf = _journey({})

    async def scenario() -> RunStatus:
        async with open_engine(storage_factory, [wf], clock) as engine:
            run_ = await engine.enqueue(wf)
            await engine.run_until_idle()
            clock.advance(60)
            await engine.run_until_idle()
            clock.advance(HOUR)
            await engine.run_until_idle()
            assert await engine.send_event(run_.id, "approved")
            await engine.run_until_idle()
            view = await engine.get_run(run_.id)
            assert view is not None
            return view.run.status

    assert run(scenario()) is RunStatus.FAILED
    assert built == []


def _blocking(entered: asyncio.Event, gate: asyncio.Event) -> Workflow[Any]:
    wf: Workflow[Any] = Workflow("blocking")

    @wf.step
    async def hold(ctx: StepContext[Any]) -> None:
        entered.set()
        await gate.wait()

    return wf


def test_cancellation_is_announced_once_per_engine(storage_factory: Any) -> None:
    """A run cancelled while idle: the cancelling engine says so; a run executing here:
    its execution says so when it stops (executing=True), and nothing else does."""
    hooks = Everything()
    entered, gate = asyncio.Event(), asyncio.Event()
    wf = _blocking(entered, gate)

    async def scenario() -> tuple[str, str]:
        async with open_engine(storage_factory, [wf], hooks=[hooks]) as engine:
            idle = await engine.enqueue(wf)
            assert await engine.cancel(idle.id)
            busy = await engine.enqueue(wf)
            await engine.start()
            await asyncio.wait_for(entered.wait(), 10)
            assert await engine.cancel(busy.id)
            await engine.wait_for(busy.id, within=10)
            assert not await engine.cancel(busy.id)  # already ended: nothing to announce
            gate.set()
            return idle.id, busy.id

    idle_id, busy_id = run(scenario())
    cancelled = hooks.of(RunCancelled)
    assert [(e.run_id, e.executing, e.step, e.attempt) for e in cancelled] == [
        (idle_id, False, None, None),
        (busy_id, True, "hold", 1),
    ]
    assert cancelled[1].duration is not None and cancelled[1].duration >= 0
    assert not hooks.of(RunInterrupted) and not hooks.of(LeaseLost)


def test_a_lost_lease_is_announced(storage_factory: Any) -> None:
    """The store takes the run away (here: reset to pending behind the holder's back);
    the holder's next heartbeat is refused and it stops, announcing the lost lease."""
    hooks = Everything()
    entered, gate = asyncio.Event(), asyncio.Event()
    wf = _blocking(entered, gate)
    lease = LeaseOptions(duration=2.0, heartbeat_interval=0.05)

    async def scenario() -> str:
        lost = asyncio.Event()

        class Signal:
            def reflow_lease_lost(self, event: LeaseLost) -> None:
                lost.set()

        hooked = [hooks, Signal()]
        # One slot, held by the run: the engine cannot claim the run back itself (which
        # would hand the new lease to the execution in progress) before its heartbeat.
        async with open_engine(
            storage_factory, [wf], hooks=hooked, lease=lease, concurrency=1
        ) as engine:
            run_ = await engine.enqueue(wf)
            await engine.start()
            await asyncio.wait_for(entered.wait(), 10)
            assert await engine.storage.update_run_status(run_.id, RunStatus.PENDING)
            await asyncio.wait_for(lost.wait(), 10)
            gate.set()
            return run_.id

    run_id = run(scenario())
    lost = hooks.of(LeaseLost)[0]
    assert (lost.run_id, lost.step, lost.attempt) == (run_id, "hold", 1)
    assert "refused its heartbeat" in lost.reason
    assert lost.duration is not None and lost.duration > 0


def test_a_stop_interrupting_a_run_is_announced(storage_factory: Any) -> None:
    hooks = Everything()
    entered, gate = asyncio.Event(), asyncio.Event()
    wf = _blocking(entered, gate)

    async def scenario() -> str:
        storage = storage_factory()
        engine = Engine(storage, [wf], hooks=[hooks], use_plugins=False)
        try:
            run_ = await engine.enqueue(wf)
            await engine.start()
            await asyncio.wait_for(entered.wait(), 10)
            await engine.stop()
            view = await Engine(storage, [wf], use_plugins=False).get_run(run_.id)
            assert view is not None and view.run.status is RunStatus.PENDING
            return run_.id
        finally:
            gate.set()
            await storage.close()

    run_id = run(scenario())
    ends = [e for e in hooks.events if not isinstance(e, RunStarted | StepStarted)]
    assert [(type(e), e.run_id, getattr(e, "reason", None)) for e in ends] == [
        (RunInterrupted, run_id, "engine_stopped")
    ]
    assert ends[0].step == "hold"  # type: ignore[union-attr]


def test_outcomes_are_logged_on_named_loggers_with_fields(
    storage_factory: Any, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    wf = _journey({})

    async def scenario() -> str:
        async with open_engine(storage_factory, [wf], clock) as engine:
            run_ = await engine.enqueue(wf)
            await engine.run_until_idle()
            clock.advance(60)
            await engine.run_until_idle()
            clock.advance(HOUR)
            await engine.run_until_idle()
            assert await engine.send_event(run_.id, "approved")
            await engine.run_until_idle()
            return run_.id

    with caplog.at_level(logging.DEBUG, logger="reflow"):
        run_id = run(scenario())
    mine = [r for r in caplog.records if getattr(r, "run_id", None) == run_id]
    fields = {(r.name, r.levelname, r.step, r.attempt) for r in mine}  # type: ignore[attr-defined]
    assert ("reflow.steps", "INFO", "flaky", 1) in fields  # retry scheduled
    assert ("reflow.steps", "INFO", "patient", 1) in fields
    assert ("reflow.steps", "INFO", "doomed", 1) in fields  # failed for good
    assert ("reflow.runs", "WARNING", "doomed", 4) in fields  # the run failed (4th claim)
    assert all(getattr(r, "workflow", None) == "journey" for r in mine)
    retry = next(r for r in mine if r.name == "reflow.steps" and r.step == "patient")  # type: ignore[attr-defined]
    assert "retrying in 60s" in retry.getMessage()
