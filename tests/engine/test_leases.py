"""Leases as the engine keeps them (contract 2.0), on every adapter.

The holder fences itself on its own monotonic clock, a heartbeat that hangs delays no
other run's renewal, ``stop()`` keeps a lease while a ``def`` step still runs in its
thread, ``when=`` decisions are stored both ways, and the holder is named in storage.
Real time drives the fences here (leases of a few hundred ms); every wait is on an
observable event with a bound, never a fixed sleep standing in for synchronisation.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from typing import Any

import pytest
from helpers import FakeClock, run

from reflow_core import (
    ConfigError,
    Engine,
    LeaseExpiredError,
    LeaseOptions,
    RunStatus,
    StepContext,
    StepResult,
    StepStatus,
    Workflow,
)

SHORT = LeaseOptions(duration=0.4, heartbeat_interval=0.1)
"""A lease the fence acts on within a test's patience."""


class HangingHeartbeats:
    """Storage proxy whose heartbeats for the runs in ``hang`` never answer, as over a
    partitioned network; every other call, and other runs' heartbeats, go through."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.hang: set[str] = set()
        self.beats: dict[str, int] = {}
        self.beat_seen = asyncio.Event()
        self.writes: list[tuple[str, str]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def heartbeat_run(self, run_id: str, lease_id: str) -> bool:
        if run_id in self.hang:
            await asyncio.Event().wait()  # never answers
        held: bool = await self._inner.heartbeat_run(run_id, lease_id)
        self.beats[run_id] = self.beats.get(run_id, 0) + 1
        self.beat_seen.set()
        return held

    async def save_step_result(self, result: StepResult, lease_id: str | None = None) -> bool:
        self.writes.append((result.run_id, result.name))
        saved: bool = await self._inner.save_step_result(result, lease_id)
        return saved

    async def update_claimed_run_status(
        self, run_id: str, lease_id: str, status: Any, **kw: Any
    ) -> bool:
        self.writes.append((run_id, f"status:{status}"))
        stored: bool = await self._inner.update_claimed_run_status(run_id, lease_id, status, **kw)
        return stored


def test_a_hung_heartbeat_fences_its_run_and_delays_no_other(storage_factory: Any) -> None:
    """One run's heartbeat hangs: that run stops at its fence with nothing written, while
    the other run's beats keep landing and it runs on."""
    wf: Workflow[Any] = Workflow("fenced")
    started: dict[str, asyncio.Event] = {}
    release = asyncio.Event()
    signalled: dict[str, Any] = {}
    fenced = asyncio.Event()

    @wf.step
    async def work(ctx: StepContext[Any]) -> str:
        started[ctx.run_id].set()
        try:
            await release.wait()
        except asyncio.CancelledError:
            signalled[ctx.run_id] = ctx.cancel.reason
            fenced.set()
            raise
        return "done"

    @wf.step
    async def after(ctx: StepContext[Any]) -> str:
        return "after"

    async def scenario() -> None:
        inner = storage_factory()
        storage = HangingHeartbeats(inner)
        engine = Engine(storage, [wf], lease=SHORT, poll_interval=60, use_plugins=False)
        try:
            hung = await engine.enqueue(wf)
            healthy = await engine.enqueue(wf)
            started[hung.id] = asyncio.Event()
            started[healthy.id] = asyncio.Event()
            storage.hang.add(hung.id)
            await engine.start()
            await asyncio.wait_for(started[hung.id].wait(), 10)
            await asyncio.wait_for(started[healthy.id].wait(), 10)
            loop = asyncio.get_running_loop()
            began = loop.time()
            await asyncio.wait_for(fenced.wait(), 10)
            fenced_after = loop.time() - began
            # The fence acts on local time alone, before the store's lease can expire.
            assert fenced_after < SHORT.duration_s + 0.3
            assert isinstance(signalled[hung.id], LeaseExpiredError)
            # The healthy run's heartbeats kept landing while the other one hung.
            target = storage.beats.get(healthy.id, 0) + 3
            while storage.beats.get(healthy.id, 0) < target:
                storage.beat_seen.clear()
                await asyncio.wait_for(storage.beat_seen.wait(), 10)
            assert list(signalled) == [hung.id]
            release.set()
            done = await engine.wait_for(healthy.id, within=10)
            assert done.status is RunStatus.COMPLETED
            # Nothing was ever written for the fenced run: no checkpoint, no status.
            assert [w for w in storage.writes if w[0] == hung.id] == []
            stored = await inner.get_run(hung.id)
            assert stored is not None and stored.status is RunStatus.RUNNING
        finally:
            storage.hang.clear()
            await engine.stop()
            await inner.close()

    run(scenario())


def test_claims_store_the_holder_and_the_lease(storage_factory: Any) -> None:
    wf: Workflow[Any] = Workflow("holder")
    seen: dict[str, Any] = {}

    @wf.step
    async def look(ctx: StepContext[Any]) -> None:
        seen["run"] = await engine.storage.get_run(ctx.run_id)

    storage = storage_factory()
    engine = Engine(
        storage, [wf], lease=LeaseOptions(duration=45), worker_id="w-7", use_plugins=False
    )

    async def scenario() -> None:
        try:
            run_ = await engine.enqueue(wf)
            await engine.run_until_idle()
            held = seen["run"]
            assert held.holder is not None
            assert (held.holder.worker, held.holder.host, held.holder.pid) == (
                "w-7",
                socket.gethostname(),
                os.getpid(),
            )
            assert held.lease_ms == 45_000
            assert held.lease_expires_at == held.heartbeat_at + 45_000
            done = await storage.get_run(run_.id)
            assert done.status is RunStatus.COMPLETED
            assert (done.holder, done.lease_ms, done.lease_expires_at) == (None, None, None)
        finally:
            await engine.stop()
            await storage.close()

    run(scenario())


class CountingBeats:
    """Storage proxy that reports each heartbeat the store confirmed."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.confirmed = 0
        self.changed = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def heartbeat_run(self, run_id: str, lease_id: str) -> bool:
        held: bool = await self._inner.heartbeat_run(run_id, lease_id)
        if held:
            self.confirmed += 1
            self.changed.set()
        return held


def test_stop_keeps_the_lease_while_a_def_step_still_runs(storage_factory: Any) -> None:
    """stop(grace=0) during a blocking ``def`` step: the lease is renewed until the thread
    returns, so another engine claims nothing; only then is the run released."""
    wf: Workflow[Any] = Workflow("blocking")
    inside = threading.Event()
    go_on = threading.Event()
    executions: list[str] = []

    @wf.step
    def slow(ctx: StepContext[Any]) -> str:
        executions.append(ctx.run_id)
        inside.set()
        go_on.wait(30)
        return "slow"

    async def scenario() -> None:
        inner = storage_factory()
        storage = CountingBeats(inner)
        first = Engine(storage, [wf], lease=SHORT, poll_interval=60, use_plugins=False)
        second = Engine(inner, [wf], lease=SHORT, poll_interval=60, use_plugins=False)
        try:
            run_ = await first.enqueue(wf)
            await first.start()
            await asyncio.to_thread(inside.wait, 10)
            stopping = asyncio.create_task(first.stop(grace=0))
            # Several leases' worth of confirmed renewals while the thread is blocked:
            # the lease never lapses, so the other engine finds nothing to claim.
            target = storage.confirmed + 8
            while storage.confirmed < target:
                storage.changed.clear()
                await asyncio.wait_for(storage.changed.wait(), 10)
                assert await second.storage.claim_next_run(["blocking"], lease_ms=400) is None
            assert not stopping.done()
            held = await inner.get_run(run_.id)
            assert held is not None and held.status is RunStatus.RUNNING
            go_on.set()
            await asyncio.wait_for(stopping, 10)
            released = await inner.get_run(run_.id)
            assert released is not None and released.status is RunStatus.PENDING
            await second.run_until_idle()
            done = await inner.get_run(run_.id)
            assert done is not None and done.status is RunStatus.COMPLETED
            assert done.recoveries == 0  # released, never taken over
        finally:
            go_on.set()
            await first.stop()
            await second.stop()
            await inner.close()

    run(scenario())


class FailOnce:
    """Storage proxy: the first checkpoint of ``step`` as completed raises, as if the worker
    died right after the step ran; the run is left running under its lease."""

    def __init__(self, inner: Any, step: str) -> None:
        self._inner = inner
        self.step = step
        self.failed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def save_step_result(self, result: StepResult, lease_id: str | None = None) -> bool:
        if not self.failed and result.name == self.step and result.status is StepStatus.COMPLETED:
            self.failed = True
            # Not a StorageError (those are retried): the execution ends right here.
            raise RuntimeError("the worker died here")
        saved: bool = await self._inner.save_step_result(result, lease_id)
        return saved


def test_a_when_decision_is_never_asked_twice(storage_factory: Any, clock: FakeClock) -> None:
    """The predicate said "run" and the step ran, but its checkpoint never landed: after
    the reclaim, the step runs again (not skipped), and the predicate is not asked."""
    wf: Workflow[Any] = Workflow("conditional")
    asked: list[str] = []
    ran: list[str] = []

    def predicate(ctx: StepContext[Any]) -> bool:
        asked.append(ctx.run_id)
        return len(asked) == 1  # would say "skip" if asked again

    @wf.step(when=predicate)
    def charge(ctx: StepContext[Any]) -> str:
        ran.append(ctx.run_id)
        return "charged"

    async def scenario() -> None:
        inner = storage_factory(clock=clock)
        first = Engine(FailOnce(inner, "charge"), [wf], clock=clock, use_plugins=False)
        second = Engine(inner, [wf], clock=clock, use_plugins=False)
        try:
            run_ = await first.enqueue(wf)
            await first.run_until_idle()
            rows = {r.name: r for r in await inner.get_step_results(run_.id)}
            assert rows["charge"].status is StepStatus.RUNNING  # the decision, stored
            clock.advance(3600)  # the first worker's lease expires by the store's clock
            await second.run_until_idle()
            done = await second.get_run(run_.id)
            assert done is not None and done.run.status is RunStatus.COMPLETED
            assert {s.name: s.status for s in done.steps} == {"charge": StepStatus.COMPLETED}
            assert done.run.recoveries == 1
        finally:
            await first.stop()
            await second.stop()
            await inner.close()

    run(scenario())
    assert len(asked) == 1
    assert len(ran) == 2


def test_a_skipped_decision_is_stored_before_anything_else(storage_factory: Any) -> None:
    wf: Workflow[Any] = Workflow("skipper")

    @wf.step(when=lambda ctx: False)
    def never(ctx: StepContext[Any]) -> str:
        raise AssertionError("must not run")

    @wf.step
    def then(ctx: StepContext[Any]) -> int:
        return 1

    async def scenario() -> None:
        storage = storage_factory()
        engine = Engine(storage, [wf], use_plugins=False)
        try:
            run_ = await engine.enqueue(wf)
            await engine.run_until_idle()
            view = await engine.get_run(run_.id)
            assert view is not None
            assert {s.name: s.status for s in view.steps} == {
                "never": StepStatus.SKIPPED,
                "then": StepStatus.COMPLETED,
            }
        finally:
            await engine.stop()
            await storage.close()

    run(scenario())


def test_a_retried_event_delivery_is_stored_once(storage_factory: Any) -> None:
    wf: Workflow[Any] = Workflow("approval")
    got: list[Any] = []

    @wf.step
    def before(ctx: StepContext[Any]) -> None:
        return None

    wf.wait_for_event("approved")

    @wf.step
    def after(ctx: StepContext[Any]) -> str:
        got.append(ctx.prev)
        return "approved once"

    async def scenario() -> None:
        storage = storage_factory()
        engine = Engine(storage, [wf], use_plugins=False)
        try:
            run_ = await engine.enqueue(wf)
            for _ in range(3):  # a sender that retries
                assert await engine.send_event(run_.id, "approved", {"ok": 1}, key="msg-1")
            await engine.run_until_idle()
            view = await engine.get_run(run_.id)
            assert view is not None and view.run.status is RunStatus.COMPLETED
            assert view.run.output == "approved once"
            # The retries stored nothing: no second copy waits in the buffer.
            assert await storage.take_event(run_.id, "approved") is None
            # Delivered to a finished run: refused, nothing stored.
            assert await engine.send_event(run_.id, "approved", {"ok": 2}) is False
        finally:
            await engine.stop()
            await storage.close()

    run(scenario())
    assert got == [{"ok": 1}]


def test_a_run_recovered_too_often_fails_instead_of_looping(
    storage_factory: Any, clock: FakeClock
) -> None:
    """Every takeover from an expired lease counts; past the workflow's cap the run
    fails with RECOVERY_LIMIT, naming the step it never got past, and on_failure runs."""
    wf: Workflow[Any] = Workflow("crashy", max_recoveries=2)
    handled: list[str | None] = []

    @wf.step
    def first(ctx: StepContext[Any]) -> int:
        return 1

    @wf.step
    def killer(ctx: StepContext[Any]) -> int:
        raise AssertionError("a worker that runs this dies before it can record anything")

    @wf.on_failure
    def compensate(ctx: Any) -> None:
        handled.append(ctx.step)

    async def scenario() -> None:
        storage = storage_factory(clock=clock)
        engine = Engine(storage, [wf], clock=clock, use_plugins=False)
        try:
            run_ = await engine.enqueue(wf)
            # Three workers in a row claim it and die without a trace.
            for _ in range(3):
                assert await storage.claim_next_run(["crashy"], lease_ms=1_000) is not None
                clock.advance(2)
            await engine.run_until_idle()
            view = await engine.get_run(run_.id)
            assert view is not None and view.run.status is RunStatus.FAILED
            assert view.run.recoveries == 3
            assert view.run.error is not None and view.run.error.code == "RECOVERY_LIMIT"
            assert view.run.error.step == "first"
            assert view.steps == []  # nothing ran on the claim that gave up
        finally:
            await engine.stop()
            await storage.close()

    run(scenario())
    assert handled == ["first"]


def test_invalid_recovery_caps_are_refused() -> None:
    for bad in (-1, 1.5, True, 10_001):
        with pytest.raises(ConfigError, match="max_recoveries"):
            Workflow("w", max_recoveries=bad)  # type: ignore[arg-type]


def test_run_outcomes_are_logged_by_an_embedded_engine(
    storage_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """An Engine inside an application (no `reflow worker`) still logs a failed run, on the
    named logger, with structured fields; a cancellation is logged as a cancellation."""
    wf: Workflow[Any] = Workflow("logged")
    gate = asyncio.Event()
    entered = asyncio.Event()

    @wf.step
    async def first(ctx: StepContext[Any]) -> None:
        if ctx.input == "wait":
            entered.set()
            await gate.wait()
        if ctx.input == "fail":
            raise ValueError("bad input")

    async def scenario() -> None:
        storage = storage_factory()
        engine = Engine(storage, [wf], use_plugins=False)
        try:
            failing = await engine.enqueue(wf, "fail")
            waiting = await engine.enqueue(wf, "wait")
            await engine.start()
            await engine.wait_for(failing.id, within=10)
            await asyncio.wait_for(entered.wait(), 10)
            assert await engine.cancel(waiting.id)
            await engine.wait_for(waiting.id, within=10)
        finally:
            gate.set()
            await engine.stop()
            await storage.close()
        return failing.id, waiting.id

    with caplog.at_level(logging.INFO, logger="reflow.runs"):
        failed_id, cancelled_id = run(scenario())
    failed = [r for r in caplog.records if getattr(r, "run_id", None) == failed_id]
    assert [(r.levelno, r.step) for r in failed] == [(logging.WARNING, "first")]  # type: ignore[attr-defined]
    assert "failed at step first: ValueError: bad input" in failed[0].getMessage()
    cancelled = [r for r in caplog.records if getattr(r, "run_id", None) == cancelled_id]
    assert [r.getMessage() for r in cancelled] == [
        f"run {cancelled_id} (logged) was cancelled; stopped executing it"
    ]


class ClaimSignals:
    """Storage proxy that sets an event whenever it hands out a claim of ``workflow``."""

    def __init__(self, inner: Any, workflow: str) -> None:
        self._inner = inner
        self.workflow = workflow
        self.claimed = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def claim_next_run(self, names: Any, **lease: Any) -> Any:
        claimed = await self._inner.claim_next_run(names, **lease)
        if claimed is not None and claimed.run.workflow == self.workflow:
            self.claimed.set()
        return claimed

    async def claim_runs(self, names: Any, **lease: Any) -> Any:
        batch = await self._inner.claim_runs(names, **lease)
        if any(claimed.run.workflow == self.workflow for claimed in batch):
            self.claimed.set()
        return batch


def test_a_run_taken_over_from_a_dead_worker_runs_alone(
    storage_factory: Any, clock: FakeClock
) -> None:
    """A recovered run may be what killed its last worker: it waits until the engine's
    other runs finish, no new run starts beside it, and only then does it execute, so
    it cannot take innocent runs down with it again."""
    order: list[str] = []
    gate = asyncio.Event()
    normal: Workflow[Any] = Workflow("normal")
    suspect: Workflow[Any] = Workflow("suspect")

    @normal.step
    async def work(ctx: StepContext[Any]) -> None:
        order.append(f"{ctx.input}:start")
        if ctx.input == "first":
            await gate.wait()
        order.append(f"{ctx.input}:end")

    @suspect.step
    async def risky(ctx: StepContext[Any]) -> None:
        order.append("suspect:start")
        order.append("suspect:end")

    async def scenario() -> None:
        inner = storage_factory(clock=clock)
        storage = ClaimSignals(inner, "suspect")
        engine = Engine(storage, [normal, suspect], clock=clock, concurrency=4, use_plugins=False)
        try:
            first = await engine.enqueue(normal, "first")
            clock.advance(0.001)  # strictly older: claimed before the suspect
            crashed = await engine.enqueue(suspect)
            assert await inner.claim_next_run(["suspect"], lease_ms=1_000) is not None
            clock.advance(2)  # its holder died: the lease expired by the store's clock
            await engine.start()
            await asyncio.wait_for(storage.claimed.wait(), 10)
            later = await engine.enqueue(normal, "later")
            gate.set()
            for run_ in (first, crashed, later):
                done = await engine.wait_for(run_.id, within=10)
                assert done.status is RunStatus.COMPLETED
            assert (await inner.get_run(crashed.id)).recoveries == 1
        finally:
            gate.set()
            await engine.stop()
            await inner.close()

    run(scenario())
    assert order == [
        "first:start",
        "first:end",
        "suspect:start",
        "suspect:end",
        "later:start",
        "later:end",
    ]


class ClaimCounter:
    """Storage proxy that counts the claims it hands out, with an event per claim."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.claims = 0
        self.claimed = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def claim_next_run(self, names: Any, **lease: Any) -> Any:
        claimed = await self._inner.claim_next_run(names, **lease)
        if claimed is not None:
            self.claims += 1
            self.claimed.set()
        return claimed

    async def claim_runs(self, names: Any, **lease: Any) -> Any:
        batch = await self._inner.claim_runs(names, **lease)
        if batch:
            self.claims += len(batch)
            self.claimed.set()
        return batch


@pytest.mark.parametrize("someone_else_in_between", [False, True], ids=["handover", "replay"])
def test_reclaiming_a_run_still_executing_here(
    storage_factory: Any, clock: FakeClock, someone_else_in_between: bool
) -> None:
    """This engine re-claims a run it is still executing (its lease expired by the store's
    clock while the step ran). With no other claim in between, the live execution takes
    the new lease and the step runs once. If another worker claimed it in between, the
    old execution is abandoned and the run replays from storage, but only after the old
    step's thread has returned: never two executions of one step at once here."""
    wf: Workflow[Any] = Workflow("stretched")
    go = threading.Event()
    inside = threading.Event()
    lock = threading.Lock()
    running: list[int] = [0]
    overlaps: list[int] = []
    executions: list[str] = []

    @wf.step
    def slow(ctx: StepContext[Any]) -> str:
        with lock:
            running[0] += 1
            overlaps.append(running[0])
            executions.append(ctx.run_id)
        inside.set()
        go.wait(30)
        with lock:
            running[0] -= 1
        return "done"

    async def scenario() -> None:
        inner = storage_factory(clock=clock)
        storage = ClaimCounter(inner)
        engine = Engine(
            storage, [wf], clock=clock, concurrency=2, poll_interval=0.01, use_plugins=False
        )
        try:
            run_ = await engine.enqueue(wf)
            await engine.start()
            await asyncio.to_thread(inside.wait, 10)
            storage.claimed.clear()
            if someone_else_in_between:
                clock.advance(31)
                assert await inner.claim_next_run(["stretched"], lease_ms=30_000) is not None
            clock.advance(31)  # by the store's clock the current lease has expired
            while storage.claims < 2:
                storage.claimed.clear()
                await asyncio.wait_for(storage.claimed.wait(), 10)
            go.set()
            done = await engine.wait_for(run_.id, within=10)
            assert done.status is RunStatus.COMPLETED
            assert done.attempt == (3 if someone_else_in_between else 2)
        finally:
            go.set()
            await engine.stop()
            await inner.close()

    run(scenario())
    assert max(overlaps) == 1
    assert len(executions) == (2 if someone_else_in_between else 1)
