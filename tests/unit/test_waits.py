"""``wait_set``: a stop (cancellation) that coincides with the event being set, or with
the timeout, is never swallowed; Python 3.11's ``asyncio.wait_for`` swallows one
(gh-86296), which left ``Engine.stop()`` waiting forever for the scheduler's loop."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Awaitable, Callable

import pytest

from reflow_core.waits import wait_set

Waiter = Callable[[asyncio.Event, float], Awaitable[object]]


async def _with_wait_for(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)


async def _loop_survives_cancel(wait: Waiter, steps: int, seconds: float) -> bool:
    """A loop that waits like the dispatcher and the scheduler do, cancelled ``steps``
    loop iterations after its event is set; ``True`` if the cancellation was lost."""
    event = asyncio.Event()
    waiting = asyncio.Event()

    async def loop() -> None:
        while True:
            event.clear()
            waiting.set()
            await wait(event, seconds)

    task = asyncio.create_task(loop())
    await waiting.wait()
    waiting.clear()
    await asyncio.sleep(0)  # the loop is inside its wait now
    event.set()
    for _ in range(steps):
        await asyncio.sleep(0)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=1.0)
    if done:
        return False
    task.cancel()  # the first was lost: end the loop for good
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return True


@pytest.mark.parametrize("steps", range(8))
def test_a_cancel_as_the_event_is_set_always_stops_the_loop(steps: int) -> None:
    assert not asyncio.run(_loop_survives_cancel(wait_set, steps, 60.0))


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="asyncio.wait_for is fixed in 3.12")
def test_the_sweep_finds_the_interleaving_that_wait_for_loses() -> None:
    """The sweep above is worth something only if it reaches the interleaving where
    ``asyncio.wait_for`` loses the cancel."""
    lost = [asyncio.run(_loop_survives_cancel(_with_wait_for, k, 60.0)) for k in range(8)]
    assert any(lost), lost


def test_a_cancel_at_the_timeout_stops_the_loop() -> None:
    async def scenario() -> None:
        task = asyncio.create_task(wait_set(asyncio.Event(), 0))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())


def test_answers() -> None:
    async def scenario() -> tuple[bool, bool, bool]:
        event = asyncio.Event()
        timed_out = await wait_set(event, 0.001)
        event.set()
        already = await wait_set(event, 0)
        later = asyncio.Event()
        asyncio.get_running_loop().call_later(0.01, later.set)
        return timed_out, already, await wait_set(later, None)

    assert asyncio.run(scenario()) == (False, True, True)
