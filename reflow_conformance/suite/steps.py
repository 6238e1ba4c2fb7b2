"""Step results: save_step_result (upsert, lease check) and get_step_results."""

from __future__ import annotations

from reflow_conformance.cases import case
from reflow_conformance.harness import ContractViolation, Harness, assert_exact, expect
from reflow_core.errors import StorageError
from reflow_core.types import ErrorInfo, RunStatus, StepStatus


@case("steps.save_and_read")
async def save_and_read(h: Harness) -> None:
    """A saved step reads back with every field exactly."""
    run = await h.create()
    step = h.step(run.id, "fetch", output={"rows": [1, 2]}, attempts=3, created_at=7)
    expect(await h.storage.save_step_result(step), True, "save_step_result without a lease")
    [stored] = await h.storage.get_step_results(run.id)
    expect(stored, step, "stored step")
    assert_exact(stored.output, {"rows": [1, 2]}, "step output")


@case("steps.upsert_by_id")
async def upsert_by_id(h: Harness) -> None:
    """Saving the same id twice (the first not final) leaves one row with the latest content."""
    run = await h.create()
    await h.storage.save_step_result(h.step(run.id, "s", StepStatus.FAILED, created_at=5))
    await h.storage.save_step_result(h.step(run.id, "s", StepStatus.COMPLETED, "ok"))
    rows = await h.storage.get_step_results(run.id)
    expect([(r.status, r.output) for r in rows], [(StepStatus.COMPLETED, "ok")], "rows")


@case("steps.upsert_keeps_created_at")
async def upsert_keeps_created_at(h: Harness) -> None:
    """An update keeps the row's original created_at."""
    run = await h.create()
    await h.storage.save_step_result(h.step(run.id, "s", StepStatus.SLEEPING, created_at=5))
    await h.storage.save_step_result(h.step(run.id, "s", created_at=99))
    [row] = await h.storage.get_step_results(run.id)
    expect((row.created_at, row.status), (5, StepStatus.COMPLETED), "(created_at, status)")


@case("steps.stale_lease_refused")
async def stale_lease_refused(h: Harness) -> None:
    """With a lease that is not held, nothing is saved."""
    claimed = await h.created_and_claimed()
    ok = await h.storage.save_step_result(h.step(claimed.run.id, "s"), "foreign")
    expect(ok, False, "save_step_result with a foreign lease")
    expect(await h.storage.get_step_results(claimed.run.id), [], "steps after refusal")


@case("steps.held_lease_saves")
async def held_lease_saves(h: Harness) -> None:
    """With the held lease, the step is saved and True returned."""
    claimed = await h.created_and_claimed()
    step = h.step(claimed.run.id, "s", output=1)
    expect(await h.storage.save_step_result(step, claimed.lease_id), True, "save with lease")
    expect(await h.storage.get_step_results(claimed.run.id), [step], "steps")


@case("steps.no_lease_saves_always")
async def no_lease_saves_always(h: Harness) -> None:
    """Without a lease there is no lease check: a completed run's new step can be written."""
    claimed = await h.created_and_claimed()
    await h.storage.update_claimed_run_status(claimed.run.id, claimed.lease_id, RunStatus.COMPLETED)
    step = h.step(claimed.run.id, "late")
    expect(await h.storage.save_step_result(step), True, "save without a lease")
    expect(await h.storage.get_step_results(claimed.run.id), [step], "steps")


@case("steps.lease_on_completed_refused")
async def lease_on_completed_refused(h: Harness) -> None:
    """Saving with the lease of a run that completed is refused."""
    claimed = await h.created_and_claimed()
    await h.storage.update_claimed_run_status(claimed.run.id, claimed.lease_id, RunStatus.COMPLETED)
    ok = await h.storage.save_step_result(h.step(claimed.run.id, "s"), claimed.lease_id)
    expect(ok, False, "save with the lease of a completed run")
    expect(await h.storage.get_step_results(claimed.run.id), [], "steps")


@case("steps.empty_for_unknown_run")
async def empty_for_unknown_run(h: Harness) -> None:
    """A run with no steps (or no run at all) has an empty list."""
    run = await h.create()
    expect(await h.storage.get_step_results(run.id), [], "steps of a new run")
    expect(await h.storage.get_step_results("missing"), [], "steps of a missing run")


@case("steps.ordered_by_created_at_then_id")
async def ordered_by_created_at_then_id(h: Harness) -> None:
    """Rows come back by (created_at, id), not by insertion order."""
    run = await h.create()
    for name, created in (("c", 3), ("b2", 2), ("a", 1), ("b1", 2)):
        await h.storage.save_step_result(h.step(run.id, name, created_at=created))
    rows = await h.storage.get_step_results(run.id)
    expect([r.name for r in rows], ["a", "b1", "b2", "c"], "step order")


@case("steps.isolated_per_run")
async def isolated_per_run(h: Harness) -> None:
    """Steps of one run never appear for another."""
    a, b = await h.create(), await h.create()
    await h.storage.save_step_result(h.step(a.id, "s"))
    expect(await h.storage.get_step_results(b.id), [], "steps of the other run")


@case("steps.run_and_name_unique")
async def run_and_name_unique(h: Harness) -> None:
    """A different id for an existing (run_id, name) is a StorageError; the row is kept."""
    run = await h.create()
    original = h.step(run.id, "s", output="first", id="id-1")
    await h.storage.save_step_result(original)
    try:
        await h.storage.save_step_result(h.step(run.id, "s", output="second", id="id-2"))
    except StorageError:
        pass
    else:
        raise ContractViolation("a second id for (run_id, name)", "StorageError", "no error")
    expect(await h.storage.get_step_results(run.id), [original], "rows after the refusal")


@case("steps.every_status_roundtrips")
async def every_status_roundtrips(h: Harness) -> None:
    """Each StepStatus is stored and read back as that member."""
    run = await h.create()
    for index, status in enumerate(StepStatus):
        await h.storage.save_step_result(h.step(run.id, f"s{index}", status, created_at=index))
    rows = await h.storage.get_step_results(run.id)
    expect([r.status for r in rows], list(StepStatus), "statuses")
    expect({type(r.status) for r in rows}, {StepStatus}, "status types")


@case("steps.error_and_wake_roundtrip")
async def error_and_wake_roundtrip(h: Harness) -> None:
    """error (ErrorInfo, all fields) and wake_at are stored exactly."""
    run = await h.create()
    error = ErrorInfo(type="x.Err", message="m\n✓", code="C", traceback="tb", step="s")
    failed = h.step(run.id, "f", StepStatus.FAILED, error=error, created_at=1)
    waiting = h.step(run.id, "w", StepStatus.WAITING, wake_at=123_456_789_012, created_at=2)
    await h.storage.save_step_result(failed)
    await h.storage.save_step_result(waiting)
    expect(await h.storage.get_step_results(run.id), [failed, waiting], "steps")


@case("steps.large_output")
async def large_output(h: Harness) -> None:
    """A ~5 MB step output round-trips exactly."""
    run = await h.create()
    output = [{"i": i, "s": "é" * 20} for i in range(100_000)]
    await h.storage.save_step_result(h.step(run.id, "big", output=output))
    [row] = await h.storage.get_step_results(run.id)
    assert_exact(row.output, output, "5 MB step output")


@case("steps.unicode_names")
async def unicode_names(h: Harness) -> None:
    """Unicode step names and ids are stored exactly."""
    run = await h.create()
    step = h.step(run.id, "étape-🚀-\u00e9\u0301", id="ïd-✓")
    await h.storage.save_step_result(step)
    expect(await h.storage.get_step_results(run.id), [step], "unicode step")
