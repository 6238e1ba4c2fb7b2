"""Schedules: upsert keeps cadence, a due occurrence is claimed once and advanced."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec

from reflow_conformance.cases import case
from reflow_conformance.harness import ContractViolation, Harness, assert_exact, expect
from reflow_core.types import ClaimedSchedule, Recurrence

MAX_CLAIMS = 100
"""More claims than any case's schedules can fire: a store that never advances a schedule
must fail the case, not spin forever (an in-memory adapter never yields to a timeout)."""


async def _next_run_at(h: Harness, key: str) -> int | None:
    for schedule in await h.storage.list_schedules():
        if schedule.key == key:
            return schedule.next_run_at
    return None


async def _claim_all_due(h: Harness) -> list[ClaimedSchedule]:
    """Claim due occurrences until none is left (at most :data:`MAX_CLAIMS`)."""
    claimed: list[ClaimedSchedule] = []
    while (item := await h.storage.claim_due_schedule(["wf"])) is not None:
        claimed.append(item)
        if len(claimed) > MAX_CLAIMS:
            raise ContractViolation(
                f"claim_due_schedule(['wf']) at {h.now()} keeps returning occurrences "
                "(not advanced?)",
                f"at most {MAX_CLAIMS}",
                [(c.schedule.key, c.slot) for c in claimed[:5]],
            )
    return claimed


@case("schedules.upsert_and_list")
async def upsert_and_list(h: Harness) -> None:
    """upsert_schedule returns what is stored; list_schedules returns it with exact input."""
    schedule = h.schedule("daily", input={"a": [1, 2.0, "x"]}, next_run_at=5_000)
    stored = await h.storage.upsert_schedule(schedule)
    expect(stored, schedule, "upsert_schedule result for a new schedule")
    [listed] = await h.storage.list_schedules()
    expect(listed, schedule, "listed schedule")
    assert_exact(listed.input, {"a": [1, 2.0, "x"]}, "schedule input")


@case("schedules.unchanged_interval_keeps_cadence")
async def unchanged_interval_keeps_cadence(h: Harness) -> None:
    """Re-upserting the same interval keeps next_run_at and created_at but updates input."""
    await h.storage.upsert_schedule(h.schedule("k", input=1, every_ms=100, next_run_at=1_000))
    again = msgspec.structs.replace(
        h.schedule("k", input=2, every_ms=100, next_run_at=9_000), created_at=50, updated_at=50
    )
    stored = await h.storage.upsert_schedule(again)
    expect((stored.next_run_at, stored.created_at, stored.input), (1_000, 1, 2), "returned")
    expect(await h.storage.list_schedules(), [stored], "listed equals returned")


@case("schedules.changed_interval_resets_cadence")
async def changed_interval_resets_cadence(h: Harness) -> None:
    """A new interval takes the supplied next_run_at and the new recurrence."""
    await h.storage.upsert_schedule(h.schedule("k", every_ms=100, next_run_at=1_000))
    stored = await h.storage.upsert_schedule(h.schedule("k", every_ms=200, next_run_at=9_000))
    expect((stored.next_run_at, stored.recurrence.every_ms), (9_000, 200), "returned")
    expect(await _next_run_at(h, "k"), 9_000, "stored next_run_at")


@case("schedules.claim_advances_and_reports_slot")
async def claim_advances_and_reports_slot(h: Harness) -> None:
    """Slot T, every 100, claimed at T+250 (the store's clock): reports T, stores T+300
    (missed occurrences skipped)."""
    base = h.now()
    await h.storage.upsert_schedule(h.schedule("k", every_ms=100, next_run_at=base))
    h.advance(250)
    claimed = await h.storage.claim_due_schedule(["wf"])
    expect(claimed.slot if claimed else None, base, "claimed slot")
    assert claimed is not None
    expect(claimed.schedule.key, "k", "claimed key")
    expect(claimed.schedule.next_run_at, base + 300, "returned next_run_at after the claim")
    expect(await _next_run_at(h, "k"), base + 300, "next_run_at after the claim")


@case("schedules.catch_up_advances_one_slot")
async def catch_up_advances_one_slot(h: Harness) -> None:
    """With catch_up, a claim advances one interval even if that is already due."""
    base = h.now()
    schedule = h.schedule("k", every_ms=100, next_run_at=base, catch_up=True)
    await h.storage.upsert_schedule(schedule)
    h.advance(250)
    slots = [c.slot for c in await _claim_all_due(h)]
    expect(slots, [base, base + 100, base + 200], "slots fired by catch-up")
    expect(await _next_run_at(h, "k"), base + 300, "next_run_at")


@case("schedules.occurrence_claimed_once")
async def occurrence_claimed_once(h: Harness) -> None:
    """A second claim at the same now returns None."""
    base = h.now()
    await h.storage.upsert_schedule(h.schedule("k", every_ms=100, next_run_at=base))
    h.advance(50)
    expect((await h.storage.claim_due_schedule(["wf"])) is not None, True, "first claim")
    expect(await h.storage.claim_due_schedule(["wf"]), None, "second claim")


@case("schedules.not_due_ignored")
async def not_due_ignored(h: Harness) -> None:
    """Due is judged by the store's clock: not due one millisecond before next_run_at, due
    at exactly next_run_at."""
    due = h.now() + 3_600_000
    await h.storage.upsert_schedule(h.schedule("k", every_ms=10**9, next_run_at=due))
    h.advance(3_599_999)
    expect(await h.storage.claim_due_schedule(["wf"]), None, "claim 1 ms before next_run_at")
    h.advance(1)
    claimed = await h.storage.claim_due_schedule(["wf"])
    expect(claimed.slot if claimed else None, due, "claim at exactly next_run_at")


@case("schedules.only_named_workflows")
async def only_named_workflows(h: Harness) -> None:
    """Schedules of other workflows are not claimed."""
    await h.storage.upsert_schedule(h.schedule("other", workflow="other", next_run_at=1))
    await h.storage.upsert_schedule(h.schedule("mine", workflow="wf", next_run_at=2))
    claimed = await h.storage.claim_due_schedule(["wf"])
    expect(claimed.schedule.key if claimed else None, "mine", "claimed key")
    expect(await h.storage.claim_due_schedule(["wf"]), None, "nothing else due for wf")


@case("schedules.empty_names_claim_nothing")
async def empty_names_claim_nothing(h: Harness) -> None:
    """An empty workflow list claims nothing."""
    await h.storage.upsert_schedule(h.schedule("k", next_run_at=1))
    expect(await h.storage.claim_due_schedule([]), None, "claim_due_schedule([])")


@case("schedules.huge_name_list")
async def huge_name_list(h: Harness) -> None:
    """10,000 workflow names work."""
    await h.storage.upsert_schedule(h.schedule("k", workflow="wf-9999", next_run_at=1))
    claimed = await h.storage.claim_due_schedule([f"wf-{i}" for i in range(10_000)])
    expect(claimed.schedule.key if claimed else None, "k", "claimed key")


@case("schedules.earliest_first_ties_by_key")
async def earliest_first_ties_by_key(h: Harness) -> None:
    """The earliest due schedule is claimed first; ties broken by key."""
    for key, at in (("c", 5), ("b", 5), ("a", 9), ("d", 1)):
        await h.storage.upsert_schedule(h.schedule(key, every_ms=10**9, next_run_at=at))
    order = [c.schedule.key for c in await _claim_all_due(h)]
    expect(order, ["d", "b", "c", "a"], "claim order")


@case("schedules.cron_roundtrip")
async def cron_roundtrip(h: Harness) -> None:
    """A cron recurrence with a time zone reads back equal."""
    schedule = h.schedule("k", cron="0 9 * * 1-5")
    schedule = msgspec.structs.replace(
        schedule, recurrence=Recurrence(cron="0 9 * * 1-5", timezone="Europe/Paris")
    )
    await h.storage.upsert_schedule(schedule)
    expect(await h.storage.list_schedules(), [schedule], "listed cron schedule")


@case("schedules.unchanged_cron_keeps_cadence")
async def unchanged_cron_keeps_cadence(h: Harness) -> None:
    """Re-upserting the same cron expression keeps next_run_at."""
    await h.storage.upsert_schedule(h.schedule("k", cron="0 9 * * *", next_run_at=1_000))
    stored = await h.storage.upsert_schedule(h.schedule("k", cron="0 9 * * *", next_run_at=5))
    expect(stored.next_run_at, 1_000, "next_run_at kept")


@case("schedules.changed_cron_resets_cadence")
async def changed_cron_resets_cadence(h: Harness) -> None:
    """A changed cron expression takes the supplied next_run_at."""
    await h.storage.upsert_schedule(h.schedule("k", cron="0 9 * * *", next_run_at=1_000))
    stored = await h.storage.upsert_schedule(h.schedule("k", cron="0 10 * * *", next_run_at=5))
    expect((stored.next_run_at, stored.recurrence.cron), (5, "0 10 * * *"), "returned")


@case("schedules.changed_timezone_resets_cadence")
async def changed_timezone_resets_cadence(h: Harness) -> None:
    """Same cron, another time zone: the recurrence changed, so the cadence resets."""
    base = h.schedule("k", cron="0 9 * * *", next_run_at=1_000)
    await h.storage.upsert_schedule(base)
    moved = msgspec.structs.replace(
        base, recurrence=Recurrence(cron="0 9 * * *", timezone="Asia/Tokyo"), next_run_at=5
    )
    stored = await h.storage.upsert_schedule(moved)
    expect((stored.next_run_at, stored.recurrence.timezone), (5, "Asia/Tokyo"), "returned")


@case("schedules.switch_interval_and_cron")
async def switch_interval_and_cron(h: Harness) -> None:
    """Switching between interval and cron replaces the recurrence and resets the cadence."""
    await h.storage.upsert_schedule(h.schedule("k", every_ms=100, next_run_at=1_000))
    stored = await h.storage.upsert_schedule(h.schedule("k", cron="0 9 * * *", next_run_at=5))
    expect(stored.recurrence, Recurrence(cron="0 9 * * *"), "recurrence after switch to cron")
    expect(stored.next_run_at, 5, "next_run_at after switch to cron")
    stored = await h.storage.upsert_schedule(h.schedule("k", every_ms=100, next_run_at=7))
    expect((stored.recurrence, stored.next_run_at), (Recurrence(every_ms=100), 7), "back")


@case("schedules.cron_claim_advances")
async def cron_claim_advances(h: Harness) -> None:
    """'0 9 * * *' due at the next 09:00Z, claimed at 09:01 by the store's clock: reports
    09:00, stores the next day's 09:00."""
    now = datetime.fromtimestamp(h.now() / 1000, tz=UTC)
    nine = now.replace(hour=9, minute=0, second=0, microsecond=0)
    if nine <= now:
        nine += timedelta(days=1)
    due = int(nine.timestamp() * 1000)
    await h.storage.upsert_schedule(h.schedule("k", cron="0 9 * * *", next_run_at=due))
    h.clock.advance_to(due + 60_000)
    claimed = await h.storage.claim_due_schedule(["wf"])
    expect(claimed.slot if claimed else None, due, "claimed slot")
    expect(await _next_run_at(h, "k"), due + 86_400_000, "next_run_at (the next day, 09:00)")


@case("schedules.delete_reports_removal")
async def delete_reports_removal(h: Harness) -> None:
    """delete_schedule is True once, then False; the list is empty."""
    await h.storage.upsert_schedule(h.schedule("k"))
    expect(await h.storage.delete_schedule("k"), True, "first delete")
    expect(await h.storage.delete_schedule("k"), False, "second delete")
    expect(await h.storage.list_schedules(), [], "schedules after delete")


@case("schedules.deleted_not_claimed")
async def deleted_not_claimed(h: Harness) -> None:
    """A deleted schedule never fires."""
    await h.storage.upsert_schedule(h.schedule("k", next_run_at=1))
    await h.storage.delete_schedule("k")
    expect(await h.storage.claim_due_schedule(["wf"]), None, "claim after delete")


@case("schedules.listed_by_key")
async def listed_by_key(h: Harness) -> None:
    """list_schedules is ordered by key (code point order)."""
    for key in ("c", "a", "B", "b", "é"):
        await h.storage.upsert_schedule(h.schedule(key))
    keys = [s.key for s in await h.storage.list_schedules()]
    expect(keys, ["B", "a", "b", "c", "é"], "schedule order")


@case("schedules.upsert_keeps_created_at")
async def upsert_keeps_created_at(h: Harness) -> None:
    """An update keeps the stored created_at even when the cadence resets."""
    await h.storage.upsert_schedule(h.schedule("k", every_ms=100))
    changed = msgspec.structs.replace(h.schedule("k", every_ms=200), created_at=999)
    expect((await h.storage.upsert_schedule(changed)).created_at, 1, "created_at kept")
