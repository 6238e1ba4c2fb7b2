"""Schedule arithmetic without an engine: intervals, cron in IANA zones across DST, and
refusal of malformed or unsatisfiable recurrences."""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any
from zoneinfo import ZoneInfo

import cronsim
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reflow_core import ConfigError, Recurrence, Workflow
from reflow_core.schedule import first_fire_time, next_fire_time, validate_recurrence
from reflow_core.scheduling import build_schedule, default_key

NY = ZoneInfo("America/New_York")
PARIS = ZoneInfo("Europe/Paris")
MIN = 60_000


def ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def utc(value: int) -> datetime:
    return datetime.fromtimestamp(value / 1000, tz=UTC)


def cron(expr: str, tz: str = "UTC", catch_up: bool = False) -> Recurrence:
    return Recurrence(cron=expr, timezone=tz, catch_up=catch_up)


def test_interval_first_firing_is_one_interval_after_registration() -> None:
    assert first_fire_time(Recurrence(every_ms=5 * MIN), 1_000) == 1_000 + 5 * MIN


def test_interval_skips_missed_occurrences_keeping_its_phase() -> None:
    every = Recurrence(every_ms=10 * MIN)
    assert next_fire_time(every, 0, 0) == 10 * MIN  # on time
    # Down for 35 minutes: fire once (the claim), next slot stays on the 10-minute grid.
    assert next_fire_time(every, 0, 35 * MIN) == 40 * MIN
    assert next_fire_time(every, 0, 40 * MIN) == 50 * MIN  # strictly after now


def test_interval_catch_up_replays_each_missed_slot() -> None:
    every = Recurrence(every_ms=10 * MIN, catch_up=True)
    assert next_fire_time(every, 0, 35 * MIN) == 10 * MIN


def test_cron_utc_next_match_strictly_after() -> None:
    at = ms(datetime(2024, 5, 1, 12, 0, tzinfo=UTC))
    assert utc(first_fire_time(cron("0 * * * *"), at)) == datetime(2024, 5, 1, 13, tzinfo=UTC)
    assert utc(first_fire_time(cron("*/15 * * * *"), at + 1)) == datetime(
        2024, 5, 1, 12, 15, tzinfo=UTC
    )


def test_cron_skips_missed_occurrences_unless_catching_up() -> None:
    daily = cron("0 9 * * *")
    slot = ms(datetime(2024, 5, 1, 9, tzinfo=UTC))
    now = ms(datetime(2024, 5, 4, 10, tzinfo=UTC))
    assert utc(next_fire_time(daily, slot, now)) == datetime(2024, 5, 5, 9, tzinfo=UTC)
    caught = cron("0 9 * * *", catch_up=True)
    assert utc(next_fire_time(caught, slot, now)) == datetime(2024, 5, 2, 9, tzinfo=UTC)


def test_new_york_spring_gap_fires_once_right_after_the_gap() -> None:
    """02:30 does not exist on 2024-03-10 in New York: it fires at 03:00 EDT, once."""
    rec = cron("30 2 * * *", "America/New_York")
    first = first_fire_time(rec, ms(datetime(2024, 3, 9, 12, tzinfo=NY)))
    assert datetime.fromtimestamp(first / 1000, NY) == datetime(2024, 3, 10, 3, 0, tzinfo=NY)
    second = next_fire_time(rec, first, first)
    assert datetime.fromtimestamp(second / 1000, NY) == datetime(2024, 3, 11, 2, 30, tzinfo=NY)
    assert second - first == 23.5 * 3600 * 1000


def test_new_york_autumn_overlap_fires_once_at_the_first_pass() -> None:
    """01:30 happens twice on 2024-11-03 in New York; the job fires at the first (EDT)."""
    rec = cron("30 1 * * *", "America/New_York")
    first = first_fire_time(rec, ms(datetime(2024, 11, 2, 12, tzinfo=NY)))
    assert utc(first) == datetime(2024, 11, 3, 5, 30, tzinfo=UTC)  # 01:30 EDT (UTC-4)
    second = next_fire_time(rec, first, first)
    assert utc(second) == datetime(2024, 11, 4, 6, 30, tzinfo=UTC)  # next day, 01:30 EST
    assert second - first == 25 * 3600 * 1000


def test_hourly_expressions_follow_real_hours_across_both_changes() -> None:
    hourly = cron("0 * * * *", "America/New_York")
    start = ms(datetime(2024, 11, 3, 0, 30, tzinfo=NY))
    fired = [first_fire_time(hourly, start)]
    for _ in range(3):
        fired.append(next_fire_time(hourly, fired[-1], fired[-1]))
    # 01:00 happens twice (EDT then EST): both fire, one real hour apart.
    assert [f - fired[0] for f in fired] == [0, 3600_000, 7200_000, 10800_000]
    spring = [first_fire_time(hourly, ms(datetime(2024, 3, 10, 0, 30, tzinfo=NY)))]
    spring.append(next_fire_time(hourly, spring[0], spring[0]))
    # 02:00 does not exist: 01:00 EST is followed by 03:00 EDT, one real hour later.
    assert spring[1] - spring[0] == 3600_000


def test_paris_gap_and_overlap() -> None:
    rec = cron("30 2 * * *", "Europe/Paris")
    gap = first_fire_time(rec, ms(datetime(2024, 3, 30, 12, tzinfo=PARIS)))
    assert datetime.fromtimestamp(gap / 1000, PARIS) == datetime(2024, 3, 31, 3, 0, tzinfo=PARIS)
    overlap = first_fire_time(rec, ms(datetime(2024, 10, 26, 12, tzinfo=PARIS)))
    assert utc(overlap) == datetime(2024, 10, 27, 0, 30, tzinfo=UTC)  # 02:30 CEST, first pass
    after = next_fire_time(rec, overlap, overlap)
    assert utc(after) == datetime(2024, 10, 28, 1, 30, tzinfo=UTC)  # not 02:30 CET same day


@pytest.mark.parametrize(
    ("recurrence", "message"),
    [
        (cron("not a cron at all"), "invalid"),
        (cron("61 * * * *"), "invalid"),
        (cron("* * *"), "5 fields"),
        (cron("0 0 30 2 *"), "invalid"),  # February 30th never comes
        (cron("0 9 * * *", "Mars/Olympus"), "unknown time zone"),
        (Recurrence(every_ms=0), "positive"),
        (Recurrence(), "exactly one"),
        (Recurrence(every_ms=1000, cron="* * * * *"), "exactly one"),
    ],
)
def test_bad_recurrences_are_refused(recurrence: Recurrence, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_recurrence(recurrence)


def _build(wf: Workflow[Any], input: Any = None, **options: Any) -> Any:
    defaults: dict[str, Any] = {
        "every": None,
        "cron": None,
        "timezone": "UTC",
        "key": None,
        "catch_up": False,
        "now": 0,
    }
    defaults.update(options)
    return build_schedule(wf, input, **defaults)


def test_registration_normalizes_aliases_and_refuses_bad_options() -> None:
    wf: Workflow[Any] = Workflow("wf")
    assert _build(wf, cron="  @Daily ").recurrence.cron == "0 0 * * *"
    assert _build(wf, cron="0  9 * *   1-5").recurrence.cron == "0 9 * * 1-5"
    assert _build(wf, every="90s").recurrence.every_ms == 90_000
    with pytest.raises(ConfigError, match="schedule interval"):
        _build(wf, every="-1s")
    with pytest.raises(ConfigError, match="key"):
        _build(wf, every="1m", key="")
    with pytest.raises(ConfigError, match="cron must be a str"):
        _build(wf, cron=5)


def test_default_key_is_stable_and_distinguishes_what_matters() -> None:
    every = Recurrence(every_ms=MIN)
    key = default_key("wf", every, {"a": 1, "b": [1, 2]})
    assert key == default_key("wf", every, {"b": [1, 2], "a": 1})  # key order irrelevant
    assert len(key) == 22
    assert key != default_key("other", every, {"a": 1, "b": [1, 2]})
    assert key != default_key("wf", Recurrence(every_ms=2 * MIN), {"a": 1, "b": [1, 2]})
    assert key != default_key("wf", every, {"a": 1.0, "b": [1, 2]})
    ny = default_key("wf", cron("0 9 * * *", "America/New_York"), None)
    assert ny != default_key("wf", cron("0 9 * * *", "Europe/Paris"), None)
    # catch_up is a policy, not an identity: toggling it updates the same schedule.
    assert default_key("wf", Recurrence(every_ms=MIN, catch_up=True), None) == default_key(
        "wf", every, None
    )


# -- DST, exhaustively: every transition of 2024-2026 in zones with odd ones ------------
#
# The reference below restates the documented rules (reflow_core.schedule) by brute
# force over every minute: a *fixed-time* expression (minute and hour fields not
# starting with ``*``) fires each matching wall-clock time at the first instant the
# zone's clock shows that time or later, so once; any other expression fires at every
# instant whose wall-clock time matches.

HOUR = 60 * MIN
DAY = 24 * HOUR
YEARS = (2024, 2027)  # [start, end)
DST_ZONES = [
    "America/New_York",
    "Europe/London",
    "Europe/Berlin",
    "Australia/Sydney",  # southern hemisphere: falls back in April
    "America/Santiago",  # changes at midnight: 00:00 is skipped, 23:00 repeated
    "Australia/Lord_Howe",  # a 30-minute shift
    "America/Havana",  # changes at midnight too, the other way round
    "Pacific/Chatham",  # +12:45 / +13:45
]
ZONES = [*DST_ZONES, "Asia/Tehran", "UTC"]  # +03:30 without DST (since 2022), and none
COMMON = ["30 1 * * *", "30 2 * * *", "0 0 * * *", "*/15 * * * *", "0 * * * *"]


def _fixed_time(expr: str) -> bool:
    minute, hour = expr.split()[:2]
    return not minute.startswith("*") and not hour.startswith("*")


def _offset(zone: ZoneInfo, at: int) -> timedelta:
    offset = utc(at).astimezone(zone).utcoffset()
    assert offset is not None
    return offset


def _transitions(zone_name: str) -> list[int]:
    """Every instant in YEARS at which the zone's UTC offset changes (to the minute)."""
    zone = ZoneInfo(zone_name)
    at = ms(datetime(YEARS[0], 1, 1, tzinfo=UTC))
    end = ms(datetime(YEARS[1], 1, 1, tzinfo=UTC))
    found = []
    while at < end:
        if _offset(zone, at) != _offset(zone, at + DAY):
            lo, hi = at, at + DAY  # offset(lo) is the old one, offset(hi) the new one
            while hi - lo > MIN:
                mid = lo + (hi - lo) // 2 // MIN * MIN
                lo, hi = (mid, hi) if _offset(zone, mid) == _offset(zone, lo) else (lo, mid)
            found.append(hi)
        at += DAY
    return found


_TRANSITIONS = {name: _transitions(name) for name in ZONES}


def _wall(zone: ZoneInfo, at: int) -> datetime:
    return utc(at).astimezone(zone).replace(tzinfo=None)


def _expected(expr: str, zone_name: str, start: int, end: int) -> list[int]:
    """The firings in ``(start, end]`` by the documented rules, minute by minute."""
    zone = ZoneInfo(zone_name)
    grid = range(start - start % MIN - 6 * HOUR, end + 6 * HOUR, MIN)
    walls = [_wall(zone, at) for at in grid]
    matches, highest = [], max(walls)
    for wall in cronsim.CronSim(expr, min(walls) - timedelta(seconds=1)):
        if wall > highest:
            break
        matches.append(wall)
    if _fixed_time(expr):
        reached = []  # the latest wall-clock time shown so far, at each minute
        for wall in walls:
            reached.append(max(wall, reached[-1]) if reached else wall)
        fired = {grid[bisect_left(reached, wall)] for wall in matches if wall <= reached[-1]}
    else:
        wanted = set(matches)
        fired = {at for at, wall in zip(grid, walls, strict=True) if wall in wanted}
    return sorted(at for at in fired if start < at <= end)


def _walk(rec: Recurrence, start: int, end: int) -> list[int]:
    """The firings in ``(start, end]`` when each one is claimed on time."""
    fired = [first_fire_time(rec, start)]
    while fired[-1] <= end:
        following = next_fire_time(rec, fired[-1], fired[-1])
        assert following > fired[-1], (utc(fired[-1]), utc(following))
        fired.append(following)
    return fired[:-1]


def _inside(zone: ZoneInfo, transition: int) -> str:
    """A fixed-time expression in the middle of the wall-clock times a transition skips
    or repeats (e.g. ``30 1 * * *`` for New York's repeated 01:00-02:00)."""
    shift = _offset(zone, transition) - _offset(zone, transition - MIN)
    middle = _wall(zone, transition - MIN) + timedelta(minutes=1) + shift / 2
    if shift < timedelta(0):  # fell back: the repeated span starts at the new wall time
        middle = _wall(zone, transition) - shift / 2
    return f"{middle.minute} {middle.hour} * * *"


def _cases() -> list[Any]:
    cases = []
    for name in ZONES:
        zone = ZoneInfo(name)
        # Zones without DST: a few arbitrary anchors so they are walked as well.
        anchors = _TRANSITIONS[name] or [ms(datetime(2025, m, 1, tzinfo=UTC)) for m in (3, 10)]
        for at in anchors:
            exprs = dict.fromkeys([*COMMON, *([_inside(zone, at)] if _TRANSITIONS[name] else [])])
            cases.append(pytest.param(name, at, list(exprs), id=f"{name}-{utc(at):%Y-%m-%d}"))
    return cases


def test_every_2024_2026_transition_of_the_dst_zones_was_found() -> None:
    for name in DST_ZONES:
        assert len(_TRANSITIONS[name]) == 6, name
    assert _TRANSITIONS["Asia/Tehran"] == _TRANSITIONS["UTC"] == []
    assert utc(_TRANSITIONS["America/New_York"][1]) == datetime(2024, 11, 3, 6, tzinfo=UTC)
    assert _inside(NY, _TRANSITIONS["America/New_York"][0]) == "30 2 * * *"
    assert _inside(NY, _TRANSITIONS["America/New_York"][1]) == "30 1 * * *"
    lord_howe = ZoneInfo("Australia/Lord_Howe")
    assert _inside(lord_howe, _TRANSITIONS["Australia/Lord_Howe"][0]) == "45 1 * * *"


@pytest.mark.parametrize(("zone_name", "transition", "exprs"), _cases())
def test_cron_across_a_transition_fires_every_documented_slot_once(
    zone_name: str, transition: int, exprs: list[str]
) -> None:
    """From a day before the transition through two days after it, claimed on time and
    evaluated from every 10 minutes around it: strictly increasing, no duplicate, no slot
    missing or extra against the reference, never a time in the past."""
    start, end = transition - DAY, transition + 2 * DAY
    for expr in exprs:
        rec = cron(expr, zone_name)
        expected = _expected(expr, zone_name, start - DAY, end + DAY)
        assert _walk(rec, start, end) == [at for at in expected if start < at <= end], expr
        for now in range(transition - 3 * HOUR, transition + 3 * HOUR, 10 * MIN):
            upcoming = expected[bisect_right(expected, now)]
            assert first_fire_time(rec, now) == upcoming, (expr, utc(now))
            for slot in (now - DAY, now):  # claimed late, or on time
                assert next_fire_time(rec, slot, now) == upcoming, (expr, utc(now), slot)
                caught_up = next_fire_time(cron(expr, zone_name, catch_up=True), slot, now)
                assert caught_up == expected[bisect_right(expected, slot)]


@pytest.mark.parametrize("zone_name", DST_ZONES)
def test_a_fixed_time_fires_once_in_a_repeated_hour_and_once_for_a_skipped_one(
    zone_name: str,
) -> None:
    zone = ZoneInfo(zone_name)
    for transition in _TRANSITIONS[zone_name]:
        expr = _inside(zone, transition)
        rec = cron(expr, zone_name)
        # A daily time: the only firing within 6 hours of the transition is that day's.
        [fired] = _walk(rec, transition - 6 * HOUR, transition + 6 * HOUR)
        fell_back = _offset(zone, transition) < _offset(zone, transition - MIN)
        if fell_back:  # the time's first occurrence, before the clocks went back
            assert transition - HOUR <= fired < transition
            assert _wall(zone, fired).strftime("%-M %-H * * *") == expr
        else:  # the time does not exist that day: the first instant after the gap
            assert fired == transition


def test_registered_in_the_second_pass_of_the_overlap_the_time_has_passed() -> None:
    """The issue: 01:10 EST is the second pass of 01:00-02:00 on 2024-11-03 in New York.
    01:30 fired (or was due) at 01:30 EDT, 40 minutes earlier: the next is tomorrow's."""
    rec = cron("30 1 * * *", "America/New_York")
    now = ms(datetime(2024, 11, 3, 6, 10, tzinfo=UTC))  # 01:10 EST
    slot = ms(datetime(2024, 11, 3, 5, 30, tzinfo=UTC))  # 01:30 EDT, just fired
    tomorrow = ms(datetime(2024, 11, 4, 6, 30, tzinfo=UTC))  # 01:30 EST
    assert first_fire_time(rec, now) == tomorrow
    assert next_fire_time(rec, slot, now) == tomorrow  # was ``slot``: claimed forever
    assert next_fire_time(cron("30 1 * * *", "America/New_York", True), slot, now) == tomorrow
    # A time after the overlap still fires the same day, in the second pass.
    later = first_fire_time(cron("0 2 * * *", "America/New_York"), now)
    assert utc(later) == datetime(2024, 11, 3, 7, tzinfo=UTC)  # 02:00 EST
    # Lord Howe repeats only 01:30-02:00 (a 30-minute shift).
    lord_howe = cron("45 1 * * *", "Australia/Lord_Howe")
    second_pass = ms(datetime(2024, 4, 6, 15, 10, tzinfo=UTC))  # 01:40 +10:30
    assert utc(first_fire_time(lord_howe, second_pass)) == datetime(2024, 4, 7, 15, 15, tzinfo=UTC)


def test_times_in_one_gap_collapse_into_one_firing() -> None:
    rec = cron("0,30 2,3 * * *", "America/New_York")
    fired = _walk(
        rec, ms(datetime(2024, 3, 10, 0, tzinfo=NY)), ms(datetime(2024, 3, 10, 5, tzinfo=NY))
    )
    # 02:00, 02:30 (skipped) and 03:00 all fire at 03:00 EDT, once; then 03:30.
    assert [datetime.fromtimestamp(at / 1000, NY).strftime("%H:%M") for at in fired] == [
        "03:00",
        "03:30",
    ]


def test_a_broken_interval_is_refused_rather_than_repeated() -> None:
    with pytest.raises(ConfigError, match="positive"):
        next_fire_time(Recurrence(every_ms=0), 1_000, 1_000)


# -- the same as a property over random instants ----------------------------------------

PROPERTY_EXPRS = [
    "30 1 * * *",
    "45 1 * * *",
    "30 2 * * *",
    "30 23 * * *",
    "0 0 * * *",
    "*/15 * * * *",
    "0 * * * *",
]
_LOW = ms(datetime(YEARS[0], 1, 1, tzinfo=UTC))
_HIGH = ms(datetime(YEARS[1], 1, 1, tzinfo=UTC)) - 1


@st.composite
def _cases_drawn(draw: st.DrawFn) -> tuple[str, str, int, int]:
    """A zone, an expression, an instant and how late a slot is claimed. The instant is
    anywhere in 2024-2026 or, half the time, within 90 minutes of a transition (where a
    uniform draw would hardly ever land), then half the time with an expression inside
    the wall-clock times that transition skips or repeats."""
    zone_name = draw(st.sampled_from(ZONES))
    expr = st.sampled_from(PROPERTY_EXPRS)
    near = _TRANSITIONS[zone_name]
    if near and draw(st.booleans()):
        transition = draw(st.sampled_from(near))
        now = transition + draw(st.integers(-90 * MIN, 90 * MIN))
        expr = st.one_of(st.just(_inside(ZoneInfo(zone_name), transition)), expr)
    else:
        now = draw(st.integers(_LOW, _HIGH))
    return zone_name, draw(expr), now, draw(st.integers(0, 2 * DAY))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_cases_drawn())
def test_cron_never_fires_in_the_past_nor_twice(case: tuple[str, str, int, int]) -> None:
    zone_name, expr, now, late = case
    rec = cron(expr, zone_name)
    first = first_fire_time(rec, now)
    assert first > now
    # Nothing the rules call a firing is skipped between now and the first one.
    expected = _expected(expr, zone_name, now, now + 26 * HOUR)
    assert first == expected[bisect_right(expected, now)]
    fired = [first]
    for _ in range(4):
        fired.append(next_fire_time(rec, fired[-1], fired[-1]))
    assert all(b > a for a, b in pairwise(fired))
    # Claimed late: strictly after both the slot and now (or the slot, catching up).
    slot = now - late
    assert next_fire_time(rec, slot, now) == first
    assert slot < next_fire_time(cron(expr, zone_name, catch_up=True), slot, now) <= first
