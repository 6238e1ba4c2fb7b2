"""PostgreSQL scaling: runs/s of 5-step runs against the number of worker processes.

For each process count N (``--processes``, default 1,2,4): ``--runs`` runs are
enqueued into a fresh schema, then N worker processes (multiprocessing ``spawn``, each
its own interpreter, event loop, connection pool and ``Engine(concurrency=25)`` started
with ``start()``) execute them. Workers first initialize their storage and report ready;
the clock starts when all are released at once (interpreter start-up is not measured)
and stops when the parent sees every run finished. The parent only observes: it counts
finished runs with one ``SELECT count(*)`` every ``--observe-ms`` milliseconds, so the
stop time is known to within that interval.

On a machine with few cores the PostgreSQL server competes with the workers for CPU;
the script prints the core count so the speed-up can be read against it.

    python bench/scaling_postgres.py
    REFLOW_BENCH_POSTGRES_DSN=postgresql://user@host/db python bench/scaling_postgres.py
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import time
from multiprocessing.synchronize import Event
from typing import Any

from common import (
    busy_fraction,
    cpu_ticks,
    drop_schema,
    fmt_rate,
    fresh_schema,
    make_workflow,
    postgres_dsn,
    postgres_unavailable,
    print_header,
)

from reflow_core import Engine


def _worker(
    dsn: str, schema: str, steps: int, concurrency: int, ready: Event, go: Event, stop: Event
) -> None:
    """Entry point of one worker process."""
    asyncio.run(_worker_main(dsn, schema, steps, concurrency, ready, go, stop))


async def _worker_main(
    dsn: str, schema: str, steps: int, concurrency: int, ready: Event, go: Event, stop: Event
) -> None:
    from reflow_adapters.postgres import PostgresStorage

    storage = PostgresStorage(dsn, schema=schema)
    engine = Engine(storage, [make_workflow(steps)], concurrency=concurrency)
    try:
        await storage.initialize()
        ready.set()
        await asyncio.to_thread(go.wait)
        await engine.start()
        await asyncio.to_thread(stop.wait)
    finally:
        await engine.stop()
        await storage.close()


async def _enqueue(dsn: str, schema: str, steps: int, runs: int) -> float:
    """Create ``runs`` pending runs (50 enqueues in flight); return enqueue/s."""
    from reflow_adapters.postgres import PostgresStorage

    storage = PostgresStorage(dsn, schema=schema)
    workflow = make_workflow(steps)
    engine = Engine(storage, [workflow])
    try:
        await storage.initialize()
        t0 = time.perf_counter()
        for start in range(0, runs, 50):
            await asyncio.gather(
                *(engine.enqueue(workflow, {"n": n}) for n in range(start, min(runs, start + 50)))
            )
        return runs / (time.perf_counter() - t0)
    finally:
        await storage.close()


def _finished(conn: Any, schema: str) -> tuple[int, int]:
    from psycopg import sql

    row = conn.execute(
        sql.SQL(
            "SELECT count(*) FILTER (WHERE status = 'completed'), "
            "count(*) FILTER (WHERE status IN ('failed', 'cancelled')) FROM {}.runs"
        ).format(sql.Identifier(schema))
    ).fetchone()
    return int(row[0]), int(row[1])


def measure(dsn: str, processes: int, args: argparse.Namespace) -> tuple[float, float, float]:
    """One measurement with ``processes`` workers; returns (runs/s, enqueue/s, machine busy)."""
    import psycopg

    schema = fresh_schema()
    ctx = multiprocessing.get_context("spawn")
    workers: list[Any] = []
    stop = ctx.Event()
    try:
        enqueue_rate = asyncio.run(_enqueue(dsn, schema, args.steps, args.runs))
        go = ctx.Event()
        readies = [ctx.Event() for _ in range(processes)]
        for ready in readies:
            proc = ctx.Process(
                target=_worker,
                args=(dsn, schema, args.steps, args.concurrency, ready, go, stop),
                daemon=True,
            )
            proc.start()
            workers.append(proc)
        for ready, proc in zip(readies, workers, strict=True):
            if not ready.wait(60):
                raise RuntimeError(f"worker {proc.pid} did not start within 60 s")
        with psycopg.connect(dsn, autocommit=True) as conn:
            ticks = cpu_ticks()
            t0 = time.perf_counter()
            go.set()
            deadline = t0 + args.timeout
            while True:
                completed, failed = _finished(conn, schema)
                now = time.perf_counter()
                if completed + failed >= args.runs:
                    break
                if now > deadline:
                    raise RuntimeError(f"only {completed} of {args.runs} runs done after timeout")
                if any(not p.is_alive() for p in workers):
                    raise RuntimeError("a worker process died")
                time.sleep(args.observe_ms / 1000)
        if failed:
            raise RuntimeError(f"{failed} runs failed")
        return args.runs / (now - t0), enqueue_rate, busy_fraction(ticks, cpu_ticks())
    finally:
        stop.set()
        for proc in workers:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
        drop_schema(dsn, schema)


def _default_pool_size() -> int:
    """The adapter's own default, read from its signature (so this line never drifts)."""
    import inspect

    from reflow_adapters.postgres import PostgresStorage

    size: int = inspect.signature(PostgresStorage).parameters["max_size"].default
    return size


def main(args: argparse.Namespace) -> None:
    print_header("Reflow on PostgreSQL: throughput against worker processes", postgres=True)
    dsn = postgres_dsn()
    reason = postgres_unavailable(dsn)
    if reason:
        print(f"SKIP: {reason}")
        print("Set REFLOW_BENCH_POSTGRES_DSN (or REFLOW_TEST_POSTGRES_DSN) to a server to run it.")
        return
    counts = [int(n) for n in args.processes.split(",")]
    print(
        f"runs={args.runs} of {args.steps} steps per measurement, fresh schema each, "
        f"Engine(concurrency={args.concurrency}) per process, default pool (max "
        f"{_default_pool_size()} connections per process); completion observed every "
        f"{args.observe_ms} ms; "
        f"{os.cpu_count()} cores shared with the PostgreSQL server\n"
    )
    print(
        f"  {'processes':>9} {'runs/s':>8} {'steps/s':>9} {'speed-up':>9} {'enqueue/s':>10} "
        f"{'machine busy':>13}"
    )
    base = 0.0
    for processes in counts:
        rate, enqueue_rate, busy = measure(dsn, processes, args)
        base = base or rate
        print(
            f"  {processes:>9} {fmt_rate(rate):>8} {fmt_rate(rate * args.steps):>9} "
            f"{rate / base:>8.2f}x {fmt_rate(enqueue_rate):>10} {busy:>13.0%}",
            flush=True,
        )
    print(
        f"\n  speed-up is relative to {counts[0]} process(es); machine busy = share of all "
        "cores busy during the measurement (workers, PostgreSQL and anything else running)"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--processes", default="1,2,4", help="comma-separated process counts")
    parser.add_argument("--runs", type=int, default=3000)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=25)
    parser.add_argument("--observe-ms", type=int, default=50, help="parent's polling interval")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per measurement")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
