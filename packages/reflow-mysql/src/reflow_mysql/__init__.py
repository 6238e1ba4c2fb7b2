"""MySQL / MariaDB storage for Reflow: many workers on many machines.

Install with ``pip install reflow-mysql`` and open with a URL::

    storage = open_storage("mysql://user:password@host:3306/db?reflow_prefix=reflow_")

The adapter registers through the ``reflow`` entry-point group (``reflow_mysql.plugin``);
the Reflow core never imports this package. ``MySQLStorage`` is imported lazily, so the
entry point costs no driver import in processes that never use MySQL.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from reflow_mysql.storage import MySQLStorage

__all__ = ["CONTRACT_VERSION", "MySQLStorage", "__version__"]

__version__ = "0.1.0"
CONTRACT_VERSION = "2.1"
"""The storage contract (``reflow_core.storage.CONTRACT_VERSION``) this adapter keeps."""


def __getattr__(name: str) -> Any:
    if name == "MySQLStorage":
        from reflow_mysql.storage import MySQLStorage

        return MySQLStorage
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
