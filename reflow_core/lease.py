"""Lease arithmetic: how long a claim lives, how often to renew it, when to stop trusting it.

A worker asks for a lease of ``duration`` when it claims a run. The store records that
length with the run and judges expiry on its own clock: the lease lives until the
store's "now" passes the last renewal plus ``duration``. Nobody else's clock or setting
enters into it, so neither skewed clocks nor mixed ``--lease`` settings across a fleet
can make a live lease look expired.

The holder fences itself without asking the store: it keeps a local deadline on its
monotonic clock, counted from the moment it *sent* the claim or the last heartbeat that
the store confirmed, of ``duration`` minus a safety ``margin``. The store stamped that
renewal after it was sent, so the store's expiry is later still: the holder stops
before anyone else can take over, even if every later heartbeat hangs.

Heartbeats every ``heartbeat_interval`` (default a third of the duration) leave room for
two lost renewals before the fence; each heartbeat call may take at most that interval,
so a hung call never delays the next one.

>>> lease = LeaseOptions(duration=30)
>>> lease.duration_ms, lease.heartbeat_every, lease.fence_after
(30000, 10.0, 27.0)
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

from reflow_core.durations import Duration, to_seconds
from reflow_core.errors import ConfigError

__all__ = ["MAX_LEASE_S", "LeaseOptions", "new_lease_id"]

MAX_LEASE_S = 7 * 24 * 3600.0
"""The longest lease a worker may ask for (a week): longer would leave a crashed worker's
runs stranded for longer than anyone would wait."""

_MARGIN_FRACTION = 0.1
_MARGIN_CAP_S = 5.0


@dataclass(frozen=True, slots=True)
class LeaseOptions:
    """Lease duration, heartbeat interval and fencing margin (seconds, a ``timedelta`` or
    ``"30s"``).

    ``margin`` (default a tenth of the duration, at most 5 s, and at most half the time
    between a heartbeat and the lease's end) is how much earlier than
    the store's expiry the holder gives up on its own: room for a step to be interrupted
    and for the two clocks to tick at slightly different rates.
    """

    duration: Duration = 30.0
    heartbeat_interval: Duration | None = None
    margin: Duration | None = None

    def __post_init__(self) -> None:
        duration = to_seconds(self.duration, what="lease duration", allow_zero=False)
        if duration * 1000 < 10 or duration > MAX_LEASE_S:
            raise ConfigError(
                f"lease duration must be between 10 ms and {MAX_LEASE_S:g}s, got {duration:g}s"
            )
        if self.heartbeat_interval is not None:
            beat = to_seconds(self.heartbeat_interval, what="heartbeat interval", allow_zero=False)
            if beat >= duration:
                raise ConfigError(
                    f"heartbeat interval ({beat:g}s) must be shorter than the lease "
                    f"duration ({duration:g}s), or the lease expires between heartbeats"
                )
        if self.margin is not None:
            margin = to_seconds(self.margin, what="lease margin")
            if margin >= duration - self.heartbeat_every:
                raise ConfigError(
                    f"lease margin ({margin:g}s) must be shorter than the lease duration "
                    f"minus the heartbeat interval ({duration - self.heartbeat_every:g}s), or "
                    "a holder would fence itself before its first heartbeat could land"
                )

    @property
    def duration_s(self) -> float:
        """Lease duration in seconds."""
        return to_seconds(self.duration)

    @property
    def duration_ms(self) -> int:
        """Lease duration in whole milliseconds: what a claim asks the store for."""
        return max(1, round(self.duration_s * 1000))

    @property
    def heartbeat_every(self) -> float:
        """Seconds between heartbeats; also the most a single heartbeat call may take."""
        if self.heartbeat_interval is not None:
            return to_seconds(self.heartbeat_interval)
        return self.duration_s / 3

    @property
    def margin_s(self) -> float:
        """Seconds before the store's expiry at which the holder fences itself."""
        if self.margin is not None:
            return to_seconds(self.margin)
        slack = self.duration_s - self.heartbeat_every
        return min(self.duration_s * _MARGIN_FRACTION, _MARGIN_CAP_S, slack / 2)

    @property
    def fence_after(self) -> float:
        """Seconds after sending a confirmed claim or heartbeat at which the holder must
        assume its lease lost: stop the run, write nothing more."""
        return self.duration_s - self.margin_s


# Lease ids unique across processes and machines, without a syscall per id: uuid4()
# reads the kernel's random source for every id (a measurable part of a claim on the
# memory adapter). Instead each process draws 96 random bits once and numbers its ids
# after them: two processes share a prefix with probability about 2**-96 per pair, and
# one process never repeats a number. A forked child draws a prefix of its own, or it
# would repeat its parent's ids.
_lease_prefix = ""
_lease_numbers = itertools.count(1)


def _new_lease_prefix() -> None:
    global _lease_prefix, _lease_numbers
    _lease_prefix = os.urandom(12).hex() + "-"
    _lease_numbers = itertools.count(1)


_new_lease_prefix()
if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork either
    os.register_at_fork(after_in_child=_new_lease_prefix)


def new_lease_id() -> str:
    """A fresh lease id: ``<24 random hex digits>-<n>``, a valid identifier that no
    process has issued before (the digits are drawn once per process).

    >>> new_lease_id() != new_lease_id()
    True
    """
    return _lease_prefix + str(next(_lease_numbers))
