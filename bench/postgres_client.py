"""PostgreSQL client cost and churn recovery, A/B against a baseline commit, interleaved.

Usage (from the repository root, the project's venv active)::

    python bench/postgres_client.py --baseline 5d7f72d
    python bench/postgres_client.py --baseline 5d7f72d --rounds 7 --runs 800

The candidate defaults to a snapshot of this working tree (its ``reflow*`` packages
copied at start, so edits made while the benchmark runs do not leak into later rounds);
the baseline is exported from git. Each measurement is a fresh child process (one
worker process: one ``Engine``, ``concurrency`` 25) that imports Reflow from one tree
(``PYTHONPATH``), enqueues N runs of 5 trivial ``async`` steps into a fresh schema,
executes them with ``start()`` and prints runs/s and the process CPU per run (the
client's cost: the server's is not in it). Two scenarios per side:

* ``steady``: nothing disturbs the worker;
* ``churn``: a thread of the child terminates every backend of the worker's schema
  (``pg_terminate_backend`` from its own connection, the pool's and the listener's)
  every ``--churn-every`` seconds while the runs execute.

A churn measurement that has not finished after ``--churn-cap`` seconds is stopped and
reported with the runs it finished by then (the old pool froze for minutes). Rounds
alternate which side goes first. The table shows medians over the rounds, the
candidate/baseline ratios and, per side, churn throughput over steady throughput.

Nothing here asserts: on a shared machine read the CPU per run beside the rate; other
load inflates it far less than a wall-clock figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab import ROOT, Side, export  # a sibling script, not a package

CHILD = r"""
import asyncio, gc, json, os, sys, threading, time, uuid
import psycopg
from reflow_core import Engine, Workflow

runs, concurrency, churn_every, cap = (
    int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]))
dsn = os.environ["PG_CLIENT_DSN"]

def make_workflow(n):
    wf = Workflow("bench5")
    for i in range(n):
        async def step(ctx, i=i):
            return {"i": i, "n": 1}
        step.__name__ = f"s{i}"
        wf.step(step)
    return wf

class Done:
    def __init__(self, expected):
        self.expected, self.count, self.event, self.at = expected, 0, asyncio.Event(), 0.0
    def reflow_run_completed(self, event):
        self.count += 1
        if self.count >= self.expected:
            self.at = time.perf_counter()
            self.event.set()

def churn(schema, stop, killed):
    # Every backend that serves this schema: the pool's and the listener's.
    with psycopg.connect(dsn, autocommit=True) as conn:
        while not stop.wait(churn_every):
            cur = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = %s AND pid <> pg_backend_pid()",
                (f"reflow:{schema}",))
            killed[0] += cur.fetchone()[0]

async def main():
    schema = "reflow_pgc_" + uuid.uuid4().hex[:10]
    wf = make_workflow(5)
    done = Done(runs)
    engine = Engine(f"{dsn}?reflow_schema={schema}", [wf], concurrency=concurrency,
                    hooks=[done], use_plugins=False)
    stop, killed, side = threading.Event(), [0], None
    try:
        for n in range(runs):
            await engine.enqueue(wf, {"n": n})
        gc.collect()
        if churn_every > 0:
            side = threading.Thread(target=churn, args=(schema, stop, killed), daemon=True)
            side.start()
        cpu0, t0 = time.process_time(), time.perf_counter()
        await engine.start()
        try:
            await asyncio.wait_for(done.event.wait(), cap)
        except TimeoutError:
            done.at = time.perf_counter()
        wall, cpu = done.at - t0, time.process_time() - cpu0
        stop.set()
        if side is not None:
            side.join()
    finally:
        stop.set()
        await engine.stop()
        await engine.storage.close()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finished = done.count
    print(json.dumps({
        "runs_per_s": finished / wall,
        "cpu_us_per_run": cpu / max(finished, 1) * 1e6,
        "finished": finished,
        "killed": killed[0],
    }))

asyncio.run(main())
"""


def snapshot(into: Path) -> Path:
    """The working tree's packages, copied: the figures stay those of one version."""
    tree = into / "candidate"
    tree.mkdir()
    for package in ROOT.glob("reflow*"):
        if (package / "__init__.py").exists():
            shutil.copytree(package, tree / package.name, ignore=shutil.ignore_patterns("*.pyc"))
    return tree


def measure(
    side: Side, runs: int, concurrency: int, churn_every: float, cap: float
) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(side.tree))
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(runs), str(concurrency), str(churn_every), str(cap)],
        env=env,
        capture_output=True,
        text=True,
        cwd=tempfile.gettempdir(),
        check=False,
        timeout=cap + 600,
    )
    if out.returncode != 0:
        raise SystemExit(f"{side.name} failed:\n{out.stderr[-3000:]}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="git ref of the baseline")
    parser.add_argument("--candidate", default=None, help="git ref (default: working tree)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=25)
    parser.add_argument("--churn-every", type=float, default=0.5, help="seconds between kills")
    parser.add_argument("--churn-cap", type=float, default=60.0, help="seconds per churn run")
    parser.add_argument(
        "--scenarios", default="steady,churn", help="steady,churn (comma-separated)"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault(
        "PG_CLIENT_DSN",
        os.environ.get("REFLOW_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"),
    )
    scenarios = args.scenarios.split(",")
    with tempfile.TemporaryDirectory(prefix="reflow-pgc-") as tmp:
        base = Side(f"baseline {args.baseline}", export(args.baseline, Path(tmp), "baseline"))
        cand_tree = (
            snapshot(Path(tmp))
            if args.candidate is None
            else export(args.candidate, Path(tmp), "candidate")
        )
        cand = Side(f"candidate {args.candidate or 'working tree'}", cand_tree)
        print(
            f"PostgreSQL client A/B: {base.name} vs {cand.name}; one worker process, 5-step "
            f"runs, {args.runs} per measurement, concurrency {args.concurrency}, "
            f"{args.rounds} rounds interleaved; churn kills every {args.churn_every:g}s "
            f"(capped at {args.churn_cap:g}s); {os.cpu_count()} cores, load average "
            f"{_load()} at start"
        )
        samples: dict[tuple[str, str], list[dict[str, float]]] = {}
        for round_ in range(args.rounds):
            order = (base, cand) if round_ % 2 == 0 else (cand, base)
            for scenario in scenarios:
                every = args.churn_every if scenario == "churn" else 0.0
                for side in order:
                    sample = measure(side, args.runs, args.concurrency, every, args.churn_cap)
                    samples.setdefault((side.name, scenario), []).append(sample)
                    print(
                        f"  round {round_ + 1} {scenario:<6} {side.name:<32} {_fmt(sample)}",
                        flush=True,
                    )
        _report(base, cand, scenarios, samples)
        # Other processes on the machine skew rates far more than CPU per run: the load
        # tells a reader how much to trust the runs/s columns.
        print(f"load average {_load()} at end")


def _load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def _fmt(sample: dict[str, float]) -> str:
    return (
        f"{sample['runs_per_s']:>8,.1f} runs/s {sample['cpu_us_per_run']:>7,.0f} us CPU/run "
        f"finished {int(sample['finished'])} killed {int(sample['killed'])}"
    )


def _report(
    base: Side,
    cand: Side,
    scenarios: list[str],
    samples: dict[tuple[str, str], list[dict[str, float]]],
) -> None:
    def med(name: str, scenario: str, key: str) -> float:
        return statistics.median(s[key] for s in samples[(name, scenario)])

    print(f"\nmedians of {len(samples[(base.name, scenarios[0])])} rounds")
    for scenario in scenarios:
        for side in (base, cand):
            print(
                f"  {scenario:<6} {side.name:<32} {med(side.name, scenario, 'runs_per_s'):>8,.1f}"
                f" runs/s {med(side.name, scenario, 'cpu_us_per_run'):>7,.0f} us CPU/run"
            )
        rate = med(cand.name, scenario, "runs_per_s") / med(base.name, scenario, "runs_per_s")
        cpu = med(cand.name, scenario, "cpu_us_per_run") / med(
            base.name, scenario, "cpu_us_per_run"
        )
        print(f"  {scenario:<6} ratio candidate/baseline: {rate:.2f}x runs/s, {cpu:.2f}x CPU/run")
    if "steady" in scenarios and "churn" in scenarios:
        for side in (base, cand):
            kept = med(side.name, "churn", "runs_per_s") / med(side.name, "steady", "runs_per_s")
            print(f"  churn/steady throughput, {side.name}: {kept:.2f}x")


if __name__ == "__main__":
    main()
