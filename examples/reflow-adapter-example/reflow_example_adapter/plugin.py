"""The entry point: ``[project.entry-points.reflow] example = "reflow_example_adapter.plugin"``.

Reflow loads this module through the ``reflow`` entry-point group and calls its
:func:`reflow_adapters` hook, exactly as it does for its own built-in adapters.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from reflow_core import AdapterSpec, Capability, Clock, ConfigError, hookimpl

from reflow_example_adapter.storage import ExampleStorage

__all__ = ["reflow_adapters"]


def _open(url: str | None = None, *, clock: Clock | None = None, **options: Any) -> ExampleStorage:
    """Build (no I/O) a handle on ``example://NAME``; ``example://`` or no URL is a new store."""
    if options:
        raise ConfigError(
            f"unknown option(s) for the example adapter: {', '.join(sorted(options))}; "
            "it accepts only clock"
        )
    name = None
    if url is not None:
        scheme, sep, rest = url.partition("://")
        if scheme.lower() != "example" or not sep or "/" in rest:
            raise ConfigError(f"not an example adapter URL: {url!r}; use 'example://NAME'")
        name = rest or None
    return ExampleStorage(name, clock=clock)


def _fresh(tmp_path: Path, options: Mapping[str, str]) -> ExampleStorage:
    """A fresh, empty store for one conformance case (a new random name; no files)."""
    if options:
        raise ConfigError(f"the example adapter takes no --reflow-option, got {dict(options)}")
    return ExampleStorage()


@hookimpl
def reflow_adapters() -> list[AdapterSpec]:
    """The ``example`` adapter: in-process, shared across threads, not durable."""
    return [
        AdapterSpec(
            name="example",
            factory=_open,
            schemes=("example",),
            capabilities=frozenset({Capability.THREADS}),
            conformance_factory=_fresh,
            description="Example third-party adapter: dicts and one lock, shared by name.",
        )
    ]
