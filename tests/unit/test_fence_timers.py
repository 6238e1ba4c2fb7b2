"""Fence timers are shared per deadline (issue 13): runs claimed in one batch get one
loop timer, which aborts exactly the runs still fenced at it when it fires and is
cancelled once the last of them has left."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from reflow_core.errors import LeaseExpiredError
from reflow_core.execution.active import FENCED, ActiveRun, FenceTimers


class _CountingLoop(asyncio.SelectorEventLoop):
    """A loop that keeps every timer it hands out."""

    def __init__(self) -> None:
        super().__init__()
        self.timers: list[asyncio.TimerHandle] = []

    def call_at(self, when: float, callback: Any, *args: Any, context: Any = None) -> Any:
        timer = super().call_at(when, callback, *args, context=context)
        self.timers.append(timer)
        return timer


def _run_on_counting_loop(scenario: Any) -> None:
    loop = _CountingLoop()
    try:
        loop.run_until_complete(scenario(loop))
    finally:
        loop.close()


def _held(run_id: str, deadline: float, fences: FenceTimers) -> ActiveRun:
    return ActiveRun(
        run_id=run_id, workflow="w", lease_id="l", attempt=1, deadline=deadline, fences=fences
    )


def test_one_timer_per_deadline_aborts_only_the_runs_still_fenced_at_it() -> None:
    async def scenario(loop: _CountingLoop) -> None:
        fences = FenceTimers()
        passed = loop.time() - 1  # already passed: the timer fires at the next loop turn
        ended, renewed, stuck = (_held(f"r{i}", passed, fences) for i in range(3))
        for run in (ended, renewed, stuck):
            run.arm()
        assert len(loop.timers) == 1  # one batch, one deadline, one timer

        ended.disarm()  # finished before its fence
        renewed.renewed(loop.time(), 60)  # a confirmed heartbeat: fenced a minute later
        assert len(loop.timers) == 2

        stuck.task = asyncio.create_task(asyncio.Event().wait())
        with pytest.raises(asyncio.CancelledError):
            await stuck.task  # cancelled by the shared timer, not by this test

        assert isinstance(stuck.abort_reason, LeaseExpiredError)
        assert FENCED in str(stuck.abort_reason)
        assert ended.abort_reason is None
        assert renewed.abort_reason is None
        renewed.disarm()
        assert loop.timers[1].cancelled()  # its last run left: the later timer is gone

    _run_on_counting_loop(scenario)


def test_the_timer_is_cancelled_when_its_last_run_leaves() -> None:
    async def scenario(loop: _CountingLoop) -> None:
        fences = FenceTimers()
        deadline = loop.time() + 60
        first, second = _held("a", deadline, fences), _held("b", deadline, fences)
        first.arm()
        second.arm()
        (timer,) = loop.timers
        first.disarm()
        assert not timer.cancelled()  # the other run is still fenced at it
        second.disarm()
        assert timer.cancelled()
        first.disarm()  # disarming twice is harmless
        assert len(loop.timers) == 1

    _run_on_counting_loop(scenario)


def test_a_run_given_no_fence_timers_gets_its_own() -> None:
    async def scenario(loop: _CountingLoop) -> None:
        one = ActiveRun(run_id="a", workflow="w", lease_id="l", attempt=1, deadline=loop.time())
        other = ActiveRun(run_id="b", workflow="w", lease_id="l", attempt=1, deadline=one.deadline)
        one.arm()
        other.arm()
        assert len(loop.timers) == 2
        assert one.fences is not other.fences
        one.disarm()
        other.disarm()
        assert all(timer.cancelled() for timer in loop.timers)

    _run_on_counting_loop(scenario)


def test_the_timers_follow_the_engine_onto_another_loop() -> None:
    fences = FenceTimers()

    async def scenario(loop: _CountingLoop) -> None:
        run = _held("r", loop.time() - 1, fences)
        run.task = asyncio.create_task(asyncio.Event().wait())
        run.arm()
        assert len(loop.timers) == 1  # on this loop, not on a closed earlier one
        with pytest.raises(asyncio.CancelledError):
            await run.task
        assert isinstance(run.abort_reason, LeaseExpiredError)

    _run_on_counting_loop(scenario)
    _run_on_counting_loop(scenario)
