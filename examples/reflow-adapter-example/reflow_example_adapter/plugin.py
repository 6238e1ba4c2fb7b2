"""The entry point: ``[project.entry-points.reflow] example = "reflow_example_adapter.plugin"``.

Reflow loads this module through the ``reflow`` entry-point group and calls its
:func:`reflow_adapters` hook, exactly as it does for its own built-in adapters.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from reflow_core import CONTRACT_VERSION as REFLOW_CONTRACT
from reflow_core import AdapterSpec, Capability, Clock, ConfigError, hookimpl

from reflow_example_adapter import CONTRACT_VERSION
from reflow_example_adapter.storage import ExampleStorage

__all__ = ["reflow_adapters"]

if REFLOW_CONTRACT.partition(".")[0] != CONTRACT_VERSION.partition(".")[0]:
    # A major version changes method signatures or guarantees: registering anyway would
    # hand the engine an adapter that breaks the contract it relies on.
    raise ImportError(
        f"reflow-adapter-example implements storage contract {CONTRACT_VERSION}, but the "
        f"installed reflow speaks contract {REFLOW_CONTRACT}"
    )


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


def _fresh(
    tmp_path: Path, options: Mapping[str, str], *, clock: Clock | None = None
) -> ExampleStorage:
    """A fresh, empty store for one conformance case (a new random name; no files), on the
    kit's ``clock``: the kit moves time by hand, and this store must follow it."""
    if options:
        raise ConfigError(f"the example adapter takes no --reflow-option, got {dict(options)}")
    return ExampleStorage(clock=clock)


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
