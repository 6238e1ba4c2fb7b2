"""Registers :class:`MemoryStorage` as the ``memory`` adapter (entry point ``reflow``).

Loaded by the registry exactly as a third-party adapter plugin would be.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from reflow_adapters.memory.storage import MemoryStorage
from reflow_core import AdapterSpec, ConfigError, hookimpl
from reflow_core.storage import Clock

__all__ = ["reflow_adapters"]

_URLS = ("memory:", "memory://")


def _open(url: str | None = None, *, clock: Clock | None = None, **options: Any) -> MemoryStorage:
    """Build a fresh, empty store from ``memory://`` (or no URL) and an optional ``clock``."""
    if url is not None and url.lower() not in _URLS:
        raise ConfigError(
            f"the memory adapter has no location to open: got {url!r}; use 'memory://' "
            "(every memory:// store is a new, empty one)"
        )
    if options:
        raise ConfigError(
            f"unknown option(s) for the memory adapter: {', '.join(sorted(options))}; "
            "it accepts only clock"
        )
    return MemoryStorage(clock=clock)


def _fresh(
    tmp_path: Path, options: Mapping[str, str], *, clock: Clock | None = None
) -> MemoryStorage:
    """A fresh, empty store for one conformance case, on the kit's ``clock``.

    Nothing to place in ``tmp_path``, and no command-line option applies to memory.
    """
    return MemoryStorage(clock=clock)


@hookimpl
def reflow_adapters() -> list[AdapterSpec]:
    """The ``memory`` adapter: every contract method, no durability, one process."""
    return [
        AdapterSpec(
            name="memory",
            factory=_open,
            schemes=("memory",),
            capabilities=frozenset(),
            conformance_factory=_fresh,
            description="In-process storage: fast, not durable, not shared across processes.",
        )
    ]
