"""A side-effect ledger for the crash tests: one row per step *execution*, in its own SQLite file.

A step of :mod:`crash_app` inserts its row (run, step, pid, attempt, start time) in a
short transaction of its own, committed before the step does its work, and stamps the
finish time, again committed, just before it returns. So the ledger records every
execution that got as far as starting, whatever happened to the worker afterwards;
that is exactly what "the side effect happened" means for the tests. The worker's
step-completed hook stamps the checkpoint time once the engine committed the checkpoint.

The ledger lives in a file separate from the store under test, so a bug in an adapter's
transactions can neither hide nor invent ledger rows. Row ids come from
``AUTOINCREMENT`` and inserts are serialised by SQLite's write lock, so id order is the
real order in which executions started, across processes, with no clock involved.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Decision",
    "Execution",
    "checkpointed",
    "decide",
    "finish",
    "init",
    "read_all",
    "read_decisions",
    "start",
]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS executions (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id      TEXT    NOT NULL,
    step        TEXT    NOT NULL,
    pid         INTEGER NOT NULL,
    attempt     INTEGER NOT NULL,
    started_ns  INTEGER NOT NULL,
    finished_ns INTEGER,
    checkpointed_ns INTEGER
);
CREATE TABLE IF NOT EXISTS decisions (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id      TEXT    NOT NULL,
    step        TEXT    NOT NULL,
    pid         INTEGER NOT NULL,
    answer      INTEGER NOT NULL,
    decided_ns  INTEGER NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class Decision:
    """One evaluation of a ``when=`` predicate and what it answered."""

    id: int
    run_id: str
    step: str
    pid: int
    answer: bool
    decided_ns: int


@dataclass(frozen=True, slots=True)
class Execution:
    """One started execution of one step (``finished_ns`` is ``None`` if it never returned)."""

    id: int
    run_id: str
    step: str
    pid: int
    attempt: int
    started_ns: int
    finished_ns: int | None
    checkpointed_ns: int | None
    """Set by the worker's step-completed hook, i.e. after the checkpoint was committed
    (``None`` also when the worker died between the commit and the hook)."""


def _connect(path: Path | str) -> sqlite3.Connection:
    # Autocommit mode: each statement below is its own transaction. synchronous=NORMAL
    # under WAL loses nothing to a killed *process* (the OS keeps the written pages),
    # which is the only kind of crash these tests cause.
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None)
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def init(path: Path | str) -> None:
    """Create the ledger file and its table (idempotent)."""
    conn = _connect(path)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(_SCHEMA)
    finally:
        conn.close()


def start(path: Path | str, run_id: str, step: str, pid: int, attempt: int) -> int:
    """Record that an execution starts; committed on return. Returns its id."""
    conn = _connect(path)
    try:
        cursor = conn.execute(
            "INSERT INTO executions (run_id, step, pid, attempt, started_ns) "
            "VALUES (?, ?, ?, ?, ?)",
            (run_id, step, pid, attempt, time.time_ns()),
        )
        row_id = cursor.lastrowid
        assert row_id is not None
        return row_id
    finally:
        conn.close()


def finish(path: Path | str, execution_id: int) -> None:
    """Record that an execution's work is done (the step is about to return)."""
    conn = _connect(path)
    try:
        conn.execute(
            "UPDATE executions SET finished_ns = ? WHERE id = ?", (time.time_ns(), execution_id)
        )
    finally:
        conn.close()


def checkpointed(path: Path | str, execution_id: int) -> None:
    """Record that an execution's checkpoint is committed; evidence that survives a later
    (wrongful) re-execution overwriting the step row."""
    conn = _connect(path)
    try:
        conn.execute(
            "UPDATE executions SET checkpointed_ns = ? WHERE id = ?", (time.time_ns(), execution_id)
        )
    finally:
        conn.close()


def read_all(path: Path | str) -> list[Execution]:
    """Every recorded execution, in the order they started."""
    conn = _connect(path)
    try:
        rows = conn.execute(
            "SELECT id, run_id, step, pid, attempt, started_ns, finished_ns, checkpointed_ns "
            "FROM executions ORDER BY id"
        ).fetchall()
    finally:
        conn.close()
    return [Execution(*row) for row in rows]


def decide(path: Path | str, run_id: str, step: str, pid: int) -> bool:
    """Record an evaluation of ``step``'s predicate for ``run_id``; committed on return.

    Answers ``True`` on the first evaluation for that run and step and ``False`` on every
    later one (in one ``BEGIN IMMEDIATE``, so two processes cannot both be first): a
    predicate whose answer changes if it is ever asked again.
    """
    conn = _connect(path)
    try:
        conn.execute("BEGIN IMMEDIATE")
        (before,) = conn.execute(
            "SELECT count(*) FROM decisions WHERE run_id = ? AND step = ?", (run_id, step)
        ).fetchone()
        answer = before == 0
        conn.execute(
            "INSERT INTO decisions (run_id, step, pid, answer, decided_ns) VALUES (?, ?, ?, ?, ?)",
            (run_id, step, pid, int(answer), time.time_ns()),
        )
        conn.execute("COMMIT")
        return answer
    finally:
        conn.close()


def read_decisions(path: Path | str) -> list[Decision]:
    """Every recorded predicate evaluation, in order."""
    conn = _connect(path)
    try:
        rows = conn.execute(
            "SELECT id, run_id, step, pid, answer, decided_ns FROM decisions ORDER BY id"
        ).fetchall()
    finally:
        conn.close()
    return [Decision(i, r, s, p, bool(a), d) for i, r, s, p, a, d in rows]
