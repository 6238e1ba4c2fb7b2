"""Registers the ``sqlite`` adapter through the ``reflow`` entry-point group."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from reflow_adapters.sqlite.storage import SQLiteStorage
from reflow_adapters.sqlite_common.url import storage_arguments
from reflow_core import AdapterSpec, Capability, Clock, hookimpl

__all__ = ["make_storage", "reflow_adapters"]


def make_storage(url: str | None = None, **options: Any) -> SQLiteStorage:
    """``sqlite:///relative.db``, ``sqlite:////abs/path.db``, ``sqlite://`` (memory).

    Options: ``path``, ``clock``, ``busy_timeout_ms``, ``synchronous``, ``watch_ms``. No I/O.
    """
    path, arguments = storage_arguments(url, "sqlite", options)
    return SQLiteStorage(path, **arguments)


@hookimpl
def reflow_adapters() -> list[AdapterSpec]:
    """The ``sqlite`` adapter."""
    return [
        AdapterSpec(
            name="sqlite",
            factory=make_storage,
            schemes=("sqlite",),
            capabilities=frozenset(
                {
                    Capability.DURABLE,
                    Capability.CROSS_PROCESS,
                    Capability.THREADS,
                    Capability.NOTIFY,
                }
            ),
            conformance_factory=_conformance_storage,
            description="SQLite file through the standard library's sqlite3 (the default)",
        )
    ]


def _conformance_storage(
    tmp_path: Path, options: Mapping[str, str], *, clock: Clock | None = None
) -> SQLiteStorage:
    """A fresh adapter on a new file for one conformance case; ``clock`` is its "now"."""
    return SQLiteStorage(tmp_path / "conformance.db", clock=clock)
