"""A worker process for the crash, fencing and chaos tests (run as a script, never imported
by the engine under test).

``python crash_app.py STORE_URL LEDGER_PATH [options]`` runs an :class:`Engine` with the
workflows :data:`FIVE`, :data:`GATED` and :data:`FLAKY` until SIGTERM or SIGINT, then stops it
(``stop(grace=0)``) and exits 0.

It reports what it does on stdout, one flushed line per fact, so a test can follow it.
Every line ends with `` @<ns>``, the host's wall clock (``time.time_ns()``, never the
engine's possibly skewed clock) when the fact happened; for a storage call, when the
call was *sent*. The harness strips that stamp off into ``WorkerProcess.stamps``.

* ``READY <pid>`` once the engine has started claiming, ``STOPPING <pid>`` when a signal
  asked it to stop, ``STOPPED <pid>`` once it has;
* ``CLAIM <run> <lease> <attempt> <recoveries> <holder>`` for each claim (stamped when the
  claim was sent) and ``CLAIMED <run>`` stamped when its answer came back (a claim sent
  just before another process's release can wait for the store's lock and take the run
  after it: only the answer's stamp orders the two), from a storage
  wrapper that also logs ``WRITE <operation> <run> <detail> <lease> -> <True|False>``
  (``WRITE save_step_result <run> <step> <lease> <status> -> ...``) for every
  lease-checked write and ``HEARTBEAT <run> <lease> -> False`` when a heartbeat
  finds the lease gone (every heartbeat's answer with ``--log-heartbeats``, and
  ``HEARTBEAT <run> <lease> hang`` for each call ``--hang-heartbeats-after`` swallows);
* ``STARTED <run> <step> <execution> <pid> <attempt>`` and ``DONE <run> <step> <execution>``
  from inside each step (``DONE``: the step's work is done, it is about to return;
  ``SIGNALLED <run> <step> <code>`` if its cancel signal was raised meanwhile);
* ``CHECKPOINTED <run> <step> <execution>``, ``COMPLETED <run>`` and ``FAILED <run>`` from
  engine hooks, i.e. after the checkpoint (or the run's outcome) is committed;
* ``ERROR <text>`` for errors the engine reports outside any run's outcome;
* ``LOG <level> <message>`` for what the engine logs (e.g. why it stopped a run);
* ``DECIDED <run> <step> <answer>`` when a ``when=`` predicate is evaluated;
* ``FAILING <run> <step> <execution> <attempt> <nth>`` from inside a :data:`FLAKY` step
  about to raise (``nth``: how many executions of it the ledger holds, this one included),
  and ``RETRYING <run> <step> <attempt> <delay> <retry_at|->`` from the retry-scheduled
  hook, i.e. once the failed attempt is stored and just before the wait for the next.

Every step records its execution in the ledger (:mod:`crash_ledger`) before doing
anything else, and its output ``{"value", "pid", "exec"}`` names the process and the
ledger row that produced it, so a test can tell whose write reached storage.

Options that make the kill moment deterministic: ``--hold STEP`` makes STEP block, after
its ``STARTED`` line, until a line arrives on stdin; ``--pause-after STEP`` makes the
engine's step-completed hook for STEP print ``PAUSED <run> <step>`` and never return, so
the run sits between STEP's checkpoint and the next step's start; ``--pause-before
STEP`` does the same in the step-started hook, i.e. after a ``when=`` step's decision
(its ``running`` row) is stored and before its function is called.

Fault injection: ``--skew-ms N`` offsets the engine's ``clock=`` by N ms (the clock
that, in contract 1.0, decided whether another worker's lease was stale);
``--hang-heartbeats-after N`` makes every ``heartbeat_run`` call after the first N
hang forever (as on a dead network: nothing reaches the store, no answer comes back);
with ``--claims-hang-too`` the worker's claims find nothing from then on.

Workflows: :data:`FIVE`, and :data:`GATED`, whose middle step ``gate`` has a ``when=``
predicate that says yes the first time it is asked for a run and no ever after (the
ledger counts the evaluations across processes); and :data:`FLAKY`, one step that fails
until its ``succeed_on``-th execution, counted in the ledger across processes.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, cast

import crash_ledger

from reflow_core import (
    ClaimedRun,
    ConsumeResult,
    Engine,
    ErrorInfo,
    LeaseHolder,
    LeaseOptions,
    RetryPolicy,
    RetryScheduled,
    RunCompleted,
    RunFailed,
    RunStatus,
    StepCompleted,
    StepContext,
    StepResult,
    StepStarted,
    StorageAdapter,
    Workflow,
    open_storage,
    system_clock,
)

__all__ = [
    "FIVE",
    "FLAKY",
    "FLAKY_BACKOFF_S",
    "FLAKY_MAX_ATTEMPTS",
    "FlakyError",
    "GATED",
    "GATED_OPERATIONS",
    "OPERATIONS",
    "expected_gated_output",
    "expected_output",
    "main",
]

PID = os.getpid()
_print_lock = threading.Lock()


def emit(*parts: object, at: int | None = None) -> None:
    """Write one whole line to stdout and flush it (safe from step threads), stamped with
    ``at`` (``time.time_ns()``; now by default)."""
    stamp = time.time_ns() if at is None else at
    line = " ".join(str(part) for part in parts) + f" @{stamp}\n"
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

GATED_OPERATIONS: dict[str, Callable[[int], int]] = {
    "g1": lambda v: v + 1,
    "gate": lambda v: v * 10,
    "g3": lambda v: v + 3,
}
"""The steps of :data:`GATED`; ``gate`` runs only if its predicate says so."""


def expected_gated_output(n: int, *, gate_ran: bool = True) -> int:
    """The final ``value`` of a ``gated`` run with input ``{"n": n}``."""
    value = n
    for name, operation in GATED_OPERATIONS.items():
        if name != "gate" or gate_ran:
            value = operation(value)
    return value


def _first_time_only(ctx: StepContext[Any]) -> bool:
    """The ``when=`` predicate of ``gate``: yes on its first evaluation for a run, no on any
    later one, so a re-evaluation after a reclaim would flip the decision."""
    answer = crash_ledger.decide(CONFIG.ledger, ctx.run_id, ctx.step, PID)
    emit("DECIDED", ctx.run_id, ctx.step, answer)
    return answer


GATED: Workflow[Any] = Workflow("gated")
"""Three ``def`` steps ``g1``, ``gate`` (``when=`` :func:`_first_time_only`), ``g3``."""

for _name, _operation in GATED_OPERATIONS.items():
    GATED.step(
        _make_step(_name, _operation),
        name=_name,
        when=_first_time_only if _name == "gate" else None,
    )


FLAKY_MAX_ATTEMPTS = 4
"""The retry policy's ``max_attempts`` for the step of :data:`FLAKY`."""

FLAKY_BACKOFF_S = 0.8
"""The fixed wait between attempts of :data:`FLAKY`: short enough to be waited in place,
holding the lease (at most ``DURABLE_BACKOFF_S``), long enough that a test SIGKILLing the
worker on its ``RETRYING`` line surely lands inside the wait, even on a loaded machine."""


class FlakyError(RuntimeError):
    """What a :data:`FLAKY` step raises on an execution that is not its ``succeed_on``-th."""


FLAKY: Workflow[Any] = Workflow("flaky")
"""One ``def`` step, ``flaky``, retried (:data:`FLAKY_MAX_ATTEMPTS`, a fixed
:data:`FLAKY_BACKOFF_S` apart). Input ``{"n": n, "succeed_on": k}``: it fails on every
execution but the ``k``-th (``0``: fails on all of them), counting the executions the
ledger holds for the run, i.e. across every process, whatever attempt number the engine
gave it. So an engine that forgot the count at a crash makes too many attempts in all,
and stores an attempt count that disagrees with the ledger."""


def flaky(ctx: StepContext[Any]) -> dict[str, int]:
    """Fail, or on the ``succeed_on``-th execution overall, return ``n``."""
    execution = crash_ledger.start(CONFIG.ledger, ctx.run_id, ctx.step, PID, ctx.attempt)
    emit("STARTED", ctx.run_id, ctx.step, execution, PID, ctx.attempt)
    nth = sum(
        1
        for e in crash_ledger.read_all(CONFIG.ledger)
        if (e.run_id, e.step) == (ctx.run_id, ctx.step)
    )
    crash_ledger.finish(CONFIG.ledger, execution)
    if nth == ctx.input["succeed_on"]:
        emit("DONE", ctx.run_id, ctx.step, execution)
        return {"value": ctx.input["n"], "pid": PID, "exec": execution, "nth": nth}
    emit("FAILING", ctx.run_id, ctx.step, execution, ctx.attempt, nth)
    raise FlakyError(f"execution {nth} (attempt {ctx.attempt}) of {ctx.step} fails")


FLAKY.step(
    flaky,
    retry=RetryPolicy(
        max_attempts=FLAKY_MAX_ATTEMPTS, backoff="fixed", initial_delay=FLAKY_BACKOFF_S
    ),
)


class Reporter:
    """Engine hooks: report checkpoints and completions, optionally pause around a step."""

    def __init__(self, pause_after: str | None, pause_before: str | None = None) -> None:
        self.pause_after = pause_after
        self.pause_before = pause_before

    async def reflow_step_started(self, event: StepStarted) -> None:
        """Called before the step's function (after a ``when=`` step's decision is stored)."""
        if event.step == self.pause_before:
            emit("PAUSED", event.run_id, event.step)
            await asyncio.Future()  # never returns: the test kills this process here

    async def reflow_step_completed(self, event: StepCompleted) -> None:
        """Called after the step's checkpoint is committed."""
        await asyncio.to_thread(crash_ledger.checkpointed, CONFIG.ledger, event.output["exec"])
        emit("CHECKPOINTED", event.run_id, event.step, event.output["exec"])
        if event.step == self.pause_after:
            emit("PAUSED", event.run_id, event.step)
            await asyncio.Future()  # never returns: the test kills this process here

    def reflow_retry_scheduled(self, event: RetryScheduled) -> None:
        """Called once a failed attempt that will be retried is stored, before the wait."""
        retry_at = "-" if event.retry_at is None else event.retry_at
        emit("RETRYING", event.run_id, event.step, event.attempt, event.delay, retry_at)

    def reflow_run_completed(self, event: RunCompleted) -> None:
        """Called after the run's completion is committed."""
        emit("COMPLETED", event.run_id)

    def reflow_run_failed(self, event: RunFailed) -> None:
        """Called after the run's failure is committed."""
        emit("FAILED", event.run_id)


def _lease(lease_id: str) -> str:
    # Whole: lease ids of one process may share a long prefix (``new_lease_id``), and
    # the tests tell leases apart by this token. Adapters issue no whitespace in them.
    return lease_id


class LoggingStorage:
    """Delegates to a real adapter, logging claims and every lease-checked write's answer
    (each line stamped with the time the call was sent).

    ``hang_heartbeats_after``: every ``heartbeat_run`` call after that many never returns
    (until the engine gives up on it) and never reaches the store. ``claims_hang_too``:
    from the first hung heartbeat on, every claim finds nothing (without it, the worker
    may well re-claim the run it fenced itself off, once its lease expired).
    """

    def __init__(
        self,
        inner: StorageAdapter,
        *,
        hang_heartbeats_after: int | None = None,
        claims_hang_too: bool = False,
        log_heartbeats: bool = False,
    ) -> None:
        self._inner = inner
        self._hang_after = hang_heartbeats_after
        self._claims_hang_too = claims_hang_too
        self._log_heartbeats = log_heartbeats
        self._heartbeats = 0
        self._hung = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def claim_next_run(
        self,
        workflow_names: Collection[str],
        *,
        lease_ms: int,
        holder: LeaseHolder | None = None,
    ) -> ClaimedRun | None:
        """Claim, and report the claim."""
        if self._hung and self._claims_hang_too:
            return None
        sent = time.time_ns()
        claimed = await self._inner.claim_next_run(workflow_names, lease_ms=lease_ms, holder=holder)
        if claimed is not None:
            run = claimed.run
            who = "-" if run.holder is None else run.holder.worker
            emit(
                "CLAIM", run.id, _lease(claimed.lease_id), run.attempt, run.recoveries, who, at=sent
            )
            emit("CLAIMED", run.id)
        return claimed

    async def claim_runs(
        self,
        workflow_names: Collection[str],
        *,
        lease_ms: int,
        holder: LeaseHolder | None = None,
        limit: int,
    ) -> list[ClaimedRun]:
        """Claim a batch, and report each claim."""
        if self._hung and self._claims_hang_too:
            return []
        sent = time.time_ns()
        batch = await self._inner.claim_runs(
            workflow_names, lease_ms=lease_ms, holder=holder, limit=limit
        )
        answered = time.time_ns()
        for claimed in batch:
            run = claimed.run
            who = "-" if run.holder is None else run.holder.worker
            emit(
                "CLAIM", run.id, _lease(claimed.lease_id), run.attempt, run.recoveries, who, at=sent
            )
            emit("CLAIMED", run.id, at=answered)
        return batch

    async def heartbeat_run(self, run_id: str, lease_id: str) -> bool:
        """Heartbeat, reporting a lost lease (every answer with ``log_heartbeats``), or hang."""
        sent = time.time_ns()
        self._heartbeats += 1
        if self._hang_after is not None and self._heartbeats > self._hang_after:
            self._hung = True
            emit("HEARTBEAT", run_id, _lease(lease_id), "hang", at=sent)
            await asyncio.Future()  # a call that never comes back (cancellable)
        held = await self._inner.heartbeat_run(run_id, lease_id)
        if not held or self._log_heartbeats:
            emit("HEARTBEAT", run_id, _lease(lease_id), "->", held, at=sent)
        return held

    async def save_step_result(self, result: StepResult, lease_id: str | None = None) -> bool:
        """Save a step row, reporting the answer."""
        sent = time.time_ns()
        saved = await self._inner.save_step_result(result, lease_id)
        lease = "-" if lease_id is None else _lease(lease_id)
        emit(
            "WRITE save_step_result",
            result.run_id,
            result.name,
            lease,
            result.status.value,
            "->",
            saved,
            at=sent,
        )
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
        sent = time.time_ns()
        stored = await self._inner.update_claimed_run_status(
            run_id, lease_id, status, output=output, error=error
        )
        lease = _lease(lease_id)
        emit("WRITE update_claimed_run_status", run_id, status.value, lease, "->", stored, at=sent)
        return stored

    async def consume_event(
        self, event_name: str, checkpoint: StepResult, lease_id: str
    ) -> ConsumeResult:
        """Consume an event with its checkpoint, reporting whether the lease was held."""
        sent = time.time_ns()
        result = await self._inner.consume_event(event_name, checkpoint, lease_id)
        lease = _lease(lease_id)
        emit(
            "WRITE consume_event", checkpoint.run_id, event_name, lease, "->", result.held, at=sent
        )
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
    parser.add_argument("--pause-before", help="step before whose function the run pauses")
    parser.add_argument("--work-ms", default="0,0", help="LOW,HIGH random work per step (ms)")
    parser.add_argument("--worker-id", help="the engine's worker id (the lease holder's name)")
    parser.add_argument(
        "--skew-ms", type=int, default=0, help="offset of the engine's clock= from the host's (ms)"
    )
    parser.add_argument(
        "--hang-heartbeats-after",
        type=int,
        default=None,
        help="heartbeat_run calls after the first N hang forever",
    )
    parser.add_argument(
        "--claims-hang-too",
        action="store_true",
        help="once a heartbeat hung, claims find nothing",
    )
    parser.add_argument(
        "--log-heartbeats", action="store_true", help="report every heartbeat's answer"
    )
    return parser.parse_args(argv)


class _EmitLogs(logging.Handler):
    """The engine's log records as ``LOG <level> <message>`` lines."""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage().replace("\n", " ")
        emit("LOG", record.levelname, message)


async def _serve(args: argparse.Namespace) -> None:
    # A delegating wrapper: structurally the adapter it wraps, which mypy cannot see.
    storage = cast(
        "StorageAdapter",
        LoggingStorage(
            open_storage(args.store),
            hang_heartbeats_after=args.hang_heartbeats_after,
            claims_hang_too=args.claims_hang_too,
            log_heartbeats=args.log_heartbeats,
        ),
    )
    skew = args.skew_ms
    engine = Engine(
        storage,
        [FIVE, GATED, FLAKY],
        concurrency=args.concurrency,
        lease=LeaseOptions(duration=args.lease, heartbeat_interval=args.heartbeat),
        poll_interval=args.poll,
        hooks=[Reporter(args.pause_after, args.pause_before)],
        on_error=lambda error: emit("ERROR", type(error).__name__, str(error).replace("\n", " ")),
        use_plugins=False,
        clock=(lambda: system_clock() + skew) if skew else None,
        worker_id=args.worker_id,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await engine.start()
        emit("READY", PID)
        await stop.wait()
        emit("STOPPING", PID)
    finally:
        # A stop that hangs is a failure the test sees only as a timeout: leave the
        # stacks of every task on stderr for whoever reads it.
        slow = loop.call_later(10.0, _dump_tasks)
        try:
            await engine.stop()
            await storage.close()
        finally:
            slow.cancel()
    emit("STOPPED", PID)


def _dump_tasks() -> None:
    print("stop() is taking over 10 s; the tasks now:", file=sys.stderr)
    for task in asyncio.all_tasks():
        task.print_stack(file=sys.stderr)
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    """Run a worker until SIGTERM/SIGINT; exit status 0 after a clean stop."""
    args = _parse(argv)
    low, high = (int(part) for part in args.work_ms.split(","))
    CONFIG.ledger = args.ledger
    CONFIG.hold = args.hold
    CONFIG.work_ms = (low, high)
    crash_ledger.init(args.ledger)
    reflow_log = logging.getLogger("reflow")
    reflow_log.addHandler(_EmitLogs())
    reflow_log.setLevel(logging.INFO)
    reflow_log.propagate = False
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
