"""Retry and lease arithmetic, and duration parsing, tested without an engine."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from reflow_core import (
    ConfigError,
    LeaseExpiredError,
    LeaseOptions,
    RetryPolicy,
    SerializationError,
    StepTimeoutError,
    Workflow,
)
from reflow_core.durations import to_millis, to_seconds


@pytest.mark.parametrize(
    ("backoff", "delays"),
    [
        ("fixed", [0.2, 0.2, 0.2]),
        ("linear", [0.2, 0.4, 0.6]),
        ("exponential", [0.2, 0.4, 0.8]),
    ],
)
def test_backoff_shapes(backoff: str, delays: list[float]) -> None:
    policy = RetryPolicy(max_attempts=4, backoff=backoff, initial_delay=0.2)  # type: ignore[arg-type]
    got = [policy.decide(n, RuntimeError()) for n in (1, 2, 3)]
    assert [d.retry for d in got] == [True, True, True]
    assert [d.delay for d in got] == pytest.approx(delays)
    assert policy.decide(4, RuntimeError()).retry is False


def test_max_delay_caps_and_jitter_stays_within_bounds() -> None:
    policy = RetryPolicy(max_attempts=20, initial_delay=1, max_delay=5, jitter=0.5)
    for attempt in range(1, 19):
        delay = policy.decide(attempt, ValueError()).delay
        cap = min(2 ** (attempt - 1), 5)
        assert cap * 0.5 <= delay <= cap
    spread = {policy.decide(10, ValueError()).delay for _ in range(20)}
    assert len(spread) > 1, "jitter must vary the delay"


def test_retryable_filters() -> None:
    policy = RetryPolicy(max_attempts=3, retry_on=(ConnectionError,), give_up_on=(BrokenPipeError,))
    assert policy.decide(1, ConnectionResetError()).retry is True
    assert policy.decide(1, BrokenPipeError()).retry is False
    assert policy.decide(1, ValueError()).retry is False
    lenient = RetryPolicy(max_attempts=3)
    assert lenient.decide(1, StepTimeoutError("s", 1.0)).retry is True
    assert lenient.decide(1, LeaseExpiredError("r")).retry is False
    assert lenient.decide(1, SerializationError("$: bad")).retry is False


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"max_attempts": 1.5},
        {"backoff": "quadratic"},
        {"initial_delay": -1},
        {"max_delay": -1},
        {"jitter": 1.5},
        {"retry_on": (int,)},
    ],
)
def test_invalid_retry_policies_are_refused_at_definition(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_lease_arithmetic() -> None:
    lease = LeaseOptions(duration="30s")
    assert (lease.duration_ms, lease.heartbeat_every) == (30_000, 10.0)
    # The holder fences itself a tenth of the lease early, at most 5 s early.
    assert (lease.margin_s, lease.fence_after) == (3.0, 27.0)
    assert LeaseOptions(duration=600).fence_after == 595.0
    # A heartbeat interval close to the lease shrinks the default margin, so the first
    # renewal can always land before the fence.
    tight = LeaseOptions(duration=1, heartbeat_interval=0.9)
    assert tight.heartbeat_every < tight.fence_after < tight.duration_s
    assert LeaseOptions(duration=2, margin=0.5).fence_after == 1.5
    with pytest.raises(ConfigError, match="shorter"):
        LeaseOptions(duration=10, heartbeat_interval=10)
    with pytest.raises(ConfigError, match="margin"):
        LeaseOptions(duration=10, margin=7)
    for bad in (0, 0.001, 8 * 24 * 3600):
        with pytest.raises(ConfigError):
            LeaseOptions(duration=bad)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("30s", 30), ("5m", 300), ("1.5h", 5400), ("7d", 604800), ("2w", 1209600)],
)
def test_duration_strings(text: str, seconds: float) -> None:
    assert to_seconds(text) == seconds


def test_duration_forms_and_errors() -> None:
    assert to_seconds(timedelta(minutes=2)) == 120
    assert to_millis(0.0011) == 2  # rounded up: a wait is never shorter than asked
    for bad in ("soon", "-5s", "1h30m", True, float("nan"), -1, None):
        with pytest.raises(ConfigError):
            to_seconds(bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="positive"):
        to_seconds(0, allow_zero=False)


@pytest.mark.parametrize("huge", [1e17, 10**30, 10**400, "99999999w", timedelta(days=40_000)])
def test_durations_beyond_a_century_are_refused_at_definition(huge: object) -> None:
    with pytest.raises(ConfigError, match="100 years"):
        to_seconds(huge)  # type: ignore[arg-type]
    wf: Workflow[Any] = Workflow("w")
    with pytest.raises(ConfigError, match="100 years"):
        wf.sleep("nap", huge)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="100 years"):
        wf.wait_for_event("ev", timeout=huge)  # type: ignore[arg-type]
