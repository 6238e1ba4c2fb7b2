"""Small helpers shared by test modules (import as ``from helpers import run, FakeClock``)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one coroutine on a fresh event loop (the suite does not use pytest-asyncio)."""
    return asyncio.run(coro)


class FakeClock:
    """A clock tests move by hand (milliseconds since the epoch)."""

    def __init__(self, start: int = 1_700_000_000_000) -> None:
        self.now = start

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += round(seconds * 1000)
