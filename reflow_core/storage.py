"""The storage contract: what every adapter promises, in one place.

An adapter is any object with these methods. The engine talks to storage only
through them; the conformance kit (``reflow_conformance``) holds every adapter to
them. Each docstring restates one row of the contract: what is atomic, what a
``False`` answer means, what must not be written.

Rules that apply to every method:

* **The store's clock is the only clock that decides.** Times are integer
  milliseconds since the Unix epoch. Whether a lease has expired, whether a sleeping
  or waiting run is due, and whether a schedule is due are judged by the store's own
  "now" (:meth:`StorageAdapter.now`): the server's clock on a server adapter (never the
  client's), the adapter's ``Clock`` on a single-host adapter (SQLite, memory). A
  ``Clock`` passed at construction replaces that "now" for tests, so time can be moved
  by hand. No caller passes "now" in, and no caller's lease setting decides whether
  another caller's run is stale.
* **Identifiers** are the strings that name things: run ids, step ids, workflow names,
  step names, idempotency keys, event names, event keys, schedule keys, lease ids, and
  a holder's ``worker`` and ``host``. A valid one is a non-empty ``str`` of at most 255
  characters (code points; schedule keys at most 200, step ids at most 600) with no
  control character (U+0000 to U+001F, U+007F to U+009F: no NUL, tab or newline) and no
  surrogate (it must encode as UTF-8). Everything else is valid and is stored, matched
  and returned exactly: separators (``:`` ``|`` ``/`` ``{``), quotes, backslashes,
  leading and trailing spaces, ``%`` and ``_``, any script, emoji. Comparison is exact
  (case-sensitive, no Unicode normalisation, no trimming), and every ordering that
  involves an id or a key (``(created_at, id)`` in claims, listings and step rows;
  schedules by key) is by code point, which is UTF-8 byte order and SQL ``COLLATE
  "C"``, never a locale's. Identifiers are never combined into one string key: with
  ``workflow + ":" + key``, workflow ``a:b`` with key ``c`` would find the run of
  workflow ``a`` with key ``b:c``. Every method checks its identifier arguments first
  and raises :class:`~reflow_core.errors.InvalidIdentifierError` for an invalid one
  before it reads or writes anything, reads included: use
  :func:`reflow_core.identifiers.check_identifier` and the record helpers beside it,
  which also say why the limits are what they are. Lease ids are the exception: the
  adapter issues them (always valid ones), and one that is not a valid identifier was
  never issued, so it is simply not held (``False``, nothing touched, no driver
  error).
* Values (run input and output, step output, event payloads, schedule input) cross
  as plain Python values and must come back equal and of the same type; adapters
  persist them with :mod:`reflow_core.codec`, which rejects what it cannot store
  exactly with ``SerializationError`` *before* anything is written.
* **A damaged value never blocks anything.** A stored value that cannot be decoded (a
  damaged row, or one written by a newer version) is returned as a
  :class:`~reflow_core.types.DamagedValue` in its place, never raised: read it with
  :func:`reflow_core.damage.decode_stored`. A claim still returns such a run (the engine
  fails it, naming the value), and listings still list it.
* A driver exception never escapes: it becomes ``StorageError`` naming the
  operation, with the driver's exception as ``__cause__``. A failed call leaves
  stored state as it was (no half-written run, step or schedule).
* Status arguments are :class:`RunStatus` members; adapters also accept their string
  values (``"pending"``), since ``RunStatus`` is a ``StrEnum``.
* "Held" means: the run is ``running`` and its ``lease_id`` equals the one given.
  Every lease-checked method is a no-op returning ``False`` when the lease is not held.
* **The lease fields** (``claimed_at``, ``lease_ms``, ``lease_expires_at``, ``holder``
  and the lease id) are set by a claim and exist only while the run is ``running``:
  every write that moves a run out of ``running`` clears them. ``heartbeat_at`` keeps
  its last value.
* **Checkpoints are written once.** A step row whose status is final
  (``completed``, ``completed-early``, ``skipped``: :attr:`StepStatus.is_done`) is
  never changed again, by any method, with or without a valid lease: the first writer
  wins. (``requeue_run`` deletes only ``failed`` rows, so it never touches them.)

Why 2.0 departs from the original ``claim_next_run(names, stale_before)``: there, the
claimer computed "stale" from its own wall clock and its own lease setting and compared
it with a heartbeat stamped by the holder's clock. A claimer whose clock ran ahead, or
one configured with a shorter lease, took runs from healthy holders, and the same step
ran twice at once. In 2.0 the holder's lease length is stored with the run at claim,
renewed by each heartbeat, and judged by one clock, the store's, so neither skew between
workers nor mixed lease settings can make a live lease look expired.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from typing import Any, Protocol, runtime_checkable

from reflow_core.errors import ConfigError
from reflow_core.types import (
    ClaimedRun,
    ClaimedSchedule,
    ConsumeResult,
    CreateRunResult,
    ErrorInfo,
    EventRecord,
    LeaseHolder,
    RunFilter,
    RunStatus,
    Schedule,
    StepResult,
    WorkflowRun,
)

__all__ = [
    "CONTRACT_VERSION",
    "TERMINAL_STATUSES",
    "Clock",
    "StorageAdapter",
    "WorkNotifier",
    "check_limit",
    "check_purge_args",
    "system_clock",
]

CONTRACT_VERSION = "2.1"
"""The version of this contract. The conformance kit checks adapters against it; an
adapter distribution depends on the ``reflow`` versions that implement it.

2.1 adds two methods to 2.0, changing nothing else: :meth:`StorageAdapter.claim_runs`
(claim up to N runs in one call, so a dispatcher fills its free slots with one round
trip) and :meth:`StorageAdapter.purge_runs` (delete finished runs older than a cutoff,
in bounded batches, for retention). Both refuse a bad ``limit`` or status with
:class:`~reflow_core.errors.ConfigError` before reading or writing anything."""

TERMINAL_STATUSES: frozenset[RunStatus] = frozenset(
    {RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED}
)
"""The statuses of a finished run: the only ones :meth:`StorageAdapter.purge_runs` deletes."""


def check_limit(limit: object, operation: str) -> int:
    """``limit`` if it is an int of at least 1, else :class:`ConfigError` naming ``operation``.

    Shared by every adapter's ``claim_runs`` and ``purge_runs`` so the refusal reads the
    same everywhere; ``bool`` is refused although it is an ``int`` subclass.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigError(
            f"{operation}: limit must be an int of at least 1, got {limit!r}; "
            "pass how many runs to handle in this call"
        )
    return limit


def check_purge_args(
    finished_before: object, limit: object, statuses: Collection[RunStatus] | None
) -> frozenset[RunStatus]:
    """Validate ``purge_runs`` arguments; return the statuses to delete.

    ``None`` means every finished status (:data:`TERMINAL_STATUSES`). A status that is
    not a :class:`RunStatus` value, or one that is not finished, raises
    :class:`ConfigError` (nothing is read or written), as does a ``finished_before``
    that is not an int or a ``limit`` below 1.
    """
    if isinstance(finished_before, bool) or not isinstance(finished_before, int):
        raise ConfigError(
            f"purge_runs: finished_before must be an int (epoch milliseconds on the "
            f"store's clock), got {finished_before!r}"
        )
    check_limit(limit, "purge_runs")
    if statuses is None:
        return TERMINAL_STATUSES
    if isinstance(statuses, str):
        raise ConfigError(
            f"purge_runs: statuses must be a collection of RunStatus, got the string "
            f"{statuses!r}; pass [{statuses!r}] for one status"
        )
    chosen: set[RunStatus] = set()
    for status in statuses:
        try:
            value = RunStatus(status)
        except ValueError:
            raise ConfigError(
                f"purge_runs: {status!r} is not a run status; use one of "
                f"{sorted(s.value for s in TERMINAL_STATUSES)}"
            ) from None
        if value not in TERMINAL_STATUSES:
            raise ConfigError(
                f"purge_runs: refusing status {value.value!r}: only finished runs "
                f"({', '.join(sorted(s.value for s in TERMINAL_STATUSES))}) can be purged"
            )
        chosen.add(value)
    return frozenset(chosen)


Clock = Callable[[], int]
"""Returns the current time in integer milliseconds since the Unix epoch."""


def system_clock() -> int:
    """Wall-clock time in integer milliseconds since the Unix epoch."""
    return time.time_ns() // 1_000_000


@runtime_checkable
class StorageAdapter(Protocol):
    """Durable state of runs, steps, events and schedules."""

    url: str | None
    """A URL that ``open_storage`` resolves to another handle onto the same store, or
    ``None`` when the store cannot be shared (an in-memory store)."""

    async def initialize(self) -> None:
        """Create or migrate tables and indexes. Idempotent; safe from many workers at once."""
        ...

    async def close(self) -> None:
        """Release connections and threads. Safe to call twice; the adapter is unusable after."""
        ...

    async def now(self) -> int:
        """The store's current time in epoch milliseconds: the clock every lease, wake-up
        and due time is judged by (the server's clock on a server adapter).

        The engine reads it to compute absolute deadlines it then stores (a sleep's wake
        time, a wait's deadline, a schedule's first firing), so that they are measured on
        the same clock that later decides them.
        """
        ...

    # -- runs -----------------------------------------------------------------

    async def create_run(self, run: WorkflowRun) -> CreateRunResult:
        """Persist a new ``pending`` run.

        If ``run.idempotency_key`` is set and a run of the same workflow already has that
        key (whatever its status), store nothing and return that run with
        ``created=False``. Atomic under concurrent callers: one key, one run.
        """
        ...

    async def get_run(self, run_id: str) -> WorkflowRun | None:
        """The run, or ``None`` if it does not exist."""
        ...

    async def list_runs(self, filter: RunFilter) -> list[WorkflowRun]:
        """Runs newest first by ``(created_at, id)``, filtered by status and workflow.

        With ``before`` and ``before_id``: only rows strictly after that key in this order
        (``created_at < before or (created_at == before and id < before_id)``); with
        ``before`` alone: ``created_at < before``. At most ``limit`` rows.
        """
        ...

    async def claim_next_run(
        self,
        workflow_names: Collection[str],
        *,
        lease_ms: int,
        holder: LeaseHolder | None = None,
    ) -> ClaimedRun | None:
        """Atomically claim the oldest claimable run of the named workflows.

        Claimable, by the store's clock ``now``: ``pending``; ``running`` with
        ``lease_expires_at <= now`` (its holder stopped renewing: a crash, a hang, a lost
        network); ``sleeping`` or ``waiting`` with ``wake_at <= now``. Oldest means
        lowest ``(created_at, id)``. ``lease_ms`` is a positive int (the engine never asks
        for less than 10 ms).

        The claim sets ``running``, a new unique lease id, ``claimed_at = heartbeat_at
        = now``, ``lease_ms`` and ``lease_expires_at = now + lease_ms``, ``holder``; it
        clears ``wake_at``/``waiting_for``, adds one to ``attempt``, and adds one to
        ``recoveries`` when the run was taken over from an expired lease (it was
        ``running``). ``lease_ms`` is the claimer's lease length, stored so that only
        the holder's own setting ever decides when its lease expires.

        Two concurrent callers (threads, processes, machines) never get the same run. An
        empty name list claims nothing. A run whose row another transaction holds at
        this very instant may be skipped (adapters built on ``SKIP LOCKED`` do so that
        workers never queue behind each other); the next claim finds it.
        """
        ...

    async def claim_runs(
        self,
        workflow_names: Collection[str],
        *,
        lease_ms: int,
        holder: LeaseHolder | None = None,
        limit: int,
    ) -> list[ClaimedRun]:
        """Claim up to ``limit`` claimable runs of the named workflows in one call (2.1).

        The result is what ``limit`` calls of :meth:`claim_next_run` in a row would
        return, stopping at the first ``None``: the same claimability (judged by the
        store's clock), the same oldest-first order by ``(created_at, id)``, and every
        returned run with exactly the fields such a claim sets (``running``, its own new
        unique lease id, ``claimed_at = heartbeat_at = now``, ``lease_ms``,
        ``lease_expires_at = now + lease_ms``, ``holder``, ``wake_at``/``waiting_for``
        cleared, ``attempt`` + 1, and ``recoveries`` + 1 for a run taken over from an
        expired lease). The store's clock may be read once for the whole call or once
        per run; ``claimed_at`` never decreases along the list.

        Returns the claimed runs in claim order (oldest first), each at most once; fewer
        than ``limit`` when fewer are claimable; ``[]`` when none is, or when
        ``workflow_names`` is empty. Only runs of the named workflows are taken.

        Each run is claimed atomically, so two concurrent callers (of this method or of
        :meth:`claim_next_run`, in any process) never get the same run; with concurrent
        callers one batch need not be the globally oldest runs (a row another transaction
        holds may be skipped, as with :meth:`claim_next_run`). The batch itself need not
        be one transaction: if the call fails part way, runs it had already claimed may
        stay claimed by a lease nobody knows, and are recovered when it expires, as after
        a crashed worker; adapters that can claim the batch in one transaction should.

        ``limit < 1`` (or a non-int ``limit``) raises
        :class:`~reflow_core.errors.ConfigError` before anything is read or written
        (:func:`check_limit`); identifiers are checked as in :meth:`claim_next_run`.
        """
        ...

    async def purge_runs(
        self,
        *,
        finished_before: int,
        limit: int,
        statuses: Collection[RunStatus] | None = None,
    ) -> int:
        """Delete up to ``limit`` finished runs last updated before a cutoff (2.1);
        return how many runs were deleted.

        A run is purged only if its status is ``completed``, ``failed`` or ``cancelled``
        (``statuses``, when given, narrows that set; an empty collection purges nothing
        and returns 0) and its ``updated_at < finished_before`` (strictly; epoch
        milliseconds on the store's clock). Among those, the oldest go first, by
        ``(updated_at, id)``. A ``pending``, ``running``, ``sleeping`` or ``waiting`` run
        is never touched, whatever its age.

        Deleting a run deletes everything stored for it: the run row, all its step rows,
        its buffered events, and the event keys delivered to it (the dedupe records of
        :meth:`deliver_event`). Its idempotency key becomes free: a later
        :meth:`create_run` with the same workflow and key creates a new run. After the
        call, :meth:`get_run` answers ``None``, :meth:`get_step_results` ``[]`` and
        :meth:`list_runs` no longer lists it. Schedules are not touched.

        Each run's status check and its deletion are one atomic step, so a run that was
        requeued (:meth:`requeue_run`) or otherwise left its finished status a moment
        before is not deleted. At most ``limit`` runs go per call, so that no call holds
        locks or memory in proportion to the store's size: callers loop until the answer
        is below ``limit`` (or 0).

        ``limit < 1``, a non-int ``finished_before``, or a status in ``statuses`` that is
        not finished (or not a status) raises :class:`~reflow_core.errors.ConfigError`
        before anything is read or written (:func:`check_purge_args`).
        """
        ...

    async def heartbeat_run(self, run_id: str, lease_id: str) -> bool:
        """Renew a held lease: ``heartbeat_at = now``, ``lease_expires_at = now +
        lease_ms`` (the stored length; ``updated_at`` is not changed).

        ``False`` once the lease is lost (reclaimed, cancelled, released). A lease that
        has expired but was not yet reclaimed is still held, and renewing it is allowed:
        nobody else can have run the step in between.
        """
        ...

    async def sleep_run(self, run_id: str, lease_id: str, wake_at: int) -> bool:
        """Held run to ``sleeping`` until ``wake_at`` (the store's clock); lease released.
        ``False`` if not held."""
        ...

    async def wait_run(
        self, run_id: str, lease_id: str, event_name: str, wake_at: int | None
    ) -> bool:
        """Held run to ``waiting`` for ``event_name`` until ``wake_at``; lease released.

        If an event of that name is already buffered, the run goes to ``pending`` instead
        so it is claimed again at once. ``wake_at=None`` waits with no deadline.
        ``False`` if not held.
        """
        ...

    async def update_run_status(
        self,
        run_id: str,
        status: RunStatus,
        *,
        expected: Collection[RunStatus] | None = None,
    ) -> bool:
        """Set a run's status without a lease check (used to cancel); clears lease and wake.

        Setting ``running`` this way leaves the run with no holder and
        ``lease_expires_at = now``: the next claim takes it over at once.

        With ``expected``, only a run currently in one of those statuses changes: the
        check and the write are one atomic step, so a run that completed a moment ago is
        never overwritten. ``False`` if the run is missing or not in ``expected``.
        """
        ...

    async def update_claimed_run_status(
        self,
        run_id: str,
        lease_id: str,
        status: RunStatus,
        *,
        output: Any = None,
        error: ErrorInfo | None = None,
    ) -> bool:
        """Set a held run's status, storing ``output`` and ``error`` with it.

        The lease is kept only if ``status`` is ``running``; to ``pending`` this releases
        the run for any worker at once. ``False`` (and nothing written) if not held.
        """
        ...

    async def requeue_run(self, run_id: str) -> bool:
        """A ``failed`` or ``cancelled`` run back to ``pending``, in one transaction.

        Deletes only its ``failed`` step rows (completed, skipped, sleeping and waiting
        rows stay, so completed work is not redone); clears ``error`` and ``output``;
        sets ``recoveries`` back to 0 (an operator's resume starts a fresh count).
        ``False`` for any other status or a missing run.
        """
        ...

    # -- steps ----------------------------------------------------------------

    async def save_step_result(self, result: StepResult, lease_id: str | None = None) -> bool:
        """Upsert a step row by ``result.id``; ``True`` if it was written.

        With ``lease_id``: a no-op returning ``False`` unless the run is held with that
        lease; the check and the write are atomic. Write-once: if the stored row is
        final (``completed``, ``completed-early``, ``skipped``), nothing is written and
        the answer is ``False``, with or without a lease (the first writer wins; the
        caller must stop and let the run replay from storage). ``created_at`` of an
        existing row is kept. ``(run_id, name)`` is unique: a different id for an
        existing pair, or an existing id under a different pair, is a ``StorageError``.
        """
        ...

    async def get_step_results(self, run_id: str) -> list[StepResult]:
        """The run's step rows, ordered by ``(created_at, id)``."""
        ...

    # -- events ---------------------------------------------------------------

    async def deliver_event(
        self, run_id: str, event_name: str, payload: Any, *, key: str | None = None
    ) -> bool:
        """Durably buffer an event for a run that can still receive it; wake the run if it
        waits for that name.

        A run ``waiting`` for ``event_name`` goes to ``pending``. ``False`` (nothing
        stored) if the run does not exist or is ``completed``, ``failed`` or
        ``cancelled``; the status check and the write are atomic, so ``True`` means the
        event is stored for a run that had not ended. With ``key``: a key already
        delivered to this run (whether still buffered or consumed since) stores nothing
        and answers ``True``, even if the run has ended since, so a sender that retries
        delivers once and hears what its first attempt achieved. A refused delivery does
        not use its key up.
        """
        ...

    async def take_event(self, run_id: str, event_name: str) -> EventRecord | None:
        """Atomically remove and return the oldest buffered event of that name, or ``None``.

        Concurrent callers never receive the same event. No lease check and no
        checkpoint: the engine consumes events with :meth:`consume_event` instead.
        """
        ...

    async def consume_event(
        self, event_name: str, checkpoint: StepResult, lease_id: str
    ) -> ConsumeResult:
        """Consume the oldest buffered ``event_name`` event of ``checkpoint.run_id`` and
        checkpoint its payload, as one atomic step.

        In one transaction: unless the run is held with ``lease_id`` and no final row
        already stands for ``checkpoint`` (write-once), change nothing and return
        ``ConsumeResult(held=False)``: either way the caller must stop. Otherwise remove
        the oldest buffered event of that name (the one :meth:`take_event` would return)
        and upsert ``checkpoint``
        by id with its ``output`` replaced by the event's payload, under the rules of
        :meth:`save_step_result` (an existing row keeps ``created_at``; an id or
        ``(run_id, name)`` clash is a ``StorageError`` and consumes nothing). Return
        ``ConsumeResult(held=True, event=<the event>)``. With nothing buffered, write
        nothing and return ``ConsumeResult(held=True, event=None)``.

        All or nothing: there is no moment, whatever kills the caller, at which the event
        is gone but its checkpoint is not stored. That is why this is one method and not
        ``take_event`` followed by ``save_step_result``. Concurrent callers (even with
        the same lease) never consume the same event, and a consumed event is never
        also left buffered. The payload was encoded when delivered, so this cannot
        raise ``SerializationError``.
        """
        ...

    # -- schedules ------------------------------------------------------------

    async def upsert_schedule(self, schedule: Schedule) -> Schedule:
        """Insert or update a schedule by ``key``; return what is stored.

        An update keeps the stored ``created_at`` and, when the recurrence is unchanged,
        the stored ``next_run_at`` (so re-registering on every start-up keeps cadence).
        """
        ...

    async def claim_due_schedule(self, workflow_names: Collection[str]) -> ClaimedSchedule | None:
        """Claim the earliest due schedule (``next_run_at <= now``, the store's clock) of
        the named workflows.

        In the same transaction advance ``next_run_at`` with
        :func:`reflow_core.schedule.next_fire_time` (given the store's ``now``), guarded on
        the old value, so one occurrence fires once across all workers. Ties broken by
        ``key``. Returns the schedule as stored after advancing, and ``slot``, the
        occurrence that fired.
        """
        ...

    async def delete_schedule(self, key: str) -> bool:
        """Remove a schedule; ``False`` if there was none."""
        ...

    async def list_schedules(self) -> list[Schedule]:
        """All schedules, ordered by key."""
        ...


@runtime_checkable
class WorkNotifier(Protocol):
    """Optional: an adapter that can push "new work" to idle workers in other processes.

    The engine runs :meth:`listen_for_work` as a background task while it is started and
    cancels it on stop. The adapter calls ``on_work`` whenever a run may have become
    claimable (created, woken, released, put to sleep so idle workers recompute their
    next wake-up), keeps listening across reconnects, and calls ``on_work`` once after
    each reconnect because notifications may have been missed meanwhile.
    """

    async def listen_for_work(self, on_work: Callable[[], None]) -> None:
        """Call ``on_work`` for every notification until cancelled."""
        ...
