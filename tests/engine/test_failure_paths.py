"""Failure paths end in a recorded outcome, through a real engine on every adapter: a
value the codec cannot bring back exactly, an int the process could print but no store
can read, a named zone, the default recovery cap, any ``BaseException`` from a step or
an ``on_failure`` handler, and retry delays past what a store can keep.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from helpers import FakeClock, run

from reflow_core import (
    ConfigError,
    Engine,
    RetryPolicy,
    RunStatus,
    SerializationError,
    StepContext,
    Workflow,
)

PARIS = ZoneInfo("Europe/Paris")


@pytest.fixture
def int_digit_limit() -> Iterator[None]:
    """Let a test change ``sys.set_int_max_str_digits`` (process-wide) and restore it."""
    saved = sys.get_int_max_str_digits()
    try:
        yield
    finally:
        sys.set_int_max_str_digits(saved)


def _deep_dollar_dict(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"$a": value}
    return value


# -- item 3 through a run: refused values end the run, never loop ------------------------


@pytest.mark.parametrize("kind", ["a 4,301-digit int", "a 500-deep $ dict"])
def test_a_step_returning_what_cannot_come_back_fails_its_run_once(
    storage_factory: Any, kind: str
) -> None:
    value = 10**4300 if kind == "a 4,301-digit int" else _deep_dollar_dict(500)
    wf: Workflow[Any] = Workflow("unstorable")
    calls: list[int] = []

    @wf.step
    def produce(ctx: StepContext[Any]) -> Any:
        calls.append(ctx.attempt)
        return {"v": value}

    good: Workflow[Any] = Workflow("good")

    @good.step
    def fine(ctx: StepContext[Any]) -> str:
        return "fine"

    async def scenario() -> None:
        storage = storage_factory()
        engine = Engine(storage, [wf, good], use_plugins=False)
        try:
            bad = await engine.enqueue(wf)
            after = await engine.enqueue(good)
            await engine.run_until_idle()
            failed = await engine.wait_for(bad.id, within=10)
            assert failed.status is RunStatus.FAILED
            assert failed.error is not None and failed.error.code == "SERIALIZATION"
            assert failed.error.step == "produce"
            assert "$.v" in failed.error.message
            assert (await engine.wait_for(after.id, within=10)).output == "fine"
        finally:
            await engine.stop()
            await storage.close()

    run(scenario())
    assert calls == [1]  # failed, not re-executed


def test_an_int_the_process_could_print_is_refused_at_enqueue_and_blocks_nothing(
    storage_factory: Any, int_digit_limit: None
) -> None:
    wf: Workflow[Any] = Workflow("numbers")

    @wf.step
    def echo(ctx: StepContext[Any]) -> Any:
        return ctx.input

    async def scenario() -> None:
        storage = storage_factory()
        engine = Engine(storage, [wf], use_plugins=False)
        try:
            sys.set_int_max_str_digits(0)  # the process lifted CPython's own limit
            with pytest.raises(SerializationError) as info:
                await engine.enqueue(wf, {"n": [1, 10**5000]})
            assert info.value.path == "$.n[1]"
            assert await engine.list_runs() == []  # nothing stored
            ok = await engine.enqueue(wf, {"n": [1, 10**4300 - 1]})
            await engine.run_until_idle()
            done = await engine.wait_for(ok.id, within=10)
            assert done.status is RunStatus.COMPLETED
            assert done.output == {"n": [1, 10**4300 - 1]}
        finally:
            await engine.stop()
            await storage.close()

    run(scenario())


def test_a_zoned_datetime_comes_back_exactly_through_every_store(storage_factory: Any) -> None:
    wf: Workflow[Any] = Workflow("zoned")
    seen: list[datetime] = []
    when = datetime(2024, 5, 1, 12, 0, tzinfo=PARIS)  # summer time, +02:00

    @wf.step
    def later(ctx: StepContext[Any]) -> datetime:
        seen.append(ctx.input["when"])
        return ctx.input["when"] + timedelta(days=180)

    async def scenario() -> None:
        storage = storage_factory()
        engine = Engine(storage, [wf], use_plugins=False)
        try:
            run_ = await engine.enqueue(wf, {"when": when})
            await engine.run_until_idle()
            done = await engine.wait_for(run_.id, within=10)
            assert done.status is RunStatus.COMPLETED
            out = done.output
            assert isinstance(out, datetime) and out.tzinfo is PARIS
            assert (out.hour, out.utcoffset()) == (12, timedelta(hours=1))  # winter time
        finally:
            await engine.stop()
            await storage.close()

    run(scenario())
    assert seen[0].tzinfo is PARIS and seen[0] == when


# -- item 8: the recovery cap's default ---------------------------------------------------


def test_the_default_recovery_cap_is_ten(storage_factory: Any, clock: FakeClock) -> None:
    """A run taken over ten times still executes; the eleventh takeover fails it."""
    wf: Workflow[Any] = Workflow("default-cap")
    assert wf.max_recoveries == 10
    executed: list[int] = []

    @wf.step
    def once(ctx: StepContext[Any]) -> str:
        executed.append(1)
        return "done"

    async def scenario() -> None:
        storage = storage_factory(clock=clock)
        engine = Engine(storage, [wf], clock=clock, use_plugins=False)
        try:
            ids = []
            for claims in (10, 11):  # the engine's claim is a 10th, then an 11th takeover
                run_ = await engine.enqueue(wf)  # one at a time: each is the oldest
                ids.append(run_.id)
                for _ in range(claims):  # workers that claim it and die
                    claimed = await storage.claim_next_run(["default-cap"], lease_ms=1_000)
                    assert claimed is not None and claimed.run.id == run_.id
                    clock.advance(2)
                view = await engine.get_run(run_.id)
                assert view is not None and view.run.recoveries == claims - 1
                await engine.run_until_idle()
            within, beyond = ids
            ok = await engine.get_run(within)
            assert ok is not None and ok.run.status is RunStatus.COMPLETED
            assert ok.run.recoveries == 10
            failed = await engine.get_run(beyond)
            assert failed is not None and failed.run.status is RunStatus.FAILED
            assert failed.run.error is not None
            assert failed.run.error.code == "RECOVERY_LIMIT"
            assert "limit 10" in failed.run.error.message
        finally:
            await engine.stop()
            await storage.close()

    run(scenario())
    assert executed == [1]  # only the run within the cap executed its step


# -- any BaseException, from any user code the engine calls ------------------------------

# A library's own BaseException (as greenlet's GreenletExit, or a test framework's outcome
# exceptions) and a BaseExceptionGroup: neither Exception nor one of the exceptions the
# engine names. Run in a child process: before the fix it escaped the engine's tasks.
CUSTOM_BASE_EXCEPTION = """
import asyncio
from reflow_adapters.memory import MemoryStorage
from reflow_core import Engine, LeaseOptions, Workflow


class Abort(BaseException):
    pass


calls = []
workflows = []


def flow(name, kind):
    wf = Workflow(name, max_recoveries=0)

    def predicate(ctx):
        calls.append(name)
        raise Abort("from a library")

    async def async_step(ctx):
        calls.append(name)
        raise Abort("from a library")

    def def_step(ctx):
        calls.append(name)
        raise Abort("from a library")

    async def group_step(ctx):
        calls.append(name)
        raise BaseExceptionGroup("from a library", [KeyboardInterrupt()])

    if kind == "when":
        wf.step(async_step, name="boom", when=predicate)
    else:
        wf.step({"async": async_step, "def": def_step, "group": group_step}[kind], name="boom")
    workflows.append(wf)
    return wf


for kind in ("async", "def", "when", "group"):
    flow(kind, kind)


async def main():
    storage = MemoryStorage()
    lease = LeaseOptions(duration=1, heartbeat_interval=0.2)
    engine = Engine(storage, workflows, lease=lease, use_plugins=False)
    try:
        runs = [(wf.name, await engine.enqueue(wf)) for wf in workflows]
        await engine.start()
        for name, run in runs:
            failed = await engine.wait_for(run.id, within=10)
            message = failed.error.message.replace("\\n", " ")
            print("OUTCOME", name, failed.error.code, calls.count(name), message)
    finally:
        await engine.stop()
        await storage.close()


asyncio.run(main())
"""


def test_any_base_exception_from_user_code_fails_the_run_once() -> None:
    child = subprocess.run(
        [sys.executable, "-c", CUSTOM_BASE_EXCEPTION],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == 0, child.stderr
    outcomes = {
        line.split(" ", 4)[1]: line.split(" ", 4)[2:]
        for line in child.stdout.splitlines()
        if line.startswith("OUTCOME ")
    }
    assert sorted(outcomes) == ["async", "def", "group", "when"], child.stdout + child.stderr
    for kind, (code, calls, message) in outcomes.items():
        assert (code, calls) == ("STEP_INTERRUPTED", "1"), (kind, message)
        assert "from a library" in message, (kind, message)


EXIT_IN_ON_FAILURE = """
import asyncio, sys
from reflow_adapters.memory import MemoryStorage
from reflow_core import Engine, Workflow

wf = Workflow("compensating")


@wf.step
def boom(ctx):
    raise ValueError("the real failure")


@wf.on_failure
def compensate(ctx):
    sys.exit(4)


async def main():
    storage = MemoryStorage()
    engine = Engine(storage, [wf], use_plugins=False)
    try:
        bad = await engine.enqueue(wf)
        await engine.start()
        failed = await engine.wait_for(bad.id, within=10)
        print("OUTCOME", failed.status.value, failed.error.message)
    finally:
        await engine.stop()
        await storage.close()


asyncio.run(main())
"""


def test_sys_exit_in_on_failure_does_not_kill_the_engine() -> None:
    child = subprocess.run(
        [sys.executable, "-c", EXIT_IN_ON_FAILURE],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == 0, child.stderr
    assert "OUTCOME failed" in child.stdout and "the real failure" in child.stdout


@pytest.mark.parametrize("policy", [{"initial_delay": 1e17}, {"max_delay": 1e17}])
def test_retry_delays_are_bounded_at_definition(policy: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="100 years"):
        RetryPolicy(**policy)


def test_an_accepted_retry_policy_never_asks_for_more_than_a_century() -> None:
    policy = RetryPolicy(max_attempts=2_000)  # exponential from 1 s, no max_delay
    century = 100 * 365.25 * 86_400
    for attempt in (33, 64, 1_500):
        assert policy.decide(attempt, ValueError()).delay <= century
