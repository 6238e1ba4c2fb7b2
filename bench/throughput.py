"""Throughput: how many pre-enqueued runs of trivial steps one engine executes per second.

For each adapter and step count: ``--runs`` runs are enqueued into a fresh, empty store
(timed separately: enqueue/s), then one ``Engine(concurrency=--concurrency)`` executes
them all, in two ways:

* ``start()``: the real dispatch loop, as users run it (``async with Engine(...)``);
  the clock runs from ``start()`` until the last run's completion hook fires. This is the
  headline figure.
* ``run_until_idle()``: the batch drain (what reflow-ts's benchmark measures with a
  tight ``tick()`` loop).

Each is repeated ``--passes`` times on a new store; the best pass is reported with the
median and worst, and the spread 1 - worst/best. SQLite and APSW use a new file in a
temporary directory per pass, in the DEFAULT configuration (WAL, synchronous=FULL: every
checkpoint is durable before the next step starts). Before measuring, one 500-run 5-step
pass per adapter warms up imports, caches and the allocator.

    python bench/throughput.py                       # memory and sqlite, 1 and 5 steps
    python bench/throughput.py --adapter postgres --passes 1
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common import (
    Spread,
    busy_fraction,
    cpu_ticks,
    drop_schema,
    fmt_rate,
    make_storage,
    make_workflow,
    postgres_dsn,
    postgres_unavailable,
    print_header,
)

from reflow_core import Engine, RunCompleted, RunFailed, RunStatus

ADAPTERS = ("memory", "sqlite", "apsw", "postgres")
MODES = ("start", "drain")

TARGETS: dict[tuple[str, int], float] = {
    ("sqlite", 5): 1_400,
    ("sqlite", 1): 2_400,
    ("memory", 5): 7_000,
}
"""runs/s targets from issue 2 ("Done when"), for the start() figure."""


class _Completions:
    """Hook object: counts finished runs and signals when all expected have finished."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.completed = 0
        self.failed = 0
        self.done = asyncio.Event()
        self.finished_ns = 0

    def reflow_run_completed(self, event: RunCompleted) -> None:
        self.completed += 1
        self._check()

    def reflow_run_failed(self, event: RunFailed) -> None:
        self.failed += 1
        self._check()

    def _check(self) -> None:
        if self.completed + self.failed >= self.expected and not self.done.is_set():
            self.finished_ns = time.perf_counter_ns()
            self.done.set()


@dataclass
class PassResult:
    """One pass: enqueue rate and execution rate."""

    enqueue_per_s: float
    runs_per_s: float
    cpu_us_per_run: float
    """Process CPU time (all threads) per run while executing: a figure that other load
    on the machine inflates far less than wall-clock rates."""
    machine_busy: float
    """Share of all cores busy meanwhile (this process, any server, and anything else)."""


async def one_pass(
    adapter: str, steps: int, runs: int, concurrency: int, mode: str, directory: Path
) -> PassResult:
    """Enqueue ``runs`` into a fresh store, execute them all, return the rates."""
    storage = make_storage(adapter, directory)
    workflow = make_workflow(steps)
    counter = _Completions(runs)
    engine = Engine(storage, [workflow], concurrency=concurrency, hooks=[counter])
    try:
        await storage.initialize()
        t0 = time.perf_counter_ns()
        for n in range(runs):
            await engine.enqueue(workflow, {"n": n})
        enqueue_s = (time.perf_counter_ns() - t0) / 1e9
        gc.collect()
        cpu0, ticks0 = time.process_time(), cpu_ticks()
        t0 = time.perf_counter_ns()
        if mode == "start":
            await engine.start()
            await asyncio.wait_for(counter.done.wait(), timeout=600)
            elapsed_s = (counter.finished_ns - t0) / 1e9
            cpu_s, busy = time.process_time() - cpu0, busy_fraction(ticks0, cpu_ticks())
        else:
            executed = await engine.run_until_idle()
            elapsed_s = (time.perf_counter_ns() - t0) / 1e9
            cpu_s, busy = time.process_time() - cpu0, busy_fraction(ticks0, cpu_ticks())
            if executed != runs:
                raise RuntimeError(f"run_until_idle executed {executed} runs, expected {runs}")
        if counter.completed != runs:
            raise RuntimeError(f"{counter.completed} of {runs} runs completed")
        await _check_all_completed(engine, runs)
    finally:
        await engine.stop()
        await storage.close()
        if adapter == "postgres":
            drop_schema(postgres_dsn(), getattr(storage, "schema", ""))
    return PassResult(
        enqueue_per_s=runs / enqueue_s,
        runs_per_s=runs / elapsed_s,
        cpu_us_per_run=cpu_s / runs * 1e6,
        machine_busy=busy,
    )


async def _check_all_completed(engine: Engine, runs: int) -> None:
    """Read back the first page of runs: all completed (a benchmark that loses runs lies)."""
    page = await engine.list_runs(limit=min(runs, 100))
    bad = [r for r in page if r.status is not RunStatus.COMPLETED]
    if bad:
        raise RuntimeError(f"{len(bad)} runs not completed, e.g. {bad[0]}")


def _report(adapter: str, steps: int, mode: str, results: list[PassResult]) -> None:
    rates = Spread(tuple(r.runs_per_s for r in results))
    enq = Spread(tuple(r.enqueue_per_s for r in results))
    cpu = statistics.median(r.cpu_us_per_run for r in results)
    busy = statistics.median(r.machine_busy for r in results)
    target = TARGETS.get((adapter, steps))
    ratio = "-"
    if target:
        ratio = f"{rates.best / target:.2f}x of {fmt_rate(target)}"
        ratio = ratio if mode == "start" else f"({rates.best / target:.2f}x)"
    warn = "  ! spread > 25%" if rates.spread > 0.25 else ""
    cells = [
        f"{adapter:<8}",
        f"{steps:>5}",
        f"{mode:<6}",
        f"{fmt_rate(rates.best):>8}",
        f"{fmt_rate(rates.median):>8}",
        f"{fmt_rate(rates.worst):>8}",
        f"{rates.spread:>6.0%}",
        f"{fmt_rate(rates.best * steps):>8}",
        f"{fmt_rate(enq.best):>9}",
        f"{cpu:>7,.0f}",
        f"{busy:>5.0%}",
    ]
    print("  " + " ".join(cells) + f"   {ratio}{warn}", flush=True)


def _print_table_header() -> None:
    cells = [
        f"{'adapter':<8}",
        f"{'steps':>5}",
        f"{'mode':<6}",
        f"{'best r/s':>8}",
        f"{'median':>8}",
        f"{'worst':>8}",
        f"{'spread':>6}",
        f"{'steps/s':>8}",
        f"{'enqueue/s':>9}",
        f"{'cpu us':>7}",
        f"{'busy':>5}",
    ]
    print("  " + " ".join(cells) + "   vs target")


async def main(args: argparse.Namespace) -> None:
    adapters = [a.strip() for a in args.adapter.split(",") if a.strip()]
    for adapter in adapters:
        if adapter not in ADAPTERS:
            raise SystemExit(f"unknown adapter {adapter!r}; choose from {', '.join(ADAPTERS)}")
    uses_postgres = "postgres" in adapters
    print_header(
        "Reflow throughput (pre-enqueued runs, trivial async steps)", postgres=uses_postgres
    )
    if uses_postgres:
        reason = postgres_unavailable(postgres_dsn())
        if reason:
            print(f"SKIP postgres: {reason}\n")
            adapters.remove("postgres")
    step_counts = [int(s) for s in args.steps.split(",")]
    print(
        f"runs={args.runs} concurrency={args.concurrency} passes={args.passes} "
        f"steps={step_counts}; best/median/worst of the passes; steps/s and enqueue/s "
        "are best-pass figures; cpu us = median process CPU (all threads) per run; "
        "busy = median share of all cores busy (anything running) during execution; "
        "'start' = start() dispatch loop (headline), 'drain' = run_until_idle()\n"
    )
    _print_table_header()
    with tempfile.TemporaryDirectory(prefix="reflow-bench-") as tmp:
        directory = Path(tmp)
        for adapter in adapters:
            await one_pass(adapter, 5, min(500, args.runs), args.concurrency, "start", directory)
            for steps in step_counts:
                for mode in MODES:
                    results = [
                        await one_pass(adapter, steps, args.runs, args.concurrency, mode, directory)
                        for _ in range(args.passes)
                    ]
                    _report(adapter, steps, mode, results)
    print()
    _print_targets_note()


def _print_targets_note() -> None:
    print(
        "targets (issue 2, start() figure): sqlite 5-step >= 1,400 runs/s, "
        "sqlite 1-step >= 2,400 runs/s, memory 5-step >= 7,000 runs/s"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--adapter",
        default="memory,sqlite",
        help="comma-separated: memory, sqlite, apsw, postgres (default: memory,sqlite)",
    )
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=25)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--steps", default="1,5", help="comma-separated step counts")
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
