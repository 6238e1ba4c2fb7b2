"""The Coalescer that batches concurrent PostgreSQL writes: how batches form and end.

The sender here is a real coroutine that records each batch and, where a test needs to
hold a batch in flight, waits on an event the test sets.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import pytest

from reflow_adapters.postgres.coalesce import Coalescer

Item = tuple[str, int]  # (key, value)


class Sender:
    """Answers each item with its value doubled; holds batches while ``gate`` is clear."""

    def __init__(self) -> None:
        self.batches: list[list[Item]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.in_flight = 0
        self.most_in_flight = 0

    async def __call__(self, items: Sequence[Item]) -> list[int | BaseException]:
        self.batches.append(list(items))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self.gate.wait()
        finally:
            self.in_flight -= 1
        return [ValueError(key) if value < 0 else value * 2 for key, value in items]

    async def hold(self, co: Coalescer[Item, int], item: Item) -> asyncio.Task[int]:
        """Submit ``item`` with the gate closed; return once its batch is in flight."""
        self.gate.clear()
        before = self.in_flight
        task = asyncio.create_task(co.submit(item))
        await until(lambda: self.in_flight > before)
        return task


def coalescer(sender: Sender, *, max_batch: int = 64, lanes: int = 1) -> Coalescer[Item, int]:
    return Coalescer(sender, key=lambda item: item[0], max_batch=max_batch, lanes=lanes)


async def until(predicate: Callable[[], bool]) -> None:
    """Let the loop turn until ``predicate()`` holds (bounded: a bug fails, not hangs)."""
    async with asyncio.timeout(5):
        # sleep(0) yields one loop turn, no wall time: the state watched is the
        # coalescer's own, which sets no event.
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0)


def test_calls_of_one_loop_turn_share_one_batch_and_get_their_own_answers() -> None:
    async def main() -> None:
        sender = Sender()
        co = coalescer(sender, lanes=3)
        answers = await asyncio.gather(*(co.submit((f"k{i}", i)) for i in range(10)))
        assert answers == [i * 2 for i in range(10)]
        assert sender.batches == [[(f"k{i}", i) for i in range(10)]]
        assert (co.batches, co.items) == (1, 10)

    asyncio.run(main())


def test_a_lone_call_is_sent_at_once_and_alone() -> None:
    async def main() -> None:
        sender = Sender()
        co = coalescer(sender)
        assert await co.submit(("a", 1)) == 2
        assert await co.submit(("b", 2)) == 4
        assert sender.batches == [[("a", 1)], [("b", 2)]]

    asyncio.run(main())


def test_calls_that_arrive_while_every_lane_is_busy_go_together_in_the_next_batch() -> None:
    async def main() -> None:
        sender = Sender()
        sender.gate.clear()
        co = coalescer(sender, lanes=2)
        first = [asyncio.create_task(co.submit((f"a{i}", i))) for i in range(2)]
        await until(lambda: sender.in_flight == 1)
        second = asyncio.create_task(co.submit(("b", 5)))
        await until(lambda: sender.in_flight == 2)
        waiting = [asyncio.create_task(co.submit((f"c{i}", i))) for i in range(5)]
        await until(lambda: len(co._queue) == 5)
        assert sender.most_in_flight == 2  # no third lane opened
        sender.gate.set()
        assert await asyncio.gather(*first, second, *waiting) == [0, 2, 10, 0, 2, 4, 6, 8]
        assert [len(batch) for batch in sender.batches] == [2, 1, 5]

    asyncio.run(main())


def test_one_key_never_appears_twice_in_a_batch_and_keeps_its_order() -> None:
    async def main() -> None:
        sender = Sender()
        co = coalescer(sender)
        items = [("x", 1), ("y", 2), ("x", 3), ("x", 4), ("z", 5)]
        assert await asyncio.gather(*(co.submit(item) for item in items)) == [2, 4, 6, 8, 10]
        assert sender.batches == [[("x", 1), ("y", 2), ("z", 5)], [("x", 3)], [("x", 4)]]

    asyncio.run(main())


def test_a_key_in_flight_waits_for_its_answer_even_with_a_lane_free() -> None:
    async def main() -> None:
        sender = Sender()
        sender.gate.clear()
        co = coalescer(sender, lanes=3)
        first = asyncio.create_task(co.submit(("x", 1)))
        await until(lambda: sender.in_flight == 1)
        again = asyncio.create_task(co.submit(("x", 2)))
        other = asyncio.create_task(co.submit(("y", 3)))
        await until(lambda: sender.in_flight == 2)
        assert sender.batches == [[("x", 1)], [("y", 3)]]  # x again is held back
        await asyncio.sleep(0)
        assert sender.in_flight == 2 and not again.done()
        sender.gate.set()
        assert list(await asyncio.gather(first, again, other)) == [2, 4, 6]
        assert sender.batches[2] == [("x", 2)]

    asyncio.run(main())


def test_max_batch_bounds_a_batch() -> None:
    async def main() -> None:
        sender = Sender()
        co = coalescer(sender, max_batch=4)
        await asyncio.gather(*(co.submit((f"k{i}", i)) for i in range(10)))
        assert [len(batch) for batch in sender.batches] == [4, 4, 2]

    asyncio.run(main())


def test_an_exception_outcome_reaches_only_its_caller() -> None:
    async def main() -> None:
        sender = Sender()
        co = coalescer(sender)
        results = await asyncio.gather(
            co.submit(("a", 1)),
            co.submit(("bad", -1)),
            co.submit(("c", 3)),
            return_exceptions=True,
        )
        assert results[0] == 2 and results[2] == 6
        assert isinstance(results[1], ValueError) and results[1].args == ("bad",)
        assert len(sender.batches) == 1

    asyncio.run(main())


def test_a_sender_that_raises_fails_every_caller_of_its_batch_and_the_next_batch_runs() -> None:
    async def main() -> None:
        calls = 0

        async def send(items: Sequence[Item]) -> list[int | BaseException]:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("server gone")
            return [value for _, value in items]

        co: Coalescer[Item, int] = Coalescer(send, key=lambda i: i[0], max_batch=2, lanes=1)
        results = await asyncio.gather(
            *(co.submit((f"k{i}", i)) for i in range(3)), return_exceptions=True
        )
        assert [type(r) for r in results[:2]] == [RuntimeError, RuntimeError]
        assert results[2] == 2

    asyncio.run(main())


def test_a_caller_cancelled_before_its_batch_left_is_never_sent() -> None:
    async def main() -> None:
        sender = Sender()
        co = coalescer(sender)
        busy = await sender.hold(co, ("a", 1))
        dropped = asyncio.create_task(co.submit(("b", 2)))
        kept = asyncio.create_task(co.submit(("c", 3)))
        await until(lambda: len(co._queue) == 2)
        dropped.cancel()
        sender.gate.set()
        assert await busy == 2 and await kept == 6
        with pytest.raises(asyncio.CancelledError):
            await dropped
        assert sender.batches == [[("a", 1)], [("c", 3)]]

    asyncio.run(main())


def test_a_caller_cancelled_while_its_batch_is_out_leaves_the_others_answered() -> None:
    async def main() -> None:
        sender = Sender()
        sender.gate.clear()
        co = coalescer(sender)
        gone = asyncio.create_task(co.submit(("a", 1)))
        stays = asyncio.create_task(co.submit(("b", 2)))
        await until(lambda: sender.in_flight == 1)
        gone.cancel()
        await asyncio.sleep(0)
        sender.gate.set()
        assert await stays == 4
        assert gone.cancelled()
        await co.idle()

    asyncio.run(main())


def test_idle_waits_for_the_batch_in_flight() -> None:
    async def main() -> None:
        sender = Sender()
        co = coalescer(sender)
        call = await sender.hold(co, ("a", 1))
        idle = asyncio.create_task(co.idle())
        await asyncio.sleep(0)
        assert not idle.done()
        sender.gate.set()
        await idle
        assert call.done() and call.result() == 2

    asyncio.run(main())


def test_cancelling_a_wait_for_idle_leaves_the_batch_in_flight_running() -> None:
    async def main() -> None:
        sender = Sender()
        co = coalescer(sender)
        call = await sender.hold(co, ("a", 1))
        idle = asyncio.create_task(co.idle())
        await asyncio.sleep(0)
        idle.cancel()
        with pytest.raises(asyncio.CancelledError):
            await idle
        sender.gate.set()
        assert await call == 2  # the batch was not cancelled with the wait

    asyncio.run(main())


def test_idle_cancels_a_batch_that_outlasts_cancel_after() -> None:
    async def main() -> None:
        sender = Sender()
        co = coalescer(sender, lanes=2)
        stuck = await sender.hold(co, ("a", 1))  # never opened: the batch would wait forever
        await co.idle(cancel_after=0.05)
        assert sender.in_flight == 0 and not co._busy
        with pytest.raises(asyncio.CancelledError):
            await stuck

    asyncio.run(main())


def test_callers_of_a_stopped_batch_get_the_stopped_error_when_one_is_given() -> None:
    async def main() -> None:
        sender = Sender()
        co: Coalescer[Item, int] = Coalescer(
            sender, key=lambda i: i[0], max_batch=8, lanes=1, stopped=lambda: OSError("closed")
        )
        stuck = await sender.hold(co, ("a", 1))
        await co.idle(cancel_after=0.01)
        with pytest.raises(OSError, match="closed"):
            await stuck

    asyncio.run(main())


@pytest.mark.parametrize(("max_batch", "lanes"), [(0, 1), (1, 0)])
def test_bounds_below_one_are_refused(max_batch: int, lanes: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        coalescer(Sender(), max_batch=max_batch, lanes=lanes)
