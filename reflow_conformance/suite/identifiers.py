"""Identifiers: every valid id, name and key is matched exactly; invalid ones are refused.

The rule (``reflow_core/storage.py``, enforced by :mod:`reflow_core.identifiers`): an
identifier is valid when it is a non-empty ``str`` of at most 255 characters (schedule
keys 200, step ids 600) without control characters or surrogates. Every valid one is
stored, matched, ordered and returned exactly, in every family of methods: separators an
adapter might join keys with (``a:b`` + ``c`` is not ``a`` + ``b:c``), SQL ``LIKE``
wildcards (``%`` ``_``), case, leading and trailing spaces, quotes and backslashes,
strings that look like ``NULL`` or an array literal, non-ASCII, emoji, Unicode that a
normaliser would fold, and the longest identifiers in 4-byte characters (the most bytes
a valid identifier can take). Every invalid one (empty, NUL or another control
character, a lone surrogate, too long, not a str) raises ``InvalidIdentifierError``
before anything is read or written: the store reads back exactly as before.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import msgspec

from reflow_conformance.cases import case
from reflow_conformance.harness import ContractViolation, Harness, expect
from reflow_core.errors import InvalidIdentifierError
from reflow_core.identifiers import MAX_LENGTH, MAX_SCHEDULE_KEY_LENGTH, MAX_STEP_ID_LENGTH
from reflow_core.types import (
    ConsumeResult,
    LeaseHolder,
    RunFilter,
    RunStatus,
    StepStatus,
)

# -- adversarial valid identifiers ------------------------------------------------------

WIDE = "\U0001f680"
"""A 4-byte character in UTF-8: identifiers made of it take the most bytes allowed."""

SEPARATORS = (":", "|", "/", "{", "}", ",", ";", ".", "=", "#", "\\", " ", "\u00a0", "")
"""What an adapter might join a composite key with (``""``: plain concatenation)."""

NEIGHBOURS_OF_A = (
    "%",
    "_",
    "a%",
    "a_",
    "A",
    "a:b",
    "ab",
    "a ",
    " a",
    "a\u200b",
    "\uff41",
    "\u00e1",
    "a\u0301",
    "a*",
    ".*",
    "[a]",
    "a\\",
    "a/b",
    "NULL",
)
"""Workflow names a sloppy match of ``a`` would take: LIKE wildcards, case, spaces, a
zero-width space, the fullwidth a (NFKC folds it to ``a``), accents, regex and glob."""

ARRAY_TRAPS = (
    "NULL",
    "null",
    "a,b",
    '"q"',
    "{x}",
    "{}",
    " sp ",
    "a\\b",
    "'; --",
    "%(x)s",
    WIDE,
)
"""Names that break a list of names bound as a SQL array or JSON text built by hand."""

ARRAY_DECOYS = ("a", "b", "q", "x", "sp", "NUL", "{x", "a\\\\b", "(x)s", "\\")
"""Workflows whose runs a broken array encoding would claim instead."""

CODE_POINT_IDS = (
    "B",
    "a",
    "Z",
    "\u00e9",
    "e\u0301",
    WIDE,
    "\uffff",
    "\ue000",
    "a b",
    "a-b",
    "a_b",
    "a~",
    "A",
    "10",
    "9",
    "\U0010ffff",
)
"""Ids whose code point order differs from a locale's, a case-folded one, and UTF-16's
(``\\uffff`` sorts before an emoji by code point, after it in UTF-16)."""

LOOKALIKES = (
    ("\u00e9", "e\u0301"),  # NFC and NFD
    ("\ufb01", "fi"),  # a ligature and its NFKC folding
    ("\uff41", "a"),  # fullwidth and ASCII
    ("\u00df", "ss"),  # casefold("ß") == "ss"
    ("\u212a", "K"),  # the Kelvin sign and K (NFKC)
    ("\u0130", "i\u0307"),  # lower("İ") == "i̇"
    ("k", "K"),
    ("k", "k "),
    ("k", "\u200bk"),
)
"""Pairs that a normalising, case-folding or trimming adapter would merge."""


def _long(seed: str, length: int = MAX_LENGTH, fill: str = WIDE) -> str:
    """An identifier of exactly ``length`` characters starting with ``seed``."""
    return seed + fill * (length - len(seed))


# -- invalid identifiers ----------------------------------------------------------------


def invalid(limit: int = MAX_LENGTH) -> list[tuple[str, Any]]:
    """(label, value) of identifiers that break the rule, for an identifier of ``limit``."""
    return [
        ("empty", ""),
        ("NUL", "a\x00b"),
        ("NUL alone", "\x00"),
        ("trailing NUL", "ev\x00"),
        ("newline", "a\nb"),
        ("tab", "\t"),
        ("DEL", "a\x7f"),
        ("C1 control", "a\x85b"),
        ("lone high surrogate", "a\ud800"),
        ("lone low surrogate", "\udcff"),
        ("surrogate pair as code points", "\ud83d\ude80"),
        ("too long", "x" * (limit + 1)),
        ("too long, 4-byte characters", WIDE * (limit + 1)),
        ("bytes", b"bytes"),
    ]


async def _refuse(
    h: Harness,
    what: str,
    call: Callable[[Any], Awaitable[Any]],
    ids: Iterable[str],
    *,
    limit: int = MAX_LENGTH,
) -> None:
    """Each invalid value raises InvalidIdentifierError and changes nothing readable."""
    run_ids = list(ids)
    for label, value in invalid(limit):
        before = await h.snapshot(run_ids)
        try:
            await call(value)
        except InvalidIdentifierError:
            pass
        except Exception as exc:
            raise ContractViolation(
                f"{what} with an invalid identifier ({label}: {value!r:.60})",
                "InvalidIdentifierError",
                f"{type(exc).__name__}: {exc}",
            ) from exc
        else:
            raise ContractViolation(
                f"{what} with an invalid identifier ({label}: {value!r:.60})",
                "InvalidIdentifierError",
                "no error",
            )
        await h.expect_unchanged(before, run_ids, f"after {what} refused {label}")


async def _not_held(
    h: Harness, what: str, call: Callable[[Any], Awaitable[Any]], ids: Iterable[str], held: Any
) -> None:
    """A lease id that is not a valid identifier was never issued: each call answers
    ``held`` (not held), raises nothing (no driver error), and changes nothing."""
    run_ids = list(ids)
    for label, value in invalid():
        before = await h.snapshot(run_ids)
        try:
            answer = await call(value)
        except Exception as exc:
            raise ContractViolation(
                f"{what} with a lease id that was never issued ({label}: {value!r:.60})",
                f"{held!r}: not held",
                f"{type(exc).__name__}: {exc}",
            ) from exc
        expect(answer, held, f"{what} with a lease id that was never issued ({label})")
        await h.expect_unchanged(before, run_ids, f"after {what} with {label}")


# -- valid identifiers are exact --------------------------------------------------------


@case("identifiers.idempotency_keys_are_not_joined")
async def idempotency_keys_are_not_joined(h: Harness) -> None:
    """Workflow "a:b" with key "c" and workflow "a" with key "b:c" are two runs, for
    every separator an adapter might join (workflow, key) with, and for none."""
    for sep in SEPARATORS:
        pairs = ((f"a{sep}b", "c"), ("a", f"b{sep}c"))
        ids = []
        for workflow, key in pairs:
            result = await h.storage.create_run(h.new_run(workflow, key, idempotency_key=key))
            expect(
                result.created,
                True,
                f"create_run(workflow={workflow!r}, idempotency_key={key!r}).created: no run "
                f"of that workflow holds that key (only workflow {pairs[0][0]!r} with key "
                f"{pairs[0][1]!r} does)",
            )
            ids.append(result.run.id)
        for (workflow, key), run_id in zip(pairs, ids, strict=True):
            again = await h.storage.create_run(h.new_run(workflow, "again", idempotency_key=key))
            expect(
                (again.created, again.run.id),
                (False, run_id),
                f"create_run again with workflow {workflow!r} and key {key!r}",
            )
            stored = await h.get(run_id)
            expect(
                (stored.workflow, stored.idempotency_key, stored.input),
                (workflow, key, key),
                f"run {run_id!r}: (workflow, idempotency_key, input)",
            )


@case("identifiers.lookalikes_are_distinct")
async def lookalikes_are_distinct(h: Harness) -> None:
    """Strings equal only after Unicode normalisation, case folding or trimming are
    distinct workflows and distinct keys, and read back exactly as given."""
    runs_of: dict[str, set[str]] = {}
    for index, (one, other) in enumerate(LOOKALIKES):
        key_for_both, workflow_for_both = f"key-{index}", f"lookalikes-{index}"
        for workflow, key in (
            (one, key_for_both),
            (other, key_for_both),
            (workflow_for_both, one),
            (workflow_for_both, other),
        ):
            result = await h.storage.create_run(h.new_run(workflow, idempotency_key=key))
            expect(
                result.created,
                True,
                f"create_run(workflow={workflow!r}, idempotency_key={key!r}).created "
                f"(distinct from {one!r} / {other!r})",
            )
            runs_of.setdefault(workflow, set()).add(result.run.id)
            stored = await h.get(result.run.id)
            expect(
                (stored.workflow, stored.idempotency_key),
                (workflow, key),
                "(workflow, idempotency_key) read back, not normalised",
            )
    for workflow, ids in runs_of.items():
        listed = await h.storage.list_runs(RunFilter(workflow=workflow))
        expect({r.id for r in listed}, ids, f"ids of list_runs(workflow={workflow!r})")


@case("identifiers.claims_match_workflow_names_exactly")
async def claims_match_workflow_names_exactly(h: Harness) -> None:
    """A claim for "a" takes only a run of "a": never one of "a:b", "a%", "a_", "A",
    "a ", ...; and each of those claims only its own run."""
    names = ("a", *NEIGHBOURS_OF_A)
    # Created oldest first with "a" newest, so a loose match would return another run.
    runs = {}
    for index, name in enumerate(reversed(names)):
        runs[name] = await h.create(name, name, created_at=1_000 + index)
    for name in names:
        claimed = await h.claim_any([name])
        expect(
            None if claimed is None else (claimed.run.id, claimed.run.workflow),
            (runs[name].id, name),
            f"claim_next_run([{name!r}]): its own run, no other workflow's",
        )
        again = await h.claim_any([name])
        expect(
            None if again is None else again.run.workflow,
            None,
            f"claim_next_run([{name!r}]) once its only run is claimed",
        )


@case("identifiers.claims_with_tricky_name_lists")
async def claims_with_tricky_name_lists(h: Harness) -> None:
    """A list of names that break hand-built SQL arrays or JSON ("NULL", "a,b", quotes,
    braces, spaces, backslashes) claims exactly the runs of those names."""
    for index, name in enumerate(ARRAY_DECOYS):
        await h.create(name, created_at=1_000 + index)
    for index, name in enumerate(ARRAY_TRAPS):
        await h.create(name, created_at=2_000 + index)
    claimed: list[str] = []
    for _ in range(len(ARRAY_TRAPS) + len(ARRAY_DECOYS) + 1):
        item = await h.claim_any(list(ARRAY_TRAPS))
        if item is None:
            break
        claimed.append(item.run.workflow)
    expect(
        sorted(claimed),
        sorted(ARRAY_TRAPS),
        f"workflows claimed by claim_next_run({list(ARRAY_TRAPS)!r}) until None",
    )
    schedules = [
        h.schedule(f"s{index}", name, every_ms=60_000, next_run_at=h.past())
        for index, name in enumerate((*ARRAY_DECOYS, *ARRAY_TRAPS))
    ]
    for schedule in schedules:
        await h.storage.upsert_schedule(schedule)
    fired: list[str] = []
    for _ in range(len(schedules) + 1):
        occurrence = await h.storage.claim_due_schedule(list(ARRAY_TRAPS))
        if occurrence is None:
            break
        fired.append(occurrence.schedule.workflow)
    expect(
        sorted(fired),
        sorted(ARRAY_TRAPS),
        f"workflows of the schedules claim_due_schedule({list(ARRAY_TRAPS)!r}) fired",
    )


@case("identifiers.list_runs_filter_is_exact")
async def list_runs_filter_is_exact(h: Harness) -> None:
    """list_runs(workflow=name) lists the runs of exactly that name."""
    names = ("a", *NEIGHBOURS_OF_A)
    runs = {name: await h.create(name, created_at=1_000 + i) for i, name in enumerate(names)}
    for name in names:
        listed = await h.storage.list_runs(RunFilter(workflow=name))
        expect([r.id for r in listed], [runs[name].id], f"list_runs(workflow={name!r})")


@case("identifiers.code_point_order")
async def code_point_order(h: Harness) -> None:
    """Ties on created_at (claims, step rows) and on next_run_at (due schedules) are broken
    by code point order of the id or key, as are list_runs and list_schedules."""
    for run_id in CODE_POINT_IDS:
        await h.create(id=run_id, created_at=7)
    expected = sorted(CODE_POINT_IDS)
    listed = [r.id for r in await h.storage.list_runs(RunFilter(limit=100))]
    expect(listed, expected[::-1], "list_runs order (newest first, then id descending)")
    middle = expected[len(expected) // 2]
    page = await h.storage.list_runs(RunFilter(before=7, before_id=middle, limit=100))
    expect(
        [r.id for r in page],
        [i for i in expected if i < middle][::-1],
        f"list_runs(before=7, before_id={middle!r})",
    )
    claimed = []
    for _ in CODE_POINT_IDS:
        item = await h.claim_any(["wf"])
        claimed.append(None if item is None else item.run.id)
    expect(claimed, expected, "order in which claims take runs of equal created_at")

    run_id = h.new_id()
    await h.create(id=run_id)
    for step_id in CODE_POINT_IDS:
        await h.storage.save_step_result(h.step(run_id, f"s-{step_id}", id=step_id, created_at=7))
    rows = await h.storage.get_step_results(run_id)
    expect([r.id for r in rows], expected, "get_step_results order for equal created_at")

    for key in CODE_POINT_IDS:
        await h.storage.upsert_schedule(h.schedule(key, next_run_at=h.past()))
    listed_keys = [s.key for s in await h.storage.list_schedules()]
    expect(listed_keys, expected, "list_schedules order")
    fired = []
    for _ in CODE_POINT_IDS:
        occurrence = await h.storage.claim_due_schedule(["wf"])
        fired.append(None if occurrence is None else occurrence.schedule.key)
    expect(fired, expected, "order in which equally due schedules are claimed")


@case("identifiers.event_names_and_keys_exact")
async def event_names_and_keys_exact(h: Harness) -> None:
    """Event names that differ by case, spaces, accents or wildcards are distinct buffers;
    keys likewise; neither is joined with the run id."""
    names = (
        "ev",
        "Ev",
        "EV",
        "ev ",
        " ev",
        "ev\u200b",
        "\u00e9v",
        "e\u0301v",
        "ev:1",
        "ev%",
        "ev_",
    )
    run = await h.create()
    for name in names:
        expect(await h.storage.deliver_event(run.id, name, name), True, f"deliver {name!r}")
    # Taken newest name first: a loose match would return an older event of another name.
    for name in reversed(names):
        record = await h.storage.take_event(run.id, name)
        expect(None if record is None else record.payload, name, f"take_event({name!r})")
    for name in names:
        expect(await h.storage.take_event(run.id, name), None, f"take_event({name!r}) again")

    # (run id, event name) is not joined: run "r" + "x:ev" vs run "r:x" + "ev".
    base = h.new_id()
    first = await h.create(id=base)
    second = await h.create(id=f"{base}:x")
    await h.storage.deliver_event(first.id, "x:ev", "first")
    await h.storage.deliver_event(second.id, "ev", "second")
    for run_id, name, payload in ((second.id, "ev", "second"), (first.id, "x:ev", "first")):
        record = await h.storage.take_event(run_id, name)
        expect(
            None if record is None else record.payload, payload, f"take_event({run_id!r}, {name!r})"
        )

    # Keys: "k", "K", "k " are three keys; (run id, key) is not joined either.
    keyed = await h.create()
    for key in ("k", "K", "k ", "k"):
        expect(await h.storage.deliver_event(keyed.id, "ev", key, key=key), True, f"key {key!r}")
    taken: list[Any] = []
    while (record := await h.storage.take_event(keyed.id, "ev")) is not None and len(taken) < 9:
        taken.append(record.payload)
    expect(taken, ["k", "K", "k "], "events stored for keys k, K, 'k ', k (repeated)")
    one = await h.create(id=f"{base}-k")
    two = await h.create(id=f"{base}-k:1")
    await h.storage.deliver_event(two.id, "ev", "two", key="k")
    await h.storage.deliver_event(one.id, "ev", "one", key="1:k")
    record = await h.storage.take_event(one.id, "ev")
    expect(
        None if record is None else record.payload,
        "one",
        f"event keyed '1:k' to run {one.id!r} (run {two.id!r} has key 'k')",
    )


@case("identifiers.waits_match_event_names_exactly")
async def waits_match_event_names_exactly(h: Harness) -> None:
    """A run waiting for "ev" is woken only by "ev" (not "Ev", "ev ", "ev\\u200b"), is not
    made pending by a buffered "EV", and consume_event takes only its own name."""
    claimed = await h.created_and_claimed()
    run_id = claimed.run.id
    await h.storage.wait_run(run_id, claimed.lease_id, "ev", None)
    for other in ("Ev", "ev ", "ev\u200b", "e", "ev%"):
        await h.storage.deliver_event(run_id, other, other)
        expect((await h.get(run_id)).status, RunStatus.WAITING, f"status after {other!r}")
    await h.storage.deliver_event(run_id, "ev", "ev")
    expect((await h.get(run_id)).status, RunStatus.PENDING, "status after 'ev'")

    claimed = await h.claim(run_id)
    await h.storage.wait_run(run_id, claimed.lease_id, "EV", None)
    expect((await h.get(run_id)).status, RunStatus.WAITING, "wait for 'EV' (only 'ev' buffered)")
    await h.storage.deliver_event(run_id, "EV", "EV")
    claimed = await h.claim(run_id)
    checkpoint = h.step(run_id, "wait-ev_", StepStatus.COMPLETED)
    result = await h.storage.consume_event("ev_", checkpoint, claimed.lease_id)
    expect(result, ConsumeResult(held=True), "consume_event('ev_'): no event of that name")
    for name in ("Ev", "ev "):
        step = h.step(run_id, f"wait-{name}", StepStatus.COMPLETED)
        result = await h.storage.consume_event(name, step, claimed.lease_id)
        payload = None if result.event is None else result.event.payload
        expect((result.held, payload), (True, name), f"consume_event({name!r}) payload")
    rows = {r.name: r.output for r in await h.storage.get_step_results(run_id)}
    expect(rows, {"wait-Ev": "Ev", "wait-ev ": "ev "}, "checkpoints written by consume_event")


@case("identifiers.step_rows_exact")
async def step_rows_exact(h: Harness) -> None:
    """Step "a/b" of run "x" and step "b" of run "x/a" are two rows of two runs (and a
    requeue of "x" drops only its own failed rows); names that differ by case or spaces
    are distinct rows; ids with quotes and braces are kept."""
    x = h.new_id()
    await h.create(id=x)
    await h.create(id=f"{x}/a")
    await h.create(id=f"{x}/")
    rows = (
        (x, "a/b", "s-1"),
        (f"{x}/a", "b", "s-2"),
        (f"{x}/", "a/b", "s-3"),
    )
    for run_id, name, step_id in rows:
        row = h.step(run_id, name, StepStatus.FAILED, output=name, id=step_id)
        ok = await h.storage.save_step_result(row)
        expect(ok, True, f"save_step_result(step {name!r} of run {run_id!r}, id {step_id!r})")
    for run_id, name, step_id in rows:
        stored = await h.storage.get_step_results(run_id)
        expect(
            [(r.id, r.run_id, r.name, r.output) for r in stored],
            [(step_id, run_id, name, name)],
            f"get_step_results({run_id!r}): its own row only",
        )
    claimed = await h.claim(x)
    await h.storage.update_claimed_run_status(x, claimed.lease_id, RunStatus.FAILED)
    expect(await h.storage.requeue_run(x), True, f"requeue_run({x!r})")
    expect(await h.storage.get_step_results(x), [], f"failed rows of {x!r} after its requeue")
    for run_id, _, step_id in rows[1:]:
        kept = [r.id for r in await h.storage.get_step_results(run_id)]
        expect(kept, [step_id], f"failed rows of {run_id!r} after requeue_run({x!r})")

    run_id = h.new_id()
    await h.create(id=run_id)
    names = ("step", "Step", "step ", " step", "st/ep", "st:ep", "{step}", '"step"', "st%", "st_")
    ids = {name: f'{{"id": "{name}"}}\\' for name in names}
    for index, name in enumerate(names):
        row = h.step(run_id, name, StepStatus.RUNNING, output=index, id=ids[name], created_at=index)
        expect(await h.storage.save_step_result(row), True, f"save step {name!r}")
    final = h.step(run_id, "step", output="done", id=ids["step"], created_at=0)
    expect(await h.storage.save_step_result(final), True, "update of step 'step'")
    stored = await h.storage.get_step_results(run_id)
    expect(
        [(r.id, r.name, r.output) for r in stored],
        [(ids[n], n, "done" if n == "step" else i) for i, n in enumerate(names)],
        "(id, name, output) of every row",
    )


@case("identifiers.schedules_exact")
async def schedules_exact(h: Harness) -> None:
    """Schedule keys and workflow names with separators, wildcards, case and spaces are
    listed, claimed and deleted exactly."""
    workflows = ("a", *NEIGHBOURS_OF_A)
    keys: tuple[str, ...] = (
        "k",
        "K",
        "k ",
        " k",
        "k:a",
        "k%",
        "k_",
        WIDE,
        "k\\",
        '"k"',
        "{k}",
        "k/",
        "%",
    )
    keys += tuple(f"key-{i}" for i in range(len(workflows) - len(keys)))
    by_key = {}
    for key, workflow in zip(keys, workflows, strict=True):
        by_key[key] = await h.storage.upsert_schedule(
            h.schedule(key, workflow, key, next_run_at=h.past())
        )
        expect((by_key[key].key, by_key[key].workflow), (key, workflow), "upsert result")
    listed = await h.storage.list_schedules()
    expect(
        [(s.key, s.workflow) for s in listed],
        sorted(zip(keys, workflows, strict=True)),
        "list_schedules",
    )
    for key, workflow in zip(keys, workflows, strict=True):
        occurrence = await h.storage.claim_due_schedule([workflow])
        expect(
            None if occurrence is None else occurrence.schedule.key,
            key,
            f"claim_due_schedule([{workflow!r}]): the schedule of that workflow only",
        )
        expect(await h.storage.claim_due_schedule([workflow]), None, f"again for {workflow!r}")
    for key in ("k%", "K", "k ", "%"):
        expect(await h.storage.delete_schedule(key), True, f"delete_schedule({key!r})")
        expect(await h.storage.delete_schedule(key), False, f"delete_schedule({key!r}) again")
    left = [s.key for s in await h.storage.list_schedules()]
    expect(left, sorted(set(keys) - {"k%", "K", "k ", "%"}), "keys left after the deletes")


@case("identifiers.longest_valid_identifiers")
async def longest_valid_identifiers(h: Harness) -> None:
    """Identifiers of the maximum length (255; schedule keys 200; step ids 600), in ASCII
    and in 4-byte characters, are stored and found exactly by every method."""
    for fill in ("x", WIDE):
        run_id = _long("r", fill=fill)
        workflow = _long("w", fill=fill)
        key = _long("k", fill=fill)
        event = _long("e", fill=fill)
        event_key = _long("d", fill=fill)
        holder = LeaseHolder(worker=_long("h", fill=fill), host=_long("o", fill=fill), pid=1)
        result = await h.storage.create_run(h.new_run(workflow, id=run_id, idempotency_key=key))
        expect((result.created, result.run.id), (True, run_id), "create_run with longest ids")
        again = await h.storage.create_run(h.new_run(workflow, idempotency_key=key))
        expect((again.created, again.run.id), (False, run_id), "same longest key again")
        listed = await h.storage.list_runs(RunFilter(workflow=workflow))
        expect([r.id for r in listed], [run_id], "list_runs(workflow=<longest>)")
        claimed = await h.claim(run_id, [workflow], holder=holder)
        expect(claimed.run.holder, holder, "holder with the longest worker and host")
        expect((await h.get(run_id)).holder, holder, "holder read back by get_run")
        step_id = _long("i", MAX_STEP_ID_LENGTH, fill)
        step = _long("s", fill=fill)
        row = h.step(run_id, step, output=1, id=step_id)
        expect(await h.storage.save_step_result(row, claimed.lease_id), True, "save longest step")
        [stored] = await h.storage.get_step_results(run_id)
        expect((stored.id, stored.name), (step_id, step), "step row with the longest id and name")
        await h.storage.deliver_event(run_id, event, "p", key=event_key)
        expect(await h.storage.deliver_event(run_id, event, "p", key=event_key), True, "repeat")
        wait_step = h.step(run_id, event, id=_long("j", MAX_STEP_ID_LENGTH, fill))
        result_ = await h.storage.consume_event(event, wait_step, claimed.lease_id)
        payload = None if result_.event is None else result_.event.payload
        expect((result_.held, payload), (True, "p"), "consume_event of the longest name")
        expect(await h.storage.take_event(run_id, event), None, "keyed event stored once")
        ok = await h.storage.wait_run(run_id, claimed.lease_id, event, None)
        expect((ok, (await h.get(run_id)).waiting_for), (True, event), "wait_run <longest>")
        schedule_key = _long("c", MAX_SCHEDULE_KEY_LENGTH, fill)
        await h.storage.upsert_schedule(h.schedule(schedule_key, workflow, next_run_at=h.past()))
        occurrence = await h.storage.claim_due_schedule([workflow])
        expect(
            None if occurrence is None else occurrence.schedule.key,
            schedule_key,
            "claim_due_schedule of the longest key and workflow",
        )
        expect(await h.storage.delete_schedule(schedule_key), True, "delete the longest key")


@case("identifiers.holder_fields_exact")
async def holder_fields_exact(h: Harness) -> None:
    """A holder's worker and host with quotes, braces, spaces and non-ASCII read back exactly."""
    holders = (
        LeaseHolder(worker="w\"1'", host="h:{x}|y", pid=1),
        LeaseHolder(worker=" w ", host="h\\o\u00e9st", pid=2),
        LeaseHolder(worker="\U0001f477\u200d\u2642", host="\u65e5\u672c.example", pid=3),
    )
    for holder in holders:
        claimed = await h.created_and_claimed(holder=holder)
        expect(claimed.run.holder, holder, "holder returned by the claim")
        expect((await h.get(claimed.run.id)).holder, holder, "holder read back by get_run")


@case("identifiers.any_valid_identifier")
def any_valid_identifier(h: Harness) -> None:
    """Hypothesis-drawn valid identifiers (any non-control, non-surrogate text, and
    strings built from separators) as workflow names and idempotency keys: each (workflow,
    key) pair is one run, found and claimed exactly."""
    from hypothesis import given
    from hypothesis import strategies as st

    from reflow_conformance.strategies import kit_settings

    identifier = st.one_of(
        st.text(st.characters(exclude_categories=("Cc", "Cs")), min_size=1, max_size=MAX_LENGTH),
        st.lists(
            st.sampled_from(["a", "b", "A", ":", "|", "/", "{", "%", "_", " ", "\u00e9", WIDE]),
            min_size=1,
            max_size=5,
        ).map("".join),
    )
    seen: dict[tuple[str, str], str] = {}

    async def check(pairs: list[tuple[str, str]]) -> None:
        for workflow, key in pairs:
            run = h.new_run(workflow, [workflow, key], idempotency_key=key)
            result = await h.storage.create_run(run)
            known = seen.get((workflow, key))
            if known is not None:
                expect(
                    (result.created, result.run.id),
                    (False, known),
                    f"create_run(workflow={workflow!r}, key={key!r}) again",
                )
                continue
            expect(
                (result.created, result.run.workflow, result.run.idempotency_key),
                (True, workflow, key),
                f"create_run(workflow={workflow!r}, key={key!r}): a new (workflow, key)",
            )
            seen[workflow, key] = run.id
            stored = await h.get(run.id)
            expect((stored.workflow, stored.idempotency_key), (workflow, key), "read back")
            claimed = await h.claim_any([workflow])
            expect(
                None if claimed is None else claimed.run.id,
                run.id,
                f"claim_next_run([{workflow!r}]) (every earlier run is claimed)",
            )

    @kit_settings()
    @given(st.lists(st.tuples(identifier, identifier), min_size=1, max_size=4))
    def property_(pairs: list[tuple[str, str]]) -> None:
        h.sync(check(pairs))

    property_()


# -- invalid identifiers are refused, with nothing stored -------------------------------


@case("identifiers.refused_by_create_run")
async def refused_by_create_run(h: Harness) -> None:
    """create_run with an invalid run id, workflow name or idempotency key raises
    InvalidIdentifierError and stores nothing (a NUL-truncated key is not taken either)."""
    existing = await h.create()
    ids = [existing.id]

    def create(field: str) -> Callable[[Any], Awaitable[Any]]:
        async def call(value: Any) -> Any:
            run = h.new_run("wf", idempotency_key="k")
            return await h.storage.create_run(msgspec.structs.replace(run, **{field: value}))

        return call

    for field in ("id", "workflow", "idempotency_key"):
        await _refuse(h, f"create_run({field}=...)", create(field), ids)
    for key in ("k", "ev", "a"):
        result = await h.storage.create_run(h.new_run("wf", idempotency_key=key))
        expect(result.created, True, f"create_run with key {key!r} after the refusals")


@case("identifiers.refused_by_reads")
async def refused_by_reads(h: Harness) -> None:
    """get_run, list_runs, get_step_results and take_event refuse an invalid identifier
    (and take_event consumes nothing)."""
    run = await h.create()
    await h.storage.deliver_event(run.id, "ev", "kept")
    ids = [run.id]
    await _refuse(h, "get_run", lambda v: h.storage.get_run(v), ids)
    await _refuse(h, "get_step_results", lambda v: h.storage.get_step_results(v), ids)
    await _refuse(
        h, "list_runs(workflow=...)", lambda v: h.storage.list_runs(RunFilter(workflow=v)), ids
    )
    await _refuse(
        h,
        "list_runs(before_id=...)",
        lambda v: h.storage.list_runs(RunFilter(before=h.future(), before_id=v)),
        ids,
    )
    await _refuse(h, "take_event(run_id=...)", lambda v: h.storage.take_event(v, "ev"), ids)
    await _refuse(h, "take_event(event_name=...)", lambda v: h.storage.take_event(run.id, v), ids)
    record = await h.storage.take_event(run.id, "ev")
    expect(None if record is None else record.payload, "kept", "the buffered event")


@case("identifiers.refused_by_claims")
async def refused_by_claims(h: Harness) -> None:
    """claim_next_run and claim_due_schedule with an invalid name among valid ones, or an
    invalid holder, raise InvalidIdentifierError and claim nothing."""
    run = await h.create()
    await h.storage.upsert_schedule(h.schedule("due", next_run_at=h.past()))
    ids = [run.id]
    await _refuse(h, "claim_next_run([name])", lambda v: h.claim_any([v]), ids)
    await _refuse(h, "claim_next_run(['wf', name])", lambda v: h.claim_any(["wf", v]), ids)
    await _refuse(
        h,
        "claim_next_run(holder=LeaseHolder(worker=...))",
        lambda v: h.claim_any(["wf"], holder=LeaseHolder(worker=v, host="host", pid=1)),
        ids,
    )
    await _refuse(
        h,
        "claim_next_run(holder=LeaseHolder(host=...))",
        lambda v: h.claim_any(["wf"], holder=LeaseHolder(worker="w", host=v, pid=1)),
        ids,
    )
    await _refuse(
        h,
        "claim_due_schedule(['wf', name])",
        lambda v: h.storage.claim_due_schedule(["wf", v]),
        ids,
    )
    await h.claim(run.id)
    occurrence = await h.storage.claim_due_schedule(["wf"])
    expect(None if occurrence is None else occurrence.schedule.key, "due", "the schedule is due")


@case("identifiers.refused_by_lease_methods")
async def refused_by_lease_methods(h: Harness) -> None:
    """Lease-checked and status methods refuse an invalid run id or event name with
    InvalidIdentifierError (not False), changing nothing; an invalid lease id is simply
    not held (False, no error); the lease stays held throughout."""
    claimed = await h.created_and_claimed()
    run_id, lease = claimed.run.id, claimed.lease_id
    s = h.storage
    ids = [run_id]
    calls: list[tuple[str, Callable[[Any], Awaitable[Any]]]] = [
        ("heartbeat_run(run_id=...)", lambda v: s.heartbeat_run(v, lease)),
        ("sleep_run(run_id=...)", lambda v: s.sleep_run(v, lease, h.future())),
        ("wait_run(run_id=...)", lambda v: s.wait_run(v, lease, "ev", None)),
        ("wait_run(event_name=...)", lambda v: s.wait_run(run_id, lease, v, None)),
        (
            "update_claimed_run_status(run_id=...)",
            lambda v: s.update_claimed_run_status(v, lease, RunStatus.COMPLETED),
        ),
        ("update_run_status(run_id=...)", lambda v: s.update_run_status(v, RunStatus.CANCELLED)),
        ("requeue_run(run_id=...)", lambda v: s.requeue_run(v)),
    ]
    for what, call in calls:
        await _refuse(h, what, call, ids)
    never_issued: list[tuple[str, Callable[[Any], Awaitable[Any]]]] = [
        ("heartbeat_run(lease_id=...)", lambda v: s.heartbeat_run(run_id, v)),
        ("sleep_run(lease_id=...)", lambda v: s.sleep_run(run_id, v, h.future())),
        ("wait_run(lease_id=...)", lambda v: s.wait_run(run_id, v, "ev", None)),
        (
            "update_claimed_run_status(lease_id=...)",
            lambda v: s.update_claimed_run_status(run_id, v, RunStatus.COMPLETED),
        ),
    ]
    for what, call in never_issued:
        await _not_held(h, what, call, ids, False)
    expect(await s.heartbeat_run(run_id, lease), True, "the lease is still held")


@case("identifiers.refused_by_step_methods")
async def refused_by_step_methods(h: Harness) -> None:
    """save_step_result and consume_event refuse an invalid step id (over 600), run id,
    step name or event name; an invalid lease id is not held (False / held=False);
    nothing is written and the event stays buffered."""
    claimed = await h.created_and_claimed()
    run_id, lease = claimed.run.id, claimed.lease_id
    await h.storage.deliver_event(run_id, "ev", "kept")
    ids = [run_id]

    def saving(field: str) -> Callable[[Any], Awaitable[Any]]:
        async def call(value: Any) -> Any:
            step = msgspec.structs.replace(h.step(run_id, "s"), **{field: value})
            return await h.storage.save_step_result(step, lease)

        return call

    def consuming(field: str) -> Callable[[Any], Awaitable[Any]]:
        async def call(value: Any) -> Any:
            step = msgspec.structs.replace(h.step(run_id, "s"), **{field: value})
            return await h.storage.consume_event("ev", step, lease)

        return call

    for field, limit in (("id", MAX_STEP_ID_LENGTH), ("run_id", MAX_LENGTH), ("name", MAX_LENGTH)):
        await _refuse(h, f"save_step_result({field}=...)", saving(field), ids, limit=limit)
        await _refuse(
            h, f"consume_event(checkpoint.{field}=...)", consuming(field), ids, limit=limit
        )
    await _not_held(
        h,
        "save_step_result(lease_id=...)",
        lambda v: h.storage.save_step_result(h.step(run_id, "s"), v),
        ids,
        False,
    )
    await _refuse(
        h,
        "consume_event(event_name=...)",
        lambda v: h.storage.consume_event(v, h.step(run_id, "s"), lease),
        ids,
    )
    await _not_held(
        h,
        "consume_event(lease_id=...)",
        lambda v: h.storage.consume_event("ev", h.step(run_id, "s"), v),
        ids,
        ConsumeResult(held=False),
    )
    record = await h.storage.take_event(run_id, "ev")
    expect(None if record is None else record.payload, "kept", "the buffered event")


@case("identifiers.refused_by_deliver_event")
async def refused_by_deliver_event(h: Harness) -> None:
    """deliver_event refuses an invalid run id, event name or key: nothing buffered, the
    waiting run not woken, and the valid prefix of a NUL-cut key not used up."""
    claimed = await h.created_and_claimed()
    run_id = claimed.run.id
    await h.storage.wait_run(run_id, claimed.lease_id, "ev", None)
    ids = [run_id]
    await _refuse(
        h, "deliver_event(run_id=...)", lambda v: h.storage.deliver_event(v, "ev", 1), ids
    )
    await _refuse(
        h, "deliver_event(event_name=...)", lambda v: h.storage.deliver_event(run_id, v, 1), ids
    )
    await _refuse(
        h,
        "deliver_event(key=...)",
        lambda v: h.storage.deliver_event(run_id, "ev", 1, key=v),
        ids,
    )
    expect(await h.storage.take_event(run_id, "ev"), None, "events buffered by refused calls")
    expect((await h.get(run_id)).status, RunStatus.WAITING, "the waiting run")
    for key in ("a", "ev", "x"):
        expect(await h.storage.deliver_event(run_id, "ev", key, key=key), True, f"key {key!r}")
    taken: list[Any] = []
    while (record := await h.storage.take_event(run_id, "ev")) is not None and len(taken) < 9:
        taken.append(record.payload)
    expect(taken, ["a", "ev", "x"], "events stored for keys the refused calls resembled")


@case("identifiers.refused_by_schedule_methods")
async def refused_by_schedule_methods(h: Harness) -> None:
    """upsert_schedule refuses an invalid key (over 200) or workflow name, and
    delete_schedule an invalid key; the stored schedules are unchanged."""
    await h.storage.upsert_schedule(h.schedule("k"))
    await h.storage.upsert_schedule(h.schedule("x" * MAX_SCHEDULE_KEY_LENGTH))

    def upsert(field: str) -> Callable[[Any], Awaitable[Any]]:
        async def call(value: Any) -> Any:
            schedule = msgspec.structs.replace(h.schedule("k", every_ms=5), **{field: value})
            return await h.storage.upsert_schedule(schedule)

        return call

    await _refuse(h, "upsert_schedule(key=...)", upsert("key"), [], limit=MAX_SCHEDULE_KEY_LENGTH)
    await _refuse(h, "upsert_schedule(workflow=...)", upsert("workflow"), [])
    await _refuse(
        h,
        "delete_schedule",
        lambda v: h.storage.delete_schedule(v),
        [],
        limit=MAX_SCHEDULE_KEY_LENGTH,
    )
    listed = await h.storage.list_schedules()
    expect(
        [(s.key, s.recurrence.every_ms) for s in listed],
        [("k", 60_000), ("x" * MAX_SCHEDULE_KEY_LENGTH, 60_000)],
        "schedules after the refusals",
    )
