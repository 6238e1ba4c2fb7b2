"""A/B throughput of two checkouts of Reflow, interleaved in one run.

Usage (from the repository root, the project's venv active)::

    python bench/ab.py --baseline 5d7f72d              # working tree vs that commit
    python bench/ab.py --baseline main --candidate HEAD --adapter memory,sqlite --rounds 7

Each side is a tree on disk: the candidate defaults to this working tree, the baseline
is exported from git (``git archive``) into a temporary directory. Every measurement is
a fresh child process that imports Reflow from one tree (``PYTHONPATH``), enqueues N
runs of 5 trivial ``async`` steps into a fresh store, executes them with ``start()`` and
prints runs/s and process CPU per run. Rounds alternate which side goes first, so a
machine that gets busier or quieter during the run shifts both sides alike; the table
shows medians over the rounds and the candidate/baseline ratio, with the spread.

Nothing here asserts: a figure on a shared machine is read next to the CPU per run, which
other load inflates far less than a wall-clock rate.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import asyncio, gc, json, os, sys, tempfile, time, uuid
from pathlib import Path
from reflow_core import Engine, Workflow

adapter, steps = sys.argv[1], int(sys.argv[2])
runs, concurrency = int(sys.argv[3]), int(sys.argv[4])

def make_workflow(n):
    wf = Workflow(f"bench{n}")
    for i in range(n):
        async def step(ctx, i=i):
            return {"i": i, "n": 1}
        step.__name__ = f"s{i}"
        wf.step(step)
    return wf

class Done:
    def __init__(self, expected):
        self.expected, self.count, self.event, self.at = expected, 0, asyncio.Event(), 0
    def reflow_run_completed(self, event):
        self.count += 1
        if self.count >= self.expected:
            self.at = time.perf_counter()
            self.event.set()

async def main():
    tmp = tempfile.mkdtemp(prefix="reflow-ab-")
    schema = None
    if adapter == "memory":
        url = "memory://"
    elif adapter == "sqlite":
        url = f"sqlite:///{tmp}/ab.db"
    elif adapter == "postgres":
        schema = "reflow_ab_" + uuid.uuid4().hex[:10]
        url = os.environ["AB_POSTGRES_DSN"] + f"?reflow_schema={schema}"
    else:
        raise SystemExit(f"unknown adapter {adapter}")
    wf = make_workflow(steps)
    done = Done(runs)
    engine = Engine(url, [wf], concurrency=concurrency, hooks=[done], use_plugins=False)
    try:
        for n in range(runs):
            await engine.enqueue(wf, {"n": n})
        gc.collect()
        cpu0, t0 = time.process_time(), time.perf_counter()
        await engine.start()
        await asyncio.wait_for(done.event.wait(), 600)
        wall, cpu = done.at - t0, time.process_time() - cpu0
    finally:
        await engine.stop()
        await engine.storage.close()
    if schema:
        import psycopg
        with psycopg.connect(os.environ["AB_POSTGRES_DSN"], autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    print(json.dumps({"runs_per_s": runs / wall, "cpu_us_per_run": cpu / runs * 1e6}))

asyncio.run(main())
"""


@dataclass(frozen=True)
class Side:
    name: str
    tree: Path


def export(ref: str, into: Path, label: str) -> Path:
    """The tree of ``ref`` written under ``into`` (``git archive``: no worktree state);
    a ``ref`` naming a directory is that tree, used as it is."""
    if Path(ref).is_dir():
        return Path(ref).resolve()
    archive = into / f"{label}.tar"
    subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", "-o", str(archive), ref], check=True
    )
    tree = into / label
    tree.mkdir()
    with tarfile.open(archive) as tar:
        tar.extractall(tree, filter="data")
    return tree


def measure(side: Side, adapter: str, runs: int, concurrency: int) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(side.tree))
    out = subprocess.run(
        [sys.executable, "-c", CHILD, adapter, "5", str(runs), str(concurrency)],
        env=env,
        capture_output=True,
        text=True,
        cwd=tempfile.gettempdir(),
        check=False,
        timeout=900,
    )
    if out.returncode != 0:
        raise SystemExit(f"{side.name} on {adapter} failed:\n{out.stderr[-3000:]}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="git ref (or directory) of the baseline")
    parser.add_argument(
        "--candidate", default=None, help="git ref or directory (default: working tree)"
    )
    parser.add_argument("--adapter", default="memory,sqlite", help="memory,sqlite,postgres")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=25)
    args = parser.parse_args(argv)
    os.environ.setdefault(
        "AB_POSTGRES_DSN",
        os.environ.get("REFLOW_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"),
    )
    with tempfile.TemporaryDirectory(prefix="reflow-ab-") as tmp:
        base = Side(f"baseline {args.baseline}", export(args.baseline, Path(tmp), "baseline"))
        cand_tree = (
            ROOT if args.candidate is None else export(args.candidate, Path(tmp), "candidate")
        )
        cand = Side(f"candidate {args.candidate or 'working tree'}", cand_tree)
        print(
            f"A/B: {base.name} vs {cand.name}; 5-step runs, {args.runs} per measurement, "
            f"concurrency {args.concurrency}, {args.rounds} rounds interleaved"
        )
        for adapter in args.adapter.split(","):
            samples: dict[str, list[dict[str, float]]] = {base.name: [], cand.name: []}
            for round_ in range(args.rounds):
                order = (base, cand) if round_ % 2 == 0 else (cand, base)
                for side in order:
                    samples[side.name].append(measure(side, adapter, args.runs, args.concurrency))
            _report(adapter, base, cand, samples)


def _report(
    adapter: str, base: Side, cand: Side, samples: dict[str, list[dict[str, float]]]
) -> None:
    def med(name: str, key: str) -> float:
        return statistics.median(s[key] for s in samples[name])

    def spread(name: str, key: str) -> float:
        values = [s[key] for s in samples[name]]
        return 1 - min(values) / max(values)

    print(f"\n{adapter}: median of {len(samples[base.name])} rounds")
    for side in (base, cand):
        print(
            f"  {side.name:<40} {med(side.name, 'runs_per_s'):>9,.0f} runs/s "
            f"(spread {spread(side.name, 'runs_per_s'):.0%})  "
            f"{med(side.name, 'cpu_us_per_run'):>7,.0f} us CPU/run"
        )
    ratio = med(cand.name, "runs_per_s") / med(base.name, "runs_per_s")
    cpu_ratio = med(cand.name, "cpu_us_per_run") / med(base.name, "cpu_us_per_run")
    print(f"  ratio candidate/baseline: {ratio:.2f}x runs/s, {cpu_ratio:.2f}x CPU per run")


if __name__ == "__main__":
    main()
