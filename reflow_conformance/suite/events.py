"""Events: deliver_event buffers and wakes, take_event consumes once, wait_run suspends."""

from __future__ import annotations

from reflow_conformance.cases import case
from reflow_conformance.harness import Harness, assert_exact, expect
from reflow_core.types import EventRecord, RunStatus


@case("events.deliver_then_take_once")
async def deliver_then_take_once(h: Harness) -> None:
    """A delivered payload is taken once; the second take is None."""
    run = await h.create()
    expect(await h.storage.deliver_event(run.id, "ev", {"ok": True}), True, "deliver_event")
    taken = await h.storage.take_event(run.id, "ev")
    expect(isinstance(taken, EventRecord), True, f"take_event returns an EventRecord: {taken!r}")
    assert taken is not None
    assert_exact(taken.payload, {"ok": True}, "event payload")
    expect(await h.storage.take_event(run.id, "ev"), None, "second take_event")


@case("events.deliver_missing_run")
async def deliver_missing_run(h: Harness) -> None:
    """deliver_event to a missing run is False and buffers nothing."""
    expect(await h.storage.deliver_event("missing", "ev", 1), False, "deliver to 'missing'")
    expect(await h.storage.take_event("missing", "ev"), None, "take from 'missing'")


@case("events.fifo")
async def fifo(h: Harness) -> None:
    """take_event returns the oldest first, also for events delivered in the same millisecond."""
    run = await h.create()
    for index in range(30):
        await h.storage.deliver_event(run.id, "ev", index)
    taken = []
    for _ in range(30):
        record = await h.storage.take_event(run.id, "ev")
        taken.append(record.payload if record else None)
    expect(taken, list(range(30)), "order of taken events")


@case("events.isolated_by_name_and_run")
async def isolated_by_name_and_run(h: Harness) -> None:
    """take_event never crosses event names or runs."""
    a, b = await h.create(), await h.create()
    await h.storage.deliver_event(a.id, "ev", 1)
    expect(await h.storage.take_event(a.id, "other"), None, "take of another name")
    expect(await h.storage.take_event(b.id, "ev"), None, "take from another run")
    record = await h.storage.take_event(a.id, "ev")
    expect(record.payload if record else None, 1, "the event is still there")


@case("events.none_payload")
async def none_payload(h: Harness) -> None:
    """A None payload is an event (EventRecord(payload=None)), distinct from no event."""
    run = await h.create()
    await h.storage.deliver_event(run.id, "ev", None)
    record = await h.storage.take_event(run.id, "ev")
    expect(record is not None and record.payload is None, True, f"record: {record!r}")


@case("events.delivered_at_is_now")
async def delivered_at_is_now(h: Harness) -> None:
    """delivered_at is the delivery time, an int in milliseconds."""
    run = await h.create()
    before = h.now()
    await h.storage.deliver_event(run.id, "ev", 1)
    after = h.now()
    record = await h.storage.take_event(run.id, "ev")
    assert record is not None
    expect(type(record.delivered_at), int, "type of delivered_at")
    expect(before - 1_000 <= record.delivered_at <= after + 1_000, True, "delivered_at ~ now")


@case("events.wait_sets_fields")
async def wait_sets_fields(h: Harness) -> None:
    """wait_run sets waiting, waiting_for and wake_at, and releases the lease."""
    claimed = await h.created_and_claimed()
    deadline = h.future()
    ok = await h.storage.wait_run(claimed.run.id, claimed.lease_id, "ev", deadline)
    expect(ok, True, "wait_run with the held lease")
    stored = await h.get(claimed.run.id)
    expect(
        (stored.status, stored.waiting_for, stored.wake_at),
        (RunStatus.WAITING, "ev", deadline),
        "(status, waiting_for, wake_at)",
    )


@case("events.deliver_wakes_waiting_run")
async def deliver_wakes_waiting_run(h: Harness) -> None:
    """A run waiting (no deadline) is not claimable; the event makes it pending and claimable."""
    claimed = await h.created_and_claimed()
    run_id = claimed.run.id
    await h.storage.wait_run(run_id, claimed.lease_id, "ev", None)
    expect(await h.storage.claim_next_run(["wf"], h.future()), None, "claim while waiting")
    expect(await h.storage.deliver_event(run_id, "ev", "hi"), True, "deliver_event")
    expect((await h.get(run_id)).status, RunStatus.PENDING, "status after delivery")
    await h.claim(run_id)
    record = await h.storage.take_event(run_id, "ev")
    expect(record.payload if record else None, "hi", "payload taken after waking")


@case("events.buffered_before_wait")
async def buffered_before_wait(h: Harness) -> None:
    """wait_run with a matching event already buffered leaves the run claimable at once."""
    claimed = await h.created_and_claimed()
    run_id = claimed.run.id
    await h.storage.deliver_event(run_id, "ev", 1)
    expect(await h.storage.wait_run(run_id, claimed.lease_id, "ev", None), True, "wait_run")
    expect((await h.get(run_id)).status, RunStatus.PENDING, "status")
    await h.claim(run_id)


@case("events.other_name_does_not_wake")
async def other_name_does_not_wake(h: Harness) -> None:
    """An event of another name is buffered but does not wake a run waiting for 'ev'."""
    claimed = await h.created_and_claimed()
    await h.storage.wait_run(claimed.run.id, claimed.lease_id, "ev", None)
    expect(await h.storage.deliver_event(claimed.run.id, "other", 1), True, "deliver 'other'")
    expect((await h.get(claimed.run.id)).status, RunStatus.WAITING, "status")
    expect(await h.storage.claim_next_run(["wf"]), None, "claim")


@case("events.other_name_buffered_does_not_shortcut_wait")
async def other_name_buffered(h: Harness) -> None:
    """A buffered event of another name does not turn wait_run into pending."""
    claimed = await h.created_and_claimed()
    await h.storage.deliver_event(claimed.run.id, "other", 1)
    await h.storage.wait_run(claimed.run.id, claimed.lease_id, "ev", None)
    expect((await h.get(claimed.run.id)).status, RunStatus.WAITING, "status")


@case("events.deliver_keeps_other_statuses")
async def deliver_keeps_other_statuses(h: Harness) -> None:
    """Delivering to a pending, running, sleeping or completed run buffers it, status unchanged."""
    running = await h.created_and_claimed()
    sleeping = await h.created_and_claimed()
    await h.storage.sleep_run(sleeping.run.id, sleeping.lease_id, h.future())
    done = await h.created_and_claimed()
    await h.storage.update_claimed_run_status(done.run.id, done.lease_id, RunStatus.COMPLETED)
    pending = await h.create()
    for run_id, status in (
        (pending.id, RunStatus.PENDING),
        (running.run.id, RunStatus.RUNNING),
        (sleeping.run.id, RunStatus.SLEEPING),
        (done.run.id, RunStatus.COMPLETED),
    ):
        expect(await h.storage.deliver_event(run_id, "ev", 1), True, f"deliver to {status}")
        expect((await h.get(run_id)).status, status, f"status of a {status} run after delivery")
    heartbeat = await h.storage.heartbeat_run(running.run.id, running.lease_id)
    expect(heartbeat, True, "the running run's lease survives a delivery")


@case("events.large_payload")
async def large_payload(h: Harness) -> None:
    """A ~5 MB payload round-trips exactly."""
    run = await h.create()
    payload = {"data": "🚀" * 1_250_000}
    await h.storage.deliver_event(run.id, "big", payload)
    record = await h.storage.take_event(run.id, "big")
    assert_exact(record.payload if record else None, payload, "5 MB payload")


@case("events.unicode_names")
async def unicode_names(h: Harness) -> None:
    """Unicode event names match exactly (no normalisation, no case folding)."""
    claimed = await h.created_and_claimed()
    await h.storage.wait_run(claimed.run.id, claimed.lease_id, "événement-🔔", None)
    await h.storage.deliver_event(claimed.run.id, "ÉVÉNEMENT-🔔", 0)
    expect((await h.get(claimed.run.id)).status, RunStatus.WAITING, "case differs: no wake")
    await h.storage.deliver_event(claimed.run.id, "événement-🔔", 1)
    expect((await h.get(claimed.run.id)).status, RunStatus.PENDING, "exact name wakes")
    record = await h.storage.take_event(claimed.run.id, "événement-🔔")
    expect(record.payload if record else None, 1, "payload")


@case("events.wait_requires_lease")
async def wait_requires_lease(h: Harness) -> None:
    """wait_run with a foreign lease is False; the run stays running."""
    claimed = await h.created_and_claimed()
    ok = await h.storage.wait_run(claimed.run.id, "foreign", "ev", None)
    expect(ok, False, "wait_run with a foreign lease")
    expect((await h.get(claimed.run.id)).status, RunStatus.RUNNING, "status")
