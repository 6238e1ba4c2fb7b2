"""``reflow adapter new NAME``: the skeleton package installs, registers and passes the kit.

The end-to-end test writes the skeleton into a temporary directory, pip-installs it into
a temporary site directory (``--target``; no network: ``--no-deps --no-build-isolation``
with the hatchling of this environment) and runs ``pytest --reflow-adapter=NAME`` in a
subprocess from the generated project, with only that site added to ``PYTHONPATH``: the
adapter is known to Reflow only through the entry point pip wrote, as for a user.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import pytest
from helpers import pip_install_into, run_python

from reflow_conformance.skeleton import (
    MAX_NAME_LENGTH,
    TEMPLATES,
    check_adapter_name,
    skeleton_names,
    write_skeleton,
)
from reflow_core.errors import ConfigError

NAME = "acme_kv"

EXPECTED_FILES = [
    "pyproject.toml",
    "README.md",
    ".github/workflows/reflow-conformance.yml",
    "reflow_acme_kv/__init__.py",
    "reflow_acme_kv/plugin.py",
    "reflow_acme_kv/storage.py",
    "reflow_acme_kv/py.typed",
    "tests/test_adapter.py",
]


_run = run_python


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The skeleton of adapter ``acme_kv``, freshly written."""
    parent = tmp_path_factory.mktemp("new")
    written = write_skeleton(NAME, parent)
    root = parent / "reflow-acme-kv"
    assert [p.relative_to(root).as_posix() for p in written] == EXPECTED_FILES
    return root


@pytest.fixture(scope="module")
def installed(project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The skeleton pip-installed into a fresh site directory."""
    pytest.importorskip("hatchling", reason="building the skeleton needs hatchling")
    site = tmp_path_factory.mktemp("site")
    result = pip_install_into(project, site, tmp_path_factory.mktemp("build"))
    assert result.returncode == 0, result.stdout + result.stderr
    [dist_info] = site.glob("reflow_acme_kv-*.dist-info")
    assert (
        "[reflow]\nacme_kv = reflow_acme_kv.plugin" in (dist_info / "entry_points.txt").read_text()
    )
    assert not (site / "tests").exists(), "the wheel must hold the adapter package only"
    return site


@pytest.mark.slow
def test_installed_skeleton_passes_the_kit(project: Path, installed: Path, tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    result = _run(
        [
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-W",
            "error",
            f"--reflow-adapter={NAME}",
            f"--reflow-report={report_path}",
            "-q",
        ],
        cwd=project,  # so the skeleton's own tests/ run too, under its pyproject config
        site=installed,
    )
    assert result.returncode == pytest.ExitCode.OK, result.stdout[-4000:] + result.stderr
    [report] = json.loads(report_path.read_text())
    assert report["adapter"] == NAME
    assert report["distribution"] == "reflow-acme-kv"
    assert report["version"] == "0.1.0"
    assert report["capabilities"] == []
    totals = report["totals"]
    assert totals["failed"] == totals["error"] == 0, [
        (c["id"], c["reason"]) for c in report["cases"] if c["outcome"] in ("failed", "error")
    ]
    assert totals["passed"] >= 200
    for case in report["cases"]:
        if case["outcome"] == "skipped":
            assert case["reason"].startswith(f"adapter '{NAME}' does not declare capability"), (
                case["id"],
                case["reason"],
            )
    # The package's own two tests ran beside the kit's cases.
    summary = re.search(r"(\d+) passed", result.stdout.splitlines()[-1])
    assert summary is not None, result.stdout[-2000:]
    assert int(summary.group(1)) == totals["passed"] + 2


def test_installed_skeleton_declares_its_option(installed: Path, tmp_path: Path) -> None:
    """The ``dsn`` option is declared (``reflow adapters`` shows it); until the adapter
    talks to a server, the conformance factory refuses it, and any unknown option, with
    a ConfigError saying what to do: the kit reports that as an error, never a pass."""
    script = (
        "import asyncio\n"
        "from pathlib import Path\n"
        "from reflow_core import ConfigError, get_adapter\n"
        f"spec = get_adapter({NAME!r})\n"
        "print([(o.name, o.default) for o in spec.options], spec.schemes)\n"
        "async def main():\n"
        "    for options in ({'dsn': 'acme://db'}, {'dns': 'typo'}, {}):\n"
        "        made = spec.conformance_factory(Path('.'), options, clock=lambda: 7)\n"
        "        try:\n"
        "            storage = await anext(made)\n"
        "        except ConfigError as exc:\n"
        "            print('refused:', exc)\n"
        "            continue\n"
        "        print('made:', type(storage).__name__, await storage.now())\n"
        "        await made.aclose()\n"
        "asyncio.run(main())\n"
    )
    result = _run(["-c", script], cwd=tmp_path, site=installed)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "[('dsn', 'an in-process store (until the adapter talks to a real one)')] ('acme-kv',)",
        "refused: the acme_kv adapter does not talk to a server yet, so --reflow-option dsn "
        "has nothing to connect; implement AcmeKvStorage first (reflow_acme_kv/storage.py)",
        "refused: unknown --reflow-option for the acme_kv adapter: dns; it understands dsn",
        "made: AcmeKvStorage 7",
    ]


def test_generated_code_is_lint_clean(project: Path) -> None:
    pytest.importorskip("ruff", reason="checking the generated code needs ruff")
    result = _run(["-m", "ruff", "check", "--no-cache", "."], cwd=project)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_template_is_written() -> None:
    """No template is shipped and forgotten: each file under skeleton_templates is used."""
    base = Path(str(resources.files("reflow_conformance").joinpath("skeleton_templates")))
    shipped = {p.relative_to(base).as_posix() for p in base.rglob("*.tmpl")}
    assert shipped == {source for source, _ in TEMPLATES}
    assert len(TEMPLATES) == len(EXPECTED_FILES)


def test_rendered_files_name_the_adapter(project: Path) -> None:
    pyproject = (project / "pyproject.toml").read_text()
    assert 'name = "reflow-acme-kv"' in pyproject
    assert 'acme_kv = "reflow_acme_kv.plugin"' in pyproject
    workflow = (project / ".github/workflows/reflow-conformance.yml").read_text()
    assert "--reflow-adapter=acme_kv" in workflow
    assert "${{ matrix.python-version }}" in workflow  # $$ in the template, one $ here
    assert '"$GITHUB_STEP_SUMMARY"' in workflow
    assert "class AcmeKvStorage:" in (project / "reflow_acme_kv/storage.py").read_text()
    for path in EXPECTED_FILES:
        text = (project / path).read_text()
        assert "$name" not in text and "$package" not in text, path


@pytest.mark.parametrize(
    ("name", "package", "distribution", "scheme", "class_name"),
    [
        ("dynamo", "reflow_dynamo", "reflow-dynamo", "dynamo", "DynamoStorage"),
        ("acme_kv", "reflow_acme_kv", "reflow-acme-kv", "acme-kv", "AcmeKvStorage"),
        ("s3", "reflow_s3", "reflow-s3", "s3", "S3Storage"),
    ],
)
def test_derived_names(
    name: str, package: str, distribution: str, scheme: str, class_name: str
) -> None:
    names = skeleton_names(name)
    assert (names["package"], names["distribution"], names["scheme"], names["class_name"]) == (
        package,
        distribution,
        scheme,
        class_name,
    )


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "is not valid"),
        ("Redis", "is not valid"),
        ("1store", "is not valid"),
        ("my-store", "is not valid"),
        ("my store", "is not valid"),
        ("my__store", "is not valid"),
        ("_store", "is not valid"),
        ("store_", "is not valid"),
        ("störe", "is not valid"),
        ("store\n", "is not valid"),
        ("a" * (MAX_NAME_LENGTH + 1), "characters long"),
        ("memory", "taken by Reflow itself"),
        ("postgres", "taken by Reflow itself"),
        ("redis", "taken by Reflow itself"),
        ("core", "taken by Reflow itself"),
        (None, "must be a str"),
    ],
)
def test_invalid_name_is_refused_before_anything_is_written(
    name: str, why: str, tmp_path: Path
) -> None:
    dest = tmp_path / "new"
    with pytest.raises(ConfigError, match=why):
        write_skeleton(name, dest)
    assert not dest.exists()


def test_longest_name_is_accepted() -> None:
    assert check_adapter_name("a" * MAX_NAME_LENGTH) == "a" * MAX_NAME_LENGTH


def test_existing_files_are_never_overwritten(tmp_path: Path) -> None:
    write_skeleton(NAME, tmp_path)
    project = tmp_path / "reflow-acme-kv"
    (project / "reflow_acme_kv" / "storage.py").write_text("# my real adapter\n")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match=r"refusing to overwrite .*reflow_acme_kv/storage\.py"):
        write_skeleton(NAME, tmp_path)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_one_existing_file_blocks_the_whole_skeleton(tmp_path: Path) -> None:
    project = tmp_path / "reflow-acme-kv"
    project.mkdir()
    (project / "README.md").write_text("mine\n")
    (project / "notes.txt").write_text("unrelated\n")
    with pytest.raises(ConfigError, match=r"refusing to overwrite .*: README\.md;"):
        write_skeleton(NAME, tmp_path)
    assert sorted(p.name for p in project.iterdir()) == ["README.md", "notes.txt"]
    assert (project / "README.md").read_text() == "mine\n"


def test_unrelated_files_do_not_block(tmp_path: Path) -> None:
    project = tmp_path / "reflow-acme-kv"
    project.mkdir()
    (project / "notes.txt").write_text("unrelated\n")
    written = write_skeleton(NAME, tmp_path)
    assert written[0] == project / "pyproject.toml"
    assert len(written) == len(EXPECTED_FILES)
    assert (project / "notes.txt").read_text() == "unrelated\n"


@pytest.mark.parametrize("taken", [".", "reflow-acme-kv"])
def test_destination_that_is_a_file_is_refused(tmp_path: Path, taken: str) -> None:
    dest = tmp_path / "dest"
    if taken == ".":
        dest.write_text("a file\n")
        blocker = dest
    else:
        dest.mkdir()
        blocker = dest / taken
        blocker.write_text("a file\n")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        write_skeleton(NAME, dest)
    assert blocker.read_text() == "a file\n"
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted({"dest", blocker.name})
