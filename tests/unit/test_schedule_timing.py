"""Schedule arithmetic without an engine: intervals, cron in IANA zones across DST, and
refusal of malformed or unsatisfiable recurrences."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

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
