"""Entry points of the racer processes (importable by ``multiprocessing`` spawn).

Each process opens its own handle with ``open_storage(url)``, initializes it, waits at
the shared barrier, then races; results go back through a queue as plain data.
"""

from __future__ import annotations

import asyncio
import traceback
from typing import Any

from reflow_core.registry import open_storage

__all__ = ["race_process"]


async def _claim_all(storage: Any, names: list[str]) -> list[tuple[str, str]]:
    claimed = []
    while (run := await storage.claim_next_run(names)) is not None:
        claimed.append((run.run.id, run.lease_id))
    return claimed


async def _claim_schedule(storage: Any, names: list[str], now: int) -> list[int]:
    claimed = await storage.claim_due_schedule(names, now)
    return [] if claimed is None else [claimed.slot]


async def _main(url: str, barrier: Any, task: str, args: tuple[Any, ...]) -> Any:
    storage = open_storage(url)
    try:
        await storage.initialize()
        barrier.wait(60)
        if task == "claim_all":
            return await _claim_all(storage, *args)
        if task == "claim_schedule":
            return await _claim_schedule(storage, *args)
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
