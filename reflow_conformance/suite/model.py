"""A reference model of the contract, and a Hypothesis state machine holding adapters to it.

:class:`Model` is the contract for runs, claims, leases, heartbeats, steps, events,
status updates and requeue, written as plain Python with no concurrency and no I/O: it
doubles as executable documentation. The state machine applies random sequences of
operations to the model and to a fresh adapter and compares every answer and, after
each step, every run's readable state. On a failure Hypothesis reports the shortest
sequence of calls it found (``state.tick(ms=1000)``, ``state.claim(names=['a'], ...)``
...) as notes on the exception, which the runner's report and the pytest plugin's
failure text both print, followed by the seed that replays it. Time is the kit clock:
the ``tick`` rule moves it, and the model judges every lease expiry and wake-up by it,
exactly as the store must.

``model.differential_exploration`` goes further: random sequences of *every* contract
call (batch claims, purge, schedules and listings included), sent through every handle
the adapter can share, with no assertion of its own: each call is checked by the
differential backbone (:mod:`reflow_conformance.differential`) against the full
reference model (:mod:`reflow_conformance.reference`), answer and complete state. Both
machines run under the session's recorded seed (``--reflow-seed``) and report the
shortest failing sequence.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from reflow_conformance.cases import case
from reflow_conformance.harness import Harness, expect
from reflow_core.types import ConsumeResult, ErrorInfo, LeaseHolder, RunStatus, StepStatus

WORKFLOWS = ("a", "b")
EVENTS = ("e1", "e2")
STEPS = ("s1", "s2")
LEASES = (1_000, 5_000)
HOLDERS = (
    None,
    LeaseHolder(worker="w1", host="h1", pid=1),
    LeaseHolder(worker="w2", host="h2", pid=2),
)


@dataclass
class ModelRun:
    """What the contract says a run's state is."""

    id: str
    workflow: str
    created_at: int
    key: str | None
    status: RunStatus = RunStatus.PENDING
    lease: str | None = None
    attempt: int = 0
    recoveries: int = 0
    wake: int | None = None
    waiting_for: str | None = None
    output: Any = None
    error: ErrorInfo | None = None
    heartbeat_at: int | None = None
    claimed_at: int | None = None
    lease_ms: int | None = None
    expires: int | None = None
    holder: LeaseHolder | None = None
    steps: dict[str, tuple[StepStatus, Any]] = field(default_factory=dict)
    events: dict[str, list[Any]] = field(default_factory=dict)
    keys: set[str] = field(default_factory=set)


class Model:
    """The storage contract (runs, leases, steps, events), sequential and in memory.

    Times are absolute milliseconds of the kit clock, the store's "now".
    """

    def __init__(self) -> None:
        self.runs: dict[str, ModelRun] = {}

    def count(self, status: RunStatus) -> int:
        """How many runs are in ``status``."""
        return sum(1 for run in self.runs.values() if run.status is status)

    def held(self, run_id: str, lease: str) -> bool:
        """Held: the run is running and its lease is the one given."""
        run = self.runs.get(run_id)
        return run is not None and run.status is RunStatus.RUNNING and run.lease == lease

    def existing(self, workflow: str, key: str | None) -> ModelRun | None:
        """The run of ``workflow`` that already has idempotency key ``key``."""
        if key is None:
            return None
        return next((r for r in self.runs.values() if (r.workflow, r.key) == (workflow, key)), None)

    def claimable(self, names: set[str], now: int) -> ModelRun | None:
        """The oldest claimable run of ``names`` by (created_at, id), at ``now``."""

        def ok(run: ModelRun) -> bool:
            if run.workflow not in names:
                return False
            if run.status is RunStatus.PENDING:
                return True
            if run.status is RunStatus.RUNNING:
                return run.expires is not None and run.expires <= now
            suspended = run.status in (RunStatus.SLEEPING, RunStatus.WAITING)
            return suspended and run.wake is not None and run.wake <= now

        candidates = sorted((r for r in self.runs.values() if ok(r)), key=_order)
        return candidates[0] if candidates else None

    def claim(
        self, run: ModelRun, lease: str, now: int, lease_ms: int, holder: LeaseHolder | None
    ) -> None:
        if run.status is RunStatus.RUNNING:
            run.recoveries += 1
        run.status, run.lease, run.attempt = RunStatus.RUNNING, lease, run.attempt + 1
        run.wake = run.waiting_for = None
        run.claimed_at = run.heartbeat_at = now
        run.lease_ms, run.expires, run.holder = lease_ms, now + lease_ms, holder

    def heartbeat(self, run: ModelRun, now: int) -> None:
        assert run.lease_ms is not None
        run.heartbeat_at, run.expires = now, now + run.lease_ms

    def release(self, run: ModelRun, status: RunStatus) -> None:
        run.status, run.lease, run.wake, run.waiting_for = status, None, None, None
        run.claimed_at = run.lease_ms = run.expires = run.holder = None

    def deliver(self, run: ModelRun, event: str, payload: Any, key: str | None) -> bool | None:
        """The answer deliver_event must give, or ``None`` when either answer is allowed:
        a repeated key for a run that has since ended stores nothing, and the contract
        does not say whether the dedupe (True) or the ended run (False) answers."""
        if run.status.is_terminal:
            return None if key is not None and key in run.keys else False
        if key is not None:
            if key in run.keys:
                return True
            run.keys.add(key)
        run.events.setdefault(event, []).append(payload)
        if run.status is RunStatus.WAITING and run.waiting_for == event:
            self.release(run, RunStatus.PENDING)
        return True

    def requeue(self, run: ModelRun) -> bool:
        if run.status not in (RunStatus.FAILED, RunStatus.CANCELLED):
            return False
        self.release(run, RunStatus.PENDING)
        run.output = run.error = None
        run.recoveries = 0
        run.steps = {n: s for n, s in run.steps.items() if s[0] is not StepStatus.FAILED}
        return True

    def final(self, run: ModelRun, step: str) -> bool:
        """Whether ``step`` of ``run`` has a final (write-once) row."""
        row = run.steps.get(step)
        return row is not None and row[0].is_done


def _order(run: ModelRun) -> tuple[int, str]:
    return (run.created_at, run.id)


def _machine(h: Harness) -> type:
    from hypothesis import strategies as st
    from hypothesis.stateful import (
        RuleBasedStateMachine,
        initialize,
        invariant,
        precondition,
        rule,
    )

    # Runs and leases are kept in lists and picked by index rather than held in Bundles:
    # Hypothesis ranks rules that fill a bundle last, which starved claims.
    pick = st.integers(min_value=0, max_value=63)

    class ContractMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.model = Model()
            self.run_ids: list[str] = []
            self.leases: list[tuple[str, str]] = []
            self.counter = itertools.count()
            self.storage = h.sync(h.fresh_storage())

        def teardown(self) -> None:
            # Closed and handed to the conformance factory's teardown now, not at the end
            # of the case: a server adapter would otherwise keep one store per example.
            h.sync(h.discard(self.storage))

        def when(self, wake: str | None) -> int | None:
            soon = h.now() + 500
            return {"past": h.past(), "soon": soon, "future": h.future(), None: None}[wake]

        def run_at(self, index: int) -> str:
            return self.run_ids[index % len(self.run_ids)]

        def lease_at(self, index: int) -> tuple[str, str]:
            return self.leases[index % len(self.leases)]

        @initialize()
        def first_run(self) -> None:
            self.create(workflow="a", key=None, created_at=0)

        @precondition(lambda self: len(self.model.runs) < 6)  # few runs, long histories
        @rule(
            workflow=st.sampled_from(WORKFLOWS),
            key=st.sampled_from([None, "k1", "k2"]),
            created_at=st.integers(0, 3),
        )
        def create(self, workflow: str, key: str | None, created_at: int) -> None:
            run_id = f"r{next(self.counter)}"
            run = h.new_run(
                workflow, created_at, id=run_id, created_at=created_at, idempotency_key=key
            )
            result = h.sync(self.storage.create_run(run))
            existing = self.model.existing(workflow, key)
            if existing is not None:
                expect((result.created, result.run.id), (False, existing.id), "create (dup key)")
                return
            expect((result.created, result.run.id), (True, run_id), "create_run")
            self.model.runs[run_id] = ModelRun(run_id, workflow, created_at, key)
            self.run_ids.append(run_id)

        @rule(ms=st.sampled_from([1, 499, 500, LEASES[0], LEASES[1]]))
        def tick(self, ms: int) -> None:
            h.advance(ms)

        # Weighted towards names that match, so runs get far enough to finish and fail.
        # ``later`` moves the clock first (as tick does), so that claims meet expired
        # leases even in examples where Hypothesis switches the tick rule off.
        @rule(
            names=st.sampled_from([WORKFLOWS, WORKFLOWS, ("a",), ("b",), ()]),
            lease_ms=st.sampled_from(LEASES),
            holder=st.sampled_from(HOLDERS),
            later=st.sampled_from([0, 0, 1, LEASES[0] - 1, LEASES[0], LEASES[1]]),
        )
        def claim(
            self, names: tuple[str, ...], lease_ms: int, holder: LeaseHolder | None, later: int
        ) -> None:
            now = h.advance(later)
            claimed = h.sync(
                self.storage.claim_next_run(list(names), lease_ms=lease_ms, holder=holder)
            )
            want = self.model.claimable(set(names), now)
            expect(claimed.run.id if claimed else None, want.id if want else None, "claimed run")
            if claimed is not None and want is not None:
                self.model.claim(want, claimed.lease_id, now, lease_ms, holder)
                self.leases.append((want.id, claimed.lease_id))

        @precondition(lambda self: bool(self.leases))
        @rule(pick=pick)
        def heartbeat(self, pick: int) -> None:
            lease = self.lease_at(pick)
            got = h.sync(self.storage.heartbeat_run(*lease))
            expect(got, self.model.held(*lease), f"heartbeat_run{lease}")
            if got:
                self.model.heartbeat(self.model.runs[lease[0]], h.now())

        @precondition(lambda self: bool(self.leases))
        @rule(pick=pick, wake=st.sampled_from(["past", "soon", "future"]))
        def sleep(self, pick: int, wake: str) -> None:
            lease = self.lease_at(pick)
            at = self.when(wake)
            assert at is not None
            got = h.sync(self.storage.sleep_run(*lease, at))
            expect(got, self.model.held(*lease), f"sleep_run{lease}")
            if got:
                run = self.model.runs[lease[0]]
                self.model.release(run, RunStatus.SLEEPING)
                run.wake = at

        @precondition(lambda self: bool(self.leases))
        @rule(
            pick=pick,
            event=st.sampled_from(EVENTS),
            wake=st.sampled_from([None, "past", "soon", "future"]),
        )
        def wait(self, pick: int, event: str, wake: str | None) -> None:
            lease = self.lease_at(pick)
            at = self.when(wake)
            got = h.sync(self.storage.wait_run(*lease, event, at))
            expect(got, self.model.held(*lease), f"wait_run{lease}")
            if got:
                run = self.model.runs[lease[0]]
                if run.events.get(event):
                    self.model.release(run, RunStatus.PENDING)
                else:
                    self.model.release(run, RunStatus.WAITING)
                    run.wake, run.waiting_for = at, event

        @rule(
            pick=pick,
            event=st.sampled_from(EVENTS),
            payload=st.integers(0, 9),
            key=st.sampled_from([None, None, "k1", "k2"]),
        )
        def deliver(self, pick: int, event: str, payload: int, key: str | None) -> None:
            run_id = self.run_at(pick)
            status = self.model.runs[run_id].status
            got = h.sync(self.storage.deliver_event(run_id, event, payload, key=key))
            want = self.model.deliver(self.model.runs[run_id], event, payload, key)
            if want is not None:
                expect(got, want, f"deliver_event(key={key!r}) to a {status} run")

        @rule(pick=pick, event=st.sampled_from(EVENTS))
        def take(self, pick: int, event: str) -> None:
            run_id = self.run_at(pick)
            record = h.sync(self.storage.take_event(run_id, event))
            buffered = self.model.runs[run_id].events.get(event) or [None]
            expect(record.payload if record else None, buffered.pop(0), "take_event payload")

        @precondition(lambda self: bool(self.leases))
        @rule(
            pick=pick,
            name=st.sampled_from(STEPS),
            status=st.sampled_from(StepStatus),
            with_lease=st.booleans(),
        )
        def save_step(self, pick: int, name: str, status: StepStatus, with_lease: bool) -> None:
            lease = self.lease_at(pick)
            run_id, lease_id = lease
            step = h.step(run_id, name, status, output=f"{name}:{status.value}")
            got = h.sync(self.storage.save_step_result(step, lease_id if with_lease else None))
            run = self.model.runs[run_id]
            want = (self.model.held(run_id, lease_id) or not with_lease) and not self.model.final(
                run, name
            )
            expect(got, want, f"save_step_result(with_lease={with_lease}) over {run.steps}")
            if want:
                run.steps[name] = (status, step.output)

        @precondition(lambda self: bool(self.leases))
        @rule(pick=pick, name=st.sampled_from(STEPS), event=st.sampled_from(EVENTS))
        def consume(self, pick: int, name: str, event: str) -> None:
            run_id, lease_id = self.lease_at(pick)
            step = h.step(run_id, name, StepStatus.COMPLETED)
            got = h.sync(self.storage.consume_event(event, step, lease_id))
            run = self.model.runs[run_id]
            if not self.model.held(run_id, lease_id) or self.model.final(run, name):
                expect(got, ConsumeResult(held=False), "consume_event (not held or final row)")
                return
            buffered = run.events.get(event)
            if not buffered:
                expect(got, ConsumeResult(held=True), "consume_event with nothing buffered")
                return
            payload = buffered.pop(0)
            expect(
                (got.held, got.event.payload if got.event else None),
                (True, payload),
                "consume_event (held, payload)",
            )
            run.steps[name] = (StepStatus.COMPLETED, payload)

        @precondition(lambda self: bool(self.leases))
        @rule(
            pick=pick,
            output=st.integers(),
            status=st.sampled_from(
                [RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.PENDING, RunStatus.RUNNING]
            ),
        )
        def update_claimed(self, pick: int, status: RunStatus, output: int) -> None:
            lease = self.lease_at(pick)
            error = ErrorInfo(type="E", message="m") if status is RunStatus.FAILED else None
            got = h.sync(
                self.storage.update_claimed_run_status(*lease, status, output=output, error=error)
            )
            expect(got, self.model.held(*lease), f"update_claimed_run_status({status})")
            if got:
                run = self.model.runs[lease[0]]
                if status is not RunStatus.RUNNING:
                    self.model.release(run, status)
                run.output, run.error = output, error

        @precondition(lambda self: self.model.count(RunStatus.CANCELLED) < 2)  # keep runs alive
        @rule(
            pick=pick,
            expected=st.sampled_from(
                [None, (), ("pending", "running"), ("sleeping", "waiting", "failed")]
            ),
        )
        def cancel(self, pick: int, expected: tuple[str, ...] | None) -> None:
            run_id = self.run_at(pick)
            statuses = None if expected is None else [RunStatus(s) for s in expected]
            got = h.sync(
                self.storage.update_run_status(run_id, RunStatus.CANCELLED, expected=statuses)
            )
            run = self.model.runs[run_id]
            want = statuses is None or run.status in statuses
            expect(got, want, f"update_run_status(cancelled, expected={expected})")
            if want:
                self.model.release(run, RunStatus.CANCELLED)

        def requeue(self, run_id: str) -> None:
            want = self.model.requeue(self.model.runs[run_id])
            expect(h.sync(self.storage.requeue_run(run_id)), want, "requeue_run")

        @precondition(lambda self: bool(self.leases))
        @rule(pick=pick)
        def requeue_claimed(self, pick: int) -> None:
            """Requeue a run that was claimed once (a random run is mostly pending)."""
            lease = self.lease_at(pick)
            self.requeue(lease[0])

        @invariant()
        def same_state(self) -> None:
            if h.differential is None:
                return  # the differential check compared every record after each call
            for run in self.model.runs.values():
                got = h.sync(self.storage.get_run(run.id))
                assert got is not None, f"run {run.id} vanished"
                fields = (got.status, got.attempt, got.recoveries, got.output, got.error)
                expect(
                    fields,
                    (run.status, run.attempt, run.recoveries, run.output, run.error),
                    f"run {run.id} (status, attempt, recoveries, output, error)",
                )
                lease = (got.heartbeat_at, got.claimed_at, got.lease_ms, got.lease_expires_at)
                expect(
                    (*lease, got.holder),
                    (run.heartbeat_at, run.claimed_at, run.lease_ms, run.expires, run.holder),
                    f"run {run.id} (heartbeat_at, claimed_at, lease_ms, lease_expires_at, holder)",
                )
                if run.status is RunStatus.WAITING:
                    expect(got.waiting_for, run.waiting_for, f"run {run.id} waiting_for")
                if run.status in (RunStatus.SLEEPING, RunStatus.WAITING):
                    expect(got.wake_at, run.wake, f"run {run.id} wake_at")
                steps = h.sync(self.storage.get_step_results(run.id))
                expect(
                    {s.name: (s.status, s.output) for s in steps}, run.steps, f"run {run.id} steps"
                )

    return ContractMachine


@case("model.state_machine")
def state_machine(h: Harness) -> None:
    """Random sequences of tick (the clock), create, claim, heartbeat, sleep, wait,
    deliver (keyed or not), take, save_step, consume, update_claimed, cancel and requeue
    agree with the reference model at every step: answers, lease fields, recoveries,
    write-once checkpoints."""
    from hypothesis.stateful import run_state_machine_as_test

    from reflow_conformance.strategies import kit_settings

    settings = kit_settings(max_examples=40, stateful_step_count=50)
    run_state_machine_as_test(_machine(h), settings=settings)


# -- exploration: random sequences over the whole contract, checked differentially ------

SCHEDULE_KEYS = ("s1", "s2")


def _explorer(h: Harness) -> type:
    from hypothesis import strategies as st
    from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

    from reflow_conformance.differential import CheckedStorage, StoreCheck
    from reflow_core.registry import Capability
    from reflow_core.types import Recurrence, RunFilter, Schedule, StepResult

    pick = st.integers(min_value=0, max_value=63)
    names = st.sampled_from([WORKFLOWS, ("a",), ("b",), ()])
    shares = h.has(Capability.THREADS)

    class Explorer(RuleBasedStateMachine):
        """Every rule is one contract call through a checked handle; the differential
        check compares its answer and the whole state with the reference model."""

        def __init__(self) -> None:
            super().__init__()
            storage = h.sync(h.fresh_storage())
            if not isinstance(storage, CheckedStorage):  # checking is off: check here anyway
                storage = CheckedStorage(storage, StoreCheck(h.clock, "store"), "handle 1")
            self.raw = storage._inner
            self.check = storage._store
            self.handles: list[Any] = [storage]
            if shares and storage.url:
                other = h.open_url(storage.url)
                if not isinstance(other, CheckedStorage):
                    other = CheckedStorage(other, self.check, "handle 2", ready=False)
                h.sync(other.initialize())
                self.handles.append(other)
            self.leases: list[tuple[str, str]] = []
            self.counter = itertools.count()

        def teardown(self) -> None:
            for other in self.handles[1:]:
                h.sync(other.close())
            h.sync(h.discard(self.raw))

        def via(self, index: int) -> Any:
            return self.handles[index % len(self.handles)]

        def run_at(self, index: int) -> str:
            ids = sorted(self.check.model.known_run_ids)
            return ids[index % len(ids)] if ids else "missing-run"

        @precondition(lambda self: len(self.check.model.runs) < 6)  # few runs, long histories
        @rule(
            workflow=st.sampled_from(WORKFLOWS),
            key=st.sampled_from([None, "k1"]),
            created_at=st.integers(0, 2),
            handle=pick,
        )
        def create(self, workflow: str, key: str | None, created_at: int, handle: int) -> None:
            run = h.new_run(
                workflow,
                [created_at],
                id=f"r{next(self.counter)}",
                created_at=created_at,
                idempotency_key=key,
            )
            h.sync(self.via(handle).create_run(run))

        @rule(ms=st.sampled_from([1, 500, LEASES[0], LEASES[1]]))
        def tick(self, ms: int) -> None:
            h.advance(ms)

        @rule(
            names=names,
            lease_ms=st.sampled_from(LEASES),
            holder=st.sampled_from(HOLDERS),
            handle=pick,
        )
        def claim(self, names: tuple[str, ...], lease_ms: int, holder: Any, handle: int) -> None:
            got = h.sync(self.via(handle).claim_next_run(names, lease_ms=lease_ms, holder=holder))
            if got is not None:
                self.leases.append((got.run.id, got.lease_id))

        @precondition(lambda self: hasattr(self.raw, "claim_runs") and bool(self.check.model.runs))
        @rule(names=names, lease_ms=st.sampled_from(LEASES), limit=st.integers(1, 3), handle=pick)
        def claim_batch(
            self, names: tuple[str, ...], lease_ms: int, limit: int, handle: int
        ) -> None:
            got = h.sync(
                self.via(handle).claim_runs(names, lease_ms=lease_ms, holder=None, limit=limit)
            )
            self.leases += [(c.run.id, c.lease_id) for c in got]

        def lease_at(self, pick: int) -> tuple[str, str]:
            return self.leases[pick % len(self.leases)]

        @precondition(lambda self: bool(self.leases))
        @rule(pick=pick, handle=pick)
        def heartbeat(self, pick: int, handle: int) -> None:
            h.sync(self.via(handle).heartbeat_run(*self.lease_at(pick)))

        @precondition(lambda self: bool(self.leases))
        @rule(pick=pick, wake=st.sampled_from([1, 500, 10**9]), handle=pick)
        def sleep(self, pick: int, wake: int, handle: int) -> None:
            h.sync(self.via(handle).sleep_run(*self.lease_at(pick), h.now() + wake))

        @precondition(lambda self: bool(self.leases))
        @rule(
            pick=pick,
            event=st.sampled_from(EVENTS),
            wake=st.sampled_from([None, 1, 500]),
            handle=pick,
        )
        def wait(self, pick: int, event: str, wake: int | None, handle: int) -> None:
            at = None if wake is None else h.now() + wake
            h.sync(self.via(handle).wait_run(*self.lease_at(pick), event, at))

        @precondition(lambda self: bool(self.leases))
        @rule(
            pick=pick,
            status=st.sampled_from(
                [RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.PENDING, RunStatus.RUNNING]
            ),
            handle=pick,
        )
        def update_claimed(self, pick: int, status: RunStatus, handle: int) -> None:
            error = ErrorInfo(type="E", message="m") if status is RunStatus.FAILED else None
            h.sync(
                self.via(handle).update_claimed_run_status(
                    *self.lease_at(pick), status, output={"n": pick}, error=error
                )
            )

        @rule(
            pick=pick,
            status=st.sampled_from([RunStatus.CANCELLED, RunStatus.RUNNING, RunStatus.PENDING]),
            expected=st.sampled_from([None, (RunStatus.PENDING, RunStatus.WAITING)]),
            handle=pick,
        )
        def set_status(self, pick: int, status: RunStatus, expected: Any, handle: int) -> None:
            h.sync(self.via(handle).update_run_status(self.run_at(pick), status, expected=expected))

        @rule(pick=pick, handle=pick)
        def requeue(self, pick: int, handle: int) -> None:
            h.sync(self.via(handle).requeue_run(self.run_at(pick)))

        @precondition(
            lambda self: (
                hasattr(self.raw, "purge_runs")
                and any(r.status.is_terminal for r in self.check.model.ordered_runs())
            )
        )
        @rule(later=st.sampled_from([0, 1, 1_000]), limit=st.integers(1, 3), handle=pick)
        def purge(self, later: int, limit: int, handle: int) -> None:
            h.sync(self.via(handle).purge_runs(finished_before=h.now() + later, limit=limit))

        @rule(
            pick=pick,
            name=st.sampled_from(STEPS),
            status=st.sampled_from(StepStatus),
            leased=st.booleans(),
            handle=pick,
        )
        def save_step(
            self, pick: int, name: str, status: StepStatus, leased: bool, handle: int
        ) -> None:
            if leased and self.leases:
                run_id, lease = self.lease_at(pick)
            else:  # a stored run: a row for a missing run may be refused (a foreign key)
                live = sorted(self.check.model.runs)
                if not live:
                    return
                run_id, lease = live[pick % len(live)], None
            step = h.step(run_id, name, status, output=[name, pick], created_at=h.now() - pick)
            h.sync(self.via(handle).save_step_result(step, lease))

        @rule(
            pick=pick,
            event=st.sampled_from(EVENTS),
            key=st.sampled_from([None, "e-k"]),
            handle=pick,
        )
        def deliver(self, pick: int, event: str, key: str | None, handle: int) -> None:
            h.sync(self.via(handle).deliver_event(self.run_at(pick), event, pick, key=key))

        @rule(pick=pick, event=st.sampled_from(EVENTS), handle=pick)
        def take(self, pick: int, event: str, handle: int) -> None:
            h.sync(self.via(handle).take_event(self.run_at(pick), event))

        @precondition(lambda self: bool(self.leases))
        @rule(pick=pick, name=st.sampled_from(STEPS), event=st.sampled_from(EVENTS), handle=pick)
        def consume(self, pick: int, name: str, event: str, handle: int) -> None:
            run_id, lease = self.lease_at(pick)
            step: StepResult = h.step(run_id, name)
            h.sync(self.via(handle).consume_event(event, step, lease))

        @rule(
            key=st.sampled_from(SCHEDULE_KEYS),
            workflow=st.sampled_from(WORKFLOWS),
            every=st.sampled_from([1_000, 60_000]),
            due=st.booleans(),
            handle=pick,
        )
        def upsert_schedule(
            self, key: str, workflow: str, every: int, due: bool, handle: int
        ) -> None:
            schedule = Schedule(
                key=key,
                workflow=workflow,
                input={"every": every},
                recurrence=Recurrence(every_ms=every),
                next_run_at=h.now() - 1 if due else h.now() + every,
                created_at=h.now(),
                updated_at=h.now(),
            )
            h.sync(self.via(handle).upsert_schedule(schedule))

        @rule(names=names, handle=pick)
        def claim_schedule(self, names: tuple[str, ...], handle: int) -> None:
            h.sync(self.via(handle).claim_due_schedule(names))

        @rule(key=st.sampled_from(SCHEDULE_KEYS), handle=pick)
        def delete_schedule(self, key: str, handle: int) -> None:
            h.sync(self.via(handle).delete_schedule(key))

        @rule(
            status=st.sampled_from([None, *RunStatus]),
            workflow=st.sampled_from([None, *WORKFLOWS]),
            limit=st.sampled_from([1, 2, 100]),
            handle=pick,
        )
        def listing(self, status: Any, workflow: str | None, limit: int, handle: int) -> None:
            h.sync(
                self.via(handle).list_runs(RunFilter(status=status, workflow=workflow, limit=limit))
            )

    return Explorer


@case("model.differential_exploration")
def differential_exploration(h: Harness) -> None:
    """Random sequences of every contract call (runs, batch claims, leases, statuses,
    requeue, purge, steps, events, schedules, listings), through every handle the adapter
    can share, each compared by the differential check with the reference model: the
    answer and, after each write, the complete state read back through every handle."""
    from hypothesis.stateful import run_state_machine_as_test

    from reflow_conformance.strategies import kit_settings

    settings = kit_settings(max_examples=12, stateful_step_count=25, report_multiple_bugs=False)
    run_state_machine_as_test(_explorer(h), settings=settings)
