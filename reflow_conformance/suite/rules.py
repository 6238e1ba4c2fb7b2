"""Rules: promises of the contract that single-fault adapters showed no other case checks.

Each case here was added because an adapter built on a real one, with a single change,
passed the whole kit (see ``tests/conformance/faults``):

* ``update_run_status(running)`` leaves the run with no holder and
  ``lease_expires_at = now``, so the next claim takes it over at once;
* step rows are ordered by ``created_at`` first: ids that sort the other way must not
  decide;
* status arguments may be the string values of ``RunStatus``;
* times are integer milliseconds: a column that reads back as a float (``REAL``,
  ``double precision``) is caught even when the value compares equal;
* an adapter that declares ``notify`` calls ``on_work`` on every path that makes a run
  claimable (requeued, woken by its event, released, a wait that finds its event, put
  to sleep, set to pending) — not only when a run is created;
* ``claim_runs`` (oldest across workflows, at most ``limit``) and ``purge_runs`` (finished
  strictly before the cutoff, only the statuses asked for, oldest first, with steps and
  events); a schedule's next firing from the store's clock, far from any wall clock;
* the check-then-write paths the concurrency area did not race: ``wait_run`` against
  ``deliver_event`` (a lost wake-up), ``update_claimed_run_status`` and
  ``consume_event`` with an old lease against a takeover, ``requeue_run`` against
  itself, and every lease-checked write (``sleep_run``, ``wait_run``,
  ``heartbeat_run``, completion) against a takeover and against a conditional cancel.

The races run several **rounds** each, with the roles rotated between racers, so the
interleaving that exposes a split check and write is not left to one throw of the dice:
in ``coroutines`` mode (one handle, FIFO adapters) only some role orders can expose a
split at all, and every order is tried; in ``threads`` mode each round is another
independent chance. Threads keep their handle across rounds (opened before the first
barrier), so a round costs the calls under test, not connection set-ups.
"""

from __future__ import annotations

import asyncio
import functools
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from reflow_conformance.cases import case
from reflow_conformance.harness import (
    BARRIER_TIMEOUT_S,
    LEASE_MS,
    ContractViolation,
    Harness,
    HarnessError,
    expect,
)
from reflow_core.registry import Capability
from reflow_core.storage import StorageAdapter, WorkNotifier
from reflow_core.types import ClaimedRun, ErrorInfo, RunFilter, RunStatus, StepResult, StepStatus

RACERS = 6
ROUNDS = 18
"""Rounds per race case: three times the number of racers, so each racer plays each role
(and each delivery offset of the wait race) at least once."""
MODES: dict[str, frozenset[Capability]] = {
    "coroutines": frozenset(),
    "threads": frozenset({Capability.THREADS}),
}
TAKEOVER_TRIES = 1000
"""A claim may skip a row another transaction holds at that instant (SKIP LOCKED)."""


# -- deterministic rules ------------------------------------------------------------------


@case("rules.update_run_status_running_claimable_at_once")
async def update_run_status_running_claimable_at_once(h: Harness) -> None:
    """update_run_status(running) leaves no holder and lease_expires_at = now: the next
    claim, at the same now, takes the run over (a new lease, one recovery); the old lease
    is void. From pending too."""
    claimed = await h.created_and_claimed()
    pending = await h.create()
    for run_id, recoveries in ((claimed.run.id, 1), (pending.id, 1)):
        expect(await h.storage.update_run_status(run_id, RunStatus.RUNNING), True, "set running")
        stored = await h.get(run_id)
        expect(
            (stored.status, stored.holder, stored.lease_expires_at),
            (RunStatus.RUNNING, None, h.now()),
            "(status, holder, lease_expires_at) after update_run_status(running)",
        )
        taken = await h.claim(run_id)  # at the same now: already expired
        expect(taken.run.recoveries, recoveries, "recoveries after taking it over")
        await h.storage.update_claimed_run_status(run_id, taken.lease_id, RunStatus.COMPLETED)
    expect(await h.storage.heartbeat_run(claimed.run.id, claimed.lease_id), False, "the old lease")


@case("rules.step_order_created_at_before_id")
async def step_order_created_at_before_id(h: Harness) -> None:
    """Step rows come back by created_at first, even when their ids sort the other way;
    the id breaks ties only."""
    run = await h.create()
    rows = [("s-9", 1), ("s-5", 2), ("s-7", 2), ("s-1", 3)]
    for step_id, created in reversed(rows):
        step = h.step(run.id, f"step-{step_id}", id=step_id, created_at=created)
        await h.storage.save_step_result(step)
    got = [r.id for r in await h.storage.get_step_results(run.id)]
    expect(got, [step_id for step_id, _ in rows], "step order by (created_at, id)")


def _text(*statuses: RunStatus) -> Any:
    """The string values of ``statuses`` (one string for one status), typed as the contract
    allows them to be passed."""
    values = [status.value for status in statuses]
    return values[0] if len(values) == 1 else values


@case("rules.status_strings_accepted")
async def status_strings_accepted(h: Harness) -> None:
    """Status arguments may be the string values of RunStatus ("pending"): update_run_status
    (status and expected) and update_claimed_run_status act exactly as with members, and
    the status reads back as the RunStatus member."""
    pending, cancelled, running = RunStatus.PENDING, RunStatus.CANCELLED, RunStatus.RUNNING
    claimed = await h.created_and_claimed()
    run_id, lease = claimed.run.id, claimed.lease_id
    ok = await h.storage.update_claimed_run_status(run_id, lease, _text(pending))
    expect(ok, True, "update_claimed_run_status(run, lease, 'pending')")
    expect((await h.get(run_id)).status, pending, "status after 'pending'")
    ok = await h.storage.update_run_status(run_id, _text(cancelled), expected=[_text(running)])
    expect(ok, False, "update_run_status('cancelled', expected=['running']) of a pending run")
    ok = await h.storage.update_run_status(
        run_id, _text(cancelled), expected=_text(pending, running)
    )
    expect(ok, True, "update_run_status('cancelled', expected=['pending', 'running'])")
    stored = await h.get(run_id)
    expect((type(stored.status), stored.status), (RunStatus, cancelled), "status read back")
    ok = await h.storage.update_run_status(run_id, _text(pending))
    expect(ok, True, "update_run_status('pending')")
    expect((await h.get(run_id)).status, pending, "status after 'pending'")


def _expect_ints(values: dict[str, Any], where: str) -> None:
    for name, value in values.items():
        if value is not None and type(value) is not int:
            raise ContractViolation(
                f"{where}: {name} is an integer count of milliseconds",
                "int",
                f"{type(value).__name__} {value!r}",
            )


_RUN_INTS = (
    "created_at",
    "updated_at",
    "heartbeat_at",
    "claimed_at",
    "lease_ms",
    "lease_expires_at",
    "wake_at",
    "attempt",
    "recoveries",
)


def _run_times(run: Any) -> dict[str, Any]:
    return {name: getattr(run, name) for name in _RUN_INTS}


@case("rules.times_are_ints")
async def times_are_ints(h: Harness) -> None:
    """Times are integer milliseconds (and counters integers) wherever they are read back:
    a float that compares equal is still the wrong type."""
    claimed = await h.created_and_claimed()
    run_id = claimed.run.id
    await h.storage.sleep_run(run_id, claimed.lease_id, h.now() + 5)
    _expect_ints({"now()": await h.storage.now()}, "now")
    _expect_ints(_run_times(claimed.run), "claim_next_run")
    _expect_ints(_run_times(await h.get(run_id)), "get_run (sleeping)")
    for run in await h.storage.list_runs(RunFilter()):
        _expect_ints(_run_times(run), "list_runs")
    await h.storage.save_step_result(h.step(run_id, "s", wake_at=h.now() + 7))
    for step in await h.storage.get_step_results(run_id):
        _expect_ints(
            {
                "created_at": step.created_at,
                "updated_at": step.updated_at,
                "wake_at": step.wake_at,
                "attempts": step.attempts,
            },
            "get_step_results",
        )
    await h.storage.deliver_event(run_id, "ev", 1)
    record = await h.storage.take_event(run_id, "ev")
    _expect_ints({"delivered_at": record.delivered_at if record else None}, "take_event")
    due = h.now() - 1_000
    stored = await h.storage.upsert_schedule(h.schedule("k", every_ms=100, next_run_at=due))
    fired = await h.storage.claim_due_schedule(["wf"])
    schedules = [
        ("upsert_schedule", stored),
        *(("list_schedules", s) for s in await h.storage.list_schedules()),
    ]
    if fired is not None:
        schedules.append(("claim_due_schedule", fired.schedule))
        _expect_ints({"slot": fired.slot}, "claim_due_schedule")
    for where, schedule in schedules:
        _expect_ints(
            {
                "next_run_at": schedule.next_run_at,
                "created_at": schedule.created_at,
                "updated_at": schedule.updated_at,
            },
            where,
        )


@case("rules.schedule_next_from_store_clock")
async def schedule_next_from_store_clock(h: Harness) -> None:
    """claim_due_schedule computes the next firing from the store's now, far from any
    wall clock: every 100 ms, slot T claimed at T + 1 h + 250 stores T + 1 h + 300."""
    base = h.now()
    await h.storage.upsert_schedule(h.schedule("k", every_ms=100, next_run_at=base))
    h.advance(3_600_250)
    claimed = await h.storage.claim_due_schedule(["wf"])
    expect(claimed.slot if claimed else None, base, "claimed slot")
    stored = {s.key: s.next_run_at for s in await h.storage.list_schedules()}
    expect(stored.get("k"), base + 3_600_300, "next_run_at after the claim (store's clock)")


async def _runs_one_ms_apart(h: Harness, workflows: Sequence[str]) -> list[str]:
    """One pending run per entry of ``workflows``, each 1 ms after the previous."""
    ids = []
    for workflow in workflows:
        ids.append((await h.create(workflow)).id)
        h.advance(1)
    return ids


@case("rules.claim_runs_oldest_first_across_workflows")
async def claim_runs_oldest_first_across_workflows(h: Harness) -> None:
    """claim_runs takes the oldest (created_at, id) runs of all named workflows, at most
    ``limit``, returned oldest first, each claimed as claim_next_run would (running, a
    lease of its own, attempt 1); runs of other workflows are untouched."""
    ids = await _runs_one_ms_apart(h, ["wf-a", "wf-b", "wf-c", "wf-b", "wf-a", "wf-b"])
    claimed = await h.storage.claim_runs(["wf-a", "wf-b"], lease_ms=LEASE_MS, limit=3)
    expect([c.run.id for c in claimed], [ids[0], ids[1], ids[3]], "runs claimed, in order")
    expect(len({c.lease_id for c in claimed}), 3, "distinct lease ids")
    for c in claimed:
        stored = await h.get(c.run.id)
        expect(
            (stored.status, stored.attempt, stored.lease_expires_at),
            (RunStatus.RUNNING, 1, h.now() + LEASE_MS),
            f"run {c.run.id} after claim_runs",
        )
        expect(await h.storage.heartbeat_run(c.run.id, c.lease_id), True, "its lease is held")
    expect((await h.get(ids[2])).status, RunStatus.PENDING, "the other workflow's run")
    rest = await h.storage.claim_runs(["wf-a", "wf-b"], lease_ms=LEASE_MS, limit=10)
    expect([c.run.id for c in rest], [ids[4], ids[5]], "the rest, with a larger limit")
    expect(await h.storage.claim_runs(["wf-a", "wf-b"], lease_ms=LEASE_MS, limit=10), [], "none")


async def _finished(h: Harness, status: RunStatus) -> str:
    """A run finished in ``status`` at the current time, with a step and a buffered event."""
    claimed = await h.created_and_claimed("purge")
    run_id = claimed.run.id
    await h.storage.save_step_result(h.step(run_id, "s"), claimed.lease_id)
    await h.storage.deliver_event(run_id, "ev", 1)
    if status is RunStatus.CANCELLED:
        await h.storage.update_run_status(run_id, status)
    else:
        await h.storage.update_claimed_run_status(run_id, claimed.lease_id, status)
    return run_id


@case("rules.purge_runs_finished_before_oldest_first")
async def purge_runs_finished_before_oldest_first(h: Harness) -> None:
    """purge_runs deletes finished runs with updated_at strictly before the cutoff, of the
    statuses asked for, oldest first, at most ``limit``, with their steps and events; it
    answers how many went and leaves everything else as it was."""
    order = [RunStatus.COMPLETED, RunStatus.CANCELLED, RunStatus.FAILED, RunStatus.COMPLETED]
    old = []
    for status in order:
        old.append(await _finished(h, status))
        h.advance(10)
    cutoff = h.now()
    at_cutoff = await _finished(h, RunStatus.COMPLETED)  # updated_at == cutoff: kept
    live = (await h.created_and_claimed("purge")).run.id
    pending = (await h.create("purge")).id
    h.advance(10)
    gone = await h.storage.purge_runs(
        finished_before=cutoff, limit=5, statuses=[RunStatus.COMPLETED]
    )
    expect(gone, 2, "runs purged (completed only)")
    expect(await h.storage.get_run(old[0]), None, "the oldest completed run")
    expect(await h.storage.get_run(old[3]), None, "the other completed run before the cutoff")
    expect(await h.storage.get_step_results(old[0]), [], "a purged run's steps")
    expect(await h.storage.take_event(old[0], "ev"), None, "a purged run's events")
    gone = await h.storage.purge_runs(finished_before=cutoff, limit=1)
    expect(gone, 1, "runs purged with limit 1")
    expect(await h.storage.get_run(old[1]), None, "the oldest remaining finished run")
    expect((await h.get(old[2])).status, RunStatus.FAILED, "the younger one, beyond the limit")
    expect(await h.storage.purge_runs(finished_before=cutoff, limit=10), 1, "the last one")
    for run_id in (at_cutoff, live, pending):
        await h.get(run_id)
    expect(len(await h.storage.get_step_results(at_cutoff)), 1, "steps of a run kept")
    record = await h.storage.take_event(at_cutoff, "ev")
    expect(record.payload if record else None, 1, "events of a run kept")
    expect(await h.storage.purge_runs(finished_before=cutoff, limit=10), 0, "nothing left")


# -- notifications ------------------------------------------------------------------------

NOTIFY_QUIET_S = 0.2
"""A listener that heard nothing for this long has delivered what was sent before."""
NOTIFY_FLOOR_S = 1.0
"""Least time a case waits for a notification (the latency seen on warm-up, times 25,
decides when that is longer)."""


class _Listener:
    """``listen_for_work`` on a handle, counting calls; warmed up by creating runs of a
    workflow no case claims until one is heard."""

    def __init__(self, h: Harness) -> None:
        self.h = h
        self.heard = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.wait_s = NOTIFY_FLOOR_S

    def _on_work(self) -> None:
        self.heard.set()

    async def __aenter__(self) -> _Listener:
        h = self.h
        if not isinstance(h.storage, WorkNotifier):
            raise AssertionError("declares 'notify' but has no listen_for_work method")
        listener = await h.open_another() if h.has(Capability.THREADS) else h.storage
        self.task = asyncio.create_task(listener.listen_for_work(self._on_work))  # type: ignore[attr-defined]
        for _ in range(100):  # the listener subscribes asynchronously
            await h.create("notify-warm-up")
            try:
                await asyncio.wait_for(self.heard.wait(), 0.1)
                break
            except TimeoutError:
                continue
        else:
            raise AssertionError("listen_for_work never called on_work for 100 created runs")
        await self.quiet()
        started = time.monotonic()
        await h.create("notify-warm-up")
        try:
            await asyncio.wait_for(self.heard.wait(), 10)
        except TimeoutError:
            raise AssertionError("listen_for_work stopped calling on_work") from None
        self.wait_s = max(NOTIFY_FLOOR_S, 25 * (time.monotonic() - started))
        await self.quiet()
        return self

    async def quiet(self) -> None:
        """Wait until nothing was heard for NOTIFY_QUIET_S, then forget what was."""
        while True:
            self.heard.clear()
            try:
                await asyncio.wait_for(self.heard.wait(), NOTIFY_QUIET_S)
            except TimeoutError:
                return

    async def expect_heard(self, what: str) -> None:
        try:
            await asyncio.wait_for(self.heard.wait(), self.wait_s)
        except TimeoutError:
            raise ContractViolation(
                f"on_work called after {what} (a run became claimable)",
                "a notification",
                f"none within {self.wait_s:.1f} s",
            ) from None

    async def __aexit__(self, *exc: object) -> None:
        if self.task is None:
            return
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass
        except Exception as error:
            raise HarnessError(f"listen_for_work raised on cancel: {error!r}") from error


NotifyScenario = Callable[[Harness], Awaitable[Callable[[], Awaitable[Any]]]]
"""Prepares a run (before the listener starts hearing) and returns the action under test."""


async def _requeue(h: Harness) -> Callable[[], Awaitable[Any]]:
    claimed = await h.created_and_claimed()
    error = ErrorInfo(type="Boom", message="boom")
    await h.storage.update_claimed_run_status(
        claimed.run.id, claimed.lease_id, RunStatus.FAILED, error=error
    )
    return lambda: h.storage.requeue_run(claimed.run.id)


async def _deliver_wakes(h: Harness) -> Callable[[], Awaitable[Any]]:
    claimed = await h.created_and_claimed()
    await h.storage.wait_run(claimed.run.id, claimed.lease_id, "ev", None)
    return lambda: h.storage.deliver_event(claimed.run.id, "ev", "wake up")


async def _release(h: Harness) -> Callable[[], Awaitable[Any]]:
    claimed = await h.created_and_claimed()
    return lambda: h.storage.update_claimed_run_status(
        claimed.run.id, claimed.lease_id, RunStatus.PENDING
    )


async def _wait_with_buffered_event(h: Harness) -> Callable[[], Awaitable[Any]]:
    claimed = await h.created_and_claimed()
    await h.storage.deliver_event(claimed.run.id, "ev", "already here")
    return lambda: h.storage.wait_run(claimed.run.id, claimed.lease_id, "ev", None)


async def _sleep(h: Harness) -> Callable[[], Awaitable[Any]]:
    claimed = await h.created_and_claimed()
    return lambda: h.storage.sleep_run(claimed.run.id, claimed.lease_id, h.now() + 60_000)


async def _update_run_status(h: Harness) -> Callable[[], Awaitable[Any]]:
    claimed = await h.created_and_claimed()
    await h.storage.update_run_status(claimed.run.id, RunStatus.CANCELLED)
    return lambda: h.storage.update_run_status(claimed.run.id, RunStatus.PENDING)


NOTIFY_SCENARIOS: dict[str, tuple[str, NotifyScenario]] = {
    "requeue": ("requeue_run of a failed run", _requeue),
    "deliver_wakes": ("deliver_event that wakes the run waiting for it", _deliver_wakes),
    "release": ("update_claimed_run_status(pending)", _release),
    "wait_with_buffered_event": (
        "wait_run that finds its event buffered (the run goes to pending)",
        _wait_with_buffered_event,
    ),
    "sleep": ("sleep_run (idle workers recompute their next wake-up)", _sleep),
    "update_run_status": ("update_run_status(pending) of a cancelled run", _update_run_status),
}


def _register_notify(name: str, what: str, scenario: NotifyScenario) -> None:
    @case(
        f"rules.notifies_{name}",
        f"An adapter declaring 'notify' calls on_work after {what}.",
        requires=[Capability.NOTIFY],
    )
    async def notifies(h: Harness) -> None:
        action = await scenario(h)
        async with _Listener(h) as listener:
            expect(await action(), True, what)
            await listener.expect_heard(what)


for _name, (_what, _scenario) in NOTIFY_SCENARIOS.items():
    _register_notify(_name, _what, _scenario)


# -- races, in rounds ---------------------------------------------------------------------

Racer = Callable[[StorageAdapter, int], Awaitable[Any]]
"""``racer(storage, index)``: one racer's part in one race."""
RoundRacer = Callable[[StorageAdapter, int, int], Awaitable[Any]]
"""``racer(storage, index, round)``."""

_RACER_REPORT_S = 300.0
"""A racer thread that does not answer within this time has hung."""


class Racers:
    """``count`` racers that race again and again, each race released by a barrier.

    ``await racers.race(fn)`` runs ``fn(storage, index)`` in every racer at once and
    returns the answers by index. In ``coroutines`` mode they share the one handle under
    test. In ``threads`` mode each racer is an OS thread with its own event loop and its
    own handle (``open_storage(url)`` with the kit clock), opened and initialized once,
    before the first race, and kept until the block ends: a race in a later round costs
    the calls under test, not connection set-ups, so a case can afford many rounds.
    Use as ``async with Racers(h, mode) as racers: ...``.
    """

    def __init__(self, h: Harness, mode: str, count: int = RACERS) -> None:
        if mode not in MODES:
            raise HarnessError(f"unknown racing mode {mode!r}")
        self.h = h
        self.mode = mode
        self.count = count
        self._barrier = threading.Barrier(count)
        self._inboxes: list[queue.SimpleQueue[Racer | None]] = []
        self._outbox: queue.SimpleQueue[tuple[int, str, Any]] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    async def __aenter__(self) -> Racers:
        if self.mode == "threads":
            url = self.h.url
            for index in range(self.count):
                self._inboxes.append(queue.SimpleQueue())
                thread = threading.Thread(
                    target=self._thread, args=(url, index), name=f"reflow-racer-{index}"
                )
                self._threads.append(thread)
                thread.start()
            try:
                self._raise(await self._collect(), "opening its handle")
            except BaseException:
                await self._stop()
                raise
        return self

    async def race(self, fn: Racer) -> list[Any]:
        """One barrier-released race of every racer on ``fn``; the answers by index."""
        if self.mode == "coroutines":
            return await self.h.race_coroutines(self.count, fn)
        for inbox in self._inboxes:
            inbox.put(fn)
        answers = await self._collect()
        self._raise(answers, "racing")
        return [value for _, _, value in sorted(answers, key=lambda a: a[0])]

    async def __aexit__(self, *exc: object) -> None:
        leftovers = await self._stop()
        if exc[0] is None:
            self._raise(leftovers, "closing its handle")

    async def _stop(self) -> list[tuple[int, str, Any]]:
        """End every racer thread (each closes its handle); what they still reported."""
        for inbox in self._inboxes:
            inbox.put(None)  # a thread that already ended never reads it
        for thread in self._threads:
            await asyncio.to_thread(thread.join, _RACER_REPORT_S)
        if any(thread.is_alive() for thread in self._threads):
            raise HarnessError(f"racer threads did not stop within {_RACER_REPORT_S} s")
        leftovers = []
        while True:
            try:
                leftovers.append(self._outbox.get_nowait())
            except queue.Empty:
                return leftovers

    async def _collect(self) -> list[tuple[int, str, Any]]:
        loop = asyncio.get_running_loop()
        answers = []
        for _ in range(self.count):
            try:
                answer = await loop.run_in_executor(None, self._next_answer)
            except queue.Empty:
                self._barrier.abort()
                raise HarnessError(
                    f"a racer thread did not answer in {_RACER_REPORT_S} s"
                ) from None
            answers.append(answer)
        return answers

    def _next_answer(self) -> tuple[int, str, Any]:
        return self._outbox.get(timeout=_RACER_REPORT_S)

    @staticmethod
    def _raise(answers: list[tuple[int, str, Any]], doing: str) -> None:
        errors = [value for _, status, value in answers if status == "error"]
        for error in errors:
            if isinstance(error, AssertionError):
                raise error
        for error in errors:
            if not isinstance(error, threading.BrokenBarrierError):
                raise error
        if errors:
            raise HarnessError(f"racer threads never all reached the barrier ({doing})")

    def _thread(self, url: str, index: int) -> None:
        try:
            asyncio.run(self._thread_main(url, index))
        except BaseException as exc:  # reported through the outbox; never lost
            self._barrier.abort()
            self._outbox.put((index, "error", exc))

    async def _thread_main(self, url: str, index: int) -> None:
        loop = asyncio.get_running_loop()
        handle = self.h.open_url(url)
        try:
            await handle.initialize()
            self._outbox.put((index, "ok", None))
            inbox = self._inboxes[index]
            while (fn := await loop.run_in_executor(None, inbox.get)) is not None:
                try:
                    self._barrier.wait(BARRIER_TIMEOUT_S)
                    self._outbox.put((index, "ok", await fn(handle, index)))
                except BaseException as exc:
                    self._barrier.abort()
                    self._outbox.put((index, "error", exc))
                    return
        except BaseException:
            self._barrier.abort()
            raise
        finally:
            await handle.close()


async def race_rounds(h: Harness, mode: str, rounds: int, fn: RoundRacer) -> list[list[Any]]:
    """``rounds`` races of :data:`RACERS` :class:`Racers`; ``results[round][index]``."""
    async with Racers(h, mode) as racers:
        return [
            await racers.race(functools.partial(_in_round, fn, round_)) for round_ in range(rounds)
        ]


def _in_round(fn: RoundRacer, round_: int, storage: StorageAdapter, index: int) -> Awaitable[Any]:
    return fn(storage, index, round_)


def _role(index: int, round_: int) -> bool:
    """Whether racer ``index`` plays the odd role in ``round_`` (each racer in turn)."""
    return index == round_ % RACERS


async def _claimed_per_round(h: Harness, rounds: int) -> list[ClaimedRun]:
    """One claimed run per round, each of its own workflow (``race-<round>``)."""
    return [await h.created_and_claimed(f"race-{r}") for r in range(rounds)]


async def _expire_all(h: Harness, runs: Sequence[ClaimedRun]) -> None:
    for claimed in runs:
        await h.expire(claimed.run.id)


async def _take_over(storage: StorageAdapter, run_id: str, workflow: str) -> ClaimedRun | None:
    """Claim the run (its lease expired); ``None`` once it is no longer running."""
    for _ in range(TAKEOVER_TRIES):
        taken = await storage.claim_next_run([workflow], lease_ms=LEASE_MS)
        if taken is not None:
            if taken.run.id != run_id:
                raise ContractViolation(f"claim of {workflow}", run_id, taken.run.id)
            return taken
        run = await storage.get_run(run_id)
        if run is None or run.status is not RunStatus.RUNNING:
            return None
    raise ContractViolation(f"claim_next_run of run {run_id} whose lease expired", run_id, None)


WAIT_RUNS = 8
"""Runs per round of the wait race: the waiter waits on each in turn while the deliverer
delivers to each in turn, one event per run, so the two streams drift across each
other's check-and-write windows and no later delivery can hide a lost wake-up."""


def _deliverer(index: int, round_: int, racers: int) -> bool:
    """The racer that delivers in ``round_`` of a wait race: the one after the waiter."""
    return index == (round_ + 1) % racers


async def _wait_all(storage: Any, runs: Sequence[tuple[str, str]]) -> bool:
    answers = [await storage.wait_run(run_id, lease, "ev", None) for run_id, lease in runs]
    return all(answers)


async def _deliver_all(storage: Any, runs: Sequence[tuple[str, str]], round_: int) -> bool:
    """One delivery per run, in the waiter's order, starting after ``round_ % 3`` reads."""
    for _ in range(round_ % 3):
        await storage.get_run(runs[0][0])
    answers = [await storage.deliver_event(run_id, "ev", run_id) for run_id, _ in runs]
    return all(answers)


async def _expect_woken(h: Harness, run_ids: Sequence[str], where: str) -> None:
    for run_id in run_ids:
        stored = await h.get(run_id)
        expect(
            (stored.status, stored.waiting_for),
            (RunStatus.PENDING, None),
            f"{where}: run {run_id} waited for 'ev' while it was delivered (a wait that "
            "missed the delivery leaves it waiting with the event buffered)",
        )


async def _wait_vs_deliver(h: Harness, mode: str) -> None:
    rounds = [
        [
            (c.run.id, c.lease_id)
            for c in [await h.created_and_claimed(f"race-{r}") for _ in range(WAIT_RUNS)]
        ]
        for r in range(ROUNDS)
    ]

    async def act(storage: StorageAdapter, index: int, round_: int) -> bool:
        if _role(index, round_):
            return await _wait_all(storage, rounds[round_])
        if _deliverer(index, round_, RACERS):
            return await _deliver_all(storage, rounds[round_], round_)
        return True

    results = await race_rounds(h, mode, ROUNDS, act)
    for round_, answers in enumerate(results):
        expect(answers, [True] * RACERS, f"round {round_}: every wait_run and delivery")
        await _expect_woken(h, [run_id for run_id, _ in rounds[round_]], f"round {round_}")


async def _complete_vs_takeover(h: Harness, mode: str) -> None:
    runs = await _claimed_per_round(h, ROUNDS)
    await _expire_all(h, runs)

    async def act(storage: StorageAdapter, index: int, round_: int) -> tuple[str, bool]:
        claimed = runs[round_]
        if _role(index, round_):
            taken = await _take_over(storage, claimed.run.id, f"race-{round_}")
            return "takeover", taken is not None
        done = await storage.update_claimed_run_status(
            claimed.run.id, claimed.lease_id, RunStatus.COMPLETED, output=index
        )
        return "completed", done

    results = await race_rounds(h, mode, ROUNDS, act)
    for round_, answers in enumerate(results):
        winners = [what for what, ok in answers if ok]
        expect(
            len(winners),
            1,
            f"round {round_}: successes among a takeover and completions with the old "
            f"lease ({winners}): the lease is held by one of them at a time",
        )
        stored = await h.get(runs[round_].run.id)
        status = RunStatus.RUNNING if winners[0] == "takeover" else RunStatus.COMPLETED
        expect(stored.status, status, f"round {round_}: status after the race")


STREAM = 20
"""Events (or saves) an old-lease racer works through, one after another, while a takeover
lands: whenever it lands, one of them is in flight."""
SETTLE_POLLS = 1000


async def _consume_stream(storage: Any, run_id: str, lease_id: str, index: int) -> list[Any]:
    """Consume with the old lease, one checkpoint each, until refused or nothing is left."""
    consumed = []
    for k in range(STREAM):
        now = await storage.now()
        row = StepResult(
            id=f"{run_id}/ev-{index}-{k:03d}",
            run_id=run_id,
            name=f"ev-{index}-{k:03d}",
            status=StepStatus.COMPLETED,
            attempts=1,
            created_at=now,
            updated_at=now,
        )
        result = await storage.consume_event("ev", row, lease_id)
        if result.event is None:
            break
        consumed.append(result.event.payload)
    return consumed


async def _take_over_when_busy(storage: Any, run_id: str, workflow: str) -> list[str]:
    """Wait until the old holder has written something, take the run over, and return
    the step names visible right after the takeover."""
    for _ in range(SETTLE_POLLS):
        if await storage.get_step_results(run_id):
            break
    if await _take_over(storage, run_id, workflow) is None:
        raise ContractViolation(f"takeover of {run_id}", "a claim", None)
    return sorted(s.name for s in await storage.get_step_results(run_id))


async def _consume_vs_takeover(h: Harness, mode: str) -> None:
    runs = await _claimed_per_round(h, ROUNDS)
    for claimed in runs:
        for index in range(STREAM):
            await h.storage.deliver_event(claimed.run.id, "ev", index)
    await _expire_all(h, runs)

    async def act(storage: StorageAdapter, index: int, round_: int) -> Any:
        claimed = runs[round_]
        if _role(index, round_):
            return await _take_over_when_busy(storage, claimed.run.id, f"race-{round_}")
        return await _consume_stream(storage, claimed.run.id, claimed.lease_id, index)

    results = await race_rounds(h, mode, ROUNDS, act)
    for round_, answers in enumerate(results):
        run_id = runs[round_].run.id
        at_takeover = next(a for i, a in enumerate(answers) if _role(i, round_))
        after = sorted(s.name for s in await h.storage.get_step_results(run_id))
        expect(
            after,
            at_takeover,
            f"round {round_}: checkpoints after the race vs. right after the takeover "
            "(a consume with the old lease landed after the takeover)",
        )
        consumed = sorted(p for i, a in enumerate(answers) if not _role(i, round_) for p in a)
        expect(sorted(set(consumed)), consumed, f"round {round_}: events consumed at most once")


async def _requeue_once(h: Harness, mode: str) -> None:
    runs = await _claimed_per_round(h, ROUNDS)
    for claimed in runs:
        error = ErrorInfo(type="Boom", message="boom")
        await h.storage.update_claimed_run_status(
            claimed.run.id, claimed.lease_id, RunStatus.FAILED, error=error
        )

    async def act(storage: StorageAdapter, index: int, round_: int) -> bool:
        return await storage.requeue_run(runs[round_].run.id)

    results = await race_rounds(h, mode, ROUNDS, act)
    for round_, answers in enumerate(results):
        winners = [i for i, ok in enumerate(answers) if ok]
        expect(len(winners), 1, f"round {round_}: racers told their requeue happened")
        expect((await h.get(runs[round_].run.id)).status, RunStatus.PENDING, "requeued")


HELD_RUNS = 4
"""Runs per round of a held-write race: the odd racer works through them in order (a
takeover or a cancel each) while the others call the held method on each in turn, so
several check-and-write windows meet the odd racer's write in every round."""
HELD_OPS = ("sleep", "wait", "heartbeat", "complete")
"""The lease-checked writes raced against a takeover and a cancel, one kind per round in
turn (save_step_result and consume_event have races of their own)."""
_LIVE = (RunStatus.PENDING, RunStatus.RUNNING, RunStatus.SLEEPING, RunStatus.WAITING)
_AFTER_OP = {
    "sleep": RunStatus.SLEEPING,
    "wait": RunStatus.WAITING,
    "complete": RunStatus.COMPLETED,
    "heartbeat": RunStatus.RUNNING,
}


async def _held_op(
    storage: Any, op: str, run_id: str, lease_id: str, index: int, wake_at: int
) -> bool:
    """One lease-checked write of kind ``op`` with ``lease_id``."""
    if op == "sleep":
        return bool(await storage.sleep_run(run_id, lease_id, wake_at))
    if op == "wait":
        return bool(await storage.wait_run(run_id, lease_id, "ev", None))
    if op == "heartbeat":
        return bool(await storage.heartbeat_run(run_id, lease_id))
    done = await storage.update_claimed_run_status(
        run_id, lease_id, RunStatus.COMPLETED, output=index
    )
    return bool(done)


async def _take_over_if_claimable(storage: Any, run_id: str, workflow: str) -> str | None:
    """Take the run over while its lease stays expired; the new lease id, or ``None``
    once the run is no longer claimable (suspended, finished, or its lease renewed)."""
    for _ in range(TAKEOVER_TRIES):
        taken = await storage.claim_next_run([workflow], lease_ms=LEASE_MS)
        if taken is not None:
            if taken.run.id != run_id:
                raise ContractViolation(f"claim of {workflow}", run_id, taken.run.id)
            return str(taken.lease_id)
        run = await storage.get_run(run_id)
        if run is None or run.status is not RunStatus.RUNNING:
            return None
        if run.lease_expires_at is not None and run.lease_expires_at > await storage.now():
            return None
    raise ContractViolation(f"claim_next_run of run {run_id} whose lease expired", run_id, None)


async def _held_rounds(h: Harness) -> list[list[ClaimedRun]]:
    """:data:`HELD_RUNS` claimed runs per round, each of its own workflow."""
    return [
        [await h.created_and_claimed(f"race-{r}-{k}") for k in range(HELD_RUNS)]
        for r in range(ROUNDS)
    ]


def _held_answers(answers: list[Any], round_: int, k: int) -> tuple[Any, list[int]]:
    """The odd racer's answer for run ``k``, and the other racers that succeeded on it."""
    odd = next(a for i, a in enumerate(answers) if _role(i, round_))
    won = [i for i, a in enumerate(answers) if not _role(i, round_) and a[k]]
    return odd[k], won


async def _held_vs_takeover(h: Harness, mode: str) -> None:
    rounds = await _held_rounds(h)
    for runs in rounds:
        await _expire_all(h, runs)
    wake_at = h.future()

    async def act(storage: StorageAdapter, index: int, round_: int) -> list[Any]:
        runs, op = rounds[round_], HELD_OPS[round_ % len(HELD_OPS)]
        if _role(index, round_):
            return [
                await _take_over_if_claimable(storage, c.run.id, f"race-{round_}-{k}")
                for k, c in enumerate(runs)
            ]
        return [await _held_op(storage, op, c.run.id, c.lease_id, index, wake_at) for c in runs]

    results = await race_rounds(h, mode, ROUNDS, act)
    for round_, answers in enumerate(results):
        op = HELD_OPS[round_ % len(HELD_OPS)]
        for k, claimed in enumerate(rounds[round_]):
            where = f"round {round_}, run {k} ({op} with the old lease vs. a takeover)"
            taken, won = _held_answers(answers, round_, k)
            await _check_held_vs_takeover(h, where, op, claimed.run.id, taken, won)


async def _check_held_vs_takeover(
    h: Harness, where: str, op: str, run_id: str, taken: Any, won: list[int]
) -> None:
    stored = await h.get(run_id)
    if taken is not None:
        expect(
            won,
            [],
            f"{where}: racers told their {op} with the old lease succeeded although the run "
            "was taken over (the lease check and the write are not atomic)",
        )
        expect((stored.status, stored.recoveries), (RunStatus.RUNNING, 1), f"{where}: run")
        return
    if op == "heartbeat":
        expect(bool(won), True, f"{where}: some heartbeat renewed the lease the taker missed")
    else:
        expect(len(won), 1, f"{where}: racers whose {op} succeeded")
    expect(stored.status, _AFTER_OP[op], f"{where}: status after the race")


async def _check_held_vs_cancel(
    h: Harness, where: str, op: str, run_id: str, cancelled: Any, won: list[int]
) -> None:
    stored = await h.get(run_id)
    if cancelled:
        if op == "complete":
            expect(won, [], f"{where}: completions told True beside a cancel")
        expect(
            (stored.status, stored.lease_expires_at, stored.claimed_at, stored.holder),
            (RunStatus.CANCELLED, None, None, None),
            f"{where}: a cancelled run stays cancelled, without lease fields (a {op} "
            "checked the lease before the cancel and wrote after it)",
        )
        return
    expect(op, "complete", f"{where}: only a completion can make the cancel fail")
    expect(len(won), 1, f"{where}: completions told True")
    expect(stored.status, RunStatus.COMPLETED, f"{where}: status after the race")


async def _held_vs_cancel(h: Harness, mode: str) -> None:
    rounds = await _held_rounds(h)
    wake_at = h.future()

    async def act(storage: StorageAdapter, index: int, round_: int) -> list[Any]:
        runs, op = rounds[round_], HELD_OPS[round_ % len(HELD_OPS)]
        if _role(index, round_):
            return [
                await storage.update_run_status(c.run.id, RunStatus.CANCELLED, expected=_LIVE)
                for c in runs
            ]
        return [await _held_op(storage, op, c.run.id, c.lease_id, index, wake_at) for c in runs]

    results = await race_rounds(h, mode, ROUNDS, act)
    for round_, answers in enumerate(results):
        op = HELD_OPS[round_ % len(HELD_OPS)]
        for k, claimed in enumerate(rounds[round_]):
            where = f"round {round_}, run {k} ({op} with the lease vs. a conditional cancel)"
            cancelled, won = _held_answers(answers, round_, k)
            await _check_held_vs_cancel(h, where, op, claimed.run.id, cancelled, won)


RACES = {
    "wait_vs_deliver": (
        "Racing wait_run against deliveries of the awaited event: no wake-up is lost (the "
        "run ends pending, never waiting with its event buffered).",
        _wait_vs_deliver,
    ),
    "complete_vs_takeover": (
        "Racing completions with an expired (not yet reclaimed) lease against a takeover: "
        "exactly one succeeds, and the run's status is the winner's.",
        _complete_vs_takeover,
    ),
    "consume_vs_takeover": (
        "Racing consume_event with an expired lease against a takeover: no consume with "
        "the old lease lands after the takeover.",
        _consume_vs_takeover,
    ),
    "requeue_once": (
        "Racing requeue_run of one failed run: exactly one is told it requeued.",
        _requeue_once,
    ),
    "held_vs_takeover": (
        "Racing sleep_run, wait_run, heartbeat_run and completion with an expired (not yet "
        "reclaimed) lease against a takeover: never both succeed.",
        _held_vs_takeover,
    ),
    "held_vs_cancel": (
        "Racing sleep_run, wait_run, heartbeat_run and completion with the held lease "
        "against a conditional cancel: a cancelled run stays cancelled, lease fields clear.",
        _held_vs_cancel,
    ),
}


def _register_race(name: str, mode: str, description: str, scenario: Any) -> None:
    @case(
        f"rules.race_{name}_{mode}",
        f"{description} ({mode}, {ROUNDS} rounds)",
        requires=MODES[mode],
    )
    async def race(h: Harness) -> None:
        await scenario(h, mode)


for _name, (_description, _race_scenario) in RACES.items():
    for _mode in MODES:
        _register_race(_name, _mode, _description, _race_scenario)


# -- races across processes ---------------------------------------------------------------
#
# One case spawns the racer processes once and plays every check-then-write path that the
# concurrency area races only in coroutines and threads, in rounds, through the store's
# URL (each process opens its own handle). The processes cannot share the kit clock: a
# takeover is prepared with a 1 ms lease taken on the store's own clock (a handle opened
# without the kit clock), and every racer waits (a bounded poll of its own now()) until
# the store's clock has passed the last of those expiries before the first round.

PROCESS_RACERS = 4
PROCESS_ROUNDS = 6
"""Rounds per path: each racer plays the odd role at least once."""
PROCESS_EVENTS = 12
PROCESS_CLOCK_WAIT_S = 30.0
PROCESS_REPORT_S = 180.0


def _p_role(index: int, round_: int) -> bool:
    return index == round_ % PROCESS_RACERS


async def _p_take_over(storage: Any, ctx: dict[str, Any]) -> Any:
    taken = await _take_over(storage, ctx["run_id"], ctx["workflow"])
    if taken is None:
        return None
    return taken.lease_id


async def _p_claim(storage: Any, index: int, round_: int, ctx: dict[str, Any]) -> Any:
    claimed = []
    while (run := await storage.claim_next_run([ctx["workflow"]], lease_ms=LEASE_MS)) is not None:
        claimed.append([run.run.id, run.lease_id])
        if len(claimed) > 2 * PROCESS_EVENTS:
            break
    return claimed


async def _p_stale_reclaim(storage: Any, index: int, round_: int, ctx: dict[str, Any]) -> Any:
    taken = await storage.claim_next_run([ctx["workflow"]], lease_ms=LEASE_MS)
    return None if taken is None else [taken.run.id, taken.run.recoveries]


async def _p_schedule_once(storage: Any, index: int, round_: int, ctx: dict[str, Any]) -> Any:
    claimed = await storage.claim_due_schedule([ctx["workflow"]])
    return None if claimed is None else claimed.slot


async def _p_fenced_save(storage: Any, index: int, round_: int, ctx: dict[str, Any]) -> Any:
    if _p_role(index, round_):
        return await _take_over_when_busy(storage, ctx["run_id"], ctx["workflow"])
    for k in range(STREAM):  # saves in flight whenever the takeover lands
        step = await _p_step(storage, ctx["run_id"], f"old-{index}-{k:03d}", StepStatus.COMPLETED)
        if not await storage.save_step_result(step, ctx["lease_id"]):
            break
    return None


async def _p_cancel_vs_complete(storage: Any, index: int, round_: int, ctx: dict[str, Any]) -> Any:
    if _p_role(index, round_):
        done = await storage.update_claimed_run_status(
            ctx["run_id"], ctx["lease_id"], RunStatus.COMPLETED, output="done"
        )
        return ["completed", done]
    live = [RunStatus.PENDING, RunStatus.RUNNING, RunStatus.SLEEPING, RunStatus.WAITING]
    cancelled = await storage.update_run_status(ctx["run_id"], RunStatus.CANCELLED, expected=live)
    return ["cancelled", cancelled]


async def _p_write_once(storage: Any, index: int, round_: int, ctx: dict[str, Any]) -> Any:
    step = await _p_step(storage, ctx["run_id"], "charge", StepStatus.COMPLETED, f"racer-{index}")
    return await storage.save_step_result(step, ctx["lease_id"] if index % 2 else None)


async def _p_event_key(storage: Any, index: int, round_: int, ctx: dict[str, Any]) -> Any:
    return await storage.deliver_event(ctx["run_id"], "ev", index, key="one-delivery")


async def _p_idempotency(storage: Any, index: int, round_: int, ctx: dict[str, Any]) -> Any:
    from reflow_core.types import WorkflowRun

    now = await storage.now()
    run = WorkflowRun(
        id=f"{ctx['workflow']}-racer-{index}",
        workflow=ctx["workflow"],
        input=index,
        status=RunStatus.PENDING,
        created_at=now,
        updated_at=now,
        idempotency_key="k",
    )
    result = await storage.create_run(run)
    return [result.run.id, result.created]


async def _p_event_once(storage: Any, index: int, round_: int, ctx: dict[str, Any]) -> Any:
    taken: list[Any] = []
    while (record := await storage.take_event(ctx["run_id"], "ev")) is not None:
        taken.append(record.payload)
        if len(taken) > 2 * PROCESS_EVENTS:
            break
    return taken


async def _p_consume_same_lease(storage: Any, index: int, round_: int, ctx: dict[str, Any]) -> Any:
    taken: list[Any] = []
    for k in range(2 * PROCESS_EVENTS):
        row = await _p_step(storage, ctx["run_id"], f"ev-{index}-{k:03d}", StepStatus.COMPLETED)
        result = await storage.consume_event("ev", row, ctx["lease_id"])
        if not result.held:
            raise AssertionError("consume_event with the held lease answered held=False")
        if result.event is None:
            return taken
        taken.append(result.event.payload)
    return taken


async def _p_wait_vs_deliver(storage: Any, index: int, round_: int, ctx: dict[str, Any]) -> Any:
    runs = [tuple(pair) for pair in ctx["runs"]]
    if _p_role(index, round_):
        return await _wait_all(storage, runs)
    if _deliverer(index, round_, PROCESS_RACERS):
        return await _deliver_all(storage, runs, round_)
    return True


async def _p_complete_vs_takeover(
    storage: Any, index: int, round_: int, ctx: dict[str, Any]
) -> Any:
    if _p_role(index, round_):
        return ["takeover", await _p_take_over(storage, ctx) is not None]
    done = await storage.update_claimed_run_status(
        ctx["run_id"], ctx["lease_id"], RunStatus.COMPLETED, output=index
    )
    return ["completed", done]


async def _p_consume_vs_takeover(storage: Any, index: int, round_: int, ctx: dict[str, Any]) -> Any:
    if _p_role(index, round_):
        return await _take_over_when_busy(storage, ctx["run_id"], ctx["workflow"])
    return await _consume_stream(storage, ctx["run_id"], ctx["lease_id"], index)


async def _p_requeue_once(storage: Any, index: int, round_: int, ctx: dict[str, Any]) -> Any:
    return await storage.requeue_run(ctx["run_id"])


_P_TAKEOVER_OPS = ("sleep", "wait", "complete")
"""Across processes the store's clock runs on, and a lease is taken for 1 ms: a heartbeat
that renews it lets it expire again at once, so a takeover after it is no violation."""


def _p_held_op(name: str, round_: int) -> str:
    ops = _P_TAKEOVER_OPS if name == "held_vs_takeover" else HELD_OPS
    return ops[round_ % len(ops)]


async def _p_held_vs_takeover(storage: Any, index: int, round_: int, ctx: dict[str, Any]) -> Any:
    if _p_role(index, round_):
        return await _take_over_if_claimable(storage, ctx["run_id"], ctx["workflow"])
    op = _p_held_op("held_vs_takeover", round_)
    return await _held_op(storage, op, ctx["run_id"], ctx["lease_id"], index, ctx["wake_at"])


async def _p_held_vs_cancel(storage: Any, index: int, round_: int, ctx: dict[str, Any]) -> Any:
    if _p_role(index, round_):
        live = list(_LIVE)
        return await storage.update_run_status(ctx["run_id"], RunStatus.CANCELLED, expected=live)
    op = _p_held_op("held_vs_cancel", round_)
    return await _held_op(storage, op, ctx["run_id"], ctx["lease_id"], index, ctx["wake_at"])


async def _p_step(
    storage: Any, run_id: str, name: str, status: StepStatus, output: Any = None
) -> Any:
    from reflow_core.types import StepResult

    now = await storage.now()
    return StepResult(
        id=f"{run_id}/{name}",
        run_id=run_id,
        name=name,
        status=status,
        output=output,
        attempts=1,
        created_at=now,
        updated_at=now,
    )


ProcessAct = Callable[[Any, int, int, dict[str, Any]], Awaitable[Any]]
PROCESS_ACTS: dict[str, ProcessAct] = {
    "claim": _p_claim,
    "stale_reclaim": _p_stale_reclaim,
    "schedule_once": _p_schedule_once,
    "fenced_save": _p_fenced_save,
    "cancel_vs_complete": _p_cancel_vs_complete,
    "write_once": _p_write_once,
    "event_key": _p_event_key,
    "idempotency": _p_idempotency,
    "event_once": _p_event_once,
    "consume_same_lease": _p_consume_same_lease,
    "wait_vs_deliver": _p_wait_vs_deliver,
    "complete_vs_takeover": _p_complete_vs_takeover,
    "consume_vs_takeover": _p_consume_vs_takeover,
    "requeue_once": _p_requeue_once,
    "held_vs_takeover": _p_held_vs_takeover,
    "held_vs_cancel": _p_held_vs_cancel,
}
"""Every check-then-write path of the contract, raced across processes in rounds (the
``concurrency.*_processes`` cases race claims, schedules and a stale takeover once)."""


async def _process_racer(
    url: str, barrier: Any, index: int, plan: list[tuple[str, list[dict[str, Any]]]], at: int
) -> list[list[Any]]:
    from reflow_core.registry import open_storage

    storage = open_storage(url)
    try:
        await storage.initialize()
        deadline = time.monotonic() + PROCESS_CLOCK_WAIT_S
        while (now := await storage.now()) < at:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the store's now() stayed at {now}, below {at}")
            await asyncio.sleep(0.002)
        results: list[list[Any]] = []
        for name, contexts in plan:
            act = PROCESS_ACTS[name]
            answers = []
            for round_, ctx in enumerate(contexts):
                barrier.wait(BARRIER_TIMEOUT_S)
                answers.append(await act(storage, index, round_, ctx))
            results.append(answers)
        return results
    finally:
        await storage.close()


def process_racer(url: str, barrier: Any, answers: Any, index: int, plan: Any, at: int) -> None:
    """Entry point of one racer process: ``(index, "ok", results)`` or an error's text."""
    import traceback

    try:
        value = asyncio.run(_process_racer(url, barrier, index, plan, at))
    except BaseException as exc:
        try:
            barrier.abort()
        finally:
            answers.put((index, "error", "".join(traceback.format_exception(exc))))
        return
    answers.put((index, "ok", value))


def _spawn_racers(url: str, plan: list[tuple[str, list[dict[str, Any]]]], at: int) -> list[Any]:
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(PROCESS_RACERS)
    results = context.Queue()
    processes = [
        context.Process(target=process_racer, args=(url, barrier, results, i, plan, at))
        for i in range(PROCESS_RACERS)
    ]
    for process in processes:
        process.start()
    collected: dict[int, Any] = {}
    try:
        for _ in range(PROCESS_RACERS):
            index, status, value = results.get(timeout=PROCESS_REPORT_S)
            if status != "ok":
                raise AssertionError(f"racer process {index} raised:\n{value}")
            collected[index] = value
    except queue.Empty:
        raise HarnessError(f"racer processes did not report within {PROCESS_REPORT_S} s") from None
    finally:
        for process in processes:
            process.join(30)
            if process.is_alive():
                process.kill()
                process.join()
        results.close()
        results.join_thread()
    return [collected[i] for i in range(PROCESS_RACERS)]


class _ProcessPlan:
    """Runs prepared for every path and round, in the parent, before the racers start."""

    def __init__(self, h: Harness, own_clock: StorageAdapter) -> None:
        self.h = h
        self.own_clock = own_clock
        self.expiry = 0

    async def held(self, name: str, round_: int) -> dict[str, Any]:
        claimed = await self.h.created_and_claimed(f"p-{name}-{round_}")
        return {"run_id": claimed.run.id, "lease_id": claimed.lease_id}

    async def expiring(self, name: str, round_: int) -> dict[str, Any]:
        """A run claimed with a 1 ms lease on the store's own clock."""
        workflow = f"p-{name}-{round_}"
        run = await self.h.create(workflow)
        claimed = await self.h.claim(run.id, (workflow,), lease_ms=1, storage=self.own_clock)
        stored = await self.h.get(run.id)
        if stored.lease_expires_at is None:
            raise ContractViolation("lease_expires_at after a claim", "an int", None)
        self.expiry = max(self.expiry, stored.lease_expires_at)
        return {"run_id": run.id, "lease_id": claimed.lease_id, "workflow": workflow}

    async def prepare(self, name: str, round_: int) -> dict[str, Any]:
        h = self.h
        workflow = f"p-{name}-{round_}"
        if name == "claim":
            for index in range(PROCESS_EVENTS):
                await h.create(workflow, index)
            return {"workflow": workflow}
        if name == "schedule_once":
            due = h.now() - 1_000  # due by any clock: the kit clock started at real time
            schedule = h.schedule(workflow, workflow, every_ms=10**9, next_run_at=due)
            await h.storage.upsert_schedule(schedule)
            return {"workflow": workflow, "due": due}
        if name in ("stale_reclaim", "fenced_save", "complete_vs_takeover"):
            return await self.expiring(name, round_)
        if name == "held_vs_takeover":
            return {**await self.expiring(name, round_), "wake_at": h.future()}
        if name == "held_vs_cancel":
            return {**await self.held(name, round_), "wake_at": h.future()}
        if name == "consume_vs_takeover":
            ctx = await self.expiring(name, round_)
            for index in range(STREAM):
                await h.storage.deliver_event(ctx["run_id"], "ev", index)
            return ctx
        if name in ("cancel_vs_complete", "write_once"):
            return await self.held(name, round_)
        if name == "wait_vs_deliver":
            claimed = [await h.created_and_claimed(workflow) for _ in range(WAIT_RUNS)]
            return {"runs": [[c.run.id, c.lease_id] for c in claimed]}
        if name == "consume_same_lease":
            ctx = await self.held(name, round_)
            for index in range(PROCESS_EVENTS):
                await h.storage.deliver_event(ctx["run_id"], "ev", index)
            return ctx
        if name == "event_once":
            run = await h.create(f"p-{name}-{round_}")
            for index in range(PROCESS_EVENTS):
                await h.storage.deliver_event(run.id, "ev", index)
            return {"run_id": run.id}
        if name == "event_key":
            return {"run_id": (await h.create(f"p-{name}-{round_}")).id}
        if name == "idempotency":
            return {"workflow": f"p-{name}-{round_}"}
        if name == "requeue_once":
            ctx = await self.held(name, round_)
            await h.storage.update_claimed_run_status(
                ctx["run_id"],
                ctx["lease_id"],
                RunStatus.FAILED,
                error=ErrorInfo(type="Boom", message="boom"),
            )
            return ctx
        raise HarnessError(f"no preparation for process race {name!r}")


async def _check_process_round(
    h: Harness, name: str, round_: int, ctx: dict[str, Any], answers: list[Any]
) -> None:
    where = f"{name}, round {round_} (processes)"
    role = next(i for i in range(PROCESS_RACERS) if _p_role(i, round_))
    if name == "claim":
        ids = [run_id for batch in answers for run_id, _ in batch]
        expect(sorted({i for i in ids if ids.count(i) > 1}), [], f"{where}: claimed twice")
        listed = await h.storage.list_runs(RunFilter(workflow=ctx["workflow"]))
        expect(sorted({r.id for r in listed} - set(ids)), [], f"{where}: runs lost")
    elif name == "stale_reclaim":
        won = [a for a in answers if a is not None]
        expect(len(won), 1, f"{where}: processes that reclaimed the one stale run")
        stored = await h.get(ctx["run_id"])
        expect((stored.recoveries, stored.attempt), (1, 2), f"{where}: (recoveries, attempt)")
    elif name == "schedule_once":
        expect([a for a in answers if a is not None], [ctx["due"]], f"{where}: slots fired")
    elif name in ("fenced_save", "consume_vs_takeover"):
        after = sorted(s.name for s in await h.storage.get_step_results(ctx["run_id"]))
        expect(after, answers[role], f"{where}: checkpoints after the race vs. at the takeover")
    elif name in ("cancel_vs_complete", "complete_vs_takeover"):
        winners = [what for what, ok in answers if ok]
        expect(len(winners), 1, f"{where}: calls that reported success ({winners})")
    elif name == "write_once":
        winners = [i for i, ok in enumerate(answers) if ok]
        expect(len(winners), 1, f"{where}: racers told their final checkpoint was written")
        rows = await h.storage.get_step_results(ctx["run_id"])
        expect([r.output for r in rows], [f"racer-{winners[0]}"], f"{where}: the row")
    elif name == "event_key":
        expect(answers, [True] * PROCESS_RACERS, f"{where}: every keyed delivery is told True")
        events = []
        while (record := await h.storage.take_event(ctx["run_id"], "ev")) is not None:
            events.append(record.payload)
            if len(events) > PROCESS_RACERS:
                break
        expect(len(events), 1, f"{where}: events stored for one key ({events})")
    elif name == "idempotency":
        expect(sum(created for _, created in answers), 1, f"{where}: racers told created=True")
        expect(len({run_id for run_id, _ in answers}), 1, f"{where}: distinct run ids returned")
        listed = await h.storage.list_runs(RunFilter(workflow=ctx["workflow"]))
        expect(len(listed), 1, f"{where}: runs stored for one key")
    elif name in ("event_once", "consume_same_lease"):
        taken = sorted(p for batch in answers for p in batch)
        expect(taken, list(range(PROCESS_EVENTS)), f"{where}: events taken, each exactly once")
    elif name == "wait_vs_deliver":
        expect(answers, [True] * PROCESS_RACERS, f"{where}: every wait_run and delivery")
        await _expect_woken(h, [run_id for run_id, _ in ctx["runs"]], where)
    elif name == "requeue_once":
        expect(sum(bool(a) for a in answers), 1, f"{where}: racers told they requeued")
    elif name in ("held_vs_takeover", "held_vs_cancel"):
        op = _p_held_op(name, round_)
        won = [i for i, a in enumerate(answers) if i != role and a]
        check = _check_held_vs_takeover if name == "held_vs_takeover" else _check_held_vs_cancel
        await check(h, f"{where}, {op}", op, ctx["run_id"], answers[role], won)


@case("rules.race_paths_processes", requires=[Capability.CROSS_PROCESS])
async def race_paths_processes(h: Harness) -> None:
    """Spawned processes race every check-then-write path (claim, stale reclaim, schedule,
    fenced save, conditional cancel, write-once, event key, idempotency, take_event,
    consume with one lease, wait against delivery, completion and consume against a
    takeover, requeue, sleep/wait/heartbeat/completion against a takeover and a cancel),
    several rounds each, roles rotated: each path keeps the promise
    its coroutine and thread races check."""
    own_clock = await h.open_another(shared_clock=False)
    plan = _ProcessPlan(h, own_clock)
    prepared = [
        (name, [await plan.prepare(name, r) for r in range(PROCESS_ROUNDS)])
        for name in PROCESS_ACTS
    ]
    results = await asyncio.to_thread(_spawn_racers, h.url, prepared, plan.expiry)
    for position, (name, contexts) in enumerate(prepared):
        for round_, ctx in enumerate(contexts):
            answers = [results[i][position][round_] for i in range(PROCESS_RACERS)]
            await _check_process_round(h, name, round_, ctx, answers)
