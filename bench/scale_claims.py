"""Claim and listing cost on a big SQLite store against an empty one (issue 13).

The "big" store holds ``--finished`` finished runs (1,000,000 by default) of the
measured workflow ``wf`` and ``--pending-other`` pending runs (50,000) of another
workflow, all older than anything the measurement creates: the two growth hazards of
issue 13 (claims that walk the other workflow's backlog, listings that walk the whole
workflow). The "empty" store starts with nothing. Both are files in a temporary
directory with the adapter's default durability (WAL, ``synchronous=FULL``), and the
big one is seeded once, straight through SQL in one transaction (a bulk INSERT from a
recursive CTE, not a million ``create_run`` calls).

Each round measures both stores, alternating which goes first, in a fresh process each
(so neither warms the other's caches): ``list_runs`` by workflow and status (and by
workflow alone), ``claim_next_run`` one at a time, ``claim_runs`` in batches of 25 (when
the code has it), storage-level five-step runs at concurrency 25 (create, claim,
five lease-checked step saves, complete), and five-step runs executed by an ``Engine``
at concurrency 25 (issue 13's line: big/empty >= 0.8). Medians over the rounds are
printed, with process CPU per call, and the big/empty ratio; the two aims of issue 13
are checked at the end.

``--baseline DIR`` adds another checkout (say ``git archive HEAD | tar -x -C DIR``)
measured the same way, interleaved round by round, and prints new/baseline ratios.

    python bench/scale_claims.py                        # ~3 min on two cores
    python bench/scale_claims.py --finished 100000 --rounds 3   # a quick look
    python bench/scale_claims.py --baseline /tmp/reflow-main
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BATCH = 25
LISTINGS = 30
"""Calls per listing kind and round; the median is kept."""


# -- the child: seed or measure one store, print JSON ----------------------------------


def _storage(path: str) -> Any:
    from reflow_adapters.sqlite import SQLiteStorage

    return SQLiteStorage(path)


async def _initialize(path: str) -> None:
    storage = _storage(path)
    await storage.initialize()
    await storage.close()


def seed(path: str, finished: int, pending_other: int) -> dict[str, float]:
    """Create the schema through the adapter, then bulk-insert the rows in one transaction."""
    asyncio.run(_initialize(path))
    started = time.perf_counter()
    base = time.time_ns() // 1_000_000 - 30 * 86_400_000
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("BEGIN")
        conn.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
            "INSERT INTO reflow_runs (id, workflow, input, status, output, attempt, "
            "created_at, updated_at) "
            "SELECT printf('done-%08d', i), 'wf', 'null', "
            "CASE i % 10 WHEN 0 THEN 'failed' ELSE 'completed' END, 'null', 1, ? + i, ? + i "
            "FROM n",
            (finished, base, base),
        )
        conn.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
            "INSERT INTO reflow_runs (id, workflow, input, status, attempt, created_at, "
            "updated_at) SELECT printf('other-%08d', i), 'other', 'null', 'pending', 0, "
            "? + i, ? + i FROM n",
            (pending_other, base - pending_other, base - pending_other),
        )
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return {"seed_s": time.perf_counter() - started}


def _run(index: int) -> Any:
    from reflow_core import RunStatus, WorkflowRun

    now = time.time_ns() // 1_000_000
    return WorkflowRun(
        id=f"m-{uuid.uuid4()}",
        workflow="wf",
        input={"n": index},
        status=RunStatus.PENDING,
        created_at=now,
        updated_at=now,
    )


async def _timed(calls: int, make: Any) -> tuple[float, float]:
    """Median wall ns per call and mean process CPU ns per call of ``calls`` awaits."""
    walls: list[int] = []
    cpu = time.process_time_ns()
    for _ in range(calls):
        start = time.perf_counter_ns()
        await make()
        walls.append(time.perf_counter_ns() - start)
    return statistics.median(walls), (time.process_time_ns() - cpu) / calls


async def _five_step_runs(storage: Any, runs: int, concurrency: int) -> tuple[float, float]:
    from reflow_core import RunStatus, StepResult, StepStatus

    async def one(index: int) -> None:
        await storage.create_run(_run(index))
        claimed = await storage.claim_next_run(["wf"], lease_ms=30_000)
        assert claimed is not None, "every coroutine creates the run it claims"
        now = time.time_ns() // 1_000_000
        for step in range(5):
            row = StepResult(
                id=f"{claimed.run.id}/s{step}",
                run_id=claimed.run.id,
                name=f"s{step}",
                status=StepStatus.COMPLETED,
                output={"step": step},
                attempts=1,
                created_at=now,
                updated_at=now,
            )
            assert await storage.save_step_result(row, claimed.lease_id)
        assert await storage.update_claimed_run_status(
            claimed.run.id, claimed.lease_id, RunStatus.COMPLETED, output={"ok": True}
        )

    counter = iter(range(runs))

    async def worker() -> None:
        for index in counter:
            await one(index)

    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return runs / elapsed, (time.process_time() - cpu) / runs * 1e6


async def _engine_runs(storage: Any, runs: int, concurrency: int) -> tuple[float, float]:
    """Runs/s and process CPU us per run of ``runs`` five-step runs of ``wf`` executed by
    an ``Engine`` on ``storage`` at ``concurrency``: enqueued first (concurrently, so
    group commit applies), then timed from ``start()`` until the last one completed.
    Only ``wf`` is registered: the other workflow's pending runs are never claimed."""
    from reflow_core import Engine, StepContext, Workflow

    workflow: Workflow[Any] = Workflow("wf")
    for index in range(5):

        async def step(ctx: StepContext[Any], index: int = index) -> dict[str, int]:
            return {"i": index}

        step.__name__ = f"s{index}"
        workflow.step(step)

    class Done:
        def __init__(self) -> None:
            self.count, self.event, self.at = 0, asyncio.Event(), 0.0

        def reflow_run_completed(self, event: Any) -> None:
            self.count += 1
            if self.count >= runs:
                self.at = time.perf_counter()
                self.event.set()

    done = Done()
    engine = Engine(storage, [workflow], concurrency=concurrency, hooks=[done], use_plugins=False)
    for first in range(0, runs, 100):
        await asyncio.gather(
            *(engine.enqueue(workflow, {"n": n}) for n in range(first, min(runs, first + 100)))
        )
    started, cpu = time.perf_counter(), time.process_time()
    await engine.start()
    try:
        await asyncio.wait_for(done.event.wait(), 600)
        cpu_used = time.process_time() - cpu
    finally:
        await engine.stop()
    return runs / (done.at - started), cpu_used / runs * 1e6


async def _measure(path: str, claims: int, runs: int) -> dict[str, float]:
    from reflow_core import RunFilter, RunStatus

    storage = _storage(path)
    await storage.initialize()
    figures: dict[str, float] = {}
    try:
        for index in range(claims):
            await storage.create_run(_run(index))
        listings = {
            "list wf+pending": RunFilter(workflow="wf", status=RunStatus.PENDING, limit=50),
            "list wf+failed": RunFilter(workflow="wf", status=RunStatus.FAILED, limit=50),
            # No run of wf is ever cancelled: an index that cannot seek to the status
            # walks every run of the workflow to find that out.
            "list wf+cancelled": RunFilter(workflow="wf", status=RunStatus.CANCELLED, limit=50),
            "list other+pending": RunFilter(workflow="other", status=RunStatus.PENDING, limit=50),
            "list wf": RunFilter(workflow="wf", limit=50),
        }
        for label, filter in listings.items():
            await storage.list_runs(filter)  # the first call opens the reader's pages
            wall, cpu = await _timed(LISTINGS, lambda f=filter: storage.list_runs(f))
            figures[f"{label} ms"], figures[f"{label} cpu us"] = wall / 1e6, cpu / 1e3

        claimed: list[Any] = []

        async def claim_one() -> None:
            got = await storage.claim_next_run(["wf"], lease_ms=30_000)
            assert got is not None, "a run was created for every claim"
            claimed.append(got)

        wall, cpu = await _timed(claims, claim_one)
        figures["claim_next_run ms"], figures["claim_next_run cpu us"] = wall / 1e6, cpu / 1e3
        for item in claimed:
            await storage.update_claimed_run_status(item.run.id, item.lease_id, RunStatus.COMPLETED)
        if hasattr(storage, "claim_runs"):
            for index in range(claims):
                await storage.create_run(_run(index))
            batches: list[Any] = []

            async def claim_batch() -> None:
                got = await storage.claim_runs(["wf"], lease_ms=30_000, limit=BATCH)
                assert len(got) == BATCH, f"{BATCH} runs were created for every batch"
                batches.extend(got)

            wall, cpu = await _timed(claims // BATCH, claim_batch)
            figures[f"claim_runs({BATCH}) ms"] = wall / 1e6
            figures[f"claim_runs({BATCH}) cpu us/run"] = cpu / 1e3 / BATCH
            for item in batches:
                await storage.update_claimed_run_status(
                    item.run.id, item.lease_id, RunStatus.COMPLETED
                )
        rate, cpu_us = await _five_step_runs(storage, runs, 25)
        figures["storage 5-step runs/s"] = rate
        figures["storage 5-step cpu us/run"] = cpu_us
        rate, cpu_us = await _engine_runs(storage, runs * 4, 25)
        figures["engine 5-step runs/s"], figures["engine 5-step cpu us/run"] = rate, cpu_us
    finally:
        await storage.close()
    return figures


# -- the parent: seed, interleave rounds, print ---------------------------------------


def _child(checkout: Path, *args: str) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(checkout))
    result = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", *args],
        env=env,
        capture_output=True,
        text=True,
        cwd=str(checkout),
    )
    if result.returncode != 0:
        raise SystemExit(f"child {args} in {checkout} failed:\n{result.stderr}")
    figures: dict[str, float] = json.loads(result.stdout.strip().splitlines()[-1])
    return figures


def _row(label: str, values: list[str]) -> str:
    return f"  {label:<28}" + "".join(f"{v:>16}" for v in values)


def main() -> None:
    """Parse arguments, seed the stores, measure in interleaved rounds and print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--finished", type=int, default=1_000_000)
    parser.add_argument("--pending-other", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--claims", type=int, default=200, help="claims per round (x25)")
    parser.add_argument("--runs", type=int, default=500, help="5-step runs per round")
    parser.add_argument("--baseline", type=Path, help="another checkout to compare with")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, path, *rest = args.child
        if mode == "seed":
            figures = seed(path, int(rest[0]), int(rest[1]))
        else:
            figures = asyncio.run(_measure(path, int(rest[0]), int(rest[1])))
        print(json.dumps(figures))
        return

    sys.path.insert(0, str(HERE))
    from common import print_header

    print_header("SQLite claim and listing cost at scale (bench/scale_claims.py)")
    checkouts = {"new": ROOT}
    if args.baseline is not None:
        checkouts["baseline"] = args.baseline.resolve()
    claims = max(BATCH, args.claims // BATCH * BATCH)
    with tempfile.TemporaryDirectory() as directory:
        paths: dict[tuple[str, str], str] = {}
        for name, checkout in checkouts.items():
            for store, rows in (("empty", (0, 0)), ("big", (args.finished, args.pending_other))):
                path = str(Path(directory) / f"{name}-{store}.db")
                took = _child(checkout, "seed", path, str(rows[0]), str(rows[1]))["seed_s"]
                paths[name, store] = path
                if store == "big":
                    size = os.path.getsize(path) / 1e6
                    print(
                        f"  seeded {name}/big: {args.finished:,} finished runs of 'wf' + "
                        f"{args.pending_other:,} pending of 'other' in {took:.1f} s "
                        f"({size:,.0f} MB)"
                    )
        print()
        results: dict[tuple[str, str], list[dict[str, float]]] = {key: [] for key in paths}
        for round_ in range(args.rounds):
            order = list(paths)
            if round_ % 2:
                order.reverse()
            for key in order:
                figures = _child(
                    checkouts[key[0]], "measure", paths[key], str(claims), str(args.runs)
                )
                results[key].append(figures)
            print(f"  round {round_ + 1}/{args.rounds} done", flush=True)
    print()
    print(
        f"Medians of {args.rounds} rounds ({claims} single claims, {claims // BATCH} batches "
        f"of {BATCH}, {LISTINGS} calls per listing, {args.runs} five-step runs at "
        "concurrency 25 per round; wall time per call unless marked):"
    )
    for name in checkouts:
        print()
        print(f"  [{name}: {checkouts[name]}]")
        print(_row("", ["empty", f"big ({args.finished:,})", "big / empty"]))
        metrics = list(results[name, "empty"][0])
        for metric in metrics:
            empty = statistics.median(r[metric] for r in results[name, "empty"])
            big = statistics.median(r[metric] for r in results[name, "big"])
            print(_row(metric, [f"{empty:,.3f}", f"{big:,.3f}", f"{big / empty:.2f}x"]))
    _verdict(results)
    if "baseline" in checkouts:
        print()
        print("  [new / baseline, big store]")
        for metric in results["baseline", "big"][0]:
            new = statistics.median(r[metric] for r in results["new", "big"])
            old = statistics.median(r[metric] for r in results["baseline", "big"])
            print(_row(metric, [f"{new:,.3f}", f"{old:,.3f}", f"{new / old:.3f}x"]))


TARGET_RATIO = 0.8
"""Issue 13: engine 5-step runs/s on the big store >= 0.8x the empty store's."""
TARGET_LIST_MS = 2.0
"""Issue 13: list_runs by workflow and status <= 2 ms at 1M rows."""


def _verdict(results: dict[tuple[str, str], list[dict[str, float]]]) -> None:
    """Issue 13's two aims for the new checkout, from the medians."""

    def med(store: str, metric: str) -> float:
        return statistics.median(r[metric] for r in results["new", store])

    ratio = med("big", "engine 5-step runs/s") / med("empty", "engine 5-step runs/s")
    listings = [m for m in results["new", "big"][0] if m.startswith("list ") and "+" in m]
    listings = [m for m in listings if m.endswith(" ms")]
    worst = max(listings, key=lambda m: med("big", m))
    print()
    print(
        f"  aim engine 5-step runs/s big/empty >= {TARGET_RATIO}: "
        f"{'met' if ratio >= TARGET_RATIO else 'NOT met'} ({ratio:.2f}x)"
    )
    print(
        f"  aim list_runs by workflow and status <= {TARGET_LIST_MS:.0f} ms on the big "
        f"store: {'met' if med('big', worst) <= TARGET_LIST_MS else 'NOT met'} "
        f"(slowest median: {worst[:-3]}, {med('big', worst):.3f} ms)"
    )


if __name__ == "__main__":
    main()
