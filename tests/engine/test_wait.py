"""Waiting for external events on every adapter: buffering, typed payloads, deadlines
that survive reclaims, defaults, and never losing a consumed event."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from flow_support import Recorder, open_engine
from helpers import FakeClock, run

from reflow_core import (
    ConfigError,
    RunStatus,
    SerializationError,
    StepContext,
    StepResult,
    StepStarted,
    StepStatus,
    ValidationError,
    Workflow,
)

HOUR_MS = 3_600_000


class Approval(msgspec.Struct):
    by: str
    level: int


def _approval_flow(
    seen: list[Any], *, timeout: Any = None, default: Any = None, typed: bool = False
) -> Workflow[Any]:
    wf: Workflow[Any] = Workflow("approval")

    @wf.step
    def ask(ctx: StepContext[Any]) -> str:
        seen.append("ask")
        return "asked"

    options: dict[str, Any] = {}
    if timeout is not None:
        options["timeout"] = timeout
    if default is not None:
        options["default"] = default
    wf.wait_for_event("approved", type=Approval if typed else None, **options)

    @wf.step
    def act(ctx: StepContext[Any]) -> Any:
        seen.append(ctx.prev)
        seen.append(ctx.steps["approved"])
        return "done"

    return wf


def test_event_sent_while_waiting_resumes_the_run(storage_factory: Any, clock: FakeClock) -> None:
    seen: list[Any] = []
    recorder = Recorder()
    wf = _approval_flow(seen)

    async def scenario() -> None:
        async with open_engine(storage_factory, [wf], clock, hooks=[recorder]) as engine:
            run_ = await engine.enqueue(wf)
            assert await engine.run_until_idle() == 1
            view = await engine.get_run(run_.id)
            assert view is not None
            assert view.run.status is RunStatus.WAITING
            assert view.run.waiting_for == "approved"
            assert view.run.wake_at is None  # no timeout: waits forever
            assert await engine.run_until_idle() == 0
            assert await engine.send_event(run_.id, "approved", {"by": "ada"}) is True
            assert await engine.run_until_idle() == 1
            done = await engine.get_run(run_.id)
            assert done is not None
            assert done.run.status is RunStatus.COMPLETED
            wait_row = next(s for s in done.steps if s.name == "approved")
            assert (wait_row.status, wait_row.output) == (StepStatus.COMPLETED, {"by": "ada"})

    run(scenario())
    assert seen == ["ask", {"by": "ada"}, {"by": "ada"}]
    assert recorder.steps(StepStarted) == ["ask", "approved", "act"]  # once, not per claim


def test_event_sent_before_the_wait_is_buffered(storage_factory: Any, clock: FakeClock) -> None:
    seen: list[Any] = []
    wf = _approval_flow(seen)

    async def scenario() -> None:
        async with open_engine(storage_factory, [wf], clock) as engine:
            run_ = await engine.enqueue(wf)
            assert await engine.send_event(run_.id, "approved", "first")
            assert await engine.send_event(run_.id, "approved", "second")
            assert await engine.run_until_idle() == 1
            done = await engine.get_run(run_.id)
            assert done is not None
            assert done.run.status is RunStatus.COMPLETED
            assert done.run.attempt == 1  # never suspended

    run(scenario())
    assert seen == ["ask", "first", "first"]  # the oldest event wins


def test_typed_payload_is_validated_when_sent(storage_factory: Any, clock: FakeClock) -> None:
    seen: list[Any] = []
    wf = _approval_flow(seen, typed=True)

    async def scenario() -> None:
        async with open_engine(storage_factory, [wf], clock) as engine:
            run_ = await engine.enqueue(wf)
            await engine.run_until_idle()
            with pytest.raises(ValidationError, match="level"):
                await engine.send_event(run_.id, "approved", {"by": "ada", "level": "high"})
            assert await engine.run_until_idle() == 0  # nothing was delivered
            assert await engine.send_event(run_.id, "approved", Approval(by="ada", level=2))
            assert await engine.run_until_idle() == 1

    run(scenario())
    assert seen == ["ask", Approval(by="ada", level=2), Approval(by="ada", level=2)]


def test_send_event_refusals(storage_factory: Any, clock: FakeClock) -> None:
    wf = _approval_flow([])

    async def scenario() -> None:
        async with open_engine(storage_factory, [wf], clock) as engine:
            assert await engine.send_event("no-such-run", "approved", 1) is False
            run_ = await engine.enqueue(wf)
            with pytest.raises(ConfigError, match="no wait_for_event named 'nope'"):
                await engine.send_event(run_.id, "nope", 1)
            with pytest.raises(SerializationError):
                await engine.send_event(run_.id, "approved", {1, 2})
            await engine.run_until_idle()
            assert await engine.cancel(run_.id)
            assert await engine.send_event(run_.id, "approved", 1) is False
            assert await engine.run_until_idle() == 0  # a cancelled waiting run stays so

    run(scenario())


def test_timeout_fails_the_run_and_survives_reclaims(
    storage_factory: Any, clock: FakeClock
) -> None:
    seen: list[Any] = []
    wf = _approval_flow(seen, timeout="1h")

    async def scenario() -> None:
        async with open_engine(storage_factory, [wf], clock) as engine:
            start = clock()
            run_ = await engine.enqueue(wf)
            await engine.run_until_idle()
            clock.advance(1800)
            # An early claim (cancel + resume) keeps the original deadline.
            assert await engine.cancel(run_.id) and await engine.resume(run_.id)
            assert await engine.run_until_idle() == 1
            view = await engine.get_run(run_.id)
            assert view is not None
            assert (view.run.status, view.run.wake_at) == (RunStatus.WAITING, start + HOUR_MS)
            clock.advance(1800)
            assert await engine.run_until_idle() == 1
            failed = await engine.get_run(run_.id)
            assert failed is not None
            assert failed.run.status is RunStatus.FAILED
            assert failed.run.error is not None
            assert failed.run.error.code == "WAIT_TIMEOUT"
            assert failed.run.error.step == "approved"
            row = next(s for s in failed.steps if s.name == "approved")
            assert row.status is StepStatus.FAILED

    run(scenario())
    assert seen == ["ask"]


def test_timeout_with_default_continues(storage_factory: Any, clock: FakeClock) -> None:
    seen: list[Any] = []
    wf = _approval_flow(seen, timeout="10m", default={"by": "nobody", "level": 0}, typed=True)

    async def scenario() -> None:
        async with open_engine(storage_factory, [wf], clock) as engine:
            run_ = await engine.enqueue(wf)
            await engine.run_until_idle()
            clock.advance(600)
            assert await engine.run_until_idle() == 1
            done = await engine.get_run(run_.id)
            assert done is not None
            assert done.run.status is RunStatus.COMPLETED

    run(scenario())
    assert seen[1] == Approval(by="nobody", level=0)


def test_a_buffered_event_wins_over_a_passed_deadline(
    storage_factory: Any, clock: FakeClock
) -> None:
    seen: list[Any] = []
    wf = _approval_flow(seen, timeout="1h")

    async def scenario() -> None:
        async with open_engine(storage_factory, [wf], clock) as engine:
            run_ = await engine.enqueue(wf)
            await engine.run_until_idle()
            clock.advance(7200)  # no worker ran while the deadline passed
            assert await engine.send_event(run_.id, "approved", "late but here")
            await engine.run_until_idle()
            done = await engine.get_run(run_.id)
            assert done is not None
            assert done.run.status is RunStatus.COMPLETED

    run(scenario())
    assert seen[1] == "late but here"


class _LoseLeaseBeforeConsume:
    """Storage proxy: just before the wait consumes, another worker takes the run over."""

    def __init__(self, inner: Any, clock: FakeClock) -> None:
        self._inner = inner
        self._clock = clock

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def consume_event(self, event_name: str, checkpoint: StepResult, lease_id: str) -> Any:
        self._clock.advance(3600)  # by the store's clock, the holder's lease has expired
        takeover = await self._inner.claim_next_run(["approval"], lease_ms=60_000)
        assert takeover is not None and takeover.lease_id != lease_id
        return await self._inner.consume_event(event_name, checkpoint, lease_id)


def test_an_event_is_not_consumed_under_a_lost_lease(
    storage_factory: Any, clock: FakeClock
) -> None:
    wf = _approval_flow([])

    async def scenario() -> None:
        inner = storage_factory(clock=clock)
        proxy = _LoseLeaseBeforeConsume(inner, clock)
        async with open_engine(lambda clock: proxy, [wf], clock) as engine:
            run_ = await engine.enqueue(wf)
            await engine.send_event(run_.id, "approved", {"n": 1})
            await engine.run_until_idle()  # the consume is refused: LeaseExpiredError
            view = await engine.get_run(run_.id)
            assert view is not None
            assert all(s.name != "approved" for s in view.steps)
            back = await inner.take_event(run_.id, "approved")  # left for the new owner
            assert back is not None
            assert back.payload == {"n": 1}

    run(scenario())


def test_wait_definition_errors() -> None:
    wf: Workflow[Any] = Workflow("bad")
    with pytest.raises(ConfigError, match="default= only makes sense"):
        wf.wait_for_event("w", default=1)
    with pytest.raises(ConfigError, match="timeout"):
        wf.wait_for_event("w", timeout=0)
