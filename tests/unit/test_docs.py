"""Documented examples run: module doctests and the README's example scripts."""

from __future__ import annotations

import doctest
import importlib
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
