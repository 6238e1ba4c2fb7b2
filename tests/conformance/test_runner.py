"""The runner as a library (no pytest plugin involved), and the report."""

from __future__ import annotations

import msgspec
import pytest

import reflow_conformance
from reflow_adapters.memory import MemoryStorage
from reflow_conformance.cases import all_cases, case, select_cases
from reflow_conformance.report import Outcome, Report, render_table, to_json
from reflow_conformance.runner import run_spec
from reflow_core import AdapterSpec, Capability
from reflow_core.errors import AdapterNotFoundError, ConfigError


class _NoLeaseOnSave(MemoryStorage):
    """Broken on purpose: ignores the lease when saving a step."""

    async def save_step_result(self, result, lease_id=None):  # type: ignore[no-untyped-def]
        return await super().save_step_result(result, None)


def _spec(cls: type[MemoryStorage], name: str = "test-adapter") -> AdapterSpec:
    return AdapterSpec(
        name=name,
        factory=lambda url=None, clock=None: cls(clock=clock),
        conformance_factory=lambda t, o, clock=None: cls(clock=clock),
    )


def test_run_memory_without_plugin() -> None:
    report = reflow_conformance.run("memory", select="runs,claim")
    assert isinstance(report, Report)
    assert report.ok
    assert report.totals.passed == report.totals.total > 20
    assert {c.area for c in report.cases} == {"runs", "claim"}


def test_contract_version_is_the_contracts() -> None:
    import reflow_conformance.cases
    import reflow_core.storage

    assert reflow_conformance.cases.CONTRACT_VERSION is reflow_core.storage.CONTRACT_VERSION
    assert reflow_conformance.CONTRACT_VERSION == "2.1"
    assert run_spec(_spec(MemoryStorage), select="clock").contract_version == "2.1"


def test_factory_gets_the_kit_clock_and_the_store_follows_it() -> None:
    seen: list[object] = []

    def factory(tmp_path, options, clock=None):  # type: ignore[no-untyped-def]
        seen.append(clock)
        return MemoryStorage(clock=clock)

    spec = AdapterSpec(
        name="clocked", factory=lambda url=None: MemoryStorage(), conformance_factory=factory
    )
    report = run_spec(spec, select="clock.now_is_injected")
    assert report.ok, render_table(report)
    [clock] = seen
    assert callable(clock) and isinstance(clock(), int)


def test_factory_without_clock_is_a_harness_error_naming_it() -> None:
    spec = AdapterSpec(
        name="old-factory",
        factory=lambda url=None: MemoryStorage(),
        conformance_factory=lambda tmp_path, options: MemoryStorage(),
    )
    report = run_spec(spec, select="claim.oldest_first")
    [only] = report.cases
    assert only.outcome is Outcome.ERROR
    assert "factory(tmp_path, options, clock=clock)" in only.reason


def test_store_ignoring_the_clock_fails_the_clock_cases() -> None:
    """A store that reads the system clock instead of the kit's fails, never errors."""
    spec = AdapterSpec(
        name="own-clock",
        factory=lambda url=None: MemoryStorage(),
        conformance_factory=lambda tmp_path, options, clock=None: MemoryStorage(),
    )
    report = run_spec(spec, select="clock")
    failed = {c.id for c in report.cases if c.outcome is Outcome.FAILED}
    assert {"clock.now_is_injected", "clock.stale_at_expiry"} <= failed, render_table(report)
    assert report.totals.error == 0


def test_run_spec_catches_a_broken_adapter() -> None:
    report = run_spec(_spec(_NoLeaseOnSave), select="steps,leases")
    failed = {c.id for c in report.cases if c.outcome is Outcome.FAILED}
    assert "steps.stale_lease_refused" in failed
    assert "leases.fencing_save_step_result" in failed
    assert not report.ok


def test_intact_adapter_passes_everything() -> None:
    report = run_spec(_spec(MemoryStorage))
    assert report.totals.failed == report.totals.error == 0, render_table(report)
    assert report.totals.total >= 250


def test_selection_matching_nothing_raises() -> None:
    with pytest.raises(LookupError, match="matches no conformance case"):
        reflow_conformance.run("memory", select="no.such.case")


def test_unknown_adapter_raises_listing_installed() -> None:
    with pytest.raises(AdapterNotFoundError, match=r"installed adapters: .*memory"):
        reflow_conformance.run("nope")


def test_unknown_capability_is_an_error() -> None:
    with pytest.raises(ConfigError, match="unknown capability 'teleport'"):
        case("x.y", requires=["teleport"])


def test_skips_name_the_missing_capability() -> None:
    report = run_spec(_spec(MemoryStorage), select="concurrency.claim_threads")
    [only] = report.cases
    assert only.outcome is Outcome.SKIPPED
    assert only.reason == "adapter 'test-adapter' does not declare capability 'threads'"


def test_report_json_roundtrip_and_table() -> None:
    report = run_spec(_spec(MemoryStorage), select="events")
    decoded = msgspec.json.decode(to_json(report), type=Report)
    assert decoded == report
    table = render_table(report)
    assert "events.fifo" in table
    assert "passed" in table


def test_case_ids_are_unique_and_well_formed() -> None:
    cases = all_cases()
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids))
    for item in cases:
        assert item.id.count(".") == 1 and item.id == item.id.lower(), item.id
        assert item.description, item.id
        assert all(isinstance(c, Capability) for c in item.requires)


def test_selection_by_area_glob_and_id() -> None:
    assert {c.area for c in select_cases("schedules")} == {"schedules"}
    assert [c.id for c in select_cases("claim.oldest_first")] == ["claim.oldest_first"]
    assert all(c.id.startswith("leases.fencing_") for c in select_cases("leases.fencing_*"))


def test_run_by_name_takes_seed_and_stress_and_reports_them() -> None:
    report = reflow_conformance.run(
        "memory", select="values.roundtrip_run_input,concurrency.claim_coroutines", seed=5, stress=2
    )
    assert report.ok, render_table(report)
    assert (report.seed, report.stress) == (5, 2)
    assert "seed 5; stress 2" in render_table(report)
    decoded = msgspec.json.decode(to_json(report), type=Report)
    assert (decoded.seed, decoded.stress) == (5, 2)
