"""When a schedule fires: pure arithmetic over :class:`~reflow_core.types.Recurrence`.

Adapters call :func:`next_fire_time` inside the transaction that claims a due
occurrence, so every adapter advances schedules identically. Cron expressions are
evaluated by `cronsim <https://pypi.org/project/cronsim/>`_ (extra ``cron``) in the
schedule's IANA time zone.

Across DST changes it follows cronie (Debian cron), by the shape of the expression:

* A *fixed-time* expression, one whose minute and hour fields both do not start with
  ``*`` (``30 1 * * *``, ``0 9-17 * * 1-5``, ``0 0 * * *``), names wall-clock times,
  and each of them fires at the first instant the zone's clock reaches it:

  - a time that occurs twice in the autumn overlap (``30 1 * * *`` on 2024-11-03 in
    America/New_York, where 01:00-01:59 happens first in EDT, then again in EST) fires
    **once, at its first occurrence** (01:30 EDT). It does not fire in the second pass,
    and when the schedule is registered or evaluated during the second pass that time
    has already passed: the next firing is the next matching time after the overlap;
  - a time that does not exist (the spring-forward gap, ``30 2 * * *`` on 2024-03-10
    in New York) fires once at the first instant after the gap (03:00 EDT). Several
    times inside one gap (``0,30 2 * * *``), or a gap time and the time the gap ends on
    (``0 2,3 * * *``), collapse into that one firing.

* Any other expression (``*/15 * * * *``, ``0 * * * *``, ``* 1 * * *``) follows real
  time: it fires at every instant whose local wall-clock time matches, so in both
  passes of a repeated hour and not at all in a skipped one.

Whatever the expression, zone or transition, :func:`next_fire_time` returns an instant
strictly after the slot it advances from (and after ``now`` unless catching up) and
:func:`first_fire_time` one strictly after ``now``: a schedule never fires a slot twice
and its claims always move forward.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
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


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_MAX_STEPS = 10_000
"""Bound on the occurrences :func:`_cron_after` may pass over. It only ever passes over
those of a repeated (fall-back) period, at most one per minute of it; reaching the bound
means the arithmetic is broken, which is reported rather than looped on forever."""


def _instant(ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=ms)


def _millis(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(milliseconds=1)


def _cron_after(recurrence: Recurrence, after_ms: int) -> int:
    """The first occurrence strictly after ``after_ms`` (see the module's DST rules)."""
    cronsim = _cronsim()
    assert recurrence.cron is not None
    zone = _zone(recurrence.timezone)
    start = _instant(after_ms).astimezone(zone)
    for _ in range(_MAX_STEPS):
        try:
            occurrence = next(cronsim.CronSim(recurrence.cron, start))
        except cronsim.CronSimError as exc:
            raise ConfigError(f"cron expression {recurrence.cron!r} is invalid: {exc}") from None
        except StopIteration:
            raise ConfigError(
                f"cron expression {recurrence.cron!r} never fires after {start.isoformat()}"
            ) from None
        at = _millis(occurrence)
        if at > after_ms:
            return at
        # cronsim evaluates a fixed-time expression on the naive wall clock, which does
        # not say which pass of a repeated hour ``start`` is in: from 01:10 EST (the
        # second pass) it answers 01:30 *EDT*, the first pass, already gone. That time
        # fired in the first pass (or was skipped then): go on from it. Each step moves
        # the wall clock forward, so this ends once past the overlap.
        start = occurrence
    raise ConfigError(  # pragma: no cover - a safety net, never reached
        f"cron expression {recurrence.cron!r} in {recurrence.timezone} did not advance "
        f"past {_instant(after_ms).isoformat()}"
    )


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
    cron occurrence strictly after now (never one that already passed, even when
    registered in the second pass of a repeated hour)."""
    if recurrence.every_ms is not None:
        return now + _interval(recurrence)
    return _cron_after(recurrence, now)


def next_fire_time(recurrence: Recurrence, slot: int, now: int) -> int:
    """The occurrence after ``slot`` (which just fired), as seen at ``now``.

    Without ``catch_up``, missed occurrences are skipped: the result is the first one
    strictly after ``now`` (an interval keeps its phase). With ``catch_up``, it is the
    occurrence right after ``slot``, even if that is already due. Either way it is
    strictly after ``slot``, so claiming a schedule always moves it forward.
    """
    if recurrence.every_ms is not None:
        every = _interval(recurrence)
        if recurrence.catch_up or now < slot + every:
            return slot + every
        return slot + ((now - slot) // every + 1) * every
    after = slot if recurrence.catch_up else max(slot, now)
    return _cron_after(recurrence, after)


def _interval(recurrence: Recurrence) -> int:
    every = recurrence.every_ms
    if every is None or every <= 0:
        raise ConfigError(f"schedule interval must be positive, got {every} ms")
    return every
