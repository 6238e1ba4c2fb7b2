"""Documented examples run: module doctests and the README's example scripts."""

from __future__ import annotations

import doctest
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

DOCTESTED = [
    "reflow_core.codec",
    "reflow_core.durations",
    "reflow_core.damage",
    "reflow_core.identifiers",
    "reflow_core.lease",
    "reflow_core.registry",
    "reflow_core.retry",
    "reflow_core.testing",
    "reflow_core.retention",
    "reflow_conformance.skeleton",
]


@pytest.mark.parametrize("module", DOCTESTED)
def test_module_doctests(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{module} has no examples"
    assert result.failed == 0


def test_quickstart_example_runs_and_is_idempotent(tmp_path: Path) -> None:
    script = ROOT / "examples" / "quickstart.py"
    for _ in range(2):  # the second run finds the same idempotency key: same run, same output
        done = subprocess.run(
            [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == (
            "completed {'account': 'acct-ada', 'plan': 'free', 'trial': '14 days'}"
        )


GUIDES = [ROOT / "docs" / "writing-an-adapter.md"]


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(encoding="utf-8"), re.S | re.M)


@pytest.mark.parametrize(
    ("guide", "index"), [(g, i) for g in GUIDES for i in range(len(_python_blocks(g)))]
)
def test_guide_python_blocks_run(guide: Path, index: int, tmp_path: Path) -> None:
    """Each python block of a guide runs on its own, in a fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", _python_blocks(guide)[index]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr
