"""pytest and Hypothesis are the conformance kit's, not the engine's: the core install does
not require them, and importing Reflow or running workflows never imports them."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEST_ONLY = ("pytest", "hypothesis")


def _name(requirement: str) -> str:
    """The distribution name of a requirement string (``"pytest>=8.0"`` -> ``"pytest"``)."""
    for i, char in enumerate(requirement):
        if not (char.isalnum() or char in "-_."):
            return requirement[:i].lower()
    return requirement.lower()


def _project() -> dict[str, object]:
    with (ROOT / "pyproject.toml").open("rb") as file:
        return tomllib.load(file)["project"]  # type: ignore[no-any-return]


def test_core_dependencies_leave_out_the_test_tools() -> None:
    project = _project()
    core = {_name(r) for r in project["dependencies"]}  # type: ignore[attr-defined]
    assert not core & set(TEST_ONLY), f"runtime dependencies include {core & set(TEST_ONLY)}"
    extras = project["optional-dependencies"]
    kit = {_name(r) for r in extras["conformance"]}  # type: ignore[index]
    assert set(TEST_ONLY) <= kit, "the conformance extra must bring pytest and Hypothesis"
    # dev installs every extra (the kit's tools and OpenTelemetry's SDK included).
    assert any("all" in r and r.startswith("reflow[") for r in extras["dev"])  # type: ignore[index]
    all_extras = next(r for r in extras["all"])  # type: ignore[index]
    for extra in ("conformance", "otel"):
        assert extra in all_extras


_PROBE = textwrap.dedent(
    """
    import asyncio, importlib, importlib.util, json, sys, tempfile
    from pathlib import Path

    import reflow_core
    import reflow_conformance  # the kit's package: lazy, so it costs nothing
    from reflow_core import Engine, RetryPolicy, StepContext, Workflow

    wf = Workflow("probe")

    @wf.step(retry=RetryPolicy(max_attempts=2, backoff="fixed", initial_delay=0))
    def flaky(ctx: StepContext) -> int:
        if ctx.attempt == 1:
            raise ValueError("once")
        return 1

    wf.sleep("nap", "10ms")

    async def main() -> list[str]:
        statuses = []
        with tempfile.TemporaryDirectory() as tmp:
            for url in ("memory://", f"sqlite:///{Path(tmp) / 'probe.db'}"):
                engine = Engine(url, [wf])  # plugins loaded: entry points included
                async with engine:
                    run = await engine.enqueue(wf)
                    done = await engine.wait_for(run.id, within=30)
                    statuses.append(done.status.value)
        return statuses

    statuses = asyncio.run(main())
    # The worker command's module, where this install has it.
    for name in ("reflow_cli.worker", "reflow_cli"):
        if importlib.util.find_spec(name.split(".")[0]) and importlib.util.find_spec(name):
            importlib.import_module(name)
            break
    print(json.dumps({
        "statuses": statuses,
        "loaded": sorted(m for m in ("pytest", "_pytest", "hypothesis") if m in sys.modules),
    }))
    """
)


def test_importing_reflow_and_running_workflows_never_imports_pytest() -> None:
    """In a fresh interpreter: import, run a workflow with a retry and a sleep on two
    adapters with every installed plugin loaded, import the worker; no test tool loaded."""
    result = subprocess.run(
        [sys.executable, "-c", _PROBE],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["statuses"] == ["completed", "completed"]
    assert report["loaded"] == [], f"importing Reflow loaded {report['loaded']}"
