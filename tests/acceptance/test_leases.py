"""Leases across machines (contract 2.0), with real worker processes on SQLite and PostgreSQL.

Each test starts ``workers/crash_app.py`` processes on one store and checks a lease
guarantee from what they did: the side-effect ledger (one committed row per step
execution, ordered across processes without a clock), the time-stamped lines each
worker prints (claims, heartbeats, every lease-checked write with the time it was sent)
and the rows in the store.

* Skewed clocks: workers whose clocks are a whole lease ahead and behind never run a
  step of a heartbeating run at the same time, and a killed worker's run is reclaimed
  within a lease (plus a heartbeat) whichever way the survivor's clock is off.
* Mixed lease settings: a worker with a 2 s lease never takes runs from one with 30 s.
* Hung heartbeats: a worker whose heartbeat calls never return stops at its fence
  (writes nothing, starts nothing) before anyone can take over; another completes.
* ``stop(grace=0)`` during a ``def`` step: the lease is kept (heartbeated) until the
  step's thread returns, so no other worker starts that step meanwhile.

Time stamps are the host's wall clock (one host: every process, and the PostgreSQL
server, read the same clock; the engines' skewed ``clock=`` never stamps a line).
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent / "workers"))
import crash_ledger
import postgres_fixtures
from crash_app import OPERATIONS, expected_output
from crash_harness import Fleet, Store, WorkerProcess, by_step, overlaps, store_url, wait_until

from reflow_core import LeaseOptions, RunStatus, StepStatus

pg_dsn = postgres_fixtures.pg_dsn
pg_schema = postgres_fixtures.pg_schema

pytestmark = pytest.mark.slow

LEASE_S = 1.0
LEASE_MS = round(LEASE_S * 1000)
HEARTBEAT_S = 0.2
SHORT = {"lease": LEASE_S, "heartbeat": HEARTBEAT_S, "poll": 0.05}
"""The lease most tests use: 1 s, renewed every 0.2 s, idle workers poll every 50 ms."""
FENCE_AFTER_S = LeaseOptions(duration=LEASE_S, heartbeat_interval=HEARTBEAT_S).fence_after
"""How long after sending its last confirmed renewal a ``SHORT`` holder stops (0.9 s)."""
SCHEDULING_SLACK_S = 0.4
"""Allowance for process scheduling on a loaded two-core machine (a late poll, a slow
claim query) on top of a bound the engine promises."""
SEND_SLACK_S = 0.05
"""Between the engine's fence check and the storage wrapper stamping the call as sent."""
STEPS = list(OPERATIONS)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh store on each backend."""
    return store_url(request.param, tmp_path, request)


@dataclass
class Setup:
    """A store, a ledger and a fleet of workers on them."""

    store: Store
    ledger: Path
    fleet: Fleet

    def executions(self, run_id: str | None = None) -> list[crash_ledger.Execution]:
        """Ledger rows (of one run), in start order."""
        return [
            e for e in crash_ledger.read_all(self.ledger) if run_id is None or e.run_id == run_id
        ]


@pytest.fixture
def setup(url: str, tmp_path: Path) -> Iterator[Setup]:
    """The store under test, an empty ledger, and a fleet reaped at the end."""
    ledger = tmp_path / "ledger.db"
    crash_ledger.init(ledger)
    store = Store(url)
    try:
        with Fleet(url, ledger, tmp_path) as fleet:
            yield Setup(store, ledger, fleet)
    finally:
        store.close()


def _ready(worker: WorkerProcess) -> bool:
    return any(line.startswith("READY ") for line in worker.output())


def _ms(ns: int) -> int:
    return ns // 1_000_000


def _clean_exit(worker: WorkerProcess) -> None:
    assert worker.stop() == 0, worker.stderr()
    assert "Traceback" not in worker.stderr(), worker.stderr()


def _all_completed(store: Store, count: int) -> bool:
    failed = store.runs(RunStatus.FAILED)
    assert not failed, f"{len(failed)} runs failed, e.g. {failed[0]}"
    return len(store.runs(RunStatus.COMPLETED)) == count


def _check_exactly_once(setup: Setup, run_ids: list[str]) -> dict[int, int]:
    """Every run completed right, was claimed once and never taken over, and each of its
    steps ran exactly once; returns how many runs each worker pid executed."""
    runs = {run.id: run for run in setup.store.runs()}
    assert set(runs) == set(run_ids)
    wrong = [r for r in runs.values() if r.output["value"] != expected_output(r.input["n"])]
    assert not wrong, f"{len(wrong)} runs with a wrong output, e.g. {wrong[0]}"
    executions = setup.executions()
    concurrent = overlaps(executions)
    assert not concurrent, f"{len(concurrent)} steps ran twice at once, e.g. {concurrent[0]}"
    taken = [r for r in runs.values() if r.attempt != 1 or r.recoveries != 0]
    assert not taken, f"{len(taken)} runs were claimed more than once, e.g. {taken[0]}"
    counts = Counter((e.run_id, e.step) for e in executions)
    repeated = {key: n for key, n in counts.items() if n != 1}
    assert not repeated, f"{len(repeated)} steps ran more than once, e.g. {repeated}"
    assert len(counts) == len(run_ids) * len(STEPS)
    per_worker = Counter(e.pid for e in executions if e.step == STEPS[0])
    return dict(per_worker)


# -- 1. skewed clocks -----------------------------------------------------------------

SKEW_MS = LEASE_MS
SKEWED_RUNS = 200


def test_skewed_clocks_never_run_a_step_twice_at_once(setup: Setup) -> None:
    """Two workers whose clocks are one lease ahead of and one lease behind the host's
    share 200 five-step runs (40-120 ms steps, so that most runs are renewed at least
    once while the other worker polls): no step of any run is executed by both
    at once (0 overlapping executions in the ledger), in fact none twice at all, and no
    run is ever taken over (attempt 1, recoveries 0 on every run). Both do work.

    Fails if a claimer's clock decides whether a lease is stale (contract 1.0): the
    worker whose clock is ahead then sees every running run as stale and takes it.
    """
    options = {
        "concurrency": 8,
        "work_ms": (40, 120),
        "log_heartbeats": True,
        "stdout_to_file": True,
        **SHORT,
    }
    ahead = setup.fleet.start("ahead", skew_ms=SKEW_MS, **options)
    behind = setup.fleet.start("behind", skew_ms=-SKEW_MS, **options)
    for worker in (ahead, behind):
        wait_until(f"{worker.name} to start", lambda w=worker: _ready(w), 20)
    run_ids = setup.store.enqueue(range(SKEWED_RUNS))
    wait_until("every run to complete", lambda: _all_completed(setup.store, SKEWED_RUNS), 90, 0.2)
    for worker in (ahead, behind):
        _clean_exit(worker)
    per_worker = _check_exactly_once(setup, run_ids)
    assert set(per_worker) == {ahead.pid, behind.pid}, "both workers executed runs"
    renewed = {
        m.group(1)
        for worker in (ahead, behind)
        for _, m in worker.matching(r"^HEARTBEAT (\S+) \S+ -> True$")
    }
    assert len(renewed) >= SKEWED_RUNS // 2, f"only {len(renewed)} runs lived past a heartbeat"
    beats = 0
    for worker in (ahead, behind):
        # A completion whose first answer was lost (a transient StorageError under load)
        # is retried and answered False: the run completed all the same (checked above).
        completed = {
            (m.group(1), m.group(2))
            for _, m in worker.matching(
                r"^WRITE update_claimed_run_status (\S+) completed (\S+) -> (?:True|False)$"
            )
        }
        for _, refused in worker.matching(r"^HEARTBEAT (\S+) (\S+) -> False$"):
            # Only a heartbeat that crossed its own run's completion may be refused.
            assert refused.groups() in completed, f"{worker.name}: {refused.string}"
            beats += 1
    print(
        f"\n{SKEWED_RUNS} runs: {per_worker[ahead.pid]} by the worker {SKEW_MS} ms ahead, "
        f"{per_worker[behind.pid]} by the one {SKEW_MS} ms behind, {len(renewed)} renewed "
        f"at least once; 0 overlaps, 0 steals ({beats} heartbeats crossed their run's "
        f"completion)"
    )


@pytest.mark.parametrize("killed", ["ahead", "behind"])
def test_skewed_survivor_reclaims_a_killed_workers_run_within_the_lease(
    setup: Setup, killed: str
) -> None:
    """The holder (clock one lease ahead, or behind) is SIGKILLed inside step 3; the
    survivor, whose clock is off the other way, had not claimed the run in more than a
    lease of polling before, claims it no earlier than the holder's last confirmed
    heartbeat plus the lease, and within lease + one heartbeat interval of the kill (plus
    ``SCHEDULING_SLACK_S``); it completes the run, and step 3 never ran twice at once.

    Fails if either clock decides staleness: a survivor ahead would take the run from the
    live holder; a survivor behind would wait a whole extra lease after the kill.
    """
    sign = 1 if killed == "ahead" else -1
    [run_id] = setup.store.enqueue([7])
    holder = setup.fleet.start(
        "holder", hold="s3", skew_ms=sign * SKEW_MS, log_heartbeats=True, **SHORT
    )
    holder.expect(rf"^STARTED {run_id} s3 ")
    survivor = setup.fleet.start("survivor", skew_ms=-sign * SKEW_MS, **SHORT)
    ready_at = survivor.expect_at(r"^READY ")[0]
    polling_since = _ms(survivor.stamps[ready_at])

    # The survivor polls for longer than a lease while the holder keeps renewing.
    def renewed_past_a_lease() -> bool:
        run = setup.store.run(run_id)
        assert run.status is RunStatus.RUNNING and run.holder is not None
        assert run.holder.worker == "holder", f"taken from a live holder: {run}"
        assert run.heartbeat_at is not None
        return run.heartbeat_at >= polling_since + 1.5 * LEASE_MS

    wait_until("the holder to renew for 1.5 leases", renewed_past_a_lease, 10)
    assert not survivor.matching(r"^CLAIM "), "claimed a run whose holder renews its lease"

    killed_at = holder.kill()
    survivor.expect(rf"^CLAIM {run_id} ", timeout=10)
    [(claimed_at, claim)] = survivor.matching(rf"^CLAIM {run_id} \S+ (\d+) (\d+) survivor$")
    assert claim.groups() == ("2", "1"), "second claim, a takeover of an expired lease"
    renewals = holder.matching(rf"^HEARTBEAT {run_id} \S+ -> True$")
    assert renewals, "the holder confirmed heartbeats before the kill"
    last_renewal = renewals[-1][0]
    assert claimed_at >= last_renewal + LEASE_S * 1e9 - SEND_SLACK_S * 1e9, (
        f"claimed {(claimed_at - last_renewal) / 1e9:.3f}s after the last renewal was sent"
    )
    waited = (claimed_at - killed_at) / 1e9
    bound = LEASE_S + HEARTBEAT_S + SCHEDULING_SLACK_S
    assert waited <= bound, f"reclaimed {waited:.2f}s after the kill (bound {bound:.2f}s)"

    survivor.expect(rf"^COMPLETED {run_id}$", timeout=15)
    _clean_exit(survivor)
    run = setup.store.run(run_id)
    assert run.status is RunStatus.COMPLETED and run.output["value"] == expected_output(7)
    assert (run.attempt, run.recoveries) == (2, 1)
    executed = by_step(setup.executions(run_id))
    assert [e.pid for e in executed["s3"]] == [holder.pid, survivor.pid]
    assert not overlaps(setup.executions(run_id), {holder.pid: killed_at})
    print(f"\nholder {killed} by {SKEW_MS} ms killed; reclaimed after {waited:.3f}s")


# -- 2. mixed lease settings ----------------------------------------------------------

MIXED_RUNS = 16


def test_short_and_long_leases_share_a_store_without_steals(setup: Setup) -> None:
    """A worker with a 2 s lease and one with a 30 s lease (heartbeat every 10 s, so it
    never renews within a run) execute 16 runs of five 450-750 ms steps together: while
    they run, the store holds each holder's own lease length; no run is ever taken over
    (attempt 1, recoveries 0), every step runs exactly once, and the long-lease worker
    held runs for longer than the short lease.

    Fails if the claimer's lease setting decides expiry (contract 1.0): the 2 s worker
    would take every run the 30 s worker held for more than 2 s.
    """
    common = {"concurrency": 3, "work_ms": (450, 750), "poll": 0.05, "stdout_to_file": True}
    short = setup.fleet.start("short", lease=2.0, heartbeat=0.5, **common)
    long = setup.fleet.start("long", lease=30.0, heartbeat=10.0, **common)
    for worker in (short, long):
        wait_until(f"{worker.name} to start", lambda w=worker: _ready(w), 20)
    run_ids = setup.store.enqueue(range(MIXED_RUNS))

    seen: dict[str, int] = {}

    def both_leases_stored() -> bool:
        for run in setup.store.runs(RunStatus.RUNNING):
            if run.holder is not None and run.lease_ms is not None:
                seen[run.holder.worker] = run.lease_ms
        return len(seen) == 2

    wait_until("runs held by both workers", both_leases_stored, 20, 0.02)
    assert seen == {"short": 2_000, "long": 30_000}
    wait_until("every run to complete", lambda: _all_completed(setup.store, MIXED_RUNS), 60, 0.2)
    for worker in (short, long):
        _clean_exit(worker)
    per_worker = _check_exactly_once(setup, run_ids)
    assert set(per_worker) == {short.pid, long.pid}, "both workers executed runs"
    spans = [
        (max(e.finished_ns or 0 for e in group) - min(e.started_ns for e in group)) / 1e9
        for run_id in run_ids
        if (group := [e for e in setup.executions(run_id) if e.pid == long.pid])
    ]
    assert max(spans) > 2.0, f"the long-lease worker never held a run for over 2 s: {spans}"
    print(
        f"\n{per_worker[short.pid]} runs by the 2 s worker, {per_worker[long.pid]} by the "
        f"30 s worker (held up to {max(spans):.1f}s); 0 steals"
    )


# -- 3. hung heartbeats ---------------------------------------------------------------


def _fence_deadlines(worker: WorkerProcess, run_id: str) -> dict[str, tuple[int, int]]:
    """Each lease ``worker`` held on the run: ``(claimed, deadline)`` stamps, the deadline
    being its last confirmed renewal's send time plus ``FENCE_AFTER_S`` (the engine's own
    send time is a little earlier still, so its real deadline is, too)."""
    claimed = {m.group(1): stamp for stamp, m in worker.matching(rf"^CLAIM {run_id} (\S+) ")}
    last = dict(claimed)
    for stamp, m in worker.matching(rf"^HEARTBEAT {run_id} (\S+) -> True$"):
        last[m.group(1)] = max(last[m.group(1)], stamp)
    return {lease: (claimed[lease], last[lease] + round(FENCE_AFTER_S * 1e9)) for lease in claimed}


@pytest.mark.parametrize("then", ["claims-stop", "claims-go-on"])
def test_worker_whose_heartbeats_hang_stops_at_its_fence(setup: Setup, then: str) -> None:
    """A worker's heartbeat calls hang after its first two: under each lease it held, it
    starts no step and sends no write after that lease's fence deadline (the last
    confirmed renewal's send time + the lease - the margin); a step in progress at the
    deadline is interrupted (its cancel signal says LEASE_EXPIRED) and returns within
    the margin, i.e. before the store lets anyone else take over; all its writes were
    accepted; no step ever ran twice at once; and the run completes.

    ``claims-stop``: from the first hung heartbeat on the worker's claims find nothing, so
    another worker must take over: it claims only after the hung worker's deadline (a
    recovery) and completes the run. ``claims-go-on``: the hung worker may re-claim the
    run it fenced itself off (each of its executions then replays from storage and stops
    at its own fence), the other worker may take it: whoever finishes it, no execution
    overlaps another.

    Fails without the fence: the hung worker would go on executing, checkpointing (the
    store accepts an expired lease nobody has reclaimed yet) and starting steps, past its
    deadline and alongside the worker that took over.
    """
    [run_id] = setup.store.enqueue([5])
    hung = setup.fleet.start(
        "hung",
        hang_heartbeats_after=2,
        claims_hang_too=then == "claims-stop",
        log_heartbeats=True,
        work_ms=(400, 400),
        **SHORT,
    )
    hung.expect(rf"^CLAIM {run_id} ")
    taker = setup.fleet.start("taker", work_ms=(400, 400), **SHORT)
    wait_until("the run to complete", lambda: _all_completed(setup.store, 1), 20)
    hung.expect(rf"^HEARTBEAT {run_id} \S+ hang$")
    hung.expect(r"^ERROR StorageError .*got no answer")
    _clean_exit(taker)
    _clean_exit(hung)

    leases = _fence_deadlines(hung, run_id)
    slack = round(SEND_SLACK_S * 1e9)
    margin = round((LEASE_S - FENCE_AFTER_S + SEND_SLACK_S) * 1e9)
    writes = hung.matching(rf"^WRITE \S+ {run_id} .* -> (True|False)$")
    assert writes, "the hung worker checkpointed steps before its fence"
    for stamp, write in writes:
        [lease] = [token for token in write.string.split() if token in leases]
        claimed, deadline = leases[lease]
        assert claimed <= stamp < deadline + slack, (
            f"sent {(stamp - deadline) / 1e9:+.3f}s after its lease's fence deadline: "
            f"{write.string}"
        )
    refused = [m.string for _, m in writes if m.group(1) != "True"]
    assert not refused, f"the store refused writes the fence should have stopped: {refused}"
    # A step records its start in the ledger before anything else (its STARTED line
    # comes after that insert, so it may be stamped a little later), and its end just
    # before it returns.
    executions = setup.executions(run_id)
    signals = hung.matching(rf"^SIGNALLED {run_id} (\S+) LEASE_EXPIRED$")
    signalled = {m.group(1) for _, m in signals}
    interrupted = []
    for execution in (e for e in executions if e.pid == hung.pid):
        within = [d for c, d in leases.values() if c <= execution.started_ns < d + slack]
        assert len(within) == 1, f"started outside every lease's fence: {execution}"
        [deadline] = within
        assert execution.finished_ns is not None, execution
        if execution.finished_ns >= deadline:
            # In progress at the fence: interrupted at once, well before the store lets
            # anyone else take the run (the margin is there for exactly that).
            interrupted.append(execution.step)
            assert execution.step in signalled, f"not signalled at the fence: {execution}"
            assert execution.finished_ns < deadline + margin, (
                f"ran {(execution.finished_ns - deadline) / 1e9:.3f}s past its fence: {execution}"
            )
    assert not overlaps(executions), overlaps(executions)
    # How it stopped: its fence fired (not a refusal from the store).
    fenced = hung.expect(rf"^LOG WARNING lease on run {run_id} was lost: (.*); stopped")
    assert "no heartbeat was confirmed" in fenced.group(1), fenced.string

    run = setup.store.run(run_id)
    assert run.status is RunStatus.COMPLETED and run.output["value"] == expected_output(5)
    rows = {row.name: row for row in setup.store.steps(run_id)}
    assert sorted(rows) == STEPS and all(r.status is StepStatus.COMPLETED for r in rows.values())
    by_hung = [name for name in STEPS if rows[name].output["pid"] == hung.pid]
    taken = taker.matching(rf"^CLAIM {run_id} \S+ (\d+) (\d+) taker$")
    if then == "claims-stop":
        [(lease, (_, deadline))] = leases.items()
        [(taken_at, claim)] = taken
        assert claim.groups() == ("2", "1"), "a takeover of the expired lease"
        assert taken_at >= deadline, "taken over before the holder's fence deadline"
        assert by_hung == STEPS[: len(by_hung)] and len(by_hung) < len(STEPS)
        detail = f"the taker claimed {(taken_at - deadline) / 1e9:.3f}s after its deadline"
    else:
        detail = f"claims: {len(leases)} by the hung worker, {len(taken)} by the taker"
    print(
        f"\nhung worker checkpointed {by_hung}, interrupted {interrupted or 'no step'} at "
        f"its fence; {detail}; attempt {run.attempt}"
    )


# -- 5. stop(grace=0) during a def step -----------------------------------------------


def test_stop_keeps_the_lease_while_a_def_step_runs(setup: Setup) -> None:
    """SIGTERM (``stop(grace=0)``) reaches a worker whose ``def`` step ``s2`` is blocked in
    its thread: the worker keeps renewing the lease (for two whole leases here, until the
    test lets the step return) and another, idle worker starts nothing of the run
    meanwhile; once the step returns, the stopping worker releases the run (without
    checkpointing ``s2``) and exits cleanly, and the other worker claims it at once (a
    handover: recoveries 0) and completes it, executing ``s2`` only after the first
    execution returned.

    Fails if ``stop`` releases (or stops renewing) the lease while the thread still runs:
    the other worker would claim the run and start ``s2`` alongside it; and if the
    stopping worker's own fence ignores the renewals it makes while stopping (it would
    then think its lease lost and leave the run to expire instead of releasing it).
    """
    [run_id] = setup.store.enqueue([9])
    a = setup.fleet.start("A", hold="s2", log_heartbeats=True, **SHORT)
    a.expect(rf"^STARTED {run_id} s2 ")
    b = setup.fleet.start("B", **SHORT)
    b.expect(r"^READY ")
    stopping_at = _ms(a.terminate())
    a.expect(r"^STOPPING ")

    def renewed_for_two_leases() -> bool:
        run = setup.store.run(run_id)
        assert run.status is RunStatus.RUNNING, f"released while s2 runs: {run}"
        assert run.holder is not None and run.holder.worker == "A", f"taken over: {run}"
        assert run.heartbeat_at is not None
        return run.heartbeat_at >= stopping_at + 2 * LEASE_MS

    wait_until("the stopping worker to renew for two leases", renewed_for_two_leases, 10)
    assert a.proc.poll() is None, "the worker exited while its step still runs"
    assert not b.matching(rf"^CLAIM {run_id} "), "claimed while s2 still runs in A"
    assert [e.pid for e in by_step(setup.executions(run_id))["s2"]] == [a.pid]

    a.release()
    a.expect(rf"^SIGNALLED {run_id} s2 ENGINE_STOPPED$")
    assert a.wait_exit() == 0, a.stderr()
    assert "Traceback" not in a.stderr(), a.stderr()
    b.expect(rf"^COMPLETED {run_id}$", timeout=15)
    _clean_exit(b)

    run = setup.store.run(run_id)
    assert run.status is RunStatus.COMPLETED and run.output["value"] == expected_output(9)
    s2 = by_step(setup.executions(run_id))["s2"]
    assert [e.pid for e in s2] == [a.pid, b.pid]
    assert s2[0].finished_ns is not None and s2[0].finished_ns < s2[1].started_ns
    # When B's claim came back (its send stamp cannot order it against A's release: a
    # claim sent a moment before the release can wait for the store's lock and take the
    # run after it).
    [(claimed_at, _)] = b.matching(rf"^CLAIMED {run_id}$")
    assert claimed_at > s2[0].finished_ns, "claimed before A's step returned"
    assert not [m.string for _, m in a.matching(rf"^WRITE \S+ {run_id} s2 ")], "A wrote s2"
    # Released as soon as the step returned (not left to expire): a handover, not a
    # recovery, and B did not have to wait a lease for it.
    released = a.matching(rf"^WRITE update_claimed_run_status {run_id} pending \S+ -> True$")
    assert released, "A did not release the run once s2 returned: it was left to expire"
    [(released_at, _)] = released
    assert s2[0].finished_ns < released_at <= claimed_at
    assert (run.attempt, run.recoveries) == (2, 0), "B took the run over instead of A handing it"
    print(
        f"\nA renewed for {2 * LEASE_S:g}s while stopping; released the run "
        f"{(released_at - s2[0].finished_ns) / 1e9:.3f}s after s2 returned; B claimed it "
        f"{(claimed_at - released_at) / 1e9:.3f}s later (answer)"
    )
