"""Events: deliver_event buffers and wakes (never for an ended run), delivers a keyed event
once, take_event consumes once, wait_run suspends."""

from __future__ import annotations

from typing import Any

from reflow_conformance.cases import case
from reflow_conformance.harness import ContractViolation, Harness, assert_exact, expect
from reflow_core.types import ConsumeResult, EventRecord, RunStatus, StepStatus


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
    """deliver_event to a missing run is False and buffers nothing, with or without a key."""
    expect(await h.storage.deliver_event("missing", "ev", 1), False, "deliver to 'missing'")
    ok = await h.storage.deliver_event("missing", "ev", 2, key="k")
    expect(ok, False, "keyed deliver to 'missing'")
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
    """delivered_at is the delivery time by the store's clock, an int in milliseconds."""
    run = await h.create()
    h.advance(1_234)
    now = h.now()
    await h.storage.deliver_event(run.id, "ev", 1)
    record = await h.storage.take_event(run.id, "ev")
    assert record is not None
    expect(type(record.delivered_at), int, "type of delivered_at")
    expect(record.delivered_at, now, "delivered_at: the store's now at delivery")


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
    expect(await h.claim_any(["wf"]), None, "claim while waiting")
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
    expect(await h.claim_any(["wf"]), None, "claim")


@case("events.other_name_buffered_does_not_shortcut_wait")
async def other_name_buffered(h: Harness) -> None:
    """A buffered event of another name does not turn wait_run into pending."""
    claimed = await h.created_and_claimed()
    await h.storage.deliver_event(claimed.run.id, "other", 1)
    await h.storage.wait_run(claimed.run.id, claimed.lease_id, "ev", None)
    expect((await h.get(claimed.run.id)).status, RunStatus.WAITING, "status")


@case("events.deliver_keeps_other_statuses")
async def deliver_keeps_other_statuses(h: Harness) -> None:
    """Delivering to a pending, running, sleeping or waiting (for another name) run buffers
    it and leaves the status unchanged."""
    running = await h.created_and_claimed()
    sleeping = await h.created_and_claimed()
    await h.storage.sleep_run(sleeping.run.id, sleeping.lease_id, h.future())
    waiting = await h.created_and_claimed()
    await h.storage.wait_run(waiting.run.id, waiting.lease_id, "other", None)
    pending = await h.create()
    for run_id, status in (
        (pending.id, RunStatus.PENDING),
        (running.run.id, RunStatus.RUNNING),
        (sleeping.run.id, RunStatus.SLEEPING),
        (waiting.run.id, RunStatus.WAITING),
    ):
        expect(await h.storage.deliver_event(run_id, "ev", 1), True, f"deliver to {status}")
        expect((await h.get(run_id)).status, status, f"status of a {status} run after delivery")
        record = await h.storage.take_event(run_id, "ev")
        expect(record.payload if record else None, 1, f"the event buffered for a {status} run")
    heartbeat = await h.storage.heartbeat_run(running.run.id, running.lease_id)
    expect(heartbeat, True, "the running run's lease survives a delivery")


async def _ended(h: Harness, status: RunStatus) -> str:
    """A run that waited for 'ev' and then ended in ``status``."""
    claimed = await h.created_and_claimed()
    run_id, lease = claimed.run.id, claimed.lease_id
    if status is RunStatus.CANCELLED:
        expect(await h.storage.wait_run(run_id, lease, "ev", None), True, "wait_run")
        expect(await h.storage.update_run_status(run_id, status), True, "cancel a waiting run")
    else:
        ok = await h.storage.update_claimed_run_status(run_id, lease, status, output="out")
        expect(ok, True, f"update_claimed_run_status({status.value})")
    return run_id


def _refused_case(status: RunStatus) -> None:
    @case(
        f"events.refused_for_{status.value}",
        f"deliver_event to a {status.value} run is False and stores nothing (with or without "
        "a key); a refused key is not taken: once the run can receive events again, "
        "that key delivers.",
    )
    async def refused(h: Harness) -> None:
        run_id = await _ended(h, status)
        before = await h.snapshot([run_id])
        ok = await h.storage.deliver_event(run_id, "ev", "late")
        expect(ok, False, f"deliver_event to a {status.value} run")
        ok = await h.storage.deliver_event(run_id, "ev", "late, keyed", key="k")
        expect(ok, False, f"keyed deliver_event to a {status.value} run")
        await h.expect_unchanged(before, [run_id], f"after deliveries to a {status.value} run")
        if status is not RunStatus.COMPLETED:
            expect(await h.storage.requeue_run(run_id), True, "requeue_run")
        expect(await h.storage.take_event(run_id, "ev"), None, "events buffered by the refusals")
        if status is not RunStatus.COMPLETED:
            ok = await h.storage.deliver_event(run_id, "ev", "after requeue", key="k")
            expect(ok, True, "keyed deliver_event after requeue")
            record = await h.storage.take_event(run_id, "ev")
            expect(
                record.payload if record else None,
                "after requeue",
                "the key refused earlier was not taken: the new delivery is stored",
            )


for _status in (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED):
    _refused_case(_status)


async def _payloads(h: Harness, run_id: str, event_name: str = "ev") -> list[Any]:
    payloads = []
    while (record := await h.storage.take_event(run_id, event_name)) is not None:
        payloads.append(record.payload)
        if len(payloads) > 100:
            raise ContractViolation("take_event keeps returning events", "<= 100", "more")
    return payloads


@case("events.key_dedupe_while_buffered")
async def key_dedupe_while_buffered(h: Harness) -> None:
    """A key delivered again while the first is still buffered: True, nothing stored."""
    run = await h.create()
    expect(await h.storage.deliver_event(run.id, "ev", 1, key="k"), True, "first delivery")
    expect(await h.storage.deliver_event(run.id, "ev", 2, key="k"), True, "repeated key")
    expect(await _payloads(h, run.id), [1], "events buffered: the first delivery only")


@case("events.key_dedupe_after_take")
async def key_dedupe_after_take(h: Harness) -> None:
    """A key delivered again after its event was taken: True, nothing stored."""
    run = await h.create()
    await h.storage.deliver_event(run.id, "ev", 1, key="k")
    expect(await _payloads(h, run.id), [1], "the first delivery")
    expect(await h.storage.deliver_event(run.id, "ev", 2, key="k"), True, "repeated key")
    expect(await _payloads(h, run.id), [], "events buffered after the repeat")


@case("events.key_dedupe_after_consume")
async def key_dedupe_after_consume(h: Harness) -> None:
    """A key delivered again after consume_event checkpointed it: True, nothing stored,
    so a retrying sender never makes the run see the event twice."""
    claimed = await h.created_and_claimed()
    run_id = claimed.run.id
    await h.storage.deliver_event(run_id, "ev", "once", key="k")
    row = h.step(run_id, "wait-1", StepStatus.COMPLETED)
    result = await h.storage.consume_event("ev", row, claimed.lease_id)
    expect(result.event.payload if result.event else None, "once", "consumed")
    expect(await h.storage.deliver_event(run_id, "ev", "twice", key="k"), True, "repeated key")
    again = await h.storage.consume_event(
        "ev", h.step(run_id, "wait-2", StepStatus.COMPLETED), claimed.lease_id
    )
    expect(again, ConsumeResult(held=True, event=None), "consume after the repeated key")
    expect(await _payloads(h, run_id), [], "events buffered after the repeat")


@case("events.key_dedupe_does_not_wake")
async def key_dedupe_does_not_wake(h: Harness) -> None:
    """A keyed delivery wakes a run waiting for it; the same key again later, while the run
    waits for that name once more, stores nothing and leaves it waiting."""
    claimed = await h.created_and_claimed()
    run_id = claimed.run.id
    await h.storage.wait_run(run_id, claimed.lease_id, "ev", None)
    expect(await h.storage.deliver_event(run_id, "ev", 1, key="k"), True, "keyed delivery")
    expect((await h.get(run_id)).status, RunStatus.PENDING, "status after the keyed delivery")
    again = await h.claim(run_id)
    row = h.step(run_id, "wait-1", StepStatus.COMPLETED)
    await h.storage.consume_event("ev", row, again.lease_id)
    expect(await h.storage.wait_run(run_id, again.lease_id, "ev", None), True, "wait again")
    before = await h.snapshot([run_id])
    expect(await h.storage.deliver_event(run_id, "ev", 2, key="k"), True, "repeated key")
    await h.expect_unchanged(before, [run_id], "after a repeated key (the run stays waiting)")
    expect(await _payloads(h, run_id), [], "events buffered")


@case("events.key_scoped_per_run")
async def key_scoped_per_run(h: Harness) -> None:
    """A key is deduplicated per run: the same key for two runs delivers to both."""
    a, b = await h.create(), await h.create()
    expect(await h.storage.deliver_event(a.id, "ev", "a", key="k"), True, "deliver to a")
    expect(await h.storage.deliver_event(b.id, "ev", "b", key="k"), True, "deliver to b")
    expect(await _payloads(h, a.id), ["a"], "events of run a")
    expect(await _payloads(h, b.id), ["b"], "events of run b (same key, other run)")


@case("events.key_spans_event_names")
async def key_spans_event_names(h: Harness) -> None:
    """A key identifies one delivery to the run whatever the event name: the same key under
    another name stores nothing ("a key already delivered to this run")."""
    run = await h.create()
    expect(await h.storage.deliver_event(run.id, "a", 1, key="k"), True, "deliver 'a'")
    expect(await h.storage.deliver_event(run.id, "b", 2, key="k"), True, "same key, 'b'")
    expect(await _payloads(h, run.id, "a"), [1], "events named 'a'")
    expect(await _payloads(h, run.id, "b"), [], "events named 'b'")


@case("events.distinct_keys_and_no_key_all_stored")
async def distinct_keys_and_no_key_all_stored(h: Harness) -> None:
    """Distinct keys are distinct deliveries, and deliveries without a key never dedupe."""
    run = await h.create()
    for payload, key in ((1, None), (2, "k1"), (3, None), (4, "k2"), (5, "K1"), (6, " k1")):
        ok = await h.storage.deliver_event(run.id, "ev", payload, key=key)
        expect(ok, True, f"deliver {payload} with key {key!r}")
    expect(await _payloads(h, run.id), [1, 2, 3, 4, 5, 6], "events buffered, in order")


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
