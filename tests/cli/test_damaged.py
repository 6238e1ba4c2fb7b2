"""The operator's commands on a store holding damaged rows beside healthy ones.

The damage is real: rows of a real SQLite file are overwritten behind the adapter's
back with valid JSON the codec refuses (as a bad disk, a hand edit or a newer Reflow
would leave them; see ``tests/engine/test_damaged_rows.py``). Text output must mark a
damaged value, ``--json`` must never pass the marker off as a value (a healthy input
``{"error": ..., "stored": ...}`` sits beside it to tell the two apart), and ``runs
explain`` must say that the next claim fails the run, and what to do.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cli_stores import invoke, invoke_json, new_run, with_store
from helpers import run

from reflow_cli.explain import Facts, Situation, explain
from reflow_core import DamagedValue, Engine, StepContext, Workflow, open_storage
from reflow_core.storage import StorageAdapter
from reflow_core.types import (
    Recurrence,
    RunStatus,
    Schedule,
    StepResult,
    StepStatus,
    WorkflowRun,
)

GARBAGE = '{"$datetime": "not a time"}'
MINUTE_MS = 60_000
LOOKALIKE = {"error": "boom", "stored": "x"}
"""A healthy input shaped like the damage marker."""


@dataclass(frozen=True)
class Store:
    url: str
    bad_input: str
    """Pending, the oldest of ``orders``; its input is damaged."""
    bad_step: str
    """Sleeping for an hour (``billing``); the output of its completed step is damaged."""
    bad_output: str
    """Completed (``emails``); its output is damaged."""
    lookalike: str
    """Pending, healthy, input :data:`LOOKALIKE`."""
    healthy: str
    """Pending, healthy, the newest."""


def _damage(path: Path, table: str, column: str, key: str) -> None:
    """Overwrite one stored value with GARBAGE, behind the adapter's back (it is closed)."""
    where = "key" if table == "schedules" else "id"
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        sql = f"UPDATE reflow_{table} SET {column} = ? WHERE {where} = ?"
        assert conn.execute(sql, (GARBAGE, key)).rowcount == 1


@pytest.fixture
def store(tmp_path: Path) -> Store:
    path = tmp_path / "cli.db"
    url = f"sqlite:///{path}"

    async def prepare(storage: StorageAdapter) -> Store:
        sleeper = await new_run(storage, "billing", {"invoice": 7}, age_ms=5 * MINUTE_MS)
        held = await storage.claim_next_run(["billing"], lease_ms=60_000)
        assert held is not None
        now = await storage.now()
        reserved = StepResult(
            id=f"{sleeper.id}/reserve", run_id=sleeper.id, name="reserve",
            status=StepStatus.COMPLETED, output={"reserved": 2}, attempts=1,
            created_at=now, updated_at=now,
        )  # fmt: skip
        assert await storage.save_step_result(reserved, held.lease_id)
        assert await storage.sleep_run(sleeper.id, held.lease_id, now + 60 * MINUTE_MS)

        sent = await new_run(storage, "emails", {"to": "ada"}, age_ms=4 * MINUTE_MS)
        held = await storage.claim_next_run(["emails"], lease_ms=60_000)
        assert held is not None
        assert await storage.update_claimed_run_status(
            sent.id, held.lease_id, RunStatus.COMPLETED, output={"sent": 1}
        )
        return Store(
            url=url,
            bad_step=sleeper.id,
            bad_output=sent.id,
            bad_input=(await new_run(storage, "orders", {"n": 0}, age_ms=3 * MINUTE_MS)).id,
            lookalike=(await new_run(storage, "orders", LOOKALIKE, age_ms=2 * MINUTE_MS)).id,
            healthy=(await new_run(storage, "orders", {"n": 1}, age_ms=MINUTE_MS)).id,
        )

    made = with_store(url, prepare)
    _damage(path, "runs", "input", made.bad_input)
    _damage(path, "runs", "output", made.bad_output)
    _damage(path, "steps", "output", f"{made.bad_step}/reserve")
    return made


def _flat(text: str) -> str:
    return " ".join(text.split())


def _words(sentence: str) -> str:
    # Ages move on between two invocations; the wording must not.
    flat = re.sub(r"\d+ (ms|s|min|h|d)\b", "AGE", _flat(sentence))
    return re.sub(r"\d+", "N", flat)


# -- runs list ------------------------------------------------------------------------------


def test_list_json_puts_null_where_a_damaged_value_was_and_names_it(store: Store) -> None:
    listed = {r["id"]: r for r in invoke_json("runs", "list", "--storage", store.url)["runs"]}
    assert len(listed) == 5

    bad = listed[store.bad_input]
    assert bad["input"] is None
    assert set(bad["damaged"]) == {"input"}
    assert bad["damaged"]["input"]["stored"] == GARBAGE
    assert "not a time" in bad["damaged"]["input"]["error"]

    sent = listed[store.bad_output]
    assert sent["input"] == {"to": "ada"} and sent["output"] is None
    assert set(sent["damaged"]) == {"output"}

    # A healthy input shaped like the marker is a value, and nothing says it is damaged.
    assert listed[store.lookalike]["input"] == LOOKALIKE
    assert listed[store.lookalike]["damaged"] == {}
    assert listed[store.healthy]["damaged"] == {}
    assert listed[store.bad_step]["damaged"] == {}  # its step is damaged, not the run's values


def test_list_text_marks_the_damaged_runs_only(store: Store) -> None:
    result = invoke("runs", "list", "--storage", store.url)
    assert result.exit_code == 0
    lines = {rid: [ln for ln in result.output.splitlines() if rid in ln] for rid in (
        store.bad_input, store.bad_output, store.lookalike, store.healthy, store.bad_step
    )}  # fmt: skip
    assert all(len(found) == 1 for found in lines.values()), result.output
    assert "input" in lines[store.bad_input][0] and "damaged" in lines[store.bad_input][0]
    assert "output" in lines[store.bad_output][0]
    for rid in (store.lookalike, store.healthy, store.bad_step):
        assert "input" not in lines[rid][0] and "output" not in lines[rid][0]
    assert "reflow runs explain" in result.output


# -- runs show ------------------------------------------------------------------------------


def test_show_text_marks_a_damaged_input_with_its_error_and_stored_text(store: Store) -> None:
    result = invoke("runs", "show", store.bad_input, "--storage", store.url)
    assert result.exit_code == 0
    line = next(ln for ln in result.output.splitlines() if ln.strip().startswith("input"))
    assert re.search(r"input\s+damaged: .*not a time.*\(stored: " + re.escape(GARBAGE), line)

    healthy = invoke("runs", "show", store.lookalike, "--storage", store.url).output
    line = next(ln for ln in healthy.splitlines() if ln.strip().startswith("input"))
    assert '{"error": "boom", "stored": "x"}' in line and "damaged" not in healthy


def test_show_text_marks_a_damaged_step_output_and_run_output(store: Store) -> None:
    steps = invoke("runs", "show", store.bad_step, "--storage", store.url).output
    row = _flat(steps[steps.index("reserve") :])
    assert row.startswith("reserve") and "damaged:" in row
    assert "damaged" not in steps[: steps.index("steps")]  # the run's own values are fine

    sent = invoke("runs", "show", store.bad_output, "--storage", store.url).output
    line = next(ln for ln in sent.splitlines() if ln.strip().startswith("output"))
    assert "damaged: " in line and "(stored: " in line


def test_show_json_separates_damage_from_values(store: Store) -> None:
    shown = invoke_json("runs", "show", store.bad_input, "--storage", store.url)
    assert shown["run"]["input"] is None
    assert shown["run"]["damaged"]["input"]["stored"] == GARBAGE

    shown = invoke_json("runs", "show", store.bad_step, "--storage", store.url)
    assert shown["run"]["damaged"] == {} and shown["run"]["input"] == {"invoice": 7}
    (step,) = shown["steps"]
    assert step["name"] == "reserve" and step["status"] == "completed"
    assert step["output"] is None
    assert set(step["damaged"]) == {"output"}
    assert step["damaged"]["output"]["stored"] == GARBAGE

    shown = invoke_json("runs", "show", store.lookalike, "--storage", store.url)
    assert shown["run"]["input"] == LOOKALIKE and shown["run"]["damaged"] == {}


# -- runs explain ---------------------------------------------------------------------------


def _explained(store: Store, run_id: str) -> tuple[dict[str, Any], str]:
    data: dict[str, Any] = invoke_json("runs", "explain", run_id, "--storage", store.url)
    text = invoke("runs", "explain", run_id, "--storage", store.url)
    assert text.exit_code == 0
    for sentence in (data["state"], *data["details"], data["action"]):
        assert _words(sentence) in _words(text.output)
    return data, text.output


def test_explain_a_pending_run_with_a_damaged_input(store: Store) -> None:
    data, _ = _explained(store, store.bad_input)
    assert data["situation"] == "damaged"
    assert "the input" in data["state"] and "not a time" in data["state"]
    assert "DAMAGED_VALUE" in data["state"] and "next worker to claim it" in data["state"]
    assert f"reflow runs cancel {store.bad_input}" in data["action"]
    assert "correct input" in data["action"]
    assert f"reflow runs show {store.bad_input}" in data["action"]
    assert "nothing to do" not in " ".join([data["state"], data["action"]]).lower()
    assert data["damaged"] == [
        {
            "value": "input",
            "step": None,
            "error": data["damaged"][0]["error"],
            "stored": GARBAGE,
        }
    ]

    # The healthy runs behind it are explained as before.
    assert _explained(store, store.lookalike)[0]["situation"] == "pending-queued"
    assert _explained(store, store.healthy)[0]["damaged"] == []


def test_explain_a_sleeping_run_with_a_damaged_checkpoint(store: Store) -> None:
    data, _ = _explained(store, store.bad_step)
    assert data["situation"] == "damaged"
    assert "step 'reserve'" in data["state"] and "DAMAGED_VALUE" in data["state"]
    assert f"reflow runs cancel {store.bad_step}" in data["action"]
    assert f"reflow runs retry {store.bad_step}" in data["action"]
    assert [(d["value"], d["step"]) for d in data["damaged"]] == [("output", "reserve")]


def test_explain_a_completed_run_with_a_damaged_output(store: Store) -> None:
    data, _ = _explained(store, store.bad_output)
    assert data["situation"] == "completed"
    assert any("output" in d and "cannot be decoded" in d for d in data["details"])


def test_explain_says_what_the_engine_then_does(store: Store) -> None:
    """The prediction holds: a worker fails the damaged run, the others complete, and
    the explanation of the failed run says resuming or retrying it would fail again."""
    orders: Workflow[Any] = Workflow("orders")

    @orders.step
    def take(ctx: StepContext[Any]) -> Any:
        return ctx.input

    async def work() -> None:
        storage = open_storage(store.url)
        engine = Engine(storage, [orders], use_plugins=False)
        try:
            assert await engine.run_until_idle() == 3
        finally:
            await engine.stop()
            await storage.close()

    run(work())
    statuses = {
        r["id"]: r["status"] for r in invoke_json("runs", "list", "--storage", store.url)["runs"]
    }
    assert statuses[store.bad_input] == "failed"
    assert statuses[store.lookalike] == statuses[store.healthy] == "completed"

    data, _ = _explained(store, store.bad_input)
    assert data["situation"] == "failed" and "DAMAGED_VALUE" not in data["action"]
    assert "fails again" in data["action"] and "correct input" in data["action"]
    refused = invoke("runs", "retry", store.bad_input, "--storage", store.url)
    assert refused.exit_code == 1 and "cannot be decoded" in refused.output


# -- schedules ------------------------------------------------------------------------------


def test_schedules_list_shows_a_damaged_input(tmp_path: Path) -> None:
    path = tmp_path / "cli.db"
    url = f"sqlite:///{path}"

    async def prepare(storage: StorageAdapter) -> None:
        now = await storage.now()
        for key in ("nightly", "lookalike"):
            await storage.upsert_schedule(
                Schedule(
                    key=key, workflow="reports", input=LOOKALIKE,
                    recurrence=Recurrence(every_ms=300_000), next_run_at=now + MINUTE_MS,
                    created_at=now, updated_at=now,
                )
            )  # fmt: skip

    with_store(url, prepare)
    _damage(path, "schedules", "input", "nightly")
    listed = {s["key"]: s for s in invoke_json("schedules", "list", "--storage", url)["schedules"]}
    assert listed["nightly"]["input"] is None
    assert listed["nightly"]["damaged"]["input"]["stored"] == GARBAGE
    assert listed["lookalike"]["input"] == LOOKALIKE and listed["lookalike"]["damaged"] == {}
    text = invoke("schedules", "list", "--storage", url).output
    line = next(ln for ln in text.splitlines() if "nightly" in ln)
    assert "damaged:" in line


# -- the other statuses, from records alone (explain is a pure function) --------------------


def _facts(status: RunStatus, *, input: Any, step_output: Any) -> Facts:
    now = 1_800_000_000_000
    run_ = WorkflowRun(
        id="r1", workflow="orders", input=input, status=status, created_at=now,
        updated_at=now, lease_expires_at=now + MINUTE_MS if status is RunStatus.RUNNING else None,
    )  # fmt: skip
    step = StepResult(
        id="r1/reserve", run_id="r1", name="reserve", status=StepStatus.COMPLETED,
        output=step_output, created_at=now, updated_at=now,
    )  # fmt: skip
    return Facts(run_, [step], now)


def test_explain_running_and_cancelled_runs_holding_damage() -> None:
    marker = DamagedValue(error="ValueError: bad", stored=GARBAGE)
    held = explain(_facts(RunStatus.RUNNING, input={"n": 1}, step_output=marker))
    assert held.situation is Situation.DAMAGED
    assert "claimed again" in held.state and "step 'reserve'" in held.state
    assert "reflow runs retry r1" in held.action

    both = explain(_facts(RunStatus.CANCELLED, input=marker, step_output=marker))
    assert both.situation is Situation.CANCELLED
    assert "correct input" in both.action and "reflow runs resume" not in both.action
    assert [d for d in both.details if "cannot be decoded" in d] == both.details
    assert len(both.details) == 2
