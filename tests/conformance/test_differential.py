"""The differential backbone catches faults that only the complete state shows.

Each adapter below is a built-in adapter with one fault that no case's own assertions
look for: a write that also changes another run's row, an upsert that keeps an old
field, a listing that drops fields of running runs, a read cache that another handle's
writes do not invalidate. With differential checking off, the case that meets the fault
passes; with it on (the default), the same case fails at the case's own line, naming the
call, the calls before it and the fields that differ.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import pytest

from reflow_adapters.memory import MemoryStorage
from reflow_adapters.sqlite import SQLiteStorage
from reflow_adapters.sqlite_common.url import storage_arguments
from reflow_conformance import differential, render_table, run_spec
from reflow_conformance.harness import SHARING
from reflow_conformance.report import Outcome, Report
from reflow_core import AdapterSpec
from reflow_core.registry import register_adapter, unregister_adapter
from reflow_core.types import RunFilter, RunStatus, Schedule, WorkflowRun


class SleepStampsTheWorkflow(MemoryStorage):
    """``UPDATE runs SET wake_at = ? WHERE workflow = ? AND status IN ('running', ...)``:
    the sleep's second statement is keyed on the workflow, not the run, so every other
    running run of the workflow gets a ``wake_at`` too. Claims judge a running run by its
    lease alone, so nothing the engine does changes; only the complete state shows it."""

    async def sleep_run(self, run_id: str, lease_id: str, wake_at: int) -> bool:
        done = await super().sleep_run(run_id, lease_id, wake_at)
        if done:
            workflow = self._runs[run_id].workflow
            for row in self._runs.values():
                if row.workflow == workflow and row.status is RunStatus.RUNNING:
                    row.wake_at = wake_at
        return done


class UpsertKeepsOldInput(MemoryStorage):
    """``ON CONFLICT (key) DO UPDATE`` that sets every column but ``input``, while the
    answer is built from the arguments (not ``RETURNING``): the caller is told the new
    input, the store keeps the old one."""

    async def upsert_schedule(self, schedule: Schedule) -> Schedule:
        old = next((s for s in await self.list_schedules() if s.key == schedule.key), None)
        answer = await super().upsert_schedule(schedule)
        if old is not None:
            await super().upsert_schedule(_with_input(answer, old.input))
        return answer


def _with_input(schedule: Schedule, value: Any) -> Schedule:
    import msgspec

    return msgspec.structs.replace(schedule, input=value)


class ListingDropsLeaseFields(MemoryStorage):
    """A listing query that selects the lease columns only for pending runs (where they
    are empty anyway): listed running runs lose ``holder`` and ``claimed_at``."""

    async def list_runs(self, filter: RunFilter) -> list[WorkflowRun]:
        import msgspec

        return [
            msgspec.structs.replace(run, holder=None, claimed_at=None)
            if run.status is RunStatus.RUNNING
            else run
            for run in await super().list_runs(filter)
        ]


class CachingSQLite(SQLiteStorage):
    """Caches ``get_run`` answers per handle and forgets them only on its own writes: a
    second handle's claim leaves the first one reading the run as it was."""

    scheme = "cachingsqlite"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._cache: dict[str, WorkflowRun | None] = {}

    async def get_run(self, run_id: str) -> WorkflowRun | None:
        if run_id not in self._cache:
            self._cache[run_id] = await super().get_run(run_id)
        return self._cache[run_id]

    async def create_run(self, run: WorkflowRun) -> Any:
        self._cache.clear()
        return await super().create_run(run)

    async def claim_next_run(self, workflow_names: Collection[str], **kwargs: Any) -> Any:
        self._cache.clear()
        return await super().claim_next_run(workflow_names, **kwargs)


def _memory_spec(adapter: type[MemoryStorage], name: str) -> AdapterSpec:
    return AdapterSpec(
        name=name,
        factory=lambda url=None, clock=None: adapter(clock=clock),
        conformance_factory=lambda tmp_path, options, clock=None: adapter(clock=clock),
    )


def _caching(url: str | None = None, **options: Any) -> CachingSQLite:
    path, arguments = storage_arguments(url, "cachingsqlite", options)
    return CachingSQLite(path, **arguments)


@pytest.fixture
def caching_spec() -> Iterator[AdapterSpec]:
    spec = AdapterSpec(
        name="caching-sqlite",
        factory=_caching,
        schemes=("cachingsqlite",),
        capabilities=SHARING,
        conformance_factory=lambda tmp_path, options, clock=None: CachingSQLite(
            Path(tmp_path) / "caching.db", clock=clock
        ),
    )
    register_adapter(spec)
    try:
        yield spec
    finally:
        unregister_adapter(spec.name)


def _run(spec: AdapterSpec, select: str, mode: str) -> Report:
    differential.set_mode(mode)
    try:
        return run_spec(spec, select=select, seed=1)
    finally:
        differential.set_mode(None)


def _failure(report: Report, case_id: str) -> tuple[str, str]:
    [item] = [c for c in report.cases if c.id == case_id]
    assert item.outcome is Outcome.FAILED, render_table(report)
    return item.reason, item.location


def test_a_write_that_also_changes_another_run_is_caught() -> None:
    spec = _memory_spec(SleepStampsTheWorkflow, "sleep-stamps-workflow")
    case_id = "events.deliver_keeps_other_statuses"
    assert _run(spec, case_id, "off").ok  # no assertion of the case looks there
    reason, location = _failure(_run(spec, case_id, "full"), case_id)
    assert location.startswith("reflow_conformance/suite/events.py:"), location
    assert "differential check: after handle 1.sleep_run(" in reason
    # Only the other run's field is shown, as model (-) against adapter (+).
    assert "- get_run('run-00002-" in reason and ").wake_at = None" in reason
    assert "+ get_run('run-00002-" in reason
    assert "list_runs(status='running')" in reason
    # The calls that led there, oldest first.
    assert "1. handle 1.create_run(" in reason and "2. handle 1.claim_next_run(" in reason


def test_an_upsert_that_keeps_an_old_field_is_caught_where_it_happens() -> None:
    spec = _memory_spec(UpsertKeepsOldInput, "upsert-keeps-input")
    case_id = "schedules.unchanged_interval_keeps_cadence"
    reason, location = _failure(_run(spec, case_id, "full"), case_id)
    assert location.startswith("reflow_conformance/suite/schedules.py:"), location
    assert "after handle 1.upsert_schedule(<schedule 'k'>)" in reason
    assert "- list_schedules()['k'].input = 2" in reason
    assert "+ list_schedules()['k'].input = 1" in reason


def test_a_listing_that_drops_fields_of_running_runs_is_caught() -> None:
    spec = _memory_spec(ListingDropsLeaseFields, "listing-drops-lease")
    case_id = "claim.marks_running_with_lease"
    assert _run(spec, case_id, "off").ok
    reason, _ = _failure(_run(spec, case_id, "full"), case_id)
    assert "after handle 1.claim_next_run(" in reason
    assert "+ list_runs(status='running')[" in reason and "].holder = None" in reason
    assert "get_run(" not in reason  # get_run is right: only the listings differ


def test_a_read_cache_that_misses_another_handles_write_is_caught(
    caching_spec: AdapterSpec,
) -> None:
    case_id = "lifecycle.second_handle_sees_writes"
    assert _run(caching_spec, case_id, "off").ok
    reason, location = _failure(_run(caching_spec, case_id, "full"), case_id)
    assert location.startswith("reflow_conformance/suite/lifecycle.py:"), location
    assert "after handle 2.claim_next_run(" in reason
    assert "the state read through handle 1 differs" in reason
    assert "- get_run('run-00002-" in reason and ").status = 'running'" in reason
    assert "+ get_run('run-00002-" in reason and ").status = 'pending'" in reason


def test_intact_adapters_pass_the_differential_exploration() -> None:
    from reflow_conformance.runner import load_spec

    for name in ("memory", "sqlite"):
        report = run_spec(load_spec(name), select="model", seed=3)
        assert report.ok, render_table(report)


def test_opting_out_and_switching_off() -> None:
    def plain(h: Any) -> None:
        del h

    @differential.opt_out("drives a clock the model cannot read")
    def marked(h: Any) -> None:
        del h

    assert differential.opt_out_reason("x.plain", plain, race=False) is None
    assert differential.opt_out_reason("x.marked", marked, race=False) == (
        "drives a clock the model cannot read"
    )
    assert "race case" in (differential.opt_out_reason("x.race", plain, race=True) or "")
    differential.set_mode("off")
    try:
        assert "off" in (differential.opt_out_reason("x.plain", plain, race=False) or "")
    finally:
        differential.set_mode(None)
    with pytest.raises(ValueError, match="needs a reason"):
        differential.opt_out(" ")
    with pytest.raises(ValueError, match="'full' or 'off'"):
        differential.set_mode("fast")


def test_plugin_option_turns_it_off(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest(
        "--reflow-adapter=memory",
        "--reflow-select=claim.oldest_first",
        "--reflow-differential=off",
    )
    assert result.ret == pytest.ExitCode.OK
    assert differential.checking_enabled()  # the session's choice does not leak
    bad = pytester.runpytest("--reflow-adapter=memory", "--reflow-differential=fast")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR


class ForgetsSleepersEvents(MemoryStorage):
    """Answers ``True`` to a delivery for a sleeping run but stores nothing (a buffer
    insert guarded by the wrong status list)."""

    async def deliver_event(
        self, run_id: str, event_name: str, payload: Any, *, key: str | None = None
    ) -> bool:
        row = self._runs.get(run_id)
        if row is not None and row.status is RunStatus.SLEEPING:
            return True
        return await super().deliver_event(run_id, event_name, payload, key=key)


def test_events_left_buffered_are_taken_and_compared_when_the_case_ends(
    tmp_path: Path,
) -> None:
    import asyncio

    from reflow_conformance import select_cases
    from reflow_conformance.harness import Harness

    [case] = select_cases("claim.oldest_first")
    loop = asyncio.new_event_loop()
    h = Harness(_memory_spec(ForgetsSleepersEvents, "forgets"), {}, tmp_path, loop, case=case)

    async def scenario() -> str:
        await h.setup()
        assert h.differential is None  # checking is on for this case
        claimed = await h.created_and_claimed()
        await h.storage.sleep_run(claimed.run.id, claimed.lease_id, h.future())
        assert await h.storage.deliver_event(claimed.run.id, "ev", {"n": 1}) is True
        with pytest.raises(differential.DifferentialViolation) as caught:
            await h.finish()  # the runner's teardown does this before closing
        return str(caught.value)

    try:
        message = loop.run_until_complete(scenario())
    finally:
        loop.run_until_complete(h.close_all())
        loop.close()
    assert "when the case ended, take_event(" in message
    assert "the kit drains the buffer" in message
    assert "- answer.payload = {'n': 1}" in message and "+ answer = None" in message
    assert "handle 1.deliver_event(" in message  # the calls that led there
