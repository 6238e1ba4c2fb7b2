"""Retry policy: turns (attempt number, exception) into "retry after N seconds" or "give up".

Pure arithmetic, tested without an engine::

    >>> policy = RetryPolicy(max_attempts=4, backoff="exponential", initial_delay=0.2)
    >>> [policy.decide(n, RuntimeError()).delay for n in (1, 2, 3)]
    [0.2, 0.4, 0.8]
    >>> policy.decide(4, RuntimeError()).retry
    False

Delay after failed attempt *n* (1-based): fixed = ``initial_delay``; linear =
``initial_delay * n``; exponential = ``initial_delay * 2**(n-1)``; then capped at
``max_delay`` and at a century (:data:`~reflow_core.durations.MAX_DURATION_S`, the
longest wait any store is asked to keep), then jittered: with ``jitter=j`` the delay
is drawn uniformly from ``[delay * (1-j), delay]`` so a burst of failures does not
retry in lockstep.
Reflow's control-flow errors (cancellation, lease loss, engine stop) and
``SerializationError`` (a non-persistable result is deterministic) are never retried.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

from reflow_core.durations import MAX_DURATION_S, to_seconds
from reflow_core.errors import ConfigError, ControlFlow, SerializationError

__all__ = ["Backoff", "RetryDecision", "RetryPolicy"]

Backoff = Literal["fixed", "linear", "exponential"]


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """The answer of :meth:`RetryPolicy.decide`."""

    retry: bool
    delay: float = 0.0
    """Seconds to wait before the next attempt (0 when not retrying)."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a step retries. The default makes one attempt and never retries."""

    max_attempts: int = 1
    backoff: Backoff = "exponential"
    initial_delay: float = 1.0
    """Seconds before the second attempt."""
    max_delay: float | None = None
    """Upper bound on any single delay, in seconds."""
    jitter: float = 0.0
    """Fraction (0 to 1) of each delay that is randomised away."""
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    """Only these exception types are retried."""
    give_up_on: tuple[type[BaseException], ...] = ()
    """These are never retried, even if they match ``retry_on``."""
    _rng: random.Random = field(
        default_factory=random.Random, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise ConfigError(f"max_attempts must be an int, got {self.max_attempts!r}")
        if self.max_attempts < 1:
            raise ConfigError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.backoff not in ("fixed", "linear", "exponential"):
            raise ConfigError(
                f"backoff must be 'fixed', 'linear' or 'exponential', got {self.backoff!r}"
            )
        # Bounded like every other duration: a retry time past a century would not fit
        # a store's integer milliseconds and would fail at run time, not here.
        delays = {"initial_delay": self.initial_delay}
        if self.max_delay is not None:
            delays["max_delay"] = self.max_delay
        for what, delay in delays.items():
            if isinstance(delay, bool) or not isinstance(delay, int | float):
                raise ConfigError(f"{what} must be a number of seconds, got {delay!r}")
            to_seconds(delay, what=what)
        if not 0.0 <= self.jitter <= 1.0:
            raise ConfigError(f"jitter must be between 0 and 1, got {self.jitter!r}")
        for kind in (*self.retry_on, *self.give_up_on):
            if not (isinstance(kind, type) and issubclass(kind, BaseException)):
                raise ConfigError(f"retry_on/give_up_on must hold exception types, got {kind!r}")

    def base_delay(self, attempt: int) -> float:
        """Delay after failed attempt ``attempt`` before jitter, in seconds."""
        if self.backoff == "fixed":
            delay = self.initial_delay
        elif self.backoff == "linear":
            delay = self.initial_delay * attempt
        else:
            # Capped exponent: 2.0 ** n raises past 1023; a product past a float's range is inf.
            delay = self.initial_delay * 2.0 ** min(attempt - 1, 1000)
        if self.max_delay is not None:
            delay = min(delay, self.max_delay)
        return min(delay, MAX_DURATION_S)

    def is_retryable(self, error: BaseException) -> bool:
        """Whether ``error`` may be retried at all, whatever the attempt count."""
        if isinstance(error, ControlFlow | SerializationError):
            return False
        if isinstance(error, self.give_up_on):
            return False
        return isinstance(error, self.retry_on)

    def decide(self, attempt: int, error: BaseException) -> RetryDecision:
        """After attempt ``attempt`` (1-based) failed with ``error``: retry, and after how long?"""
        if attempt >= self.max_attempts or not self.is_retryable(error):
            return RetryDecision(retry=False)
        delay = self.base_delay(attempt)
        if self.jitter:
            delay -= delay * self.jitter * self._rng.random()
        return RetryDecision(retry=True, delay=delay)
