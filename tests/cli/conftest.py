"""Fixtures of the command tests: ``store_url`` is a fresh store, SQLite and PostgreSQL.

This directory goes on ``sys.path`` (as ``tests/`` does through the pytest config) so
the test modules import their helpers (``cli_stores``, ``worker_app``) by name.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = str(Path(__file__).parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from cli_stores import STORES, make_store_url  # noqa: E402


@pytest.fixture(params=STORES)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL for a new, empty store (not yet created: commands must not create it)."""
    yield from make_store_url(request.param, tmp_path)
