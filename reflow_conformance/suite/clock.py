"""The store's clock: ``now()``, and every lease expiry judged by it alone.

The kit's clock is the store's "now" (the conformance factory's ``clock=``), so these
cases put a lease exactly one millisecond before its expiry and exactly at it. A run is
stale when ``lease_expires_at <= now``: its holder's own lease length, stored at the
claim and renewed by each heartbeat, decides, never the lease length of whoever tries
to claim it, nor anybody's wall clock.
"""

from __future__ import annotations

from reflow_conformance.cases import case
from reflow_conformance.harness import FAR, KIT_HOLDER, LEASE_MS, Harness, expect
from reflow_core.types import LeaseHolder, RunStatus

SHORT = 1
"""The shortest lease a claimer may ask for: a claimer judging staleness by its own
lease length would see every run as stale after one millisecond."""

OTHER = LeaseHolder(worker="kit-worker-2", host="kit-host-2.example", pid=99)


@case("clock.now_is_injected")
async def now_is_injected(h: Harness) -> None:
    """now() is the injected clock, an int in epoch milliseconds, and follows it when moved."""
    for step in (0, 1, 999, LEASE_MS, FAR):
        h.advance(step)
        got = await h.storage.now()
        expect(type(got), int, "type of now()")
        expect(got, h.now(), f"now() after advancing the kit clock by {step} ms")


@case("clock.now_monotonic")
async def now_monotonic(h: Harness) -> None:
    """Successive now() readings never decrease, with writes and clock moves in between."""
    last = await h.storage.now()
    run = await h.create()
    for index in range(30):
        if index % 3 == 0:
            h.advance(index)
        await h.storage.deliver_event(run.id, "ev", index)
        got = await h.storage.now()
        expect(got >= last, True, f"now() went from {last} to {got}")
        expect(got, h.now(), "now() equals the kit clock")
        last = got


@case("clock.not_stale_before_expiry")
async def not_stale_before_expiry(h: Harness) -> None:
    """One millisecond before lease_expires_at the run is not claimable, and nothing about
    it changes."""
    claimed = await h.created_and_claimed(lease_ms=12_345)
    h.advance(12_344)
    before = await h.snapshot([claimed.run.id])
    expect(await h.claim_any(["wf"]), None, "claim 1 ms before the lease expires")
    await h.expect_unchanged(before, [claimed.run.id], "after a claim of a live run")
    expect(await h.storage.heartbeat_run(claimed.run.id, claimed.lease_id), True, "still held")


@case("clock.stale_at_expiry")
async def stale_at_expiry(h: Harness) -> None:
    """At exactly lease_expires_at (claim time + the holder's lease_ms) the run is taken
    over: new lease, attempt 2, one recovery, the new claim's own lease fields."""
    first = await h.created_and_claimed(lease_ms=12_345)
    start = h.now()
    h.advance(12_345)
    second = await h.claim(first.run.id, lease_ms=4_321, holder=OTHER)
    expect(second.lease_id != first.lease_id, True, "a new lease on takeover")
    now = start + 12_345
    for label, seen in (("returned", second.run), ("stored", await h.get(first.run.id))):
        expect(
            (seen.status, seen.attempt, seen.recoveries),
            (RunStatus.RUNNING, 2, 1),
            f"{label} (status, attempt, recoveries) after a takeover",
        )
        expect(
            (seen.claimed_at, seen.heartbeat_at, seen.lease_ms, seen.lease_expires_at),
            (now, now, 4_321, now + 4_321),
            f"{label} (claimed_at, heartbeat_at, lease_ms, lease_expires_at) of the takeover",
        )
        expect(seen.holder, OTHER, f"{label} holder after the takeover")


@case("clock.long_lease_survives_short_claimers")
async def long_lease_survives_short_claimers(h: Harness) -> None:
    """A run claimed with a long lease is never taken by claimers asking for short leases
    before its own expiry (a claimer's lease length never decides another's staleness)."""
    long = 600_000
    claimed = await h.created_and_claimed(lease_ms=long)
    elapsed = 0
    for step in (SHORT, 1_000, LEASE_MS, 100_000, 478_998):
        h.advance(step)
        elapsed += step
        for lease_ms in (SHORT, 10, LEASE_MS):
            got = await h.claim_any(["wf"], lease_ms=lease_ms, holder=OTHER)
            expect(
                got.run.id if got else None,
                None,
                f"claim with lease_ms={lease_ms}, {elapsed} ms into a {long} ms lease",
            )
    h.advance(long - elapsed)
    taken = await h.claim(claimed.run.id, lease_ms=SHORT, holder=OTHER)
    expect(taken.run.recoveries, 1, "recoveries after the takeover at the long lease's expiry")


@case("clock.short_lease_expires_for_long_claimers")
async def short_lease_expires_for_long_claimers(h: Harness) -> None:
    """A run claimed with a short lease is taken at its own expiry by a claimer asking for
    a much longer lease (the stored lease length decides, not the claimer's)."""
    claimed = await h.created_and_claimed(lease_ms=1_000)
    h.advance(999)
    expect(await h.claim_any(["wf"], lease_ms=600_000), None, "claim 1 ms before expiry")
    h.advance(1)
    taken = await h.claim(claimed.run.id, lease_ms=600_000, holder=OTHER)
    expect(taken.run.lease_expires_at, h.now() + 600_000, "the new holder's lease_expires_at")


@case("clock.heartbeat_extends_by_stored_lease")
async def heartbeat_extends_by_stored_lease(h: Harness) -> None:
    """A heartbeat moves the expiry to now + the holder's stored lease_ms: not stale one
    millisecond before that, stale at it (whatever lease other claimers use)."""
    claimed = await h.created_and_claimed(lease_ms=12_345)
    # Another workflow's run, claimed with another lease length, in between.
    await h.created_and_claimed("other", lease_ms=777)
    h.advance(6_000)
    expect(await h.storage.heartbeat_run(claimed.run.id, claimed.lease_id), True, "heartbeat")
    beat = h.now()
    h.advance(12_344)
    for lease_ms in (SHORT, 777, LEASE_MS):
        got = await h.claim_any(["wf"], lease_ms=lease_ms)
        expect(
            got.run.id if got else None,
            None,
            f"claim (lease_ms={lease_ms}) 1 ms before the renewed expiry {beat + 12_345}",
        )
    h.advance(1)
    await h.claim(claimed.run.id)


@case("clock.heartbeat_fields_after_renewal")
async def heartbeat_fields_after_renewal(h: Harness) -> None:
    """After a heartbeat: heartbeat_at = now, lease_expires_at = now + lease_ms; claimed_at,
    lease_ms, holder, attempt and updated_at unchanged."""
    claimed = await h.created_and_claimed(lease_ms=12_345)
    start = h.now()
    after_claim = await h.get(claimed.run.id)
    for step in (4_321, 10_000):
        h.advance(step)
        expect(await h.storage.heartbeat_run(claimed.run.id, claimed.lease_id), True, "heartbeat")
        now = h.now()
        stored = await h.get(claimed.run.id)
        expect(
            (stored.heartbeat_at, stored.lease_expires_at),
            (now, now + 12_345),
            f"(heartbeat_at, lease_expires_at) after a heartbeat at {now}",
        )
        expect(
            (stored.claimed_at, stored.lease_ms, stored.holder, stored.attempt),
            (start, 12_345, KIT_HOLDER, 1),
            "(claimed_at, lease_ms, holder, attempt) after a heartbeat",
        )
        expect(stored.updated_at, after_claim.updated_at, "updated_at (a heartbeat keeps it)")
        expect(stored.status, RunStatus.RUNNING, "status after a heartbeat")


@case("clock.expired_lease_renewable")
async def expired_lease_renewable(h: Harness) -> None:
    """A lease that expired but was not yet taken over is still held: a heartbeat renews
    it (True) for a full lease_ms from now, and the run is not stale again until then."""
    claimed = await h.created_and_claimed(lease_ms=1_000)
    h.advance(5_000)
    expect(await h.storage.heartbeat_run(claimed.run.id, claimed.lease_id), True, "heartbeat")
    expect(await h.claim_any(["wf"]), None, "claim right after the renewal")
    h.advance(999)
    expect(await h.claim_any(["wf"]), None, "claim 1 ms before the renewed expiry")
    h.advance(1)
    await h.claim(claimed.run.id)
