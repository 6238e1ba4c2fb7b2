"""The third-party path end to end: pip-install the example adapter package, run the kit.

``examples/reflow-adapter-example`` is a complete adapter distribution with its own
``pyproject.toml`` and ``reflow`` entry point. It is installed with pip into a
temporary site directory (``--target``; no network: ``--no-deps --no-build-isolation``
with the hatchling of this environment), and the kit is run in a subprocess from an
empty directory with only that site added to ``PYTHONPATH``. The adapter is importable
there only because it was installed, and known to Reflow only through its entry point
(the dist-info pip wrote), exactly as it would be for a user.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import pip_install_into, run_python

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "reflow-adapter-example"


_run = run_python


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example package pip-installed into a fresh site directory."""
    pytest.importorskip("hatchling", reason="building the example needs hatchling")
    site = tmp_path_factory.mktemp("site")
    result = pip_install_into(EXAMPLE, site, tmp_path_factory.mktemp("build"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (site / "reflow_example_adapter" / "plugin.py").is_file()
    [dist_info] = site.glob("reflow_adapter_example-*.dist-info")
    assert (
        "[reflow]\nexample = reflow_example_adapter.plugin"
        in (dist_info / "entry_points.txt").read_text()
    )
    return site


@pytest.mark.slow
def test_not_importable_without_installing(tmp_path: Path) -> None:
    """Control: outside the install the example does not exist, so the kit cannot load it."""
    result = _run(["-m", "pytest", "-p", "no:cacheprovider", "--reflow-adapter=example"], tmp_path)
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, result.stdout + result.stderr
    assert "no storage adapter named 'example'" in result.stderr


@pytest.mark.slow
def test_installed_example_passes_the_kit(installed: Path, tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    result = _run(
        [
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "--strict-markers",
            "-W",
            "error",
            "--reflow-adapter=example",
            f"--reflow-report={report_path}",
            "-q",
        ],
        cwd=tmp_path,
        site=installed,
    )
    assert result.returncode == pytest.ExitCode.OK, result.stdout[-4000:] + result.stderr
    [report] = json.loads(report_path.read_text())
    assert report["adapter"] == "example"
    assert report["distribution"] == "reflow-adapter-example"
    assert report["version"] == "0.1.0"
    assert report["capabilities"] == ["threads"]
    totals = report["totals"]
    assert totals["failed"] == totals["error"] == 0, [
        (c["id"], c["reason"]) for c in report["cases"] if c["outcome"] in ("failed", "error")
    ]
    assert totals["passed"] >= 240
    skipped = {c["id"]: c["reason"] for c in report["cases"] if c["outcome"] == "skipped"}
    assert skipped, "the example declares no 'durable' or 'cross-process'; those cases skip"
    for reason in skipped.values():
        assert reason.startswith("adapter 'example' does not declare capability"), reason


@pytest.mark.slow
def test_installed_example_opens_by_url(installed: Path, tmp_path: Path) -> None:
    """An application finds the adapter by its URL scheme, through the entry point alone."""
    script = (
        "import asyncio\n"
        "from reflow_core import open_storage\n"
        "async def main():\n"
        "    a, b = open_storage('example://shop'), open_storage('example://shop')\n"
        "    await a.initialize(); await b.initialize()\n"
        "    from reflow_core import WorkflowRun, RunStatus\n"
        "    run = WorkflowRun(id='r1', workflow='wf', input={'n': 1},\n"
        "                      status=RunStatus.PENDING, created_at=1, updated_at=1)\n"
        "    await a.create_run(run)\n"
        "    print(type(a).__module__, (await b.get_run('r1')).input)\n"
        "    await a.close(); await b.close()\n"
        "asyncio.run(main())\n"
    )
    result = _run(["-c", script], cwd=tmp_path, site=installed)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "reflow_example_adapter.storage {'n': 1}"
