"""Hypothesis strategies and settings shared by the suite (imported only when cases run).

Example counts are modest so the whole kit runs in minutes on a small machine; raise
them with ``REFLOW_CONFORMANCE_EXAMPLES`` (a multiplier, e.g. ``10``) for a soak run.
Settings are passed per test, never registered as a global profile, so the kit does
not change the Hypothesis configuration of the project it is installed in.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

__all__ = ["kit_settings", "persistable"]

_MULTIPLIER = max(1, int(os.environ.get("REFLOW_CONFORMANCE_EXAMPLES", "1") or "1"))


def kit_settings(max_examples: int = 50, **overrides: Any) -> settings:
    """Settings for the kit: no deadline (storage is I/O), no example database written
    into the user's directory, health checks that do not apply to I/O-bound tests off.

    ``derandomize`` is always off: Hypothesis turns it on in its ``ci`` profile (loaded
    by itself whenever a ``CI`` variable is set), and a derandomized test draws from a
    seed made of its own source code, ignoring the forced seed, so ``--reflow-seed``
    would replay nothing and every seed would give the same examples.
    """
    return settings(
        max_examples=max_examples * _MULTIPLIER,
        deadline=None,
        database=None,
        derandomize=False,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
        **overrides,
    )


_KEYS = st.one_of(
    st.text(max_size=8),
    st.sampled_from(["$datetime", "$dict", "$", "$$", "$x", "__reflowDate__", "", "\u0000"]),
)
_ZONES = st.one_of(
    st.none(),
    st.just(UTC),
    st.integers(min_value=-23 * 60, max_value=23 * 60).map(
        lambda minutes: timezone(timedelta(minutes=minutes))
    ),
)
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**300), max_value=2**300),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([-0.0, 5e-324, 1e300, -1e300, 2.0**63]),
    st.text(),
    st.datetimes(timezones=_ZONES),
    st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31)),
)


def persistable() -> st.SearchStrategy[Any]:
    """Every kind of persistable value, nested: dicts with str keys (including ``$`` keys
    that look like the codec's tags), lists, str, int (also huge), finite float (also
    ``-0.0`` and subnormals), bool, None, naive and aware datetimes."""
    return st.recursive(
        _SCALARS,
        lambda children: st.one_of(
            st.lists(children, max_size=5),
            st.dictionaries(_KEYS, children, max_size=5),
        ),
        max_leaves=25,
    )
