"""Concurrent calls coalesced into one statement: fewer round trips and commits under load.

A worker with many runs in flight saves many checkpoints at the same moment. Each on its
own costs a pool checkout, a round trip and a commit (a WAL flush on the server): most of
a 5-step run's cost on both sides of the wire. A :class:`Coalescer` sends the calls that
arrive together as one batch, so one statement and one commit serve them all.

How a batch forms (the "natural batching" of group commit): a call that finds a lane
free starts a batch on the next turn of the event loop, so the calls of the same turn go
with it; calls that arrive while every lane is busy wait for the next batch, which takes
everything queued by then. Alone, a call waits for nothing extra; under load, batches
grow with the load. Several lanes run at once, so one statement that waits on a row lock
delays only its own batch, not every write of the process.

A call whose caller was cancelled before its batch left is dropped, as a statement never
sent. Two items with the same key are never out at once: one statement may not touch a
row twice, and two statements in flight would race. The later waits for the earlier's
answer, so writes of one row land in the order they were made.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Generic, TypeVar

__all__ = ["Coalescer"]

T = TypeVar("T")
R = TypeVar("R")


class Coalescer(Generic[T, R]):
    """Runs ``send(items)`` for batches of concurrent :meth:`submit` calls.

    ``send`` returns one outcome per item, in order: the item's result, or the exception
    that item's caller is to raise (a fresh one per caller). If ``send`` itself raises,
    every caller of that batch gets the exception. A batch cancelled by :meth:`idle`
    gives each of its callers ``stopped()`` (cancelled callers, without it).
    """

    def __init__(
        self,
        send: Callable[[Sequence[T]], Awaitable[Sequence[R | BaseException]]],
        *,
        key: Callable[[T], Hashable],
        max_batch: int,
        lanes: int,
        stopped: Callable[[], BaseException] | None = None,
    ) -> None:
        if max_batch < 1 or lanes < 1:
            raise ValueError("max_batch and lanes must be at least 1")
        self._send = send
        self._key = key
        self._max_batch = max_batch
        self._lanes = lanes
        self._stopped = stopped
        self._queue: deque[tuple[T, asyncio.Future[R]]] = deque()
        self._busy: set[asyncio.Task[None]] = set()
        self._out: set[Hashable] = set()
        """Keys of the batches in flight: an item with one of them waits, so two writes of
        one row never race each other from one process."""
        # Lanes started and not yet past their last look at the queue. Counted by the
        # lane itself, not by a done callback: a callback runs a loop turn after the
        # lane has stopped taking work, and a call in that turn would find no lane free
        # and none coming.
        self._open = 0
        self.batches = 0
        """Batches sent so far (with :attr:`items`: how much coalescing happened)."""
        self.items = 0
        """Items sent so far, in all batches."""

    async def submit(self, item: T) -> R:
        """``item``'s outcome, once the batch that carries it has been sent."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._queue.append((item, future))
        if self._open < self._lanes:
            self._open += 1
            lane = loop.create_task(self._lane())
            self._busy.add(lane)
            lane.add_done_callback(self._busy.discard)
        return await future

    async def idle(self, cancel_after: float | None = None) -> None:
        """Wait until no batch is in flight (``close()`` lets writes already sent finish).

        After ``cancel_after`` seconds the batches still out (a statement waiting on a lock
        someone never releases) are cancelled, and their callers with them. If the
        caller of ``idle`` is cancelled, the batches go on: ``asyncio.wait``, unlike
        ``gather``, does not cancel what it waits for.
        """
        loop = asyncio.get_running_loop()
        until = None if cancel_after is None else loop.time() + cancel_after
        while self._busy:
            left = None if until is None else max(0.0, until - loop.time())
            _, late = await asyncio.wait(self._busy, timeout=left)
            if late and until is not None and loop.time() >= until:
                for lane in late:
                    lane.cancel()
                await asyncio.wait(late)

    async def _lane(self) -> None:
        try:
            while self._queue:
                batch = self._take()
                if not batch:
                    # What is queued waits for a batch in flight; the lane that sent it
                    # looks at the queue again when its answer comes.
                    break
                keys = [self._key(item) for item, _ in batch]
                self._out.update(keys)
                try:
                    await self._send_batch(batch)
                finally:
                    self._out.difference_update(keys)
        finally:
            self._open -= 1

    async def _send_batch(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        self.batches += 1
        self.items += len(batch)
        try:
            outcomes = await self._send([item for item, _ in batch])
        except asyncio.CancelledError:
            for _, future in batch:
                if future.done():
                    continue
                if self._stopped is None:
                    future.cancel()
                else:
                    future.set_exception(self._stopped())
            raise
        except Exception as exc:  # a defect of send(): its callers are told
            outcomes = [exc] * len(batch)
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if future.done():  # its caller was cancelled while the batch was out
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    def _take(self) -> list[tuple[T, asyncio.Future[R]]]:
        batch: list[tuple[T, asyncio.Future[R]]] = []
        later: list[tuple[T, asyncio.Future[R]]] = []
        keys: set[Hashable] = set()
        queue = self._queue
        while queue and len(batch) < self._max_batch:
            entry = queue.popleft()
            if entry[1].done():  # cancelled before it was sent: never sent
                continue
            key = self._key(entry[0])
            if key in keys or key in self._out:
                later.append(entry)
                continue
            keys.add(key)
            batch.append(entry)
        queue.extendleft(reversed(later))
        return batch
