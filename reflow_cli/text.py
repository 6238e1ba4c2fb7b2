"""Times and durations as an operator reads them (no click, no rich: :mod:`reflow_cli.explain`
uses these too and stays a pure function of the records)."""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["age", "when"]


def when(ms: int | None) -> str:
    """Epoch milliseconds as a UTC time an operator reads (``""`` for none)."""
    if ms is None:
        return ""
    moment = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S") + " UTC"


def age(ms: int) -> str:
    """A duration in milliseconds, rounded down for reading: ``450 ms``, ``3 s``,
    ``7 min``, ``2 h 5 min``, ``3 d 4 h``."""
    ms = max(ms, 0)
    if ms < 1000:
        return f"{ms} ms"
    seconds = ms // 1000
    if seconds < 120:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"
