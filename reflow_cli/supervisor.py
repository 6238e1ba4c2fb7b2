"""The supervisor of ``reflow worker --processes N``: starts N worker children, restarts
one that crashes (with backoff), forwards SIGTERM/SIGINT to them and waits for them.

Each child is ``python -m reflow_cli.worker`` with the fleet's arguments (see
``reflow_cli.worker.main``); it loads the target itself, since an engine cannot cross a
process boundary. The worker side of the protocol is one exit code, :data:`CONFIG_EXIT`.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the worker module imports this one
    from reflow_cli.worker import WorkerConfig

__all__ = ["CONFIG_EXIT", "Supervisor"]

log = logging.getLogger("reflow.worker")

CONFIG_EXIT = 2
"""Exit code of a worker that cannot start (bad target, options or storage): a worker
that has not become ready exits with it, and the supervisor never restarts it."""


@dataclass(slots=True)
class _Child:
    """One supervised worker process slot."""

    number: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    failures: int = 0
    restart_at: float | None = None


class Supervisor:
    """Runs ``processes`` worker children, restarts crashed ones, forwards stop signals.

    A child that exits with :data:`CONFIG_EXIT` could not start (it logged why, on one
    line): restarting it would fail the same way, so the supervisor stops the other
    children and exits with :data:`CONFIG_EXIT` too. A child that crashes otherwise (any
    other exit, or a signal) is restarted after a backoff that doubles with each quick
    failure (1 s up to ``max_backoff``) and resets once a child has lived ``max_backoff``
    seconds.
    """

    def __init__(self, config: WorkerConfig, processes: int, *, max_backoff: float = 30.0) -> None:
        self.config = config
        self.children = [_Child(number) for number in range(1, processes + 1)]
        self.max_backoff = max_backoff
        self._stop = threading.Event()
        self._signals = 0
        self._exit_code = 0

    def _spawn(self, child: _Child) -> None:
        cmd = [sys.executable, "-m", "reflow_cli.worker", *self.config.argv()]
        cmd += ["--supervisor-pid", str(os.getpid())]
        child.proc = subprocess.Popen(cmd)
        child.started = time.monotonic()
        child.restart_at = None
        log.info("worker process #%d started (pid %d)", child.number, child.proc.pid)

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        name = signal.Signals(signum).name
        if self._signals == 1:
            log.info("%s: stopping %d worker processes", name, len(self.children))
        else:
            log.warning("%s again: telling the workers to exit now", name)
        self._stop_children()

    def _stop_children(self) -> None:
        for child in self.children:
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        self._stop.set()

    def _check(self, child: _Child) -> None:
        """Notice a child that died and schedule (or perform) its restart."""
        now = time.monotonic()
        if child.proc is None:
            if child.restart_at is not None and now >= child.restart_at:
                self._spawn(child)
            return
        code = child.proc.poll()
        if code is None:
            return
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited {code}"
        if code == CONFIG_EXIT:
            log.error(
                "worker process #%d (pid %d) cannot start (exit code %d, reason above); not "
                "restarting it, since it would fail the same way: stopping all workers",
                child.number,
                child.proc.pid,
                code,
            )
            self._exit_code = CONFIG_EXIT
            self._stop_children()
            return
        lived = now - child.started
        child.failures = 1 if lived >= self.max_backoff else child.failures + 1
        delay = min(self.max_backoff, 2.0 ** (child.failures - 1))
        log.error(
            "worker process #%d (pid %d) %s after %.1fs; restarting in %gs",
            child.number,
            child.proc.pid,
            how,
            lived,
            delay,
        )
        child.proc = None
        child.restart_at = now + delay

    def run(self) -> int:
        """Supervise until SIGTERM/SIGINT; return 0 if every child stopped cleanly."""
        previous = {s: signal.signal(s, self._forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            for child in self.children:
                self._spawn(child)
            while not self._stop.is_set():
                for child in self.children:
                    if self._stop.is_set():  # one child that cannot start stops them all
                        break
                    self._check(child)
                self._stop.wait(0.2)
            return self._wait_all()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _wait_all(self) -> int:
        """Wait for the children to stop: the grace period plus time to release leases."""
        deadline = time.monotonic() + self.config.grace + 10.0
        code = self._exit_code
        for child in self.children:
            if child.proc is None:
                continue
            try:
                result = child.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker process #%d did not stop in time; killing it", child.number)
                child.proc.kill()
                result = child.proc.wait()
            if result == CONFIG_EXIT:
                code = CONFIG_EXIT  # it logged why it cannot start; nothing to add
            elif result != 0:
                log.error("worker process #%d exited %d", child.number, result)
                code = code or 1
        log.info("all worker processes stopped")
        return code
