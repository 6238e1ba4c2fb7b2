"""Waiting for an :class:`asyncio.Event` with a timeout, without losing a cancellation.

On Python 3.11 ``asyncio.wait_for(event.wait(), t)`` returns normally when the task is
cancelled in the same loop iteration as the event is set: the cancellation is
swallowed (CPython gh-86296, fixed in 3.12). In a loop such as the dispatcher's or the
scheduler's that means ``Engine.stop()`` waits forever for a task that went back to
sleep. :func:`wait_set` awaits the event in the calling task under
:func:`asyncio.timeout`, which counts cancellations, so a stop always wins.

>>> import asyncio
>>> async def demo():
...     event = asyncio.Event()
...     late = await wait_set(event, 0.01)
...     event.set()
...     return late, await wait_set(event, 10)
>>> asyncio.run(demo())
(False, True)
"""

from __future__ import annotations

import asyncio

__all__ = ["wait_set"]


async def wait_set(event: asyncio.Event, seconds: float | None) -> bool:
    """Wait until ``event`` is set or ``seconds`` pass (``None``: no limit); ``True`` if it is set.

    A cancellation of the calling task always propagates, whatever it coincides with.
    """
    if event.is_set():
        return True
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        return event.is_set()
    return True
