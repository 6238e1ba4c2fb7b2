"""The ``reflow`` entry point of the throw-away distribution :func:`faults.install` writes.

Processes spawned by the kit's ``*_processes`` cases open ``fault-*://`` URLs; they find
the fault adapters here, as they would find any installed adapter. In the process that
registered the faults by hand, this returns nothing (the names would clash).
"""

from __future__ import annotations

from faults.base import entry_point_specs
from reflow_core import AdapterSpec, hookimpl


@hookimpl
def reflow_adapters() -> list[AdapterSpec]:
    """Every fault adapter (in a spawned child), or none (where they are registered)."""
    return entry_point_specs()
