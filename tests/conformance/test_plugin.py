"""The pytest plugin, driven through ``pytester`` from directories with no test files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from reflow_conformance.cases import select_cases


def capability_cases(select: str | None = None) -> int:
    """How many selected cases need a capability; the memory adapter declares none."""
    return sum(1 for case in select_cases(select) if case.requires)


BROKEN_CONFTEST = """
from reflow_adapters.memory import MemoryStorage
from reflow_core import AdapterSpec
from reflow_core.registry import register_adapter, unregister_adapter


class HeartbeatAlwaysTrue(MemoryStorage):
    async def heartbeat_run(self, run_id, lease_id):
        await super().heartbeat_run(run_id, lease_id)
        return True


def _fail(tmp_path, options, clock=None):
    raise RuntimeError("server unreachable")


register_adapter(AdapterSpec(
    name="broken-heartbeat", factory=lambda url=None, **o: HeartbeatAlwaysTrue(),
    conformance_factory=lambda tmp_path, options, clock=None: HeartbeatAlwaysTrue(clock=clock),
))
register_adapter(AdapterSpec(
    name="unreachable", factory=lambda url=None, **o: HeartbeatAlwaysTrue(),
    conformance_factory=_fail,
))


def pytest_unconfigure(config):
    unregister_adapter("broken-heartbeat")
    unregister_adapter("unreachable")
"""


def test_empty_directory_runs_the_suite(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--reflow-adapter=memory", "--strict-markers", "-rs")
    result.assert_outcomes(passed=result.parseoutcomes()["passed"], skipped=capability_cases())
    assert result.parseoutcomes()["passed"] >= 230
    result.stdout.fnmatch_lines(["*adapter 'memory' does not declare capability 'threads'*"])
    assert result.ret == pytest.ExitCode.OK


def test_ids_carry_the_adapter_name(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--reflow-adapter=memory", "--collect-only", "-q")
    result.stdout.fnmatch_lines(["reflow[[]memory[]]::claim.oldest_first"])


def test_collect_only_counts_the_cases_as_collected(pytester: pytest.Pytester) -> None:
    """``pytest --co`` lists the cases and reports them collected (it used to end with
    "no tests collected" and exit code 5)."""
    total = len(select_cases())
    result = pytester.runpytest("--reflow-adapter=memory", "--collect-only")
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(
        [
            f"collected {total} items",
            "<ReflowSuite reflow[[]memory[]]>",
            "  <ReflowCaseItem claim.oldest_first>",
            f"*= {total} tests collected in *",
        ]
    )
    assert "no tests collected" not in result.stdout.str()
    quiet = pytester.runpytest("--reflow-adapter=memory", "--co", "-q", "-k", "claim")
    assert quiet.ret == pytest.ExitCode.OK
    selected = sum(1 for case in select_cases() if "claim" in case.id)
    quiet.stdout.fnmatch_lines(
        [f"{selected}/{total} tests collected ({total - selected} deselected) in *"]
    )
    two = pytester.runpytest("--reflow-adapter=memory", "--reflow-adapter=sqlite", "--co")
    two.stdout.fnmatch_lines([f"collected {2 * total} items"])


def test_unknown_adapter_lists_installed(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--reflow-adapter=nope")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*no storage adapter named 'nope'*installed adapters:*memory*"])


def test_bad_option_format_is_usage_error(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--reflow-adapter=memory", "--reflow-option=novalue")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--reflow-option expects KEY=VALUE*"])


def test_report_is_written(pytester: pytest.Pytester) -> None:
    path = pytester.path / "report.json"
    result = pytester.runpytest(
        "--reflow-adapter=memory", "--reflow-select=claim,concurrency", f"--reflow-report={path}"
    )
    assert result.ret == pytest.ExitCode.OK
    [report] = json.loads(path.read_text())
    assert report["contract_version"] == "2.1"
    assert report["adapter"] == "memory"
    assert report["distribution"] == "reflow"
    assert report["version"]
    assert report["capabilities"] == []
    assert report["totals"]["failed"] == 0
    assert report["totals"]["skipped"] == capability_cases("claim,concurrency") > 0
    case = next(c for c in report["cases"] if c["id"] == "concurrency.claim_threads")
    assert case["outcome"] == "skipped"
    assert case["reason"] == "adapter 'memory' does not declare capability 'threads'"
    assert set(case) == {"id", "area", "outcome", "reason", "duration_s", "location"}
    assert case["location"] == ""
    assert isinstance(report["seed"], int) and report["stress"] == 1


@pytest.mark.parametrize(
    "args", [["-k", "matches_nothing"], ["--reflow-select=no.such.case"]], ids=["-k", "select"]
)
def test_selecting_nothing_is_an_error(pytester: pytest.Pytester, args: list[str]) -> None:
    result = pytester.runpytest("--reflow-adapter=memory", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR


def test_broken_adapter_fails_and_harness_failure_is_an_error(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(BROKEN_CONFTEST)
    path = pytester.path / "report.json"
    result = pytester.runpytest(
        "--reflow-adapter=broken-heartbeat",
        "--reflow-adapter=unreachable",
        "--reflow-select=leases",
        f"--reflow-report={path}",
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        ["*FAILED reflow[[]broken-heartbeat[]]::leases.fencing_heartbeat_run*"]
    )
    reports = {r["adapter"]: r for r in json.loads(path.read_text())}
    assert reports["broken-heartbeat"]["totals"]["failed"] > 0
    assert reports["broken-heartbeat"]["totals"]["error"] == 0
    unreachable = reports["unreachable"]["totals"]
    assert unreachable["error"] == unreachable["total"]
    assert unreachable["failed"] == 0
    reason = reports["unreachable"]["cases"][0]["reason"]
    assert "server unreachable" in reason


def test_reflow_storage_fixture(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        from reflow_core import RunFilter

        def test_uses_storage(reflow_storage):
            storage = reflow_storage.storage
            run = reflow_storage.new_run("wf", {"x": 1})
            reflow_storage.sync(storage.create_run(run))
            listed = reflow_storage.sync(storage.list_runs(RunFilter()))
            assert [r.id for r in listed] == [run.id]
        """
    )
    result = pytester.runpytest(
        "--reflow-adapter=memory", "--reflow-adapter=sqlite", "--reflow-no-suite", "-v"
    )
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*test_uses_storage[[]memory[]] PASSED*"])
    skipped = pytester.runpytest("-rs")
    skipped.assert_outcomes(skipped=1)


def test_plugin_is_inert_without_the_option(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_plain():\n    pass\n")
    result = pytester.runpytest("--strict-markers")
    result.assert_outcomes(passed=1)


def test_plugin_import_is_cheap() -> None:
    code = (
        "import sys, reflow_conformance.plugin; "
        "heavy = [m for m in ('reflow_core', 'hypothesis', 'reflow_adapters', "
        "'reflow_conformance.suite', 'msgspec') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
