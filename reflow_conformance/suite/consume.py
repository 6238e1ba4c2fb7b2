"""consume_event: an event is consumed and checkpointed as one atomic step, or not at all.

The engine consumes a waited-for event with ``consume_event`` so that no crash can fall
between removing the event and recording it. These cases hold an adapter to every
outcome: consumed and checkpointed exactly; nothing buffered, nothing written; lease not
held, nothing consumed; a checkpoint that cannot be written, nothing consumed; and,
under real races, each event consumed once.

(The payload was encoded when it was delivered, so ``SerializationError`` cannot arise
here and has no case.)
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec

from reflow_conformance.cases import case
from reflow_conformance.harness import ContractViolation, Harness, assert_exact, expect
from reflow_core.errors import StorageError
from reflow_core.registry import Capability
from reflow_core.storage import StorageAdapter
from reflow_core.types import ConsumeResult, EventRecord, StepResult, StepStatus

MAX_TAKES = 1000
"""Bound on drain loops, far above any case's event count."""

RACERS = 6
EVENTS = 30
MODES: dict[str, frozenset[Capability]] = {
    "coroutines": frozenset(),
    "threads": frozenset({Capability.THREADS}),
}

# Every kind of persistable value, so the copy from event to step row is checked exactly.
PAYLOAD: dict[str, Any] = {
    "text": "ünïcødé 🚀",
    "int": 2**53 + 1,
    "float": -0.0,
    "ratio": 0.1,
    "flag": True,
    "none": None,
    "list": [1, 1.0, "1", [], {}],
    "when": datetime(2024, 2, 29, 23, 59, 59, 999_999, tzinfo=timezone(timedelta(hours=5))),
    "utc": datetime(2000, 1, 1, tzinfo=UTC),
    "naive": datetime(2024, 2, 29, 12, 0),
    "$datetime": "a user key that looks like the codec's tag",
    "tagged": {"$dict": [1]},
}


def checkpoint(h: Harness, run_id: str, name: str = "ev", **fields: Any) -> StepResult:
    """The row the engine passes: the wait's COMPLETED checkpoint, output to be filled in."""
    return msgspec.structs.replace(h.step(run_id, name, StepStatus.COMPLETED, None), **fields)


async def consume(
    storage: StorageAdapter, row: StepResult, lease_id: str, event_name: str = "ev"
) -> ConsumeResult:
    """Call consume_event and check the answer's type before any case reads it."""
    result = await storage.consume_event(event_name, row, lease_id)
    if not isinstance(result, ConsumeResult):
        raise ContractViolation("consume_event returns a ConsumeResult", "ConsumeResult", result)
    if result.event is not None and not isinstance(result.event, EventRecord):
        raise ContractViolation("ConsumeResult.event is an EventRecord", "EventRecord", result)
    return result


async def remaining(h: Harness, run_id: str, event_name: str = "ev") -> list[Any]:
    """Drain the buffer with take_event: the payloads still there, oldest first."""
    payloads = []
    # Bounded: an adapter whose take_event never removes must fail the kit, not hang it.
    while (record := await h.storage.take_event(run_id, event_name)) is not None:
        payloads.append(record.payload)
        if len(payloads) > MAX_TAKES:
            raise ContractViolation("take_event keeps returning events", f"<= {MAX_TAKES}", "more")
    return payloads


@case("consume.oldest_checkpointed_exactly")
async def oldest_checkpointed_exactly(h: Harness) -> None:
    """The oldest event is removed and the checkpoint is stored with its payload, exactly."""
    claimed = await h.created_and_claimed()
    run_id = claimed.run.id
    now = h.now()
    await h.storage.deliver_event(run_id, "ev", PAYLOAD)
    await h.storage.deliver_event(run_id, "ev", "second")
    row = checkpoint(h, run_id, attempts=3, created_at=1_000, wake_at=None)
    row = msgspec.structs.replace(row, updated_at=2_000, output="ignored: replaced")
    result = await consume(h.storage, row, claimed.lease_id)
    expect(result.held, True, "ConsumeResult.held with the held lease")
    if result.event is None:
        raise ContractViolation("consume_event with an event buffered", "an EventRecord", None)
    assert_exact(result.event.payload, PAYLOAD, "ConsumeResult.event.payload")
    expect(type(result.event.delivered_at), int, "type of delivered_at")
    expect(result.event.delivered_at, now, "delivered_at (the store's now at delivery)")
    steps = await h.storage.get_step_results(run_id)
    expect(len(steps), 1, "step rows after consume_event")
    assert_exact(steps[0].output, PAYLOAD, "the checkpoint's output")
    expect(steps[0], msgspec.structs.replace(row, output=steps[0].output), "the checkpoint row")
    expect(await remaining(h, run_id), ["second"], "events left: only the newer one")
    stored = await h.get(run_id)
    expect((stored.status, stored.attempt), (claimed.run.status, 1), "the run is unchanged")
    expect(await h.storage.heartbeat_run(run_id, claimed.lease_id), True, "the lease is kept")


@case("consume.none_payload")
async def none_payload(h: Harness) -> None:
    """A None payload is consumed as an event (event.payload is None), not as "no event"."""
    claimed = await h.created_and_claimed()
    await h.storage.deliver_event(claimed.run.id, "ev", None)
    result = await consume(h.storage, checkpoint(h, claimed.run.id), claimed.lease_id)
    expect(
        result.held and result.event is not None and result.event.payload is None,
        True,
        f"consume of a None payload: {result!r}",
    )
    steps = await h.storage.get_step_results(claimed.run.id)
    expect([(s.status, s.output) for s in steps], [(StepStatus.COMPLETED, None)], "rows")
    expect(await remaining(h, claimed.run.id), [], "events left")


@case("consume.nothing_buffered")
async def nothing_buffered(h: Harness) -> None:
    """With no event of that name for that run: held=True, event=None, nothing written."""
    claimed = await h.created_and_claimed()
    other = await h.create()
    run_id = claimed.run.id
    await h.storage.deliver_event(run_id, "other-name", 1)
    await h.storage.deliver_event(other.id, "ev", 2)
    before = await h.snapshot([run_id, other.id])
    result = await consume(h.storage, checkpoint(h, run_id), claimed.lease_id)
    expect(result, ConsumeResult(held=True, event=None), "consume_event with nothing buffered")
    await h.expect_unchanged(before, [run_id, other.id], "consume_event with nothing buffered")
    expect(await remaining(h, run_id, "other-name"), [1], "events of another name")
    expect(await remaining(h, other.id), [2], "events of another run")


@case("consume.fifo")
async def fifo(h: Harness) -> None:
    """Repeated consumes (one checkpoint each) take events oldest first, also within one
    millisecond; each checkpoint holds its event's payload."""
    claimed = await h.created_and_claimed()
    for index in range(EVENTS):
        await h.storage.deliver_event(claimed.run.id, "ev", index)
    taken = []
    for index in range(EVENTS + 1):
        row = checkpoint(h, claimed.run.id, f"ev-{index:03d}", created_at=index)
        result = await consume(h.storage, row, claimed.lease_id)
        taken.append(result.event.payload if result.event else None)
    expect(taken, [*range(EVENTS), None], "payloads consumed in order, then none")
    steps = await h.storage.get_step_results(claimed.run.id)
    expect([s.output for s in steps], list(range(EVENTS)), "each checkpoint holds its payload")


@case("consume.stale_lease_consumes_nothing")
async def stale_lease_consumes_nothing(h: Harness) -> None:
    """After a takeover the old lease gets held=False: the event stays, no row is written."""
    old = await h.created_and_claimed()
    run_id = old.run.id
    await h.storage.deliver_event(run_id, "ev", "payload")
    new = await h.take_over(run_id)
    before = await h.snapshot([run_id])
    result = await consume(h.storage, checkpoint(h, run_id), old.lease_id)
    expect(result, ConsumeResult(held=False, event=None), "consume_event with the old lease")
    await h.expect_unchanged(before, [run_id], "consume_event with the old lease")
    result = await consume(h.storage, checkpoint(h, run_id), new.lease_id)
    expect(result.event.payload if result.event else None, "payload", "the new holder consumes it")


@case("consume.not_held_consumes_nothing")
async def not_held_consumes_nothing(h: Harness) -> None:
    """A foreign lease, a released (waiting or pending) run or a missing run: held=False."""
    claimed = await h.created_and_claimed()
    run_id = claimed.run.id
    await h.storage.deliver_event(run_id, "ev", 1)
    refused = ConsumeResult(held=False, event=None)
    expect(await consume(h.storage, checkpoint(h, run_id), "foreign"), refused, "a foreign lease")
    # wait_run with the event buffered releases the run to pending; the lease is gone.
    expect(await h.storage.wait_run(run_id, claimed.lease_id, "ev", None), True, "wait_run")
    before = await h.snapshot([run_id])
    released = await consume(h.storage, checkpoint(h, run_id), claimed.lease_id)
    expect(released, refused, "the lease of a released run")
    await h.expect_unchanged(before, [run_id], "consume_event on a released run")
    missing = await consume(h.storage, checkpoint(h, "missing"), claimed.lease_id)
    expect(missing, refused, "a missing run")
    expect(await h.storage.get_step_results("missing"), [], "rows of the missing run")
    expect(await remaining(h, run_id), [1], "the event is still buffered")


@case("consume.keeps_created_at")
async def keeps_created_at(h: Harness) -> None:
    """An existing row (the wait's 'waiting' row) is updated in place and keeps created_at."""
    claimed = await h.created_and_claimed()
    run_id = claimed.run.id
    waiting = h.step(run_id, "ev", StepStatus.WAITING, created_at=1_000, wake_at=h.future())
    await h.storage.save_step_result(waiting, claimed.lease_id)
    await h.storage.deliver_event(run_id, "ev", {"n": 1})
    row = checkpoint(h, run_id, created_at=5_000, attempts=0)
    row = msgspec.structs.replace(row, updated_at=6_000)
    result = await consume(h.storage, row, claimed.lease_id)
    expect(result.event is not None, True, "an event was consumed")
    expected = msgspec.structs.replace(row, created_at=1_000, output={"n": 1})
    expect(await h.storage.get_step_results(run_id), [expected], "the updated row")


@case("consume.checkpoint_clash_consumes_nothing")
async def checkpoint_clash_consumes_nothing(h: Harness) -> None:
    """A checkpoint id that names another step is a StorageError and consumes nothing."""
    claimed = await h.created_and_claimed()
    run_id = claimed.run.id
    await h.storage.save_step_result(h.step(run_id, "s", id="taken-id"), claimed.lease_id)
    await h.storage.deliver_event(run_id, "ev", "kept")
    before = await h.snapshot([run_id])
    try:
        await h.storage.consume_event("ev", checkpoint(h, run_id, id="taken-id"), claimed.lease_id)
    except StorageError:
        pass
    else:
        raise ContractViolation("a checkpoint id owned by another step", "StorageError", "none")
    await h.expect_unchanged(before, [run_id], "after the refused checkpoint")
    expect(await remaining(h, run_id), ["kept"], "the event is still buffered")


async def _race(h: Harness, mode: str, fn: Any) -> list[Any]:
    if mode == "threads":
        return await h.race_threads(RACERS, fn)
    return await h.race_coroutines(RACERS, fn)


async def _once_same_lease(h: Harness, mode: str) -> None:
    claimed = await h.created_and_claimed()
    run_id = claimed.run.id
    for index in range(EVENTS):
        await h.storage.deliver_event(run_id, "ev", index)

    async def consume_all(storage: StorageAdapter, racer: int) -> list[Any]:
        taken: list[Any] = []
        for index in range(MAX_TAKES):
            # One checkpoint per consume, as the engine writes one per wait.
            row = checkpoint(h, run_id, f"ev-{racer}-{index:04d}")
            result = await consume(storage, row, claimed.lease_id)
            expect(result.held, True, "held, for every racer presenting the held lease")
            if result.event is None:
                return taken
            taken.append(result.event.payload)
        raise ContractViolation("consume_event keeps returning events", f"<= {MAX_TAKES}", "more")

    taken = sorted(p for batch in await _race(h, mode, consume_all) for p in batch)
    expect(taken, list(range(EVENTS)), "events consumed across racers (each exactly once)")
    expect(await remaining(h, run_id), [], "events left")
    steps = await h.storage.get_step_results(run_id)
    expect(sorted(s.output for s in steps), taken, "checkpoints: one per consumed event")


async def _once_after_takeover(h: Harness, mode: str) -> None:
    old = await h.created_and_claimed()
    run_id = old.run.id
    await h.storage.deliver_event(run_id, "ev", "only")
    new = await h.take_over(run_id)

    async def consume_one(storage: StorageAdapter, index: int) -> tuple[bool, Any]:
        lease = old.lease_id if index % 2 == 0 else new.lease_id
        result = await consume(storage, checkpoint(h, run_id), lease)
        return index % 2 == 0, result

    results = await _race(h, mode, consume_one)
    for with_old, result in results:
        if with_old:
            expect(result, ConsumeResult(held=False), "consume_event with the old lease")
    events = [r.event.payload for _, r in results if r.event is not None]
    expect(events, ["only"], "the one event, consumed once, by a holder of the new lease")
    steps = await h.storage.get_step_results(run_id)
    expect([s.output for s in steps], ["only"], "the checkpoint row")


SCENARIOS = {
    "once_same_lease": (
        "Racers presenting the same held lease consume buffered events: each exactly once.",
        _once_same_lease,
    ),
    "once_after_takeover": (
        "Old and new lease holders race for one event (one checkpoint) after a takeover: "
        "the old lease is refused and the event is consumed once.",
        _once_after_takeover,
    ),
}


def _register(name: str, mode: str, description: str, scenario: Any) -> None:
    @case(f"consume.{name}_{mode}", f"{description} ({mode})", requires=MODES[mode])
    async def race(h: Harness) -> None:
        await scenario(h, mode)


for _name, (_description, _scenario) in SCENARIOS.items():
    for _mode in MODES:
        _register(_name, _mode, _description, _scenario)
