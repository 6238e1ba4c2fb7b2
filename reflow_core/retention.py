"""Retention: delete finished runs older than a configured age, in bounded batches.

An engine started with ``Engine(..., retention="30d")`` runs :func:`retention_loop` beside
its workers: every ``every`` it asks the store (``purge_runs``, contract 2.1) to delete
completed, failed and cancelled runs whose last update is older than the age, with their
steps and events, a batch at a time. Pending, running, sleeping and waiting runs are
never touched, whatever their age: the store checks the status in the same atomic step
as the delete.

>>> policy = RetentionPolicy.parse("30d")
>>> policy.keep_ms, policy.every_s, policy.batch
(2592000000, 600.0, 500)
>>> RetentionPolicy.parse(None) is None
True
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass

from reflow_core.durations import Duration, to_millis, to_seconds
from reflow_core.errors import ConfigError
from reflow_core.storage import StorageAdapter, check_purge_args
from reflow_core.types import RunStatus

__all__ = ["RetentionPolicy", "purge_before", "purge_finished", "retention_loop"]


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """How long finished runs are kept, and how the engine purges older ones.

    ``keep_ms``: age (by ``updated_at``, on the store's clock) past which a finished run
    is deleted. ``every_s``: pause between purges. ``batch``: runs per storage call, so
    that no call holds locks in proportion to the store's size. ``statuses``: which
    finished statuses to delete (``None``: completed, failed and cancelled).
    """

    keep_ms: int
    every_s: float = 600.0
    batch: int = 500
    statuses: frozenset[RunStatus] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1:
            raise ConfigError(f"retention batch must be a positive int, got {self.batch!r}")
        if self.statuses is not None:
            check_purge_args(0, 1, self.statuses)

    @classmethod
    def parse(cls, value: Duration | RetentionPolicy | None) -> RetentionPolicy | None:
        """``None``, a policy, or a duration (``"30d"``, a ``timedelta``, seconds) to keep."""
        if value is None or isinstance(value, RetentionPolicy):
            return value
        keep_ms = to_millis(value, what="retention", allow_zero=False)
        # Purge about a hundred times per retention period, at most every ten minutes,
        # so that the backlog a purge meets stays small whatever the age.
        every_s = min(600.0, max(1.0, to_seconds(value, what="retention") / 100))
        return cls(keep_ms=keep_ms, every_s=every_s)


async def purge_finished(
    storage: StorageAdapter,
    *,
    older_than_ms: int,
    batch: int = 500,
    statuses: Collection[RunStatus] | None = None,
) -> int:
    """Delete every finished run last updated more than ``older_than_ms`` ago, in
    batches of ``batch``; return how many were deleted.

    The cutoff is fixed once, on the store's clock, so a purge ends even while new runs
    finish.
    """
    cutoff = await storage.now() - older_than_ms
    return await purge_before(storage, finished_before=cutoff, batch=batch, statuses=statuses)


async def purge_before(
    storage: StorageAdapter,
    *,
    finished_before: int,
    batch: int = 500,
    statuses: Collection[RunStatus] | None = None,
) -> int:
    """Delete every finished run with ``updated_at < finished_before`` (store-clock ms),
    ``batch`` per storage call, yielding to the event loop in between; return the count."""
    total = 0
    while True:
        deleted = await storage.purge_runs(
            finished_before=finished_before, limit=batch, statuses=statuses
        )
        total += deleted
        if deleted < batch:
            return total
        await asyncio.sleep(0)


async def retention_loop(
    storage: StorageAdapter,
    policy: RetentionPolicy,
    on_error: Callable[[BaseException], Awaitable[None]],
) -> None:
    """Purge per ``policy`` until cancelled; a failed purge is reported and retried at
    the next period (the runs it left are still finished and still old)."""
    while True:
        try:
            await purge_finished(
                storage,
                older_than_ms=policy.keep_ms,
                batch=policy.batch,
                statuses=policy.statuses,
            )
        except Exception as exc:
            await on_error(exc)
        await asyncio.sleep(policy.every_s)
