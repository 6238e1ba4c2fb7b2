"""SyncEngine is one thin facade with every public Engine operation, and it works:
enqueue, wait, events, schedules, cancel, resume and the event stream, from plain threads."""

from __future__ import annotations

import inspect
import threading
from pathlib import Path
from typing import Any

import pytest

from reflow_core import (
    ConfigError,
    Engine,
    RunCompleted,
    RunStarted,
    RunStatus,
    StepContext,
    Workflow,
)
from reflow_core.sync import SyncEngine

# Engine names whose synchronous twin has another name (async context manager -> with).
RENAMED = {"__aenter__": "__enter__", "__aexit__": "__exit__"}
# Facade-only names: the alias kept for code written before ``stop`` existed here.
SYNC_ONLY = {"close"}


def _public(cls: type[Any]) -> dict[str, Any]:
    return {
        name: member
        for name, member in inspect.getmembers(cls, callable)
        if not name.startswith("_") or name in RENAMED or name in RENAMED.values()
    }


def test_every_public_engine_operation_has_a_sync_twin() -> None:
    engine_ops = {RENAMED.get(name, name) for name in _public(Engine)}
    sync_ops = set(_public(SyncEngine)) - SYNC_ONLY
    assert sorted(engine_ops - sync_ops) == [], "Engine operations missing from SyncEngine"
    assert sorted(sync_ops - engine_ops) == [], "SyncEngine operations Engine does not have"


@pytest.mark.parametrize(
    "name", sorted(n for n in _public(Engine) if not n.startswith("_") and n != "events")
)
def test_sync_twin_takes_the_same_parameters(name: str) -> None:
    """Same names, kinds and defaults: code moves between the two without surprises."""

    def shape(func: Any) -> list[tuple[str, Any, Any]]:
        params = list(inspect.signature(func).parameters.values())[1:]  # not self
        return [(p.name, p.kind, p.default) for p in params]

    assert shape(getattr(SyncEngine, name)) == shape(getattr(Engine, name))
    doc = inspect.getdoc(getattr(SyncEngine, name)) or ""
    assert doc, f"SyncEngine.{name} has no docstring"


def test_events_takes_the_same_parameters() -> None:
    engine = inspect.signature(Engine.events).parameters
    sync = inspect.signature(SyncEngine.events).parameters
    assert [(p.name, p.kind, p.default) for p in engine.values()] == [
        (p.name, p.kind, p.default) for p in sync.values()
    ]


def _approval() -> Workflow[Any]:
    wf: Workflow[Any] = Workflow("approval")

    @wf.step
    def ask(ctx: StepContext[Any]) -> str:
        return f"please approve {ctx.input['what']}"

    wf.wait_for_event("approved", type=dict)

    @wf.step
    def act(ctx: StepContext[Any]) -> dict[str, Any]:
        return {"done": ctx.input["what"], "by": ctx.prev["by"]}

    return wf


def _blocked() -> tuple[Workflow[Any], threading.Event, threading.Event]:
    entered, gate = threading.Event(), threading.Event()
    wf: Workflow[Any] = Workflow("blocked")

    @wf.step
    def hold(ctx: StepContext[Any]) -> str:
        entered.set()
        gate.wait(10)
        return "released"

    return wf, entered, gate


def test_a_worker_hosted_by_sync_code(tmp_path: Path) -> None:
    """Enqueue, send an event, wait, list, stream: all from the calling thread."""
    db = f"sqlite:///{tmp_path / 'sync.db'}"
    with SyncEngine(Engine(db, [_approval()], use_plugins=False)) as engine:
        stream = engine.events(buffer=100)
        run = engine.enqueue("approval", {"what": "budget"})
        first = next(stream)
        assert isinstance(first, RunStarted) and first.run_id == run.id
        # Refused to the sender: this workflow has no such wait.
        with pytest.raises(ConfigError, match="no wait_for_event named 'nope'"):
            engine.send_event(run.id, "nope")
        assert engine.send_event(run.id, "approved", {"by": "ada"}, key="mail-1")
        done = engine.wait_for(run.id, within=10)
        assert done.status is RunStatus.COMPLETED
        assert done.output == {"done": "budget", "by": "ada"}
        seen = []
        for event in stream:
            seen.append(event)
            if isinstance(event, RunCompleted):
                break
        stream.close()
        assert isinstance(seen[-1], RunCompleted) and seen[-1].output == done.output
        assert [r.id for r in engine.list_runs(status="completed")] == [run.id]
        view = engine.get_run(run.id)
        assert view is not None and view.outputs["approved"] == {"by": "ada"}
        assert engine.workflow("approval").name == "approval"
    engine.stop()  # twice: nothing happens


def test_schedules_cancel_and_resume_without_an_event_loop(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'sync.db'}"
    wf, entered, gate = _blocked()
    with SyncEngine(Engine(db, [wf], use_plugins=False), worker=False) as engine:
        key = engine.schedule("blocked", every="1h", key="hourly")
        assert key == "hourly"
        assert [s.key for s in engine.list_schedules()] == ["hourly"]
        assert engine.unschedule("hourly")
        assert not engine.unschedule("hourly")
        assert engine.list_schedules() == []

        run = engine.enqueue("blocked")
        assert engine.cancel(run.id)
        assert engine.get_run(run.id).run.status is RunStatus.CANCELLED  # type: ignore[union-attr]
        assert engine.resume(run.id)
        gate.set()
        assert engine.run_until_idle() == 1
        assert entered.is_set()
        assert engine.wait_for(run.id, within=10).output == "released"


def test_register_before_start() -> None:
    wf, _, _ = _blocked()
    engine = SyncEngine(Engine("memory://", use_plugins=False), worker=False)
    engine.register(wf)
    assert engine.engine.workflow("blocked") is wf
    engine.close()
