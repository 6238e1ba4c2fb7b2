"""A worker process for the crash, fencing and chaos tests (run as a script, never imported
by the engine under test).

``python crash_app.py STORE_URL LEDGER_PATH [options]`` runs an :class:`Engine` with the
five-step workflow :data:`FIVE` until SIGTERM or SIGINT, then stops it and exits 0.

It reports what it does on stdout, one flushed line per fact, so a test can follow it:

* ``READY <pid>`` once the engine has started claiming;
* ``CLAIM <run> <lease> <attempt>`` for each claim, from a storage wrapper that also logs
  ``WRITE <operation> <run> <detail> <lease> -> <True|False>`` for every lease-checked
  write and ``HEARTBEAT <run> <lease> -> False`` when a heartbeat finds the lease gone;
* ``STARTED <run> <step> <execution> <pid> <attempt>`` and ``DONE <run> <step> <execution>``
  from inside each step (``DONE``: the step's work is done, it is about to return;
  ``SIGNALLED <run> <step> <code>`` if its cancel signal was raised meanwhile);
* ``CHECKPOINTED <run> <step> <execution>`` and ``COMPLETED <run>`` from engine hooks,
  i.e. after the checkpoint (or the run's completion) is committed;
* ``ERROR <text>`` for errors the engine reports outside any run's outcome.

Every step records its execution in the ledger (:mod:`crash_ledger`) before doing
anything else, and its output ``{"value", "pid", "exec"}`` names the process and the
ledger row that produced it, so a test can tell whose write reached storage.

Options that make the kill moment deterministic: ``--hold STEP`` makes STEP block, after
its ``STARTED`` line, until a line arrives on stdin; ``--pause-after STEP`` makes the
engine's step-completed hook for STEP print ``PAUSED <run> <step>`` and never return, so
the run sits between STEP's checkpoint and the next step's start.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import sys
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, cast

import crash_ledger

from reflow_core import (
    ClaimedRun,
    ConsumeResult,
    Engine,
    ErrorInfo,
    LeaseOptions,
    RunCompleted,
    RunStatus,
    StepCompleted,
    StepContext,
    StepResult,
    StorageAdapter,
    Workflow,
    open_storage,
)

__all__ = ["FIVE", "OPERATIONS", "expected_output", "main"]

PID = os.getpid()
_print_lock = threading.Lock()


def emit(*parts: object) -> None:
    """Write one whole line to stdout and flush it (safe from step threads)."""
    line = " ".join(str(part) for part in parts) + "\n"
    with _print_lock:
        sys.stdout.write(line)
        sys.stdout.flush()


@dataclass(slots=True)
class Config:
    """What the steps need to know about this process (set once by :func:`main`)."""

    ledger: str = ""
    hold: str | None = None
    work_ms: tuple[int, int] = (0, 0)


CONFIG = Config()

OPERATIONS: dict[str, Callable[[int], int]] = {
    "s1": lambda v: v + 1,
    "s2": lambda v: v * 2,
    "s3": lambda v: v + 3,
    "s4": lambda v: v * 4,
    "s5": lambda v: v - 5,
}
"""Each step's arithmetic on the previous value (the run input ``n`` for ``s1``)."""


def expected_output(n: int) -> int:
    """The final ``value`` of a run with input ``{"n": n}``."""
    value = n
    for operation in OPERATIONS.values():
        value = operation(value)
    return value


FIVE: Workflow[Any] = Workflow("five")
"""Five plain-``def`` steps ``s1``..``s5``, each a ledger side effect plus some arithmetic."""


def _make_step(name: str, operation: Callable[[int], int]) -> Callable[[StepContext[Any]], Any]:
    def step(ctx: StepContext[Any]) -> dict[str, int]:
        execution = crash_ledger.start(CONFIG.ledger, ctx.run_id, name, PID, ctx.attempt)
        emit("STARTED", ctx.run_id, name, execution, PID, ctx.attempt)
        if CONFIG.hold == name:
            sys.stdin.readline()  # the test's go-ahead (or this process is killed first)
        low, high = CONFIG.work_ms
        if high > 0:
            ctx.cancel.wait(random.uniform(low, high) / 1000)  # the step's "work"
        previous = ctx.input["n"] if ctx.prev is None else ctx.prev["value"]
        value = operation(previous)
        crash_ledger.finish(CONFIG.ledger, execution)
        if ctx.cancel.is_set:
            reason = ctx.cancel.reason
            emit("SIGNALLED", ctx.run_id, name, getattr(reason, "code", type(reason).__name__))
        emit("DONE", ctx.run_id, name, execution)
        return {"value": value, "pid": PID, "exec": execution}

    step.__name__ = name
    return step


for _name, _operation in OPERATIONS.items():
    FIVE.step(_make_step(_name, _operation))


class Reporter:
    """Engine hooks: report checkpoints and completions, optionally pause after a step."""

    def __init__(self, pause_after: str | None) -> None:
        self.pause_after = pause_after

    async def reflow_step_completed(self, event: StepCompleted) -> None:
        """Called after the step's checkpoint is committed."""
        await asyncio.to_thread(crash_ledger.checkpointed, CONFIG.ledger, event.output["exec"])
        emit("CHECKPOINTED", event.run_id, event.step, event.output["exec"])
        if event.step == self.pause_after:
            emit("PAUSED", event.run_id, event.step)
            await asyncio.Future()  # never returns: the test kills this process here

    def reflow_run_completed(self, event: RunCompleted) -> None:
        """Called after the run's completion is committed."""
        emit("COMPLETED", event.run_id)


def _lease(lease_id: str) -> str:
    return lease_id[:8]


class LoggingStorage:
    """Delegates to a real adapter, logging claims and every lease-checked write's answer."""

    def __init__(self, inner: StorageAdapter) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def claim_next_run(
        self, workflow_names: Collection[str], stale_before: int | None = None
    ) -> ClaimedRun | None:
        """Claim, and report the claim."""
        claimed = await self._inner.claim_next_run(workflow_names, stale_before)
        if claimed is not None:
            emit("CLAIM", claimed.run.id, _lease(claimed.lease_id), claimed.run.attempt)
        return claimed

    async def heartbeat_run(self, run_id: str, lease_id: str) -> bool:
        """Heartbeat, reporting only a lost lease (heartbeats are frequent)."""
        held = await self._inner.heartbeat_run(run_id, lease_id)
        if not held:
            emit("HEARTBEAT", run_id, _lease(lease_id), "-> False")
        return held

    async def save_step_result(self, result: StepResult, lease_id: str | None = None) -> bool:
        """Save a step row, reporting the answer."""
        saved = await self._inner.save_step_result(result, lease_id)
        lease = "-" if lease_id is None else _lease(lease_id)
        emit("WRITE save_step_result", result.run_id, result.name, lease, "->", saved)
        return saved

    async def update_claimed_run_status(
        self,
        run_id: str,
        lease_id: str,
        status: RunStatus,
        *,
        output: Any = None,
        error: ErrorInfo | None = None,
    ) -> bool:
        """Change a held run's status, reporting the answer."""
        stored = await self._inner.update_claimed_run_status(
            run_id, lease_id, status, output=output, error=error
        )
        lease = _lease(lease_id)
        emit("WRITE update_claimed_run_status", run_id, status.value, lease, "->", stored)
        return stored

    async def consume_event(
        self, event_name: str, checkpoint: StepResult, lease_id: str
    ) -> ConsumeResult:
        """Consume an event with its checkpoint, reporting whether the lease was held."""
        result = await self._inner.consume_event(event_name, checkpoint, lease_id)
        lease = _lease(lease_id)
        emit("WRITE consume_event", checkpoint.run_id, event_name, lease, "->", result.held)
        return result


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", help="storage URL (sqlite:///..., postgresql://...)")
    parser.add_argument("ledger", help="path of the ledger SQLite file")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--lease", type=float, default=1.0, help="lease duration (s)")
    parser.add_argument("--heartbeat", type=float, default=0.2, help="heartbeat interval (s)")
    parser.add_argument("--poll", type=float, default=0.05, help="poll interval (s)")
    parser.add_argument("--hold", help="step that waits for a line on stdin")
    parser.add_argument("--pause-after", help="step after whose checkpoint the run pauses")
    parser.add_argument("--work-ms", default="0,0", help="LOW,HIGH random work per step (ms)")
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    # A delegating wrapper: structurally the adapter it wraps, which mypy cannot see.
    storage = cast("StorageAdapter", LoggingStorage(open_storage(args.store)))
    engine = Engine(
        storage,
        [FIVE],
        concurrency=args.concurrency,
        lease=LeaseOptions(duration=args.lease, heartbeat_interval=args.heartbeat),
        poll_interval=args.poll,
        hooks=[Reporter(args.pause_after)],
        on_error=lambda error: emit("ERROR", type(error).__name__, str(error).replace("\n", " ")),
        use_plugins=False,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await engine.start()
        emit("READY", PID)
        await stop.wait()
    finally:
        await engine.stop()
        await storage.close()
    emit("STOPPED", PID)


def main(argv: list[str] | None = None) -> int:
    """Run a worker until SIGTERM/SIGINT; exit status 0 after a clean stop."""
    args = _parse(argv)
    low, high = (int(part) for part in args.work_ms.split(","))
    CONFIG.ledger = args.ledger
    CONFIG.hold = args.hold
    CONFIG.work_ms = (low, high)
    crash_ledger.init(args.ledger)
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
