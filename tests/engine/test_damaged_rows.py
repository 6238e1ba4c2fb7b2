"""A stored value that cannot be decoded fails its run, names it, and blocks nothing else.

The damage is real: the row is rewritten under the adapter (SQL on the SQLite file or
the PostgreSQL schema; the stored bytes in memory), as a bad disk, a hand edit or a newer
Reflow version would leave it. The value written is valid JSON the codec refuses (a
datetime tag around garbage), so it passes PostgreSQL's json type check too.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from helpers import run

from reflow_core import DamagedValue, Engine, RunStatus, StepContext, Workflow

GARBAGE = '{"$datetime": "not a time"}'


def _damage(storage: Any, table: str, column: str, where: str, key: str) -> None:
    """Overwrite one stored value with GARBAGE, behind the adapter's back."""
    name = type(storage).__name__
    if name == "MemoryStorage":
        if table == "runs":
            storage._runs[key].input = GARBAGE.encode()
        else:
            run_id, step = key.split("/", 1)
            rows = storage._steps._rows[run_id]
            row, _ = rows[step]
            rows[step] = (row, GARBAGE.encode())
        return
    sql = f"UPDATE reflow_{table} SET {column} = ? WHERE {where} = ?"
    if name == "SQLiteStorage":
        with sqlite3.connect(storage._path) as conn:
            assert conn.execute(sql, (GARBAGE, key)).rowcount == 1
        return
    if name == "APSWStorage":
        # Through APSW's own SQLite: two SQLite libraries in one process do not see each
        # other's locks, and the stdlib one would delete the WAL the adapter has open.
        import apsw

        conn = apsw.Connection(storage._path)
        try:
            conn.execute(sql, (GARBAGE, key))
            assert conn.changes() == 1
        finally:
            conn.close()
        return
    import psycopg
    from psycopg import sql as pgsql

    from reflow_adapters.postgres.conninfo import split_dsn

    with psycopg.connect(split_dsn(storage.url)[0], autocommit=True) as conn:
        query = pgsql.SQL("UPDATE {}.{} SET {} = %s WHERE {} = %s").format(
            pgsql.Identifier(storage.schema),
            pgsql.Identifier(table),
            pgsql.Identifier(column),
            pgsql.Identifier(where),
        )
        assert conn.execute(query, (GARBAGE, key)).rowcount == 1


def test_a_damaged_input_fails_that_run_only(storage_factory: Any) -> None:
    wf: Workflow[Any] = Workflow("fragile")
    seen: list[Any] = []

    @wf.step
    def use(ctx: StepContext[Any]) -> Any:
        seen.append(ctx.input)
        return ctx.input

    async def scenario() -> None:
        storage = storage_factory()
        engine = Engine(storage, [wf], use_plugins=False)
        try:
            bad = await engine.enqueue(wf, {"n": 0})  # the oldest: claimed first
            goods = [await engine.enqueue(wf, {"n": n}) for n in (1, 2)]
            _damage(storage, "runs", "input", "id", bad.id)
            assert await engine.run_until_idle() == 3
            failed = await storage.get_run(bad.id)
            assert failed is not None and failed.status is RunStatus.FAILED
            assert failed.error is not None and failed.error.code == "DAMAGED_VALUE"
            assert bad.id in failed.error.message and "input" in failed.error.message
            for good in goods:
                done = await storage.get_run(good.id)
                assert done is not None and done.status is RunStatus.COMPLETED
            # Listing still works, and shows the damage rather than hiding the run.
            listed = {r.id: r for r in await engine.list_runs()}
            assert isinstance(listed[bad.id].input, DamagedValue)
            assert "not a time" in listed[bad.id].input.stored
        finally:
            await engine.stop()
            await storage.close()

    run(scenario())
    assert sorted(x["n"] for x in seen) == [1, 2]


def test_a_damaged_checkpoint_fails_the_run_naming_the_step(storage_factory: Any) -> None:
    wf: Workflow[Any] = Workflow("checkpointed")
    calls: list[str] = []

    @wf.step
    def first(ctx: StepContext[Any]) -> int:
        calls.append("first")
        return 1

    @wf.step
    def second(ctx: StepContext[Any]) -> int:
        calls.append("second")
        if len(calls) == 2:
            raise RuntimeError("fail once, to be resumed")
        return 2

    async def scenario() -> None:
        storage = storage_factory()
        engine = Engine(storage, [wf], use_plugins=False)
        try:
            run_ = await engine.enqueue(wf)
            await engine.run_until_idle()
            key = f"{run_.id}/first"
            _damage(storage, "steps", "output", "id", key)
            assert await engine.resume(run_.id)
            await engine.run_until_idle()
            failed = await storage.get_run(run_.id)
            assert failed is not None and failed.status is RunStatus.FAILED
            assert failed.error is not None and failed.error.code == "DAMAGED_VALUE"
            assert failed.error.step == "first"
            view = await engine.get_run(run_.id)
            assert view is not None
            assert isinstance({s.name: s for s in view.steps}["first"].output, DamagedValue)
        finally:
            await engine.stop()
            await storage.close()

    run(scenario())
    assert calls == ["first", "second"]  # the damaged step was neither replayed nor re-run
