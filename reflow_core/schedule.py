"""When a schedule fires: pure arithmetic over :class:`~reflow_core.types.Recurrence`.

Adapters call :func:`next_fire_time` inside the transaction that claims a due
occurrence, so every adapter advances schedules identically. Cron expressions are
evaluated by `cronsim <https://pypi.org/project/cronsim/>`_ (extra ``cron``) in the
schedule's IANA time zone; across DST changes it follows cronie: a time that falls in
the spring-forward gap fires once at the first valid instant after the gap, and a time
that occurs twice in the autumn overlap fires once, on its first occurrence.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from reflow_core.errors import ConfigError
from reflow_core.types import Recurrence

__all__ = ["first_fire_time", "next_fire_time", "validate_recurrence"]


def _cronsim() -> Any:
    try:
        import cronsim
    except ImportError:  # pragma: no cover - depends on the environment
        raise ConfigError(
            "cron schedules need the 'cron' extra: pip install 'reflow[cron]'"
        ) from None
    return cronsim


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"unknown time zone {name!r}; use an IANA name such as 'UTC' or 'Europe/Paris'"
        ) from None


def _cron_after(recurrence: Recurrence, after_ms: int) -> int:
    cronsim = _cronsim()
    assert recurrence.cron is not None
    zone = _zone(recurrence.timezone)
    start = datetime.fromtimestamp(after_ms / 1000, tz=UTC).astimezone(zone)
    try:
        occurrence = next(cronsim.CronSim(recurrence.cron, start))
    except cronsim.CronSimError as exc:
        raise ConfigError(f"cron expression {recurrence.cron!r} is invalid: {exc}") from None
    except StopIteration:
        raise ConfigError(
            f"cron expression {recurrence.cron!r} never fires after {start.isoformat()}"
        ) from None
    return int(occurrence.timestamp() * 1000)


def validate_recurrence(recurrence: Recurrence) -> None:
    """Refuse a malformed recurrence with a :class:`ConfigError` that says what to fix."""
    if (recurrence.every_ms is None) == (recurrence.cron is None):
        raise ConfigError(
            "a schedule needs exactly one of an interval (every) or a cron expression"
        )
    if recurrence.every_ms is not None and recurrence.every_ms <= 0:
        raise ConfigError(f"schedule interval must be positive, got {recurrence.every_ms} ms")
    _zone(recurrence.timezone)
    if recurrence.cron is not None:
        if len(recurrence.cron.split()) != 5 and not recurrence.cron.strip().startswith("@"):
            raise ConfigError(
                f"cron expression {recurrence.cron!r} must have 5 fields "
                "(minute hour day-of-month month day-of-week)"
            )
        _cron_after(recurrence, 0)


def first_fire_time(recurrence: Recurrence, now: int) -> int:
    """First occurrence of a newly registered schedule: one interval from now, or the next
    cron match strictly after now."""
    if recurrence.every_ms is not None:
        return now + recurrence.every_ms
    return _cron_after(recurrence, now)


def next_fire_time(recurrence: Recurrence, slot: int, now: int) -> int:
    """The occurrence after ``slot`` (which just fired), as seen at ``now``.

    Without ``catch_up``, missed occurrences are skipped: the result is the first one
    strictly after ``now`` (an interval keeps its phase). With ``catch_up``, it is the
    occurrence right after ``slot``, even if that is already due.
    """
    if recurrence.every_ms is not None:
        every = recurrence.every_ms
        if recurrence.catch_up or now < slot + every:
            return slot + every
        return slot + ((now - slot) // every + 1) * every
    after = slot if recurrence.catch_up else max(slot, now)
    return _cron_after(recurrence, after)
