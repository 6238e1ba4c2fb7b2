"""An example third-party storage adapter for Reflow (``example://NAME``).

Installing this distribution is all it takes: its ``reflow`` entry point makes the
adapter known to :func:`reflow_core.open_storage` and to the conformance kit
(``pytest --reflow-adapter=example``).
"""

from __future__ import annotations

from reflow_example_adapter.storage import ExampleStorage

__all__ = ["CONTRACT_VERSION", "ExampleStorage"]

CONTRACT_VERSION = "2.1"
"""The version of Reflow's storage contract (``reflow_core.CONTRACT_VERSION``) this
adapter implements. The plugin refuses to register under a different major version."""
