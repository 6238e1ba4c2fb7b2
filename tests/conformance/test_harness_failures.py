"""What a failure shows: the case's own line, a diff for "unchanged", the model's steps.

* A contract violation points at the line of the case that called ``expect()`` /
  ``assert_exact()`` (or a harness helper such as ``h.claim``), never at the helper: in the
  runner's report (``location``) and in pytest's failure text.
* ``expect_unchanged`` shows only what differs between the two snapshots.
* Under pytest, a state-machine failure shows Hypothesis' shortest failing sequence of
  calls (it travels as exception notes, which the plugin used to drop).
"""

from __future__ import annotations

import asyncio
import linecache
from pathlib import Path
from typing import Any

import pytest

import reflow_conformance
from reflow_adapters.memory import MemoryStorage
from reflow_conformance import differential
from reflow_conformance.harness import ContractViolation, Harness
from reflow_conformance.report import Outcome, render_table
from reflow_conformance.runner import run_spec
from reflow_core import AdapterSpec
from reflow_core.errors import SerializationError
from reflow_core.types import ClaimedRun, RunStatus

KIT = Path(reflow_conformance.__file__).resolve().parent


def _spec(cls: type[MemoryStorage], name: str = "broken") -> AdapterSpec:
    return AdapterSpec(
        name=name,
        factory=lambda url=None, clock=None: cls(clock=clock),
        conformance_factory=lambda tmp_path, options, clock=None: cls(clock=clock),
    )


def _source(location: str) -> tuple[Path, str]:
    file, _, line = location.rpartition(":")
    path = KIT.parent / file
    return path, linecache.getline(str(path), int(line)).strip()


class NoLeaseOnSave(MemoryStorage):
    async def save_step_result(self, result, lease_id=None):  # type: ignore[no-untyped-def]
        return await super().save_step_result(result, None)


class ClaimsNothing(MemoryStorage):
    async def claim_next_run(self, workflow_names, *, lease_ms, holder=None):  # type: ignore[no-untyped-def]
        return None


# -- the case's line ----------------------------------------------------------------------


def test_report_locates_the_expect_call_in_the_case() -> None:
    report = run_spec(_spec(NoLeaseOnSave), select="leases.fencing_save_step_result")
    [item] = report.cases
    assert item.outcome is Outcome.FAILED
    assert item.location.startswith("reflow_conformance/suite/leases.py:"), item.location
    path, source = _source(item.location)
    assert path.is_file()
    assert source.startswith("expect("), source
    assert f"at {item.location}" in item.reason
    assert source in item.reason  # the line itself is quoted under the location
    assert "harness.py" not in item.reason


def test_failures_raised_inside_harness_helpers_point_at_the_calling_case_line() -> None:
    # h.claim(...) raises the violation inside the harness; the location is the case line
    # that called it.
    report = run_spec(_spec(ClaimsNothing), select="claim,leases")
    failed = [c for c in report.cases if c.outcome is Outcome.FAILED]
    assert len(failed) > 10, render_table(report)
    for item in failed:
        assert item.location.startswith("reflow_conformance/suite/"), (item.id, item.location)
        assert "harness.py" not in item.location
    helpers = [c for c in failed if "h.claim(" in _source(c.location)[1]]
    assert helpers, "some failures come from the h.claim helper"


def test_table_shows_the_location() -> None:
    report = run_spec(_spec(NoLeaseOnSave), select="leases.fencing_save_step_result")
    assert "reflow_conformance/suite/leases.py:" in render_table(report)


BROKEN_CONFTEST = """
from reflow_adapters.memory import MemoryStorage
from reflow_core import AdapterSpec
from reflow_core.registry import register_adapter, unregister_adapter


class HeartbeatAlwaysTrue(MemoryStorage):
    async def heartbeat_run(self, run_id, lease_id):
        await super().heartbeat_run(run_id, lease_id)
        return True


class RaisesOnHeartbeat(MemoryStorage):
    async def heartbeat_run(self, run_id, lease_id):
        raise RuntimeError("driver exploded")


for name, cls in (("broken-heartbeat", HeartbeatAlwaysTrue), ("raw-error", RaisesOnHeartbeat)):
    register_adapter(AdapterSpec(
        name=name, factory=lambda url=None, cls=cls, **o: cls(),
        conformance_factory=lambda tmp_path, options, clock=None, cls=cls: cls(clock=clock),
    ))


def pytest_unconfigure(config):
    unregister_adapter("broken-heartbeat")
    unregister_adapter("raw-error")
"""


def test_pytest_failure_points_at_the_case_line(pytester: pytest.Pytester) -> None:
    # The case's own expect() (differential checking off: it would answer first).
    pytester.makeconftest(BROKEN_CONFTEST)
    result = pytester.runpytest(
        "--reflow-adapter=broken-heartbeat",
        "--reflow-select=leases.fencing_heartbeat_run",
        "--reflow-differential=off",
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "heartbeat_run with the old lease",
            "  expected: False",
            "  got:      True",
            "  at reflow_conformance/suite/leases.py:*",
            "    expect(await write(h, old.run.id, old.lease_id), False, *",
        ]
    )
    assert "harness.py" not in result.stdout.str()


def test_pytest_differential_failure_points_at_the_case_line(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(BROKEN_CONFTEST)
    result = pytester.runpytest(
        "--reflow-adapter=broken-heartbeat", "--reflow-select=leases.fencing_heartbeat_run"
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "differential check: handle 1.heartbeat_run(*) answered otherwise than the "
            "reference model:",
            "    - answer = False",
            "    + answer = True",
            "  calls so far on this store:",
            "    1. handle 1.create_run(*",
            "  at reflow_conformance/suite/leases.py:*",
        ]
    )
    assert "harness.py" not in result.stdout.str()
    assert "differential.py" not in result.stdout.str()


def test_pytest_traceback_of_an_unexpected_error_hides_helper_frames(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeconftest(BROKEN_CONFTEST)
    result = pytester.runpytest(
        "--reflow-adapter=raw-error", "--reflow-select=leases.heartbeat_keeps_run_live"
    )
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "RuntimeError: driver exploded" in out
    assert "at reflow_conformance/suite/leases.py:" in out
    # The traceback starts at the case and skips the runner and harness plumbing.
    assert "runner.py" not in out and "harness.py" not in out, out


# -- "unchanged": a diff, not two dumps ---------------------------------------------------


def _harness() -> tuple[Harness, asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    harness = Harness(_spec(MemoryStorage, "memory-test"), {}, Path("."), loop)
    loop.run_until_complete(harness.setup())
    return harness, loop


def test_expect_unchanged_shows_only_the_fields_that_changed() -> None:
    h, loop = _harness()

    async def scenario() -> str:
        claimed: ClaimedRun = await h.created_and_claimed("wf", {"big": "x" * 500})
        await h.storage.save_step_result(h.step(claimed.run.id, "s", output=[1, 2]))
        await h.storage.upsert_schedule(h.schedule("k"))
        before = await h.snapshot([claimed.run.id])
        await h.storage.update_run_status(claimed.run.id, RunStatus.CANCELLED)
        with pytest.raises(ContractViolation) as caught:
            await h.expect_unchanged(before, [claimed.run.id], "after the refused write")
        return str(caught.value)

    try:
        message = loop.run_until_complete(scenario())
    finally:
        loop.run_until_complete(h.close_all())
        loop.close()
    lines = message.splitlines()
    assert lines[0].startswith("after the refused write: storage must be unchanged")
    assert "--- before" in message and "+++ after" in message
    removed = [line.strip() for line in lines if line.strip().startswith("- get_run(")]
    added = [line.strip() for line in lines if line.strip().startswith("+ get_run(")]
    assert any(line.endswith(".status = 'running'") for line in removed), message
    assert any(line.endswith(".status = 'cancelled'") for line in added), message
    # Only what changed: not the input, not the step rows, not the schedule, no full dumps;
    # list_runs() agrees with get_run(), so the change is not shown twice.
    assert "xxxxxxxx" not in message
    assert "list_runs" not in message
    assert "get_step_results" not in message
    assert "list_schedules" not in message
    assert "WorkflowRun(" not in message
    assert len(lines) < 30


def test_expect_unchanged_passes_when_nothing_changed() -> None:
    h, loop = _harness()

    async def scenario() -> None:
        run = await h.create("wf", 1)
        before = await h.snapshot([run.id])
        await h.expect_unchanged(before, [run.id], "nothing happened")

    try:
        loop.run_until_complete(scenario())
    finally:
        loop.run_until_complete(h.close_all())
        loop.close()


class FailsRunOnRejectedOutput(MemoryStorage):
    """Writes before encoding: a rejected output still fails the run."""

    async def update_claimed_run_status(self, run_id, lease_id, status, **kwargs: Any):  # type: ignore[no-untyped-def]
        try:
            return await super().update_claimed_run_status(run_id, lease_id, status, **kwargs)
        except SerializationError:
            await self.update_run_status(run_id, RunStatus.FAILED)
            raise


def test_unchanged_failure_in_a_case_is_a_diff() -> None:
    # The case's own expect_unchanged (differential checking off: it would answer first).
    differential.set_mode("off")
    try:
        report = run_spec(_spec(FailsRunOnRejectedOutput), select="values.reject_run_output")
    finally:
        differential.set_mode(None)
    [item] = report.cases
    assert item.outcome is Outcome.FAILED, render_table(report)
    assert "storage must be unchanged, but it changed (- before, + after):" in item.reason
    assert ".status = 'running'" in item.reason and ".status = 'failed'" in item.reason
    assert "expected: (" not in item.reason  # the old message: two full snapshots
    assert item.location.startswith("reflow_conformance/suite/values.py:")


def test_a_call_that_raises_after_writing_is_caught_by_the_differential_check() -> None:
    report = run_spec(_spec(FailsRunOnRejectedOutput), select="values.reject_run_output")
    [item] = report.cases
    assert item.outcome is Outcome.FAILED, render_table(report)
    assert "update_claimed_run_status(" in item.reason
    assert "(which raised), the state read through handle 1 differs" in item.reason
    assert "- get_run(" in item.reason and ".status = 'running'" in item.reason
    assert "+ get_run(" in item.reason and ".status = 'failed'" in item.reason
    assert item.location.startswith("reflow_conformance/suite/values.py:")


# -- the model's shortest failing sequence, under pytest ----------------------------------


def test_pytest_shows_the_state_machine_steps_and_the_seed(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(BROKEN_CONFTEST)
    result = pytester.runpytest(
        "--reflow-adapter=broken-heartbeat",
        "--reflow-select=model.state_machine",
        "--reflow-seed=1",
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "differential check: handle 1.heartbeat_run(*) answered otherwise than the "
            "reference model:",
            "    - answer = False",
            "    + answer = True",
            "  at reflow_conformance/suite/model.py:*",
            "*state = ContractMachine()*",
            "*state.claim(*",
            "*state.heartbeat(*",
            "Hypothesis seed 1: replay with: pytest --reflow-adapter=broken-heartbeat "
            "--reflow-select=model.state_machine --reflow-seed=1",
        ]
    )
