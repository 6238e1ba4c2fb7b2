"""Durations as users write them: ``"30s"``, ``"1.5h"``, ``"7d"``, a ``timedelta``, or seconds.

>>> to_seconds("1.5h"), to_seconds(timedelta(minutes=2)), to_seconds(0.25)
(5400.0, 120.0, 0.25)
>>> to_seconds("soon")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
reflow_core.errors.ConfigError: invalid duration 'soon': use seconds, a timedelta, or a string ...
"""

from __future__ import annotations

import math
import re
from datetime import timedelta

from reflow_core.errors import ConfigError

__all__ = ["MAX_DURATION_S", "Duration", "to_millis", "to_seconds"]

MAX_DURATION_S = 100 * 365.25 * 86400
"""The longest duration accepted anywhere (a century): a sleep, a timeout or an interval
beyond it is a mistake, and a deadline computed from it must still fit every store's
integer milliseconds."""

Duration = float | int | str | timedelta
"""Seconds as a number, a ``timedelta``, or a string with a unit (ms, s, m, h, d, w)."""

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$")


def to_seconds(value: Duration, *, what: str = "duration", allow_zero: bool = True) -> float:
    """Parse a duration into seconds; :class:`ConfigError` naming ``what`` if invalid."""
    seconds: float
    if isinstance(value, bool):
        raise ConfigError(f"invalid {what} {value!r}: a bool is not a duration")
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:  # an int too large for a float: far past the limit
            seconds = MAX_DURATION_S * 2
    elif isinstance(value, str):
        match = _PATTERN.match(value)
        if match is None:
            raise ConfigError(
                f"invalid {what} {value!r}: use seconds, a timedelta, or a string like "
                "'250ms', '30s', '5m', '2h', '7d'"
            )
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    else:
        raise ConfigError(f"invalid {what} {value!r}: expected seconds, a timedelta or a string")
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        bound = "non-negative" if allow_zero else "positive"
        raise ConfigError(f"invalid {what} {value!r}: must be a finite, {bound} duration")
    if seconds > MAX_DURATION_S:
        raise ConfigError(
            f"invalid {what} {value!r}: longer than the limit of 100 years "
            f"({MAX_DURATION_S:.0f}s)"
        )
    return seconds


def to_millis(value: Duration, *, what: str = "duration", allow_zero: bool = True) -> int:
    """Parse a duration into whole milliseconds (rounded up, so a wait is never shorter)."""
    return math.ceil(to_seconds(value, what=what, allow_zero=allow_zero) * 1000)
