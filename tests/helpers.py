"""Small helpers shared by test modules (import as ``from helpers import run, FakeClock``)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one coroutine on a fresh event loop (the suite does not use pytest-asyncio)."""
    return asyncio.run(coro)


class FakeClock:
    """A clock tests move by hand (milliseconds since the epoch)."""

    def __init__(self, start: int = 1_700_000_000_000) -> None:
        self.now = start

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += round(seconds * 1000)


def run_python(
    args: list[str], cwd: Path, site: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """This interpreter in a subprocess, isolated from the running pytest (no
    ``PYTEST_*`` variables, no inherited ``PYTHONPATH``); ``site`` goes on its path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "COV_"))}
    env.pop("PYTHONPATH", None)
    if site is not None:
        env["PYTHONPATH"] = str(site)
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=180
    )


def pip_install_into(project: Path, site: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``pip install --target site project``, offline and without its dependencies: the
    distribution as a user would get it, beside the Reflow already installed here."""
    return run_python(
        [
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(site),
            str(project),
        ],
        cwd=cwd,
    )
