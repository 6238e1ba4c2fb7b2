"""Registers the ``apsw`` adapter through the ``reflow`` entry-point group.

APSW is an optional dependency (extra ``apsw``): nothing here imports it until an
adapter is built, so discovery never fails or warns where it is absent; building one
then raises a :class:`ConfigError` that says what to install.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reflow_adapters.sqlite_common.url import storage_arguments
from reflow_core import AdapterSpec, Capability, Clock, ConfigError, hookimpl

if TYPE_CHECKING:
    from reflow_adapters.apsw.storage import APSWStorage

__all__ = ["make_storage", "reflow_adapters"]


def _storage_class() -> type[APSWStorage]:
    try:
        from reflow_adapters.apsw.storage import APSWStorage
    except ImportError as exc:
        raise ConfigError(
            f"the apsw adapter needs APSW: pip install 'reflow[apsw]' ({exc})"
        ) from exc
    return APSWStorage


def make_storage(url: str | None = None, **options: Any) -> APSWStorage:
    """``apsw:///relative.db``, ``apsw:////abs/path.db``, ``apsw://`` (memory).

    Options: ``path``, ``clock``, ``busy_timeout_ms``, ``synchronous``, ``watch_ms``. No I/O.
    """
    path, arguments = storage_arguments(url, "apsw", options)
    return _storage_class()(path, **arguments)


def _conformance_storage(
    tmp_path: Path, options: Mapping[str, str], *, clock: Clock | None = None
) -> APSWStorage:
    """A fresh adapter on a new file for one conformance case; ``clock`` is its "now"."""
    return _storage_class()(tmp_path / "conformance.db", clock=clock)


@hookimpl
def reflow_adapters() -> list[AdapterSpec]:
    """The ``apsw`` adapter."""
    return [
        AdapterSpec(
            name="apsw",
            factory=make_storage,
            schemes=("apsw",),
            capabilities=frozenset(
                {
                    Capability.DURABLE,
                    Capability.CROSS_PROCESS,
                    Capability.THREADS,
                    Capability.NOTIFY,
                }
            ),
            conformance_factory=_conformance_storage,
            description="SQLite file through APSW, with its own bundled SQLite (extra apsw)",
        )
    ]
