"""The worker loop: claim runs into free slots, execute them, keep their leases alive.

One loop a reader can follow (after procrastinate's worker): a count (a semaphore in
effect) holds the free execution slots; the loop takes a slot, claims a run, and hands
it to a task that gives the slot back when the run ends, so a freed slot claims the
next run at once and no run waits for the slowest of a batch. With nothing to claim,
it waits on the wake event (set by an enqueue in this process, by a storage
notification from another process, or by a finished run) or until the next local
wake-up or the poll interval, whichever comes first. Push sources only set the event.

Leases (see :mod:`reflow_core.lease`): every claim asks the store for this engine's
lease length and names this engine as the holder. Each held run has a fence timer on
the loop's monotonic clock (one timer for the runs claimed together, which share their
deadline), pushed forward only by renewals the store confirmed; when it fires the run
is aborted without waiting for storage. Heartbeats run on one loop for all held runs,
but each call is its own task with its own timeout, so one slow or hung call never
delays another run's renewal. A heartbeat answered ``False`` means the
lease is gone (reclaimed, or the run was cancelled): the run is aborted at once.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Awaitable, Callable, Collection

from reflow_core.errors import (
    EngineStoppedError,
    LeaseExpiredError,
    RunCancelledError,
    StorageError,
)
from reflow_core.execution import ActiveRun
from reflow_core.execution.active import FenceTimers
from reflow_core.lease import LeaseOptions
from reflow_core.observers import Observers
from reflow_core.storage import Clock, StorageAdapter
from reflow_core.types import ClaimedRun, LeaseHolder, RunStatus
from reflow_core.waits import wait_set

__all__ = ["Dispatcher"]

_ERROR_BACKOFF_MAX = 5.0


class _Slots:
    """Free execution slots: a count, and an event set when it rises from zero.

    An ``asyncio.Semaphore`` would do, but taking a batch of slots from it costs two
    Python calls per slot (``locked()`` and ``acquire()``), and each release one more:
    a measurable part of a run on the memory adapter. Here a batch is taken in one call
    and a release is one addition.
    """

    __slots__ = ("_freed", "free")

    def __init__(self, count: int) -> None:
        self.free = count
        self._freed = asyncio.Event()

    async def take(self, wanted: int) -> int:
        """Wait until a slot is free, then take up to ``wanted`` at once; return how many."""
        while self.free <= 0:
            # Cleared only while none is free: a release from zero sets it again, and
            # every waiter then looks again (a slot taken meanwhile by another is gone).
            self._freed.clear()
            await self._freed.wait()
        taken = min(wanted, self.free)
        self.free -= taken
        return taken

    def release(self) -> None:
        """Give one slot back."""
        self.free += 1
        if self.free == 1:
            self._freed.set()


class Dispatcher:
    """Claims and executes runs of ``names`` with at most ``concurrency`` at once."""

    def __init__(
        self,
        *,
        storage: StorageAdapter,
        names: Collection[str],
        concurrency: int,
        lease: LeaseOptions,
        poll_interval: float,
        clock: Clock,
        observers: Observers,
        holder: LeaseHolder,
        execute: Callable[[ClaimedRun, ActiveRun], Awaitable[None]],
    ) -> None:
        self.storage = storage
        self.holder = holder
        self.names = list(names)
        self.concurrency = concurrency
        self.lease = lease  # also caches what every claim reads (see the property)
        self.poll_interval = poll_interval
        self.clock = clock
        self.observers = observers
        self._execute = execute
        self.active: dict[str, ActiveRun] = {}
        self._fences = FenceTimers()
        self.wake = asyncio.Event()
        self._slots = _Slots(concurrency)
        self._wakeups: list[int] = []
        self._stopping = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._beats: set[asyncio.Task[None]] = set()
        # Set while no claim is in flight: stop() waits on it, so a claim that commits
        # during shutdown is released rather than left running under a dead lease.
        self._claims_settled = asyncio.Event()
        self._claims_settled.set()
        # Quarantine of runs taken over from a dead holder (see _run): while one waits or
        # runs, no claims are made and it runs alone, one at a time.
        self._suspects = 0
        self._claims_open = asyncio.Event()
        self._claims_open.set()
        self._alone = asyncio.Lock()
        self._others = 0
        self._others_done = asyncio.Event()
        self._others_done.set()
        # Set when a suspect was handed back because others ran here (see _claim_batch).
        self._suspect_yielded = False

    @property
    def lease(self) -> LeaseOptions:
        """The lease options every claim and heartbeat uses."""
        return self._lease

    @lease.setter
    def lease(self, lease: LeaseOptions) -> None:
        # Derived once: the options are frozen, and each claim would recompute these.
        self._lease = lease
        self._lease_ms = lease.duration_ms
        self._fence_after = lease.fence_after

    def stopping(self) -> bool:
        """True once :meth:`stop` was called."""
        return self._stopping

    # -- signals from elsewhere ---------------------------------------------------

    def poke(self) -> None:
        """New work may be claimable now."""
        self.wake.set()

    def note_wake(self, in_ms: int) -> None:
        """A run becomes claimable in ``in_ms``: wake up then rather than at the next poll."""
        heapq.heappush(self._wakeups, self.clock() + max(0, in_ms))
        self.wake.set()

    # -- claiming -----------------------------------------------------------------

    async def claim(self) -> tuple[ClaimedRun | None, float]:
        """Claim one run (including runs whose holder's lease expired) under this engine's
        lease; return it with the loop time the claim was sent, where its fence starts."""
        sent = asyncio.get_running_loop().time()
        claimed = await self.storage.claim_next_run(
            self.names, lease_ms=self._lease_ms, holder=self.holder
        )
        return claimed, sent

    def spawn(self, claimed: ClaimedRun, sent: float) -> asyncio.Task[None] | None:
        """Execute a claimed run in its own task; the slot is released when it ends."""
        run = claimed.run
        previous = self.active.get(run.id)
        if previous is not None:
            if previous.abort_reason is None and run.attempt == previous.attempt + 1:
                # We re-claimed a run we are still executing (its lease expired in the
                # store while our loop stalled), and the claim counter shows nobody else
                # claimed it in between: hand the new lease to the execution in progress
                # instead of starting a second one.
                previous.lease_id = claimed.lease_id
                previous.attempt = run.attempt
                previous.renewed(sent, self._fence_after)
                self._slots.release()
                return None
            # Someone else held the run in between (or our execution is already being
            # torn down): what we remember may be stale. Abandon the old execution and
            # replay from storage, once it has fully stopped.
            previous.abort(
                LeaseExpiredError(run.id, "this worker claimed the run again after another did")
            )
        active = ActiveRun(
            run_id=run.id,
            workflow=run.workflow,
            lease_id=claimed.lease_id,
            attempt=run.attempt,
            deadline=sent + self._fence_after,
            fences=self._fences,
        )
        active.arm()
        self.active[active.run_id] = active
        # Counted now, not when the task first runs: the loop would claim again, and a
        # suspect could start, in between (see _run_alone).
        if run.recoveries > 0:
            self._suspects += 1
            self._claims_open.clear()
        else:
            if self._others == 0:  # set exactly while none runs: clear it once, not per run
                self._others_done.clear()
            self._others += 1
        # Unnamed: a name per run costs a string and a call, and the run's id is in
        # every log record and event about it anyway. The loop's own create_task (what
        # asyncio.create_task calls) saves a frame per run.
        task = asyncio.get_running_loop().create_task(self._run(claimed, active, previous))
        active.task = task
        self._tasks.add(task)
        return task

    async def _run(
        self, claimed: ClaimedRun, active: ActiveRun, previous: ActiveRun | None
    ) -> None:
        try:
            if previous is not None:
                # Never two executions of one run in this process, not even a thread.
                await previous.settled()
            if claimed.run.recoveries > 0:
                await self._run_alone(claimed, active)
            elif active.abort_reason is None:
                await self._execute(claimed, active)
        except Exception as exc:
            # Storage failed mid-run: the lease lapses and another worker resumes the run.
            await self.observers.error(exc)
        finally:
            active.disarm()
            if self.active.get(active.run_id) is active:
                del self.active[active.run_id]
            if claimed.run.recoveries > 0:
                self._suspects -= 1
                if self._suspects == 0:
                    self._claims_open.set()
                    self.wake.set()
            else:
                self._others -= 1
                if self._others == 0:
                    self._others_done.set()
            self._slots.release()
            if active.task is not None:  # this task: spawn() set it before it ran
                self._tasks.discard(active.task)

    async def _run_alone(self, claimed: ClaimedRun, active: ActiveRun) -> None:
        """Execute a run taken over from a holder that died, with nothing else beside it.

        Whatever killed its last process (a step that calls ``os._exit``, runs out of
        memory, crashes in native code) will kill this one too, and every run executing
        beside it would be taken over again and counted against its own recovery cap.
        So such a run waits, heartbeating, until this engine's other runs have finished,
        no new claim is made meanwhile, and suspects run one at a time: a poison run
        reaches its cap alone, and an innocent one completes on its next try.
        """
        try:
            async with self._alone:
                await self._others_done.wait()
                if active.abort_reason is None:
                    await self._execute(claimed, active)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not isinstance(active.abort_reason, EngineStoppedError) or task is None:
                raise
            # Stopped while it waited its turn: nothing ran, hand it back at once.
            task.uncancel()
            await self._release(ClaimedRun(claimed.run, active.lease_id))

    def _idle_timeout(self) -> float:
        timeout = self.poll_interval
        now = self.clock()
        while self._wakeups and self._wakeups[0] <= now:
            heapq.heappop(self._wakeups)
        if self._wakeups:
            timeout = min(timeout, (self._wakeups[0] - now) / 1000)
        return max(timeout, 0.0)

    async def _idle(self, seconds: float) -> None:
        await wait_set(self.wake, seconds)

    async def _take_slots(self, wanted: int) -> int:
        """Wait for one free slot, then take up to ``wanted`` without waiting; return how many."""
        return await self._slots.take(wanted)

    async def _claim_batch(self, slots: int) -> tuple[int, BaseException | None]:
        """Claim up to ``slots`` runs in one storage call and start them; release unused
        slots.

        A run claimed while the engine is stopping is released at once instead of
        started. Returns (started, error).
        """
        self._claims_settled.clear()
        try:
            if slots == 1:
                outcomes: list[tuple[ClaimedRun | None, float] | BaseException] = []
                try:
                    outcomes.append(await self.claim())
                except Exception as exc:
                    outcomes.append(exc)
            else:
                # One storage call for every free slot (contract 2.1: one statement on
                # PostgreSQL, one transaction on SQLite). Sent no earlier than now, so
                # the fences start early enough for all.
                sent = asyncio.get_running_loop().time()
                try:
                    batch = await self.storage.claim_runs(
                        self.names, lease_ms=self._lease_ms, holder=self.holder, limit=slots
                    )
                except Exception as exc:
                    outcomes = [exc, *([(None, sent)] * (slots - 1))]
                else:
                    outcomes = [(claimed, sent) for claimed in batch]
                    outcomes.extend([(None, sent)] * (slots - len(outcomes)))
            error: BaseException | None = None
            claims: list[tuple[ClaimedRun, float]] = []
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    self._slots.release()
                    error = error or outcome
                elif outcome[0] is None:
                    self._slots.release()
                else:
                    claims.append((outcome[0], outcome[1]))
            keep, give_back = self._sort_claims(claims)
            # Hand back before starting anything: a run started now could kill this
            # process (a poison step) before a hand-back lands, and the run handed back
            # would be counted as recovered from a dead worker.
            for claimed, _ in give_back:
                self._slots.release()
                await self._release(claimed)
            started = 0
            for claimed, sent in keep:
                if self.spawn(claimed, sent) is not None:
                    started += 1
            return started, error
        finally:
            self._claims_settled.set()

    def _is_suspect(self, claimed: ClaimedRun) -> bool:
        """A run taken over from a dead holder (not our own run re-claimed after a stall)."""
        return claimed.run.recoveries > 0 and claimed.run.id not in self.active

    def _sort_claims(
        self, claims: list[tuple[ClaimedRun, float]]
    ) -> tuple[list[tuple[ClaimedRun, float]], list[tuple[ClaimedRun, float]]]:
        """Split one round of claims into the runs to start and the runs to hand back.

        A suspect (taken over from a dead holder) must run alone: whatever killed its
        last process may kill this one, and everything beside it would die too and be
        counted against its own cap. So a suspect is kept only when it is the one run
        this engine would execute, and then alone. Otherwise (others run here, or came
        in the same round) every suspect goes back, its count kept so that its next
        claimer quarantines it too, and this engine claims nothing more until its runs
        have finished, so that a suspect cannot bounce back here meanwhile. Fresh runs
        are never handed back: their claim counter keeps meaning "times executed".
        """
        if self.stopping():
            return [], claims
        for claim in claims:  # the common case first: no run was taken over
            if claim[0].run.recoveries > 0:
                break
        else:
            return claims, []
        suspects = [claim for claim in claims if self._is_suspect(claim[0])]
        if not suspects:
            return claims, []
        if self._others > 0 or self._suspects > 0 or len(suspects) < len(claims):
            self._suspect_yielded = True
            return [claim for claim in claims if not self._is_suspect(claim[0])], suspects
        first = suspects[0]
        return [first], [claim for claim in claims if claim is not first]

    async def _after_yielded_suspect(self) -> None:
        """After handing a suspect back, wait until this engine runs nothing (or stops)."""
        self._suspect_yielded = False
        while self._others > 0 and self._tasks and not self.stopping():
            done = asyncio.ensure_future(self._others_done.wait())
            try:
                await asyncio.wait([done, *self._tasks], return_when=asyncio.FIRST_COMPLETED)
            finally:
                done.cancel()

    async def _quarantine_done(self) -> None:
        """Wait until no suspect run waits or runs (or every task has ended)."""
        while not self._claims_open.is_set() and self._tasks:
            opened = asyncio.ensure_future(self._claims_open.wait())
            try:
                await asyncio.wait([opened, *self._tasks], return_when=asyncio.FIRST_COMPLETED)
            finally:
                opened.cancel()

    async def _release(self, claimed: ClaimedRun) -> None:
        try:
            await self.storage.update_claimed_run_status(
                claimed.run.id, claimed.lease_id, RunStatus.PENDING
            )
        except Exception as exc:
            await self.observers.error(exc)

    async def loop(self) -> None:
        """Claim and execute until :meth:`stop`.

        While every claim finds work, the next round claims for every free slot at once;
        as soon as one comes back empty, it claims one at a time again, so an idle worker
        costs one query per wake-up.
        """
        failures = 0
        wanted = 1
        while not self.stopping():
            if self._suspect_yielded:
                await self._after_yielded_suspect()
                continue
            await self._claims_open.wait()
            slots = await self._take_slots(wanted)
            if self.stopping() or not self._claims_open.is_set():
                # Stopping, or a recovered run came in while we waited for a slot: it
                # must run alone, so claim nothing beside it.
                for _ in range(slots):
                    self._slots.release()
                if self.stopping():
                    break
                continue
            self.wake.clear()
            started, error = await self._claim_batch(slots)
            if error is not None:
                failures += 1
                wanted = 1
                await self.observers.error(error)
                # Back off so a database outage is not hammered; a poke still wakes us.
                await self._idle(min(_ERROR_BACKOFF_MAX, self.poll_interval * 2**failures))
                continue
            failures = 0
            if started == slots:
                wanted = self.concurrency
                continue
            wanted = 1
            if started == 0:
                await self._idle(self._idle_timeout())

    async def drain(self) -> int:
        """Claim and execute until nothing is claimable and nothing runs; return the count."""
        count = 0
        wanted = 1
        while True:
            if self._suspect_yielded:
                await self._after_yielded_suspect()
            if not self._claims_open.is_set():
                await self._quarantine_done()
            slots = await self._take_slots(wanted)
            if not self._claims_open.is_set():
                for _ in range(slots):
                    self._slots.release()
                continue
            started, error = await self._claim_batch(slots)
            if error is not None:
                raise error
            count += started
            if started == slots:
                wanted = self.concurrency
                continue
            wanted = 1
            if started:
                continue
            if not self._tasks:
                return count
            await asyncio.wait(set(self._tasks), return_when=asyncio.FIRST_COMPLETED)

    # -- heartbeats ---------------------------------------------------------------

    async def heartbeat_loop(self) -> None:
        """Renew every held lease each ``heartbeat_every`` seconds, until cancelled.

        Each renewal is a task of its own, bounded by the interval: the loop never waits
        for one, and a run never has two in flight.
        """
        try:
            while True:
                await asyncio.sleep(self.lease.heartbeat_every)
                for active in list(self.active.values()):
                    # Past its fence a run sends nothing, a heartbeat included: the
                    # fence may not have fired yet (a process resumed after SIGSTOP).
                    if (
                        active.wants_lease()
                        and not active.fenced()
                        and (active.beat is None or active.beat.done())
                    ):
                        beat = asyncio.create_task(self._beat(active))
                        active.beat = beat
                        self._beats.add(beat)
                        beat.add_done_callback(self._beats.discard)
        finally:
            for beat in list(self._beats):
                beat.cancel()

    async def _beat(self, active: ActiveRun) -> None:
        loop = asyncio.get_running_loop()
        sent = loop.time()
        lease_id = active.lease_id
        timeout = self.lease.heartbeat_every
        try:
            async with asyncio.timeout(timeout):
                held = await self.storage.heartbeat_run(active.run_id, lease_id)
        except TimeoutError:
            # The fence, not this answer, decides when to give up: it runs on its own.
            await self.observers.error(
                StorageError(
                    "heartbeat_run",
                    f"run {active.run_id} got no answer within {timeout:g}s; it stops at "
                    "its lease fence unless a later heartbeat lands",
                )
            )
            return
        except Exception as exc:
            await self.observers.error(exc)
            return
        if lease_id != active.lease_id:
            return  # handed over meanwhile: this answer is about the old lease
        if held:
            active.renewed(sent, self._fence_after)
            return
        reason: LeaseExpiredError | RunCancelledError = LeaseExpiredError(
            active.run_id, "the store refused its heartbeat (another worker claimed it)"
        )
        try:
            async with asyncio.timeout(timeout):
                run = await self.storage.get_run(active.run_id)
            if run is not None and run.status is RunStatus.CANCELLED:
                reason = RunCancelledError(active.run_id)
        except (StorageError, TimeoutError):
            pass
        active.abort(reason)

    # -- stopping -----------------------------------------------------------------

    async def stop(self, grace: float, abort: Callable[[ActiveRun], None]) -> None:
        """Stop claiming; let runs finish for ``grace`` seconds, then abort the rest."""
        self._stopping = True
        self.wake.set()
        await self._claims_settled.wait()
        if grace > 0 and self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace)
        for active in list(self.active.values()):
            abort(active)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
