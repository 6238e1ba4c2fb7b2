"""The identifier rule: which strings may name things, one check, used early by the engine."""

from __future__ import annotations

import re
import socket
import unicodedata
from typing import Any

import msgspec
import pytest
from helpers import run
from hypothesis import given
from hypothesis import strategies as st

import reflow_core.engine as engine_module
from reflow_adapters.memory import MemoryStorage
from reflow_adapters.sqlite import SQLiteStorage
from reflow_core import (
    ConfigError,
    Engine,
    InvalidIdentifierError,
    ReflowError,
    RunStatus,
    StepContext,
    Workflow,
    check_identifier,
)
from reflow_core.execution import step_id
from reflow_core.identifiers import (
    MAX_LENGTH,
    MAX_SCHEDULE_KEY_LENGTH,
    MAX_STEP_ID_LENGTH,
    check_holder,
    check_names,
    check_run,
    check_schedule,
    check_step,
    is_identifier,
)
from reflow_core.scheduling import build_schedule, occurrence_key
from reflow_core.types import (
    LeaseHolder,
    Recurrence,
    Schedule,
    StepResult,
    StepStatus,
    WorkflowRun,
)

VALID = [
    "a",
    " ",
    "a:b",
    "a|b/c{d}",
    "\"'`\\",
    "%_",
    " lead",
    "trail ",
    "NULL",
    "\u00e9",
    "e\u0301",
    "\U0001f469\u200d\U0001f4bb",
    "\u200b",
    "\ufeff",
    "\u00a0",
    "\u2028",
    "\ue000",
    "\uffff",
    "\U0010ffff",
    "x" * MAX_LENGTH,
    "\U0001f680" * MAX_LENGTH,
]

INVALID = [
    ("", "it is empty"),
    ("a\x00b", "control character U+0000 at index 1"),
    ("\n", "control character U+000A at index 0"),
    ("a\tb", "control character U+0009"),
    ("\x1f", "control character U+001F"),
    ("a\x7f", "control character U+007F"),
    ("\x80", "control character U+0080"),
    ("a\x9f", "control character U+009F"),
    ("a\ud800", "lone surrogate U+D800 at index 1"),
    ("\udcff", "lone surrogate U+DCFF"),
    ("\ud83d\ude80", "lone surrogate U+D83D"),
    ("x" * (MAX_LENGTH + 1), "longer than 255 characters"),
    (b"bytes", "it is a bytes, not a str"),
    (None, "it is a NoneType, not a str"),
    (7, "it is a int, not a str"),
]


def _oracle(value: str, limit: int = MAX_LENGTH) -> bool:
    """The rule as stated, written the slow, obvious way."""
    return (
        0 < len(value) <= limit
        and all(unicodedata.category(c) not in ("Cc", "Cs") for c in value)
        and value.encode("utf-8", "strict") is not None
    )


@pytest.mark.parametrize("value", VALID, ids=repr)
def test_valid_identifiers_come_back_unchanged(value: str) -> None:
    assert check_identifier(value, "workflow name") is value
    assert is_identifier(value)


@pytest.mark.parametrize(("value", "reason"), INVALID, ids=lambda v: repr(v)[:20])
def test_invalid_identifiers_raise_a_clear_error(value: Any, reason: str) -> None:
    with pytest.raises(InvalidIdentifierError, match=re.escape(reason)) as info:
        check_identifier(value, "event name")
    error = info.value
    assert isinstance(error, ConfigError) and isinstance(error, ReflowError)
    assert error.code == "INVALID_IDENTIFIER"
    assert (error.what, error.value) == ("event name", value)
    assert str(error).startswith("event name ")
    assert "not a valid identifier" in str(error)
    assert not is_identifier(value)


def test_long_values_are_shortened_in_the_message() -> None:
    with pytest.raises(InvalidIdentifierError) as info:
        check_identifier("k" * 10_000, "idempotency key")
    assert len(str(info.value)) < 300
    assert "(10000 characters)" in str(info.value)


def test_limits_per_kind_are_exact() -> None:
    assert check_identifier("s" * MAX_SCHEDULE_KEY_LENGTH, "key", MAX_SCHEDULE_KEY_LENGTH)
    with pytest.raises(InvalidIdentifierError, match="longer than 200"):
        check_identifier("s" * (MAX_SCHEDULE_KEY_LENGTH + 1), "key", MAX_SCHEDULE_KEY_LENGTH)
    assert check_identifier("i" * MAX_STEP_ID_LENGTH, "step id", MAX_STEP_ID_LENGTH)
    with pytest.raises(InvalidIdentifierError, match="longer than 600"):
        check_identifier("i" * (MAX_STEP_ID_LENGTH + 1), "step id", MAX_STEP_ID_LENGTH)
    # Characters, not bytes, are counted.
    assert check_identifier("\U0001f680" * MAX_LENGTH, "run id")


@given(st.text(max_size=MAX_LENGTH + 2))
def test_check_agrees_with_the_stated_rule(value: str) -> None:
    try:
        value.encode("utf-8")
        encodable = True
    except UnicodeEncodeError:
        encodable = False
    expected = encodable and _oracle(value)
    assert is_identifier(value) is expected
    if expected:
        assert check_identifier(value, "x") is value
    else:
        with pytest.raises(InvalidIdentifierError):
            check_identifier(value, "x")


@given(st.text(st.characters(max_codepoint=0x7F), min_size=1, max_size=20))
def test_ascii_fast_path_matches_the_slow_path(value: str) -> None:
    assert is_identifier(value) is all(0x20 <= ord(c) < 0x7F for c in value)


def test_record_helpers_check_every_identifier_field() -> None:
    run_ = WorkflowRun(
        id="r", workflow="wf", input=None, status=RunStatus.PENDING, created_at=1, updated_at=1
    )
    check_run(run_)
    for field in ("id", "workflow", "idempotency_key", "waiting_for"):
        with pytest.raises(InvalidIdentifierError):
            check_run(msgspec.structs.replace(run_, **{field: "bad\x00"}))
    with pytest.raises(InvalidIdentifierError, match="lease holder host"):
        check_run(
            msgspec.structs.replace(run_, holder=LeaseHolder(worker="w", host="\ud800", pid=1))
        )
    check_holder(None)
    with pytest.raises(InvalidIdentifierError, match="lease holder worker"):
        check_holder(LeaseHolder(worker="", host="h", pid=1))
    step = StepResult(
        id="r/" + "s" * MAX_LENGTH,
        run_id="r",
        name="s" * MAX_LENGTH,
        status=StepStatus.COMPLETED,
        created_at=1,
        updated_at=1,
    )
    check_step(step)
    for field in ("id", "run_id", "name"):
        with pytest.raises(InvalidIdentifierError):
            check_step(msgspec.structs.replace(step, **{field: "\n"}))
    schedule = Schedule(
        key="k" * MAX_SCHEDULE_KEY_LENGTH,
        workflow="wf",
        input=None,
        recurrence=Recurrence(every_ms=1000),
        next_run_at=1,
        created_at=1,
        updated_at=1,
    )
    check_schedule(schedule)
    with pytest.raises(InvalidIdentifierError, match="schedule key"):
        check_schedule(msgspec.structs.replace(schedule, key="k" * (MAX_SCHEDULE_KEY_LENGTH + 1)))
    check_names(["a", "b:c"])
    check_names(())
    with pytest.raises(InvalidIdentifierError, match="collection of names"):
        check_names("wf")
    with pytest.raises(InvalidIdentifierError, match="workflow name"):
        check_names(["ok", "bad\x00"])


# -- identifiers the engine derives -----------------------------------------------------


def test_step_ids_keep_their_format_and_never_collide() -> None:
    assert step_id("3f2a-uuid", "charge") == "3f2a-uuid/charge"  # ids already stored stay valid
    assert step_id("x", "a/b") != step_id("x/a", "b")
    assert step_id("x/", "a/b") not in (step_id("x", "/a/b"), step_id("x//a", "b"))
    longest = step_id("/" * MAX_LENGTH, "\U0001f680" * MAX_LENGTH)
    assert check_identifier(longest, "step id", MAX_STEP_ID_LENGTH) is longest


_names = st.text(st.sampled_from("ab/1:"), min_size=1, max_size=6)


@given(st.tuples(_names, _names), st.tuples(_names, _names))
def test_step_ids_are_injective(one: tuple[str, str], other: tuple[str, str]) -> None:
    if one != other:
        assert step_id(*one) != step_id(*other)


def test_occurrence_keys_of_the_longest_schedule_key_are_valid_idempotency_keys() -> None:
    key = "\U0001f680" * MAX_SCHEDULE_KEY_LENGTH
    for slot in (0, 1_700_000_000_000, 2**63 - 1, -(2**63)):
        assert check_identifier(occurrence_key(key, slot), "idempotency key")


def test_schedule_keys_are_checked_at_registration() -> None:
    wf: Workflow[Any] = Workflow("wf")
    options: dict[str, Any] = {
        "every": "1m",
        "cron": None,
        "timezone": "UTC",
        "catch_up": False,
        "now": 0,
    }
    assert build_schedule(wf, None, key="k:{/}", **options).key == "k:{/}"
    for bad in ("", "k\x00", "k" * (MAX_SCHEDULE_KEY_LENGTH + 1)):
        with pytest.raises(InvalidIdentifierError, match="schedule key"):
            build_schedule(wf, None, key=bad, **options)


def test_host_names_are_made_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "box\udcff\x00-1")
    assert engine_module._host_name() == "box??-1"
    monkeypatch.setattr(socket, "gethostname", lambda: "h" * 300)
    assert engine_module._host_name() == "h" * MAX_LENGTH
    monkeypatch.setattr(socket, "gethostname", lambda: "")
    assert engine_module._host_name() == "unknown-host"


# -- the engine refuses early -----------------------------------------------------------


def test_definitions_refuse_invalid_names() -> None:
    with pytest.raises(InvalidIdentifierError, match="workflow name"):
        Workflow("orders\x00")
    with pytest.raises(ConfigError, match="only spaces"):
        Workflow("   ")
    wf: Workflow[Any] = Workflow("orders")
    with pytest.raises(InvalidIdentifierError, match="step name"):
        wf.sleep("nap\n", 1)
    with pytest.raises(InvalidIdentifierError, match="step name"):
        wf.wait_for_event("approved\ud800")
    with pytest.raises(InvalidIdentifierError, match="step name"):

        @wf.step(name="x" * (MAX_LENGTH + 1))
        def too_long(ctx: StepContext[Any]) -> None: ...

    with pytest.raises(InvalidIdentifierError, match="worker_id"):
        Engine(MemoryStorage(), [wf], worker_id="w\x00")


def test_engine_calls_refuse_invalid_identifiers_before_storing() -> None:
    wf: Workflow[Any] = Workflow("orders")
    wf.wait_for_event("approved")

    async def scenario() -> None:
        storage = MemoryStorage()
        engine = Engine(storage, [wf])
        try:
            with pytest.raises(InvalidIdentifierError, match="idempotency_key"):
                await engine.enqueue(wf, None, idempotency_key="k\x00")
            assert await engine.list_runs() == []
            started = await engine.enqueue(wf, None)
            for name, key in (("approved\x00", None), ("approved", ""), ("", None)):
                with pytest.raises(InvalidIdentifierError):
                    await engine.send_event(started.id, name, key=key)
            with pytest.raises(InvalidIdentifierError, match="run id"):
                await engine.send_event("run\x00", "approved")
            with pytest.raises(InvalidIdentifierError, match="run id"):
                await engine.get_run("\ud800")
            with pytest.raises(InvalidIdentifierError, match="schedule key"):
                await engine.schedule(wf, every="1m", key="k\n")
            assert await engine.list_schedules() == []
        finally:
            await engine.stop()
            await storage.close()

    run(scenario())


@pytest.mark.parametrize("adapter", ["memory", "sqlite"])
def test_adversarial_names_run_end_to_end(adapter: str, tmp_path: Any) -> None:
    """A workflow, steps, a wait and keys named with separators, quotes and emoji run to
    completion, and an event sent by its exact name (not a case or space variant) is taken."""
    wf: Workflow[Any] = Workflow("orders:eu/\u03b2 \U0001f680")

    @wf.step(name="a/b")
    def first(ctx: StepContext[Any]) -> str:
        return "first"

    wf.wait_for_event("ev:1 ")

    @wf.step(name='{"x"}\\')
    def last(ctx: StepContext[Any]) -> Any:
        return ctx.prev

    async def scenario() -> None:
        storage = MemoryStorage() if adapter == "memory" else SQLiteStorage(tmp_path / "db")
        engine = Engine(storage, [wf])
        try:
            started = await engine.enqueue(wf, None, idempotency_key="a:b|c")
            again = await engine.enqueue(wf, None, idempotency_key="a:b|c")
            assert again.id == started.id
            await engine.start()
            assert await engine.send_event(started.id, "ev:1 ", "approved", key="k/1")
            done = await engine.wait_for(started.id, within=30)
            assert (done.status, done.output) == (RunStatus.COMPLETED, "approved")
            view = await engine.get_run(started.id)
            assert view is not None
            assert [s.name for s in view.steps] == ["a/b", "ev:1 ", '{"x"}\\']
            assert [s.id for s in view.steps] == [step_id(started.id, s.name) for s in view.steps]
        finally:
            await engine.stop()
            await storage.close()

    run(scenario())


def test_new_run_ids_are_version_7_unique_and_ordered_by_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import time
    import uuid

    from reflow_core import identifiers

    fresh = [identifiers.new_run_id() for _ in range(10_000)]
    assert len(set(fresh)) == len(fresh)
    for text in fresh[:100]:
        parsed = uuid.UUID(text)
        assert (parsed.version, parsed.variant) == (7, uuid.RFC_4122)
        assert str(parsed) == text and identifiers.is_identifier(text)

    # Ids of later milliseconds sort later, whatever their random bits; the first 48
    # bits are the Unix time in milliseconds.
    moments = [1_700_000_000_000, 1_700_000_000_001, 1_800_000_000_000]
    ids = []
    for ms in moments:
        monkeypatch.setattr(time, "time_ns", lambda ms=ms: ms * 1_000_000 + 999_999)
        ids.append(identifiers.new_run_id())
    assert ids == sorted(ids)
    assert [int(text.replace("-", "")[:12], 16) for text in ids] == moments
