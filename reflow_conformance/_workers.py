"""Entry points of the racer processes (importable by ``multiprocessing`` spawn).

Each process opens its own handle with ``open_storage(url)``, initializes it, prepares
(a task may first wait for the store's clock), waits at the shared barrier, then races;
results go back through a queue as plain data.

A handle in another process cannot share the kit's clock: it reads the store's own
"now" (the server's clock, or the system clock of a single-host store). A task that
needs a lease to have expired therefore polls ``now()`` until it has, bounded by
:data:`CLOCK_WAIT_S`, instead of sleeping for a fixed time.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from typing import Any

from reflow_core.registry import open_storage

__all__ = ["CLOCK_WAIT_S", "race_process"]

CLOCK_WAIT_S = 30.0
"""How long a racer waits for the store's clock to reach a time before giving up."""

LEASE_MS = 60_000
"""The lease the racers ask for: long enough never to expire during the race."""


async def _claim_all(storage: Any, names: list[str]) -> list[tuple[str, str]]:
    claimed = []
    while (run := await storage.claim_next_run(names, lease_ms=LEASE_MS)) is not None:
        claimed.append((run.run.id, run.lease_id))
    return claimed


async def _claim_schedule(storage: Any, names: list[str]) -> list[int]:
    claimed = await storage.claim_due_schedule(names)
    return [] if claimed is None else [claimed.slot]


async def _take_over(storage: Any, names: list[str], _: int) -> list[Any]:
    claimed = await storage.claim_next_run(names, lease_ms=LEASE_MS)
    if claimed is None:
        return []
    return [claimed.run.id, claimed.lease_id, claimed.run.recoveries]


async def _wait_for_store_clock(storage: Any, at: int) -> None:
    """Poll the store's ``now()`` until it reaches ``at`` (bounded)."""
    deadline = time.monotonic() + CLOCK_WAIT_S
    while (now := await storage.now()) < at:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"the store's now() stayed at {now}, below {at}, for {CLOCK_WAIT_S} s"
            )
        await asyncio.sleep(0.002)


async def _main(url: str, barrier: Any, task: str, args: tuple[Any, ...]) -> Any:
    storage = open_storage(url)
    try:
        await storage.initialize()
        if task == "take_over":
            await _wait_for_store_clock(storage, args[1])
        barrier.wait(60)
        if task == "claim_all":
            return await _claim_all(storage, *args)
        if task == "claim_schedule":
            return await _claim_schedule(storage, *args)
        if task == "take_over":
            return await _take_over(storage, *args)
        raise ValueError(f"unknown racer task {task!r}")
    finally:
        await storage.close()


def race_process(
    url: str, barrier: Any, results: Any, index: int, task: str, args: tuple[Any, ...]
) -> None:
    """Run one racer; put ``(index, "ok", value)`` or ``(index, "error", text)``."""
    try:
        value = asyncio.run(_main(url, barrier, task, args))
    except BaseException as exc:
        try:
            barrier.abort()
        finally:
            results.put((index, "error", "".join(traceback.format_exception(exc))))
        return
    results.put((index, "ok", value))
