"""``reflow demo``: kill a worker mid-run, start another, prove nothing completed ran twice.

The demo is the README's first command, so it shows the real thing rather than a
simulation. The parent process (this module's :func:`run_demo`) creates a SQLite file,
enqueues three "order fulfilment" runs and starts worker process #1
(``python -m reflow_cli.demo worker``). When that worker reports that the first order
has started charging the card, the parent SIGKILLs it: no cleanup, no lease release,
exactly like a crashed machine. Worker process #2 then reclaims the runs whose leases
went stale and finishes every run, resuming each at its first step without a
checkpoint.

Every step appends rows to a separate *ledger* (a second SQLite file, written with the
stdlib ``sqlite3``, outside Reflow's control): one when it starts and one for its side
effect when it finishes. Comparing the ledger with the checkpoints proves that each
completed step ran to completion once, and shows honestly which steps were in flight at
the kill and therefore started again (execution is at-least-once for those).

Workers report progress as JSON lines on stdout, so the parent reacts to what happened
instead of sleeping and hoping. Only the parent renders (with rich, imported inside
:func:`run_demo`); the worker side needs nothing beyond the core dependencies.

This module is longer than the usual ~400 lines (about 570): the workflow, the worker
entry point, the orchestration and the verification are one story a reader should be
able to follow in one file. If it grows, split off ``verify`` and the rendering.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from reflow_core.context import StepContext
from reflow_core.engine import Engine
from reflow_core.events import RunCompleted, RunFailed, RunStarted, StepCompleted
from reflow_core.lease import LeaseOptions
from reflow_core.registry import open_storage
from reflow_core.types import RunStatus, StepResult, WorkflowRun
from reflow_core.workflow import Workflow

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

__all__ = [
    "DEMO_LEASE",
    "STEPS",
    "Ledger",
    "LedgerEntry",
    "Order",
    "Verdict",
    "main",
    "order_workflow",
    "run_demo",
    "sqlite_url",
    "verify",
]

WORKFLOW = "order-fulfilment"
STEPS: tuple[tuple[str, float], ...] = (
    ("validate_order", 0.3),
    ("reserve_inventory", 0.4),
    ("charge_card", 0.6),
    ("ship_order", 0.5),
    ("send_receipt", 0.3),
)
"""Step names in order, with their base duration in seconds (long enough to watch)."""

DEMO_LEASE = LeaseOptions(duration=1.5, heartbeat_interval=0.5)
"""A short lease, so the second worker may reclaim the killed worker's runs after 1.5 s
instead of the default 30 s. Heartbeats every 0.5 s keep live runs safe meanwhile."""


class Order(msgspec.Struct, frozen=True):
    """The run input: a typed value, validated before anything is stored."""

    order_id: str
    email: str
    items: int
    amount_cents: int


# -- the ledger: side effects recorded outside Reflow ---------------------------------


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One ledger row: ``phase`` is ``"started"`` or ``"effect"`` (the step's side effect)."""

    run_id: str
    order_id: str
    step: str
    phase: str
    pid: int
    at: float


class Ledger:
    """An append-only table in its own SQLite file; a connection per write, so the
    step threads share nothing and every row is committed before the step goes on."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=10)

    def create(self) -> None:
        """Create the table (idempotent)."""
        with closing(self._connect()) as db, db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS ledger (seq INTEGER PRIMARY KEY, run_id TEXT, "
                "order_id TEXT, step TEXT, phase TEXT, pid INTEGER, at REAL)"
            )

    def record(self, run_id: str, order_id: str, step: str, phase: str) -> None:
        """Append and commit one row for this process."""
        with closing(self._connect()) as db, db:
            db.execute(
                "INSERT INTO ledger (run_id, order_id, step, phase, pid, at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (run_id, order_id, step, phase, os.getpid(), time.time()),
            )

    def entries(self) -> list[LedgerEntry]:
        """Every row, in the order written."""
        with closing(self._connect()) as db:
            rows = db.execute(
                "SELECT run_id, order_id, step, phase, pid, at FROM ledger ORDER BY seq"
            ).fetchall()
        return [LedgerEntry(*row) for row in rows]


# -- the workflow ----------------------------------------------------------------------

_print_lock = threading.Lock()


def emit(event: str, **fields: Any) -> None:
    """Report progress to the parent: one JSON object per stdout line, flushed at once."""
    line = json.dumps({"event": event, "pid": os.getpid(), **fields})
    with _print_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def order_workflow(ledger: Ledger) -> Workflow[Order]:
    """The demo workflow, bound to a ledger (a factory: a Workflow is an inert value)."""
    wf: Workflow[Order] = Workflow(WORKFLOW, input=Order)

    def define(name: str, seconds: float) -> None:
        def step(ctx: StepContext[Order]) -> dict[str, Any]:
            order = ctx.input
            ledger.record(ctx.run_id, order.order_id, name, "started")
            emit("step_started", run=ctx.run_id, step=name)
            # Bigger orders take longer, so the three runs drift out of lockstep and
            # the kill catches them at different steps.
            time.sleep(seconds * (1 + 0.2 * (order.items - 1)))
            ledger.record(ctx.run_id, order.order_id, name, "effect")
            return {"pid": os.getpid(), "order": order.order_id}

        wf.step(step, name=name)

    for name, seconds in STEPS:
        define(name, seconds)
    return wf


class _Reporter:
    """Engine hooks that forward checkpoints and run lifecycle to the parent."""

    def reflow_run_started(self, event: RunStarted) -> None:
        emit("run_started", run=event.run_id, attempt=event.attempt)

    def reflow_step_completed(self, event: StepCompleted) -> None:
        emit("step_completed", run=event.run_id, step=event.step, attempts=event.attempts)

    def reflow_run_completed(self, event: RunCompleted) -> None:
        emit("run_completed", run=event.run_id)

    def reflow_run_failed(self, event: RunFailed) -> None:
        emit("run_failed", run=event.run_id, error=event.error.message)


def sqlite_url(path: Path) -> str:
    """The storage URL of a SQLite file (absolute, so a child process in any cwd finds it)."""
    return "sqlite:///" + str(path.resolve())


async def serve(db: Path, ledger: Path, concurrency: int) -> None:
    """Worker process body: execute runs until every run in the file has finished."""
    engine = Engine(
        sqlite_url(db),
        [order_workflow(Ledger(ledger))],
        concurrency=concurrency,
        lease=DEMO_LEASE,
        poll_interval=0.1,
        hooks=[_Reporter()],
        use_plugins=False,
    )
    await engine.start()
    try:
        # Other processes finish runs too, so watching the storage is the only way to know.
        while True:
            runs = await engine.list_runs(limit=1000)
            if all(run.status.is_terminal for run in runs):
                break
            await asyncio.sleep(0.1)
    finally:
        await engine.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m reflow_cli.demo worker --db PATH --ledger PATH``: one demo worker."""
    parser = argparse.ArgumentParser(prog="python -m reflow_cli.demo")
    sub = parser.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("worker", help="run one demo worker process")
    worker.add_argument("--db", type=Path, required=True)
    worker.add_argument("--ledger", type=Path, required=True)
    worker.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.db, args.ledger, args.concurrency))
    return 0


# -- orchestration (the parent process) ------------------------------------------------

ORDERS = (
    Order("A-1001", "ada@example.com", items=1, amount_cents=5_900),
    Order("A-1002", "grace@example.com", items=2, amount_cents=12_450),
    Order("A-1003", "alan@example.com", items=3, amount_cents=3_199),
)
KILL_AT = (ORDERS[0].order_id, "charge_card")
"""Worker #1 is killed as soon as the first order has *started* this step."""
TIME_LIMIT_S = 60.0
"""A worker silent for this long has hung; the demo gives up (the whole demo takes ~5 s)."""


_PROGRESS = {
    "step_started": "{step:<18} [dim]started[/dim]",
    "step_completed": "{step:<18} [green]checkpointed[/green]",
    "run_started": "claimed",
    "run_reclaimed": "[bold]reclaimed[/bold]: its lease went stale",
    "run_completed": "[bold green]run completed[/bold green]",
    "run_failed": "[bold red]run failed: {error}[/bold red]",
    "output": "[dim]{text}[/dim]",
}
"""How the parent renders each kind of worker event."""


class _WorkerProcess:
    """A demo worker child process and a thread turning its stdout into a queue of
    events, so the parent can wait for the next event with a deadline."""

    def __init__(self, number: int, db: Path, ledger: Path, concurrency: int) -> None:
        self.number = number
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "reflow_cli.demo", "worker", "--db", str(db),
             "--ledger", str(ledger), "--concurrency", str(concurrency)],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        self.pid = self.proc.pid
        self._events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = {"event": "output", "text": line.rstrip()}
            self._events.put(event)
        self._events.put(None)

    def next_event(self, timeout: float = TIME_LIMIT_S) -> dict[str, Any] | None:
        """The next event; ``None`` once the worker closed its stdout (it exited)."""
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"worker {self.number} reported nothing for {timeout:g}s") from None

    def finish(self, timeout: float = TIME_LIMIT_S) -> int:
        """Wait for the exit (killing the process if it hangs); return the exit code."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return code


class _Demo:
    """The parent's story: enqueue, start #1, kill it mid-step, start #2, verify."""

    def __init__(self, console: Console, db: Path, ledger: Ledger) -> None:
        self.console = console
        self.db = db
        self.ledger = ledger
        self.t0 = time.time()
        self.orders: dict[str, str] = {}  # run id -> order id
        self.pids: dict[int, int] = {}  # pid -> worker number
        self.workers: list[_WorkerProcess] = []

    def say(self, text: str) -> None:
        self.console.print(text, highlight=False)

    def show(self, worker: _WorkerProcess, event: dict[str, Any]) -> None:
        """One progress line per worker event."""
        kind = event["event"]
        if kind == "run_started" and event["attempt"] > 1:
            kind = "run_reclaimed"
        what = _PROGRESS.get(kind)
        if what is None:
            return
        colour = "cyan" if worker.number == 1 else "magenta"
        order = self.orders.get(str(event.get("run")), "")
        clock = f"{time.time() - self.t0:5.2f}s"
        text = what.format(**event)
        self.say(f"  {clock}  [{colour}]worker {worker.number}[/{colour}]  {order:<7} {text}")

    async def enqueue(self) -> None:
        engine = Engine(sqlite_url(self.db), [order_workflow(self.ledger)], use_plugins=False)
        try:
            for order in ORDERS:
                run = await engine.enqueue(WORKFLOW, order)
                self.orders[run.id] = order.order_id
        finally:
            await engine.stop()

    async def load(self) -> list[tuple[WorkflowRun, list[StepResult]]]:
        storage = open_storage(sqlite_url(self.db))
        try:
            await storage.initialize()
            loaded = []
            for run_id in self.orders:
                run = await storage.get_run(run_id)
                assert run is not None, f"run {run_id} vanished"
                loaded.append((run, await storage.get_step_results(run_id)))
            return loaded
        finally:
            await storage.close()

    def start(self, number: int, concurrency: int) -> _WorkerProcess:
        worker = _WorkerProcess(number, self.db, self.ledger.path, concurrency)
        self.pids[worker.pid] = number
        self.workers.append(worker)
        return worker

    def cleanup(self) -> None:
        """Leave no worker behind, whatever happened (a hang, Ctrl-C)."""
        for worker in self.workers:
            if worker.proc.poll() is None:
                worker.proc.kill()
            worker.finish()

    def run(self) -> int:
        self.ledger.create()
        asyncio.run(self.enqueue())
        self.say(f"Enqueued {len(ORDERS)} orders: {', '.join(self.orders.values())}, each")
        self.say("  " + " → ".join(name for name, _ in STEPS) + "\n")

        first = self.start(1, concurrency=2)
        self.say(f"[cyan]worker 1[/cyan] started (pid {first.pid}, 2 runs at a time)")
        while (event := first.next_event()) is not None:
            self.show(first, event)
            step_key = (self.orders.get(str(event.get("run"))), event.get("step"))
            if event["event"] == "step_started" and step_key == KILL_AT:
                os.kill(first.pid, signal.SIGKILL)
                break
        else:
            self.say(f"[red]worker 1 exited ({first.finish()}) before the kill point[/red]")
            return 1
        while (event := first.next_event()) is not None:
            self.show(first, event)  # lines it wrote just before dying
        first.finish()
        self.say(
            f"\n[bold red]SIGKILL[/bold red] → worker 1 (pid {first.pid}) while {KILL_AT[0]} "
            f"was in {KILL_AT[1]}.\nNo cleanup ran: its runs stay 'running' under leases "
            "nobody renews.\n"
        )

        second = self.start(2, concurrency=3)
        self.say(
            f"[magenta]worker 2[/magenta] started (pid {second.pid}); it reclaims a run after "
            f"{DEMO_LEASE.duration_s:g} s without a heartbeat"
        )
        while (event := second.next_event()) is not None:
            self.show(second, event)
        if second.finish() != 0:
            self.say(f"[red]worker 2 exited with code {second.proc.returncode}[/red]")
            return 1

        runs = asyncio.run(self.load())
        verdict = verify(runs, self.ledger.entries(), killed_pid=first.pid)
        self.say("\n[bold]Step timeline[/bold], read back from the checkpoints in the database:")
        for run, results in runs:
            self.console.print(self.timeline(run, results, verdict))
        self.say(f"\nLedger check ({self.ledger.path.name}, written by the steps themselves):")
        for ok, line in verdict.lines:
            self.say(f"  {'[green]' if ok else '[red]'}{line}[/]")
        return 0 if verdict.ok else 1

    def timeline(self, run: WorkflowRun, results: Sequence[StepResult], verdict: Verdict) -> Table:
        """One run's steps as checkpointed: who ran each, when, and what the kill did."""
        from rich import box
        from rich.table import Table

        title = f"{self.orders[run.id]}: {run.status}, claimed {run.attempt}x"
        table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        for column in ("step", "status", "attempts", "worker", "at", "note"):
            table.add_column(column, justify="right" if column == "at" else "left", no_wrap=True)
        by_name = {r.name: r for r in results}
        for name, _ in STEPS:
            result = by_name.get(name)
            if result is None:
                table.add_row(name, "-", "", "", "", "")
                continue
            pid = result.output.get("pid") if isinstance(result.output, dict) else None
            number = self.pids.get(pid, 0) if isinstance(pid, int) else 0
            table.add_row(
                name,
                result.status,
                str(result.attempts),
                f"#{number} ({pid})" if number else f"? ({pid})",
                f"+{result.updated_at / 1000 - self.t0:.2f}s",
                verdict.notes.get((run.id, name), ""),
            )
        return table


# -- verification (pure: checkpoints + ledger in, verdict out) ---------------------------


@dataclass
class Verdict:
    """Whether the demo proved its claim, as printable lines and per-step notes."""

    ok: bool = True
    lines: list[tuple[bool, str]] = field(default_factory=list)
    notes: dict[tuple[str, str], str] = field(default_factory=dict)

    def fail(self, line: str) -> None:
        self.ok = False
        self.lines.append((False, line))


def verify(
    runs: Sequence[tuple[WorkflowRun, Sequence[StepResult]]],
    entries: Sequence[LedgerEntry],
    *,
    killed_pid: int,
) -> Verdict:
    """Check that every run completed and every checkpointed step's side effect happened
    once; a step that was running at the kill may have run twice (at-least-once), which
    is reported as such and is not a failure."""
    verdict = Verdict()
    effects: dict[tuple[str, str], list[LedgerEntry]] = {}
    starts: dict[tuple[str, str], list[LedgerEntry]] = {}
    for entry in entries:
        into = effects if entry.phase == "effect" else starts
        into.setdefault((entry.run_id, entry.step), []).append(entry)
    checked = twice = 0
    for run, results in runs:
        if run.status != RunStatus.COMPLETED:
            verdict.fail(f"run {run.id} ended {run.status}, not completed ✗")
        resumed = any(e.pid != killed_pid for e in entries if e.run_id == run.id) and any(
            e.pid == killed_pid for e in entries if e.run_id == run.id
        )
        for result in results:
            if not result.status.is_done:
                continue
            key = (run.id, result.name)
            done, began = effects.get(key, []), starts.get(key, [])
            checked += 1
            ran_on = result.output.get("pid") if isinstance(result.output, dict) else None
            if len(done) == 1 and len(began) > 1:
                verdict.notes[key] = "re-run"
            elif len(done) == 1 and resumed and ran_on == killed_pid:
                verdict.notes[key] = "before kill"
            elif len(done) == 2 and done[0].pid == killed_pid and ran_on != killed_pid:
                # Killed after its side effect but before its checkpoint: at-least-once.
                twice += 1
                verdict.notes[key] = "ran twice (at-least-once)"
            elif len(done) != 1:
                verdict.fail(f"{result.name} of run {run.id} has {len(done)} side effects ✗")
    if verdict.ok and not twice:
        verdict.lines.insert(
            0, (True, f"each completed step ran to completion exactly once ✓ ({checked} steps)")
        )
    elif verdict.ok:
        verdict.lines.insert(
            0,
            (True, f"{checked} steps checked: all ran to completion once, except {twice} that "
             "the kill caught between side effect and checkpoint; they ran twice, as "
             "at-least-once execution allows ✓"),
        )  # fmt: skip
    restarted = [key for key, note in verdict.notes.items() if note == "re-run"]
    if restarted:
        verdict.lines += [
            (True, f"{len(restarted)} step(s) in flight at the kill started again on worker 2"),
            (True, "(at-least-once); the killed attempts died before their side effect."),
            (True, "Key side effects by run id to stay safe when a kill lands later."),
        ]
    return verdict


def run_demo(db: Path | None = None, *, keep: bool = False) -> int:
    """``reflow demo``: the whole story in this process and two worker processes.

    Uses a fresh temporary directory unless ``db`` names a file that must not exist
    yet (the ledger goes next to it). Returns the exit code: 0 when every run completed
    and no completed step ran twice, except as at-least-once allows.
    """
    from rich.console import Console

    console = Console(highlight=False)
    workdir = Path(tempfile.mkdtemp(prefix="reflow-demo-")) if db is None else db.parent
    db_path = db if db is not None else workdir / "demo.db"
    ledger = Ledger(db_path.with_name(db_path.stem + "-ledger.db"))
    for path in (db_path, ledger.path):
        if path.exists():
            console.print(f"[red]{path} exists; the demo needs a fresh file (or omit --db)[/red]")
            return 2
    console.print(
        "[bold]Reflow demo[/bold]: durable order fulfilment on one SQLite file, "
        f"no server.\n  database: {db_path}\n  ledger:   {ledger.path}"
    )
    started = time.monotonic()
    demo = _Demo(console, db_path, ledger)
    try:
        return demo.run()
    except TimeoutError as exc:
        console.print(f"[red]{exc}; giving up[/red]")
        return 1
    finally:
        demo.cleanup()
        console.print(f"\nDone in {time.monotonic() - started:.1f}s.")
        if db is None and not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            console.print(
                f"Files kept. Inspect them with: reflow runs list --storage {sqlite_url(db_path)}",
                soft_wrap=True,
            )


if __name__ == "__main__":
    sys.exit(main())
