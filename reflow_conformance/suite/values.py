"""Values: exact round-trips through every value-carrying method, and clean rejections.

"Exact" means equal *and* of the same type at every level (see ``assert_exact``): a
replay after a crash must see what the first execution saw. The value-carrying methods
are run input (create_run; read back by get_run, list_runs and claim_next_run), run
output (update_claimed_run_status), step output, event payload and schedule input.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from reflow_conformance.cases import case
from reflow_conformance.harness import ContractViolation, Harness, assert_exact, expect
from reflow_conformance.strategies import kit_settings, persistable
from reflow_core.errors import SerializationError
from reflow_core.types import RunFilter, RunStatus, StepStatus

Check = Callable[[Harness, Any], Awaitable[None]]


async def _run_input(h: Harness, value: Any) -> None:
    workflow = h.new_id("wf")
    result = await h.storage.create_run(h.new_run(workflow, value))
    assert_exact(result.run.input, value, "create_run(...).run.input")
    assert_exact((await h.get(result.run.id)).input, value, "get_run(...).input")
    [listed] = await h.storage.list_runs(RunFilter(workflow=workflow))
    assert_exact(listed.input, value, "list_runs(...)[0].input")
    claimed = await h.claim(result.run.id, [workflow])
    assert_exact(claimed.run.input, value, "claim_next_run(...).run.input")


async def _run_output(h: Harness, value: Any) -> None:
    workflow = h.new_id("wf")
    claimed = await h.created_and_claimed(workflow)
    ok = await h.storage.update_claimed_run_status(
        claimed.run.id, claimed.lease_id, RunStatus.COMPLETED, output=value
    )
    expect(ok, True, "update_claimed_run_status with the held lease")
    assert_exact((await h.get(claimed.run.id)).output, value, "get_run(...).output")


async def _step_output(h: Harness, value: Any) -> None:
    run_id = (await h.create(h.new_id("wf"))).id
    await h.storage.save_step_result(h.step(run_id, "s", output=value))
    [row] = await h.storage.get_step_results(run_id)
    assert_exact(row.output, value, "get_step_results(...)[0].output")


async def _event_payload(h: Harness, value: Any) -> None:
    run = await h.create(h.new_id("wf"))
    await h.storage.deliver_event(run.id, "ev", value)
    record = await h.storage.take_event(run.id, "ev")
    if record is None:
        raise ContractViolation("take_event after deliver_event", "an EventRecord", None)
    assert_exact(record.payload, value, "take_event(...).payload")


async def _schedule_input(h: Harness, value: Any) -> None:
    key = h.new_id("sched")
    stored = await h.storage.upsert_schedule(h.schedule(key, input=value))
    assert_exact(stored.input, value, "upsert_schedule(...).input")
    [listed] = [s for s in await h.storage.list_schedules() if s.key == key]
    assert_exact(listed.input, value, "list_schedules()[...].input")
    await h.storage.delete_schedule(key)


CARRIERS: dict[str, Check] = {
    "run_input": _run_input,
    "run_output": _run_output,
    "step_output": _step_output,
    "event_payload": _event_payload,
    "schedule_input": _schedule_input,
}


def _roundtrip_case(carrier: str, check: Check) -> None:
    @case(
        f"values.roundtrip_{carrier}",
        f"Hypothesis-generated persistable values come back exactly as {carrier}.",
    )
    def roundtrip(h: Harness) -> None:
        from hypothesis import given

        @kit_settings()
        @given(persistable())
        def property_(value: Any) -> None:
            h.sync(check(h, value))

        property_()


for _carrier, _check in CARRIERS.items():
    _roundtrip_case(_carrier, _check)


PARIS_SUMMER = timezone(timedelta(hours=2), "CEST")
EDGE_VALUES: list[Any] = [
    0,
    -0.0,
    0.0,
    5e-324,
    1e300,
    -1e-300,
    0.1,
    2**63 - 1,
    -(2**63),
    2**64,
    2**200,
    -(10**40),
    True,
    False,
    1,
    1.0,
    None,
    "",
    "\u0000",
    "a\u0000b",
    "🚀👩‍👩‍👧",
    "\u00e9",
    "e\u0301",
    '\n\t"\\',
    "x" * 10_000,
    [],
    {},
    [[]],
    {"": {}},
    [True, 1, 1.0, "1", None],
    datetime(2024, 2, 29, 23, 59, 59, 999_999),
    datetime(1970, 1, 1, tzinfo=UTC),
    datetime(2024, 7, 1, 12, 0, tzinfo=PARIS_SUMMER),
    datetime(1, 1, 1),
    datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
    {"$datetime": "2024-01-01T00:00:00"},
    {"$dict": {"a": 1}},
    {"$dict": "x", "b": 2},
    {"$": None},
    {"$$": [{"$datetime": 1}]},
    {"__reflowDate__": "2024"},
    {"when": datetime(2020, 5, 17, 3, 4, 5), "$dict": [datetime(2020, 5, 17, tzinfo=UTC)]},
    {"k": 1, "K": 2, "k ": 3},
    {str(i): i for i in range(100)},
]
"""Values a careless store gets wrong: sign of zero, subnormals, big ints, bool vs int vs
float, NUL, combining marks, tag look-alikes, naive vs aware datetimes."""


def _edge_case(carrier: str, check: Check) -> None:
    @case(
        f"values.edge_values_{carrier}",
        f"Hand-picked edge values (-0.0, 5e-324, 2**200, NUL, tag look-alikes, naive and "
        f"aware datetimes, ...) come back exactly as {carrier}.",
    )
    async def edges(h: Harness) -> None:
        for value in EDGE_VALUES:
            await check(h, value)
        await check(h, EDGE_VALUES)


for _carrier, _check in CARRIERS.items():
    _edge_case(_carrier, _check)


class _Opaque:
    pass


BAD_VALUES: list[Any] = [
    math.nan,
    math.inf,
    -math.inf,
    (1, 2),
    {1, 2},
    frozenset(),
    b"bytes",
    bytearray(b"x"),
    _Opaque(),
    {1: "int key"},
    {("t",): 1},
    Decimal("1.5"),
    1j,
    datetime(2024, 1, 1).date(),
    {"ok": [1, {"deep": [{"deeper": math.nan}]}]},
    [[[[[(1,)]]]]],
    {"a": {"b": {"c": {2: 1}}}},
    print,
    "\ud800",
]
"""Not persistable: each must raise SerializationError before anything is written."""


async def _reject(
    h: Harness, what: str, write: Callable[[Any], Awaitable[Any]], ids: list[str]
) -> None:
    for value in BAD_VALUES:
        before = await h.snapshot(ids)
        try:
            await write(value)
        except SerializationError:
            pass
        except Exception as exc:
            raise ContractViolation(
                f"{what} with {value!r}", "SerializationError", f"{type(exc).__name__}: {exc}"
            ) from exc
        else:
            raise ContractViolation(f"{what} with {value!r}", "SerializationError", "no error")
        await h.expect_unchanged(before, ids, f"after {what} rejected {value!r}")


@case("values.reject_run_input")
async def reject_run_input(h: Harness) -> None:
    """create_run with a non-persistable input raises SerializationError and stores nothing."""
    run_id = h.new_id()

    async def write(value: Any) -> Any:
        return await h.storage.create_run(h.new_run("wf", value, id=run_id))

    await _reject(h, "create_run", write, [run_id])
    expect(await h.storage.get_run(run_id), None, "the rejected run")


@case("values.reject_run_output")
async def reject_run_output(h: Harness) -> None:
    """A non-persistable run output is rejected; the run stays running with its lease."""
    claimed = await h.created_and_claimed()

    async def write(value: Any) -> Any:
        return await h.storage.update_claimed_run_status(
            claimed.run.id, claimed.lease_id, RunStatus.COMPLETED, output=value
        )

    await _reject(h, "update_claimed_run_status", write, [claimed.run.id])
    expect(await h.storage.heartbeat_run(claimed.run.id, claimed.lease_id), True, "lease held")


@case("values.reject_step_output")
async def reject_step_output(h: Harness) -> None:
    """A non-persistable step output is rejected; an existing row for that step is unchanged."""
    claimed = await h.created_and_claimed()
    # A row that is not final (write-once would refuse any rewrite of a final one anyway).
    first = h.step(claimed.run.id, "s", StepStatus.RUNNING, output="v1")
    await h.storage.save_step_result(first, claimed.lease_id)

    async def write(value: Any) -> Any:
        step = h.step(claimed.run.id, "s", output=value)
        return await h.storage.save_step_result(step, claimed.lease_id)

    await _reject(h, "save_step_result", write, [claimed.run.id])


@case("values.reject_event_payload")
async def reject_event_payload(h: Harness) -> None:
    """A non-persistable payload is rejected: nothing buffered, the waiting run not woken."""
    claimed = await h.created_and_claimed()
    await h.storage.wait_run(claimed.run.id, claimed.lease_id, "ev", None)

    async def write(value: Any) -> Any:
        return await h.storage.deliver_event(claimed.run.id, "ev", value)

    await _reject(h, "deliver_event", write, [claimed.run.id])
    expect(await h.storage.take_event(claimed.run.id, "ev"), None, "buffered events")


@case("values.reject_schedule_input")
async def reject_schedule_input(h: Harness) -> None:
    """A non-persistable schedule input is rejected; the existing schedule is unchanged."""
    await h.storage.upsert_schedule(h.schedule("k", input="v1"))

    async def write(value: Any) -> Any:
        return await h.storage.upsert_schedule(h.schedule("k", input=value, every_ms=5))

    await _reject(h, "upsert_schedule", write, [])
