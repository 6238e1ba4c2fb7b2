"""Runs: create_run, get_run and idempotency keys."""

from __future__ import annotations

from reflow_conformance.cases import case
from reflow_conformance.harness import Harness, assert_exact, expect
from reflow_core.types import RunFilter, RunStatus


@case("runs.create_reports_created")
async def create_reports_created(h: Harness) -> None:
    """A fresh run is stored with created=True and reads back pending, as given."""
    run = h.new_run("wf", {"n": 1}, created_at=1_000)
    result = await h.storage.create_run(run)
    expect(result.created, True, "create_run(...).created")
    expect(result.run.id, run.id, "create_run(...).run.id")
    stored = await h.get(run.id)
    expect(stored.status, RunStatus.PENDING, "status of a new run")
    expect(
        (stored.workflow, stored.created_at, stored.attempt, stored.idempotency_key),
        ("wf", 1_000, 0, None),
        "(workflow, created_at, attempt, idempotency_key) of a new run",
    )
    expect((stored.output, stored.error, stored.wake_at), (None, None, None), "empty fields")
    assert_exact(stored.input, {"n": 1}, "run input")


@case("runs.get_missing_is_none")
async def get_missing_is_none(h: Harness) -> None:
    """get_run of an unknown id is None."""
    expect(await h.storage.get_run("missing"), None, "get_run('missing')")


@case("runs.input_roundtrip")
async def input_roundtrip(h: Harness) -> None:
    """A nested input (dict, list, str, int, float, bool, None) reads back exactly."""
    value = {"a": [1, 2.5, "x", True, None], "b": {"c": {"d": []}}, "e": "", "f": -7}
    run = await h.create("wf", value)
    assert_exact((await h.get(run.id)).input, value, "get_run input")
    assert_exact(run.input, value, "create_run(...).run.input")


@case("runs.idempotency_returns_existing")
async def idempotency_returns_existing(h: Harness) -> None:
    """A reused key returns the first run with created=False and stores nothing new."""
    first = await h.create("wf", {"v": 1}, idempotency_key="k")
    second = h.new_run("wf", {"v": 2}, idempotency_key="k")
    result = await h.storage.create_run(second)
    expect(result.created, False, "created for a reused idempotency key")
    expect(result.run.id, first.id, "run returned for a reused key")
    assert_exact(result.run.input, {"v": 1}, "input of the returned (existing) run")
    expect(await h.storage.get_run(second.id), None, "the second run must not be stored")
    expect(len(await h.storage.list_runs(RunFilter())), 1, "number of stored runs")


@case("runs.idempotency_scoped_per_workflow")
async def idempotency_scoped_per_workflow(h: Harness) -> None:
    """The same key under another workflow creates a new run."""
    first = await h.create("a", idempotency_key="k")
    second = await h.create("b", idempotency_key="k")
    expect(second.id != first.id, True, "a distinct run for another workflow")


@case("runs.idempotency_any_status")
async def idempotency_any_status(h: Harness) -> None:
    """A key stays taken whatever the run's status (running, completed, cancelled)."""
    run = await h.create("wf", idempotency_key="k")
    claimed = await h.claim(run.id)
    again = await h.storage.create_run(h.new_run("wf", idempotency_key="k"))
    expect((again.created, again.run.id), (False, run.id), "reuse while running")
    await h.storage.update_claimed_run_status(run.id, claimed.lease_id, RunStatus.COMPLETED)
    again = await h.storage.create_run(h.new_run("wf", idempotency_key="k"))
    expect((again.created, again.run.id), (False, run.id), "reuse once completed")
    expect(again.run.status, RunStatus.COMPLETED, "status of the returned run")


@case("runs.no_key_never_deduplicates")
async def no_key_never_deduplicates(h: Harness) -> None:
    """Without a key, identical runs are distinct runs."""
    for _ in range(3):
        await h.create("wf", {"same": True})
    expect(len(await h.storage.list_runs(RunFilter())), 3, "runs stored without a key")


@case("runs.unicode_names_and_ids")
async def unicode_names_and_ids(h: Harness) -> None:
    """Unicode ids, workflow names and keys are stored, found and claimed exactly."""
    workflow = "flux-é-∑-日本-🚀"
    run = await h.create(workflow, "ß", id="run-ü-ñ-🌍-\u200b", idempotency_key="clé-🔑")
    stored = await h.get(run.id)
    expect((stored.workflow, stored.idempotency_key), (workflow, "clé-🔑"), "unicode fields")
    again = await h.storage.create_run(h.new_run(workflow, idempotency_key="clé-🔑"))
    expect((again.created, again.run.id), (False, run.id), "unicode key deduplicates")
    listed = await h.storage.list_runs(RunFilter(workflow=workflow))
    expect([r.id for r in listed], [run.id], "list_runs by unicode workflow")
    await h.claim(run.id, (workflow,))


@case("runs.large_input")
async def large_input(h: Harness) -> None:
    """A ~5 MB input (long string and a long list) round-trips exactly."""
    value = {"blob": "x🚀" * 1_000_000, "items": list(range(200_000))}
    run = await h.create("wf", value)
    assert_exact((await h.get(run.id)).input, value, "5 MB input")


@case("runs.created_at_preserved")
async def created_at_preserved(h: Harness) -> None:
    """created_at is stored as given (ordering and paging are defined on it)."""
    run = await h.create("wf", created_at=42)
    expect((await h.get(run.id)).created_at, 42, "stored created_at")


@case("runs.distinct_runs_isolated")
async def distinct_runs_isolated(h: Harness) -> None:
    """Writing one run never changes another."""
    a = await h.create("wf", "a", created_at=1)
    b = await h.create("wf", "b", created_at=2)
    before = await h.get(b.id)
    claimed = await h.claim(a.id)
    await h.storage.update_claimed_run_status(a.id, claimed.lease_id, RunStatus.COMPLETED)
    expect(await h.get(b.id), before, "the other run")
