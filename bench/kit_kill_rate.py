"""How reliably the conformance kit kills single-fault adapters: kill counts over N runs.

Every fault in ``tests/conformance/faults`` (the real SQLite or PostgreSQL adapter with
one query fragment, column declaration or method body changed) is run ``--runs`` times
(default 20) through ``reflow_conformance.run(name, select=<its named cases>)`` with the
kit's default settings. A run *kills* the fault when every named case fails (an error
is not a kill). The table shows, per fault, the kills out of N and, for split
check-then-write faults (caught only by races), how often each race case failed on its
own, so the kill rate of each racing mode (coroutines, threads, processes) is visible.

    python bench/kit_kill_rate.py                      # all faults, 20 runs each
    python bench/kit_kill_rate.py --races-only --runs 200   # the race figures alone
    python bench/kit_kill_rate.py --only postgres-split --runs 50
    python bench/kit_kill_rate.py --parallel 4   # four faults at a time (threads)

With ``--parallel N`` the faults are measured N at a time (one thread each, every fault's
runs one after another), as ``test_single_faults.py`` runs them: races then compete for
the CPU with other faults' cases, which is the harder setting for a split to be caught
in (interleavings are as the scheduler makes them, never arranged).

PostgreSQL is found as for the other benchmarks (``REFLOW_BENCH_POSTGRES_DSN``,
``REFLOW_TEST_POSTGRES_DSN``, else a local server); without one, its faults are skipped
with the reason. Exits 1 when a fault was not killed in every run.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from common import postgres_dsn, postgres_unavailable, print_header

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "conformance"))

import faults

from reflow_conformance import run
from reflow_conformance.report import Outcome


def _mode(case_id: str) -> str:
    for mode in ("coroutines", "threads", "processes"):
        if case_id.endswith(f"_{mode}"):
            return mode
    return "other"


def measure(
    fault: faults.Fault, runs: int, options: dict[str, str], stress: int = 1, cases: str = "*"
) -> dict[str, Any]:
    """Run the fault's cases ``runs`` times: a *kill* is every asserted case failing
    (``caught_by``); *caught* is any of its cases failing (``raced_by`` too)."""
    kills, caught, errors = 0, 0, 0
    per_case: Counter[str] = Counter()
    started = time.perf_counter()
    patterns = [p.strip() for p in cases.split(",") if p.strip()]
    measured = fault.caught_by | {
        c for c in fault.measured if any(fnmatch.fnmatchcase(c, p) for p in patterns)
    }
    select = ",".join(sorted(measured))
    for _ in range(runs):
        report = run(fault.name, options, select=select, stress=stress)
        failed = {c.id for c in report.cases if c.outcome is Outcome.FAILED}
        errored = {c.id for c in report.cases if c.outcome is Outcome.ERROR}
        per_case.update(failed & measured)
        errors += bool(errored)
        kills += fault.caught_by <= failed
        caught += bool(failed & measured)
    return {
        "fault": fault.name,
        "base": fault.base,
        "kind": fault.kind,
        "topic": fault.topic,
        "race": fault.race,
        "runs": runs,
        "kills": kills,
        "caught": caught,
        "errors": errors,
        "per_case": {case: per_case[case] for case in sorted(measured)},
        "asserted": sorted(fault.caught_by),
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="runs per fault (default 20)")
    parser.add_argument("--only", default="", help="only faults whose name contains this")
    parser.add_argument("--races-only", action="store_true", help="only split check/write")
    parser.add_argument("--no-races", action="store_true", help="only the other faults")
    parser.add_argument(
        "--cases",
        default="*",
        help="measure only the fault's cases matching these globs (comma-separated); "
        "asserted cases are always run",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--parallel", type=int, default=1, help="faults measured at once")
    parser.add_argument("--stress", type=int, default=1, help="--reflow-stress for every run")
    args = parser.parse_args()

    dsn = postgres_dsn()
    no_postgres = postgres_unavailable(dsn)
    print_header("Conformance kit: kill rate on single-fault adapters", postgres=not no_postgres)
    faults.install()
    chosen = [
        f
        for f in faults.all_faults()
        if args.only in f.name
        and (f.race or not args.races_only)
        and not (f.race and args.no_races)
    ]
    options = {"dsn": dsn}
    print(
        f"{len(chosen)} faults, {args.runs} runs each, stress {args.stress}, "
        f"{args.parallel} at a time\n"
    )
    print(f"{'fault':<52} {'kind':<6} {'killed':>8} {'secs':>6}  cases failed (* asserted)")
    results, not_killed = [], []
    runnable = []
    for fault in chosen:
        if fault.base == "postgres" and no_postgres:
            print(f"{fault.name:<52} SKIP {no_postgres}")
        else:
            runnable.append(fault)
    with ThreadPoolExecutor(max(1, args.parallel)) as pool:
        futures = [
            pool.submit(measure, fault, args.runs, options, args.stress, args.cases)
            for fault in runnable
        ]
        for fault, future in zip(runnable, futures, strict=True):
            row = future.result()
            results.append(row)
            if row["kills"] < row["runs"] or row["errors"]:
                not_killed.append(fault.name)
            cases = ", ".join(
                f"{c}{'*' if c in fault.caught_by else ''} {n}" for c, n in row["per_case"].items()
            )
            killed = f"{row['kills']}/{row['runs']}"
            print(
                f"{fault.name:<52} {fault.kind:<6} {killed:>8} {row['seconds']:>6}  {cases}",
                flush=True,
            )

    _summary(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1), "utf-8")
    if not_killed:
        print(f"\nNOT KILLED IN EVERY RUN: {', '.join(not_killed)}")
        return 1
    print(f"\nevery fault killed in {args.runs}/{args.runs} runs")
    return 0


def _summary(results: list[dict[str, Any]]) -> None:
    if not results:
        return
    total = sum(r["runs"] for r in results)
    kills = sum(r["kills"] for r in results)
    print(
        f"\nall faults: {len(results)}, killed in {kills}/{total} runs ({100 * kills / total:.2f}%)"
    )
    races = [r for r in results if r["race"]]
    if not races:
        return
    runs = sum(r["runs"] for r in races)
    caught = sum(r["caught"] for r in races)
    kills = sum(r["kills"] for r in races)
    print(
        f"split check/write faults: {len(races)}, caught in {caught}/{runs} default runs "
        f"({100 * caught / runs:.2f}%); every asserted case failed in {kills}/{runs}"
    )
    by_mode: dict[str, list[int]] = {}
    for r in races:
        for case, n in r["per_case"].items():
            tally = by_mode.setdefault(_mode(case), [0, 0])
            tally[0] += n
            tally[1] += r["runs"]
    for mode, (n, of) in sorted(by_mode.items()):
        print(f"  race cases in {mode:<10} failed in {n}/{of} case runs ({100 * n / of:.2f}%)")


if __name__ == "__main__":
    raise SystemExit(main())
