"""The SQLite storage adapter on APSW (extra ``apsw``): same schema, newer bundled SQLite.

``APSWStorage`` is imported on first use, so that the plugin module (imported at
adapter discovery) loads even where APSW is not installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from reflow_adapters.apsw.storage import APSWStorage

__all__ = ["APSWStorage"]


def __getattr__(name: str) -> Any:
    if name == "APSWStorage":
        from reflow_adapters.apsw.storage import APSWStorage

        return APSWStorage
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
