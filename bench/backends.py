"""Every storage backend in one run: 5-step runs/s with 1 and 4 worker processes, and
cross-process dispatch latency (enqueue in one process -> first step starts in another).

Backends: ``sqlite`` always; ``postgres`` when its server answers; ``mysql`` and
``redis`` when their packages (``reflow-mysql``, ``reflow-redis``) are installed and
their servers answer. A backend that cannot run is listed with the reason and skipped.

Each store is a fresh one from the adapter's own conformance factory (a SQLite file, a
PostgreSQL schema, a MySQL table prefix, a Redis key prefix), opened by worker
processes through its URL exactly as ``reflow worker --storage URL`` would, and torn
down afterwards. Rounds are interleaved: every round measures every backend once, in a
rotated order, and the figures are medians over ``--rounds`` (default 5) rounds.

* throughput: ``--runs`` 5-step runs are enqueued, then P worker processes
  (multiprocessing ``spawn``; ``Engine(concurrency=25, poll_interval=50 ms)``) are
  released together; the clock stops when the parent sees every run completed (it
  counts with ``list_runs`` every 20 ms). CPU per run is the workers' user+system CPU
  over the measured interval divided by the runs (server CPU not included).
* dispatch: one idle worker with the engine's default 1 s poll interval; the parent
  enqueues ``--latency-n`` runs one at a time (random gaps) and records enqueue ->
  first step body. Backends with push wake-ups (``notify``) answer in milliseconds;
  the others at their next poll.

    python bench/backends.py
    python bench/backends.py --backends sqlite,mysql --rounds 5 --runs 200
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import queue
import random
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

from common import fmt_ms, make_workflow, percentile, postgres_dsn, print_header

from reflow_core import Engine, RunFilter, RunStatus, StepContext, Workflow, open_storage
from reflow_core.registry import Capability, adapter_specs

STEPS = 5
CONCURRENCY = 25
WORKER_POLL_S = 0.05
OBSERVE_S = 0.02

MYSQL_URL = os.environ.get("REFLOW_BENCH_MYSQL_URL", "mysql://root@127.0.0.1:3306/test")
REDIS_URL = os.environ.get("REFLOW_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


def _options(backend: str) -> dict[str, str]:
    """The conformance factory's ``--reflow-option`` values for one backend."""
    if backend == "postgres":
        return {"dsn": postgres_dsn()}
    if backend == "mysql":
        return {"url": MYSQL_URL}
    if backend == "redis":
        return {"url": REDIS_URL}
    return {}


@contextlib.contextmanager
def fresh_store(backend: str, directory: Path) -> Iterator[str]:
    """The URL of a fresh, empty, initialized store of ``backend``; torn down on exit."""
    spec = adapter_specs()[backend]
    assert spec.conformance_factory is not None, f"{backend} has no conformance factory"
    # A directory of its own: a file-based factory may use one fixed file name in it.
    own = Path(tempfile.mkdtemp(prefix=f"{backend}-", dir=directory))
    made: Any = spec.conformance_factory(own, _options(backend), clock=None)
    generator = made if isinstance(made, Iterator) else None
    storage = next(generator) if generator is not None else made
    try:
        asyncio.run(_initialize(storage))
        assert storage.url, f"{backend} cannot be shared between processes"
        yield storage.url
    finally:
        if generator is not None:
            next(generator, None)


async def _initialize(storage: Any) -> None:
    try:
        await storage.initialize()
    finally:
        await storage.close()


def available(backend: str, directory: Path) -> str | None:
    """Why ``backend`` cannot be measured here, or None."""
    spec = adapter_specs().get(backend)
    if spec is None:
        return "adapter not installed"
    if Capability.CROSS_PROCESS not in spec.capabilities:
        return "not shareable between processes"
    try:
        with fresh_store(backend, directory):
            return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"[:160]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- throughput -------------------------------------------------------------------------


def _throughput_worker(url: str, ready: Event, go: Event, stop: Event) -> None:
    asyncio.run(_throughput_main(url, ready, go, stop))


async def _throughput_main(url: str, ready: Event, go: Event, stop: Event) -> None:
    storage = open_storage(url)
    engine = Engine(
        storage,
        [make_workflow(STEPS)],
        concurrency=CONCURRENCY,
        poll_interval=WORKER_POLL_S,
        use_plugins=False,
    )
    try:
        await storage.initialize()
        ready.set()
        await asyncio.to_thread(go.wait)
        await engine.start()
        await asyncio.to_thread(stop.wait)
    finally:
        await engine.stop()
        await storage.close()


async def _enqueue(url: str, runs: int) -> None:
    storage = open_storage(url)
    engine = Engine(storage, [make_workflow(STEPS)], use_plugins=False)
    try:
        await storage.initialize()
        for n in range(runs):
            await engine.enqueue(f"bench_{STEPS}step", {"n": n})
    finally:
        await storage.close()


async def _completed(storage: Any, runs: int) -> int:
    done = await storage.list_runs(RunFilter(status=RunStatus.COMPLETED, limit=runs + 1))
    return len(done)


def throughput(url: str, processes: int, runs: int) -> tuple[float, float]:
    """(runs/s, worker CPU ms per run) for ``runs`` runs on ``processes`` workers."""
    asyncio.run(_enqueue(url, runs))
    ctx = multiprocessing.get_context("spawn")
    go, stop = ctx.Event(), ctx.Event()
    readies = [ctx.Event() for _ in range(processes)]
    procs = [
        ctx.Process(target=_throughput_worker, args=(url, ready, go, stop), daemon=True)
        for ready in readies
    ]
    for proc in procs:
        proc.start()
    try:
        for ready in readies:
            if not ready.wait(60):
                raise RuntimeError("a worker process did not start within 60 s")
        pids = [p.pid for p in procs if p.pid is not None]
        cpu_before = sum(_cpu_seconds(pid) for pid in pids)

        async def observe() -> float:
            storage = open_storage(url)
            await storage.initialize()
            try:
                started = time.perf_counter()
                go.set()
                while await _completed(storage, runs) < runs:
                    if time.perf_counter() - started > 600:
                        raise RuntimeError("runs did not finish within 600 s")
                    await asyncio.sleep(OBSERVE_S)
                return time.perf_counter() - started
            finally:
                await storage.close()

        elapsed = asyncio.run(observe())
        cpu = sum(_cpu_seconds(pid) for pid in pids) - cpu_before
    finally:
        stop.set()
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
    return runs / elapsed, cpu / runs * 1000


# -- dispatch latency -------------------------------------------------------------------


def _latency_workflow(report: Any = None) -> Workflow[Any]:
    workflow: Workflow[Any] = Workflow("backends_latency")

    @workflow.step
    async def first(ctx: StepContext[Any]) -> int:
        started = time.time_ns()
        if report is not None:
            report.put((int(ctx.input["n"]), started))
        return started

    return workflow


def _latency_worker(url: str, report: Any, ready: Event, stop: Event) -> None:
    asyncio.run(_latency_main(url, report, ready, stop))


async def _latency_main(url: str, report: Any, ready: Event, stop: Event) -> None:
    storage = open_storage(url)
    engine = Engine(storage, [_latency_workflow(report)], concurrency=CONCURRENCY)
    try:
        await engine.start()
        await asyncio.sleep(0.3)  # let a listener subscribe and the loop go idle
        ready.set()
        await asyncio.to_thread(stop.wait)
    finally:
        await engine.stop()
        await storage.close()


def dispatch_latency(url: str, n: int) -> list[int]:
    """Nanoseconds from just before ``enqueue()`` to the first step body, ``n`` samples."""
    ctx = multiprocessing.get_context("spawn")
    report: Any = ctx.Queue()
    ready, stop = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_latency_worker, args=(url, report, ready, stop), daemon=True)
    proc.start()
    samples: list[int] = []

    async def drive() -> None:
        storage = open_storage(url)
        engine = Engine(storage, [_latency_workflow()], use_plugins=False)
        await storage.initialize()
        try:
            for i in range(-3, n):  # three warm-up runs
                await asyncio.sleep(0.005 + random.uniform(0, 0.02))
                t0 = time.time_ns()
                await engine.enqueue("backends_latency", {"n": i})
                try:
                    seen, started = await asyncio.to_thread(report.get, True, 15)
                except queue.Empty:
                    raise RuntimeError(f"run {i} did not start in the worker") from None
                if seen != i:
                    raise RuntimeError(f"expected run {i}, the worker started run {seen}")
                if i >= 0:
                    samples.append(started - t0)
        finally:
            await storage.close()

    try:
        if not ready.wait(60):
            raise RuntimeError("the worker process did not start within 60 s")
        asyncio.run(drive())
    finally:
        stop.set()
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    return samples


# -- the run ----------------------------------------------------------------------------


@dataclass
class Figures:
    """One backend's samples over all rounds."""

    rate: dict[int, list[float]] = field(default_factory=dict)
    cpu_ms: dict[int, list[float]] = field(default_factory=dict)
    latency_ns: list[int] = field(default_factory=list)
    latency_p50: list[float] = field(default_factory=list)


def _round(
    backends: list[str], figures: dict[str, Figures], args: argparse.Namespace, directory: Path
) -> None:
    for backend in backends:
        for processes in args.processes:
            with fresh_store(backend, directory) as url:
                rate, cpu_ms = throughput(url, processes, args.runs)
            figures[backend].rate.setdefault(processes, []).append(rate)
            figures[backend].cpu_ms.setdefault(processes, []).append(cpu_ms)
        with fresh_store(backend, directory) as url:
            samples = dispatch_latency(url, args.latency_n)
        figures[backend].latency_ns += samples
        figures[backend].latency_p50.append(percentile(samples, 50))


def _report(backends: list[str], figures: dict[str, Figures], args: argparse.Namespace) -> None:
    procs = args.processes
    head = "".join(f" {f'runs/s P={p}':>12} {'CPU ms/run':>10}" for p in procs)
    print(f"\n{'backend':<10}{head} {'dispatch p50':>12} {'p90':>8} {'p99':>8} {'notify':>7}")
    specs = adapter_specs()
    for backend in backends:
        f = figures[backend]
        cells = "".join(
            f" {statistics.median(f.rate[p]):>12,.0f} {statistics.median(f.cpu_ms[p]):>10.1f}"
            for p in procs
        )
        notify = "yes" if Capability.NOTIFY in specs[backend].capabilities else "poll"
        print(
            f"{backend:<10}{cells} {fmt_ms(statistics.median(f.latency_p50)):>12} "
            f"{fmt_ms(percentile(f.latency_ns, 90)):>8} "
            f"{fmt_ms(percentile(f.latency_ns, 99)):>8} {notify:>7}"
        )
    print(
        f"\nmedians of {args.rounds} interleaved rounds; {args.runs} runs of {STEPS} steps per "
        f"throughput sample; dispatch in ms (p50: median of per-round medians; p90/p99 over "
        f"all {args.rounds * args.latency_n} samples; 'poll' = found at the 1 s poll)."
    )
    for backend in backends:
        f = figures[backend]
        spread = ", ".join(f"P={p}: {min(f.rate[p]):,.0f}..{max(f.rate[p]):,.0f}" for p in procs)
        print(f"  {backend} runs/s range over rounds: {spread}")


def main(args: argparse.Namespace) -> None:
    print_header("Storage backends: throughput and cross-process dispatch", postgres=True)
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    backends: list[str] = []
    with tempfile.TemporaryDirectory(prefix="reflow-backends-") as tmp:
        directory = Path(tmp)
        for backend in wanted:
            why = available(backend, directory)
            if why is None:
                backends.append(backend)
            else:
                print(f"  skipping {backend}: {why}")
        if not backends:
            print("nothing to measure")
            return
        figures = {backend: Figures() for backend in backends}
        for index in range(args.rounds):
            order = backends[index % len(backends) :] + backends[: index % len(backends)]
            started = time.perf_counter()
            _round(order, figures, args, directory)
            print(
                f"  round {index + 1}/{args.rounds} done in {time.perf_counter() - started:.0f} s"
            )
        _report(backends, figures, args)


def _processes(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="sqlite,postgres,mysql,redis")
    parser.add_argument("--processes", type=_processes, default=[1, 4])
    parser.add_argument("--runs", type=int, default=200, help="runs per throughput sample")
    parser.add_argument("--latency-n", type=int, default=30, help="dispatch samples per round")
    parser.add_argument("--rounds", type=int, default=5)
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
