"""Lease arithmetic: how long a claim lives without a heartbeat, and how often to renew it.

A worker holds a run while it keeps heartbeating. Another worker may reclaim the run
once its last heartbeat is older than ``duration``. Heartbeats every
``heartbeat_interval`` (default a third of the duration) leave room for two missed
renewals before anyone else may take over.

>>> LeaseOptions(duration=30).heartbeat_every
10.0
>>> LeaseOptions(duration=30).stale_before(now_ms=100_000)
70000
"""

from __future__ import annotations

from dataclasses import dataclass

from reflow_core.durations import Duration, to_seconds
from reflow_core.errors import ConfigError

__all__ = ["LeaseOptions"]


@dataclass(frozen=True, slots=True)
class LeaseOptions:
    """Lease duration and heartbeat interval (seconds, a ``timedelta`` or ``"30s"``)."""

    duration: Duration = 30.0
    heartbeat_interval: Duration | None = None

    def __post_init__(self) -> None:
        duration = to_seconds(self.duration, what="lease duration", allow_zero=False)
        if self.heartbeat_interval is not None:
            beat = to_seconds(self.heartbeat_interval, what="heartbeat interval", allow_zero=False)
            if beat >= duration:
                raise ConfigError(
                    f"heartbeat interval ({beat:g}s) must be shorter than the lease "
                    f"duration ({duration:g}s), or the lease expires between heartbeats"
                )

    @property
    def duration_s(self) -> float:
        """Lease duration in seconds."""
        return to_seconds(self.duration)

    @property
    def heartbeat_every(self) -> float:
        """Seconds between heartbeats."""
        if self.heartbeat_interval is not None:
            return to_seconds(self.heartbeat_interval)
        return self.duration_s / 3

    def stale_before(self, now_ms: int) -> int:
        """Runs whose last heartbeat is older than this (ms) may be reclaimed."""
        return now_ms - round(self.duration_s * 1000)

    def expired(self, last_renewed_ms: int, now_ms: int) -> bool:
        """True once a holder that last renewed at ``last_renewed_ms`` must assume it lost the
        lease (another worker may already have reclaimed the run)."""
        return now_ms - last_renewed_ms >= round(self.duration_s * 1000)
