"""The Python side of the key layout described in ``lua/lib.lua``.

Scripts build almost every key themselves; the adapter needs only the prefix rules,
the run sort key, the list-index names and the pattern that finds a prefix's keys.
"""

from __future__ import annotations

import re

from reflow_core.errors import ConfigError
from reflow_core.types import RunStatus

__all__ = ["DEFAULT_PREFIX", "check_prefix", "list_index", "prefix_pattern", "sort_key"]

DEFAULT_PREFIX = "reflow"

_PREFIX = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
"""No ':' (the separator after the prefix) and no glob character (the prefix is used
in a SCAN pattern), so one store's keys can never be read as another's."""

_OFFSET = 1 << 63


def check_prefix(prefix: str) -> str:
    """``prefix`` if allowed, else :class:`ConfigError` saying what is."""
    if not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix):
        raise ConfigError(
            f"Redis key prefix {prefix!r} is not allowed; use 1-64 letters, digits, "
            "'_', '-' or '.' (no ':', no glob characters)"
        )
    return prefix


def _encode(component: str) -> bytes:
    raw = component.encode()
    return str(len(raw)).encode() + b":" + raw


def _time_bytes(ms: int, what: str) -> bytes:
    try:
        return (ms + _OFFSET).to_bytes(8, "big")
    except OverflowError:
        raise ConfigError(f"{what} {ms} is out of range for a 64-bit time") from None


def sort_key(created_at: int, run_id: str) -> bytes:
    """A run's member in the ordered sets: bytewise order is ``(created_at, id)`` with ids
    in UTF-8 byte order, which is code point order."""
    return _time_bytes(created_at, "created_at") + run_id.encode()


def list_bound(before: int | None, before_id: str | None) -> bytes:
    """The exclusive upper bound for ``ZREVRANGEBYLEX`` that keyset paging asks for."""
    if before is None:
        return b"+"
    bound = b"(" + _time_bytes(before, "before")
    return bound if before_id is None else bound + before_id.encode()


def list_index(status: RunStatus | None, workflow: str | None) -> bytes:
    """The suffix (after ``<prefix>:list``) of the index that answers this filter."""
    if status is None and workflow is None:
        return b""
    if status is None:
        assert workflow is not None
        return b":wf:" + _encode(workflow)
    if workflow is None:
        return b":st:" + status.value.encode()
    return b":ws:" + status.value.encode() + b":" + _encode(workflow)


def prefix_pattern(prefix: str) -> str:
    """The SCAN pattern matching every key of a prefix (and nothing else)."""
    return f"{check_prefix(prefix)}:*"
