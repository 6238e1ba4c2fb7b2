"""Single-fault adapters built on the real SQLite and PostgreSQL adapters.

Each :class:`~faults.base.Fault` is the shipped adapter with one query fragment, one
column declaration or one method body changed, registered as an adapter of its own
(``fault-sqlite-*``, ``fault-postgres-*``: name and URL scheme alike), with the case ids
of the conformance kit that must fail on it. ``test_single_faults.py`` asserts them;
``bench/kit_kill_rate.py`` measures how often each is caught.

Import as ``faults`` with ``tests/conformance`` on ``sys.path`` (:func:`install` puts it
there for spawned processes too).
"""

from __future__ import annotations

from faults.base import TOPICS, Fault, Patch, install, uninstall

__all__ = ["TOPICS", "Fault", "Patch", "all_faults", "install", "uninstall"]


def all_faults() -> list[Fault]:
    """Every fault: SQLite first, then PostgreSQL (imported lazily: psycopg)."""
    from faults.postgres import FAULTS as POSTGRES
    from faults.sqlite import FAULTS as SQLITE

    return [*SQLITE, *POSTGRES]
