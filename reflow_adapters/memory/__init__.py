"""The in-memory storage adapter: the full contract, no durability, one process."""

from __future__ import annotations

from reflow_adapters.memory.storage import MemoryStorage

__all__ = ["MemoryStorage"]
