"""A worker that dies holding a run whose event is buffered never costs the event.

The wait consumes an event and checkpoints it in one storage call (``consume_event``),
so there is no moment at which the event is gone but not recorded; the conformance kit
(``consume.*``) proves that atomicity for each adapter. Here, on every adapter, the
engine-level consequences at the two ends of that one call: a worker that dies before
it consumes (holding the claim) and one that dies right after the consume committed.
Either way another engine, reclaiming the stale run, completes it with the payload, and
the event is consumed exactly once.
"""

from __future__ import annotations

from typing import Any

import pytest
from flow_support import Recorder
from helpers import FakeClock, run

from reflow_core import (
    Engine,
    LeaseOptions,
    RunStatus,
    StepCompleted,
    StepContext,
    StepStarted,
    StepStatus,
    StorageError,
    Workflow,
)

LEASE_S = 30


def _flow(seen: list[Any]) -> Workflow[Any]:
    wf: Workflow[Any] = Workflow("approval")

    @wf.step
    def ask(ctx: StepContext[Any]) -> str:
        seen.append("ask")
        return "asked"

    wf.wait_for_event("approved")

    @wf.step
    def act(ctx: StepContext[Any]) -> Any:
        seen.append((ctx.prev, ctx.steps["approved"]))
        return {"approved": ctx.prev}

    return wf


@pytest.mark.parametrize("suspended_first", [False, True], ids=["buffered-early", "while-waiting"])
def test_a_reclaimed_run_still_receives_the_event_its_dead_worker_held(
    storage_factory: Any, clock: FakeClock, suspended_first: bool
) -> None:
    seen: list[Any] = []
    wf = _flow(seen)
    payload = {"by": "ada", "level": 2}

    async def scenario() -> None:
        storage = storage_factory(clock=clock)
        recorder = Recorder()
        options: dict[str, Any] = {
            "clock": clock,
            "use_plugins": False,
            "lease": LeaseOptions(duration=LEASE_S),
        }
        first = Engine(storage, [wf], **options)
        second = Engine(storage, [wf], hooks=[recorder], **options)
        try:
            run_ = await first.enqueue(wf, "input")
            if suspended_first:
                assert await first.run_until_idle() == 1  # ask, then suspends waiting
                view = await first.get_run(run_.id)
                assert view is not None and view.run.status is RunStatus.WAITING
            assert await first.send_event(run_.id, "approved", payload)
            # The doomed worker claims the run (so it holds the only lease) and dies
            # before its executor consumes anything: no heartbeat, no release, no write.
            doomed = await storage.claim_next_run([wf.name], lease_ms=LEASE_S * 1000)
            assert doomed is not None and doomed.run.id == run_.id
            assert await second.run_until_idle() == 0  # the lease is fresh: not stale yet
            clock.advance(LEASE_S + 1)
            assert await second.run_until_idle() == 1  # reclaims the stale run
            done = await second.get_run(run_.id)
            assert done is not None
            assert done.run.status is RunStatus.COMPLETED
            assert done.run.output == {"approved": payload}
            assert done.run.attempt == (3 if suspended_first else 2)
            rows = {s.name: s for s in done.steps}
            assert (rows["approved"].status, rows["approved"].output) == (
                StepStatus.COMPLETED,
                payload,
            )
            # Consumed exactly once: nothing is left in the buffer.
            assert await storage.take_event(run_.id, "approved") is None
            # The dead worker's lease is fenced: it can neither consume nor checkpoint.
            refused = await storage.consume_event("approved", rows["approved"], doomed.lease_id)
            assert refused.held is False
        finally:
            await first.stop()
            await second.stop()
            await storage.close()

        completed = [e for e in recorder.events if isinstance(e, StepCompleted)]
        assert [e.step for e in completed if e.step == "approved"] == ["approved"]
        approved = next(e for e in completed if e.step == "approved")
        assert approved.output == payload
        started = recorder.steps(StepStarted)
        # A wait resumed from its "waiting" row is not started again.
        assert started == (["act"] if suspended_first else ["ask", "approved", "act"])

    run(scenario())
    # "ask" ran once (by the first engine or by the reclaiming one, never both), and the
    # step after the wait saw the payload both as prev and as steps["approved"].
    assert seen == ["ask", (payload, payload)]


class _DiesAfterConsume:
    """Storage proxy: the consume commits, then the worker "dies" before it learns so.

    Raising after the inner call stands for a crash (or a dropped connection) between
    the storage's commit and the engine's next step; the engine abandons the run, as a
    dead worker would, and its lease lapses.
    """

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.consumed: list[Any] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def consume_event(self, event_name: str, checkpoint: Any, lease_id: str) -> Any:
        result = await self._inner.consume_event(event_name, checkpoint, lease_id)
        self.consumed.append(result)
        raise StorageError("consume_event", "connection lost after commit")


def test_a_worker_dying_right_after_the_consume_leaves_the_payload_checkpointed(
    storage_factory: Any, clock: FakeClock
) -> None:
    seen: list[Any] = []
    wf = _flow(seen)
    errors: list[BaseException] = []

    async def scenario() -> None:
        storage = storage_factory(clock=clock)
        dying = _DiesAfterConsume(storage)
        lease = LeaseOptions(duration=LEASE_S)
        first = Engine(
            dying,
            [wf],
            clock=clock,
            use_plugins=False,
            lease=lease,
            on_error=errors.append,
        )
        second = Engine(storage, [wf], clock=clock, use_plugins=False, lease=lease)
        try:
            run_ = await first.enqueue(wf, "input")
            assert await first.send_event(run_.id, "approved", "yes")
            assert await first.run_until_idle() == 1  # consumes, then "dies"
            [result] = dying.consumed
            assert result.event is not None and result.event.payload == "yes"
            clock.advance(LEASE_S + 1)
            assert await second.run_until_idle() == 1
            done = await second.get_run(run_.id)
            assert done is not None
            assert done.run.status is RunStatus.COMPLETED
            assert done.run.output == {"approved": "yes"}
            # Replayed from the checkpoint; nothing was left to consume a second time.
            assert await storage.take_event(run_.id, "approved") is None
        finally:
            await first.stop()
            await second.stop()
            await storage.close()

    run(scenario())
    assert [type(e) for e in errors] == [StorageError]
    assert seen == ["ask", ("yes", "yes")]
