"""Which strings may name things in storage, the one check every layer uses, and the
ids the engine gives new runs (:func:`new_run_id`).

An *identifier* is any string a caller hands to storage to name something: a run id, a
step id, a workflow name, a step name, an idempotency key, an event name, an event key,
a schedule key, a lease id, or the ``worker`` and ``host`` of a lease holder. The rule
(stated in :mod:`reflow_core.storage`, enforced here):

* a ``str``, not empty, of at most :data:`MAX_LENGTH` (255) characters, except schedule
  keys (:data:`MAX_SCHEDULE_KEY_LENGTH`, 200) and step ids (:data:`MAX_STEP_ID_LENGTH`,
  600);
* no control character (Unicode category ``Cc``: U+0000 to U+001F, U+007F to U+009F,
  so no NUL, tab or newline) and no surrogate code point (U+D800 to U+DFFF): the
  string must encode as UTF-8;
* anything else is allowed (separators such as ``:`` ``|`` ``/`` ``{``, quotes,
  backslashes, spaces, ``%`` and ``_``, any other language, emoji) and compared
  exactly: case-sensitive, no normalisation, no trimming;
* lease ids are issued by adapters, which issue only valid ones: a method given a lease
  id that is not valid answers as for any lease that is not held (``False``), since
  none was ever issued.

Why these limits: NUL cannot be stored in a PostgreSQL ``text`` column, a lone
surrogate cannot be encoded for any database driver, and PostgreSQL refuses an index
row longer than 2704 bytes, which two 255-character identifiers of 4-byte characters
(the pair ``(workflow, idempotency key)`` is indexed) still fit. A schedule key leaves
room for ``reflow.schedule:<key>:<slot>``, the idempotency key of the run an occurrence
creates; a step id for the engine's ``<run id>/<step name>``.

>>> check_identifier("orders:eu/2024 ✓", "workflow name")
'orders:eu/2024 ✓'
>>> check_identifier("a\\x00b", "event name")
Traceback (most recent call last):
...
reflow_core.errors.InvalidIdentifierError: event name 'a\\x00b' is not a valid identifier: \
it contains the control character U+0000 ...
>>> check_identifier("k" * 256, "idempotency key")
Traceback (most recent call last):
...
reflow_core.errors.InvalidIdentifierError: idempotency key 'kkkkkkkkkkkk...' (256 characters) \
is not a valid identifier: it is longer than 255 characters...
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Collection

from reflow_core.errors import InvalidIdentifierError
from reflow_core.types import LeaseHolder, Schedule, StepResult, WorkflowRun

__all__ = [
    "MAX_LENGTH",
    "MAX_SCHEDULE_KEY_LENGTH",
    "MAX_STEP_ID_LENGTH",
    "check_holder",
    "check_identifier",
    "check_names",
    "check_run",
    "check_schedule",
    "check_step",
    "is_identifier",
    "new_run_id",
]

MAX_LENGTH = 255
"""Longest run id, workflow name, step name, idempotency key, event name or key, lease
id, holder worker or host, in characters (code points)."""

MAX_SCHEDULE_KEY_LENGTH = 200
"""Longest schedule key: ``reflow.schedule:<key>:<slot>`` must fit :data:`MAX_LENGTH`."""

MAX_STEP_ID_LENGTH = 600
"""Longest step id: the engine's ``<run id>/<step name>`` of two 255-character names fits."""

_FORBIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
"""Control characters (category Cc) and surrogates (Cs): the characters refused."""


def is_identifier(value: object, max_length: int = MAX_LENGTH) -> bool:
    """Whether ``value`` is a valid identifier of at most ``max_length`` characters."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= max_length
        # Plain ASCII is valid exactly when it is printable (0x20 to 0x7E).
        and (value.isprintable() if value.isascii() else _FORBIDDEN.search(value) is None)
    )


def _reason(value: object, max_length: int) -> str:
    if not isinstance(value, str):
        return f"it is a {type(value).__name__}, not a str"
    if not value:
        return "it is empty"
    if len(value) > max_length:
        return f"it is longer than {max_length} characters"
    match = _FORBIDDEN.search(value)
    assert match is not None
    char = ord(match.group())
    kind = "a lone surrogate" if 0xD800 <= char <= 0xDFFF else "the control character"
    return f"it contains {kind} U+{char:04X} at index {match.start()}"


def check_identifier(value: object, what: str, max_length: int = MAX_LENGTH) -> str:
    """Return ``value`` if it is a valid identifier (see the module docstring); otherwise
    raise :class:`~reflow_core.errors.InvalidIdentifierError` naming ``what`` it was.

    Cheap enough for every storage call: plain ASCII is decided by two C-level string
    methods, anything else by one regular-expression search.
    """
    # The test of is_identifier, inlined: this runs several times in every storage call.
    if (
        value.__class__ is str
        and 0 < len(value) <= max_length
        and (value.isprintable() if value.isascii() else _FORBIDDEN.search(value) is None)
    ):
        return value
    if isinstance(value, str) and is_identifier(value, max_length):  # a str subclass
        return value
    raise InvalidIdentifierError(what, value, _reason(value, max_length))


def check_names(names: Collection[str], what: str = "workflow name") -> None:
    """Check every name of a collection (the workflow names a claim is for)."""
    if isinstance(names, str):
        # A bare str is a collection of one-character names: almost surely a mistake.
        raise InvalidIdentifierError(what, names, "a collection of names is needed, not one str")
    for name in names:
        check_identifier(name, what)


def check_holder(holder: LeaseHolder | None) -> None:
    """Check a lease holder's ``worker`` and ``host`` (``None`` is fine)."""
    if holder is not None:
        check_identifier(holder.worker, "lease holder worker")
        check_identifier(holder.host, "lease holder host")


def check_run(run: WorkflowRun) -> None:
    """Check every identifier of a run record given to ``create_run``."""
    check_identifier(run.id, "run id")
    check_identifier(run.workflow, "workflow name")
    if run.idempotency_key is not None:
        check_identifier(run.idempotency_key, "idempotency key")
    if run.waiting_for is not None:
        check_identifier(run.waiting_for, "event name")
    check_holder(run.holder)


def check_step(step: StepResult) -> None:
    """Check the identifiers of a step row (its id, run id and name)."""
    check_identifier(step.id, "step id", MAX_STEP_ID_LENGTH)
    check_identifier(step.run_id, "run id")
    check_identifier(step.name, "step name")


def check_schedule(schedule: Schedule) -> None:
    """Check the identifiers of a schedule record (its key and workflow name)."""
    check_identifier(schedule.key, "schedule key", MAX_SCHEDULE_KEY_LENGTH)
    check_identifier(schedule.workflow, "workflow name")


def new_run_id() -> str:
    """A fresh run id: a UUID of version 7 (RFC 9562) in the usual 36-character form,
    48 bits of Unix time in milliseconds followed by 74 random bits.

    Time-ordered on purpose: a run id, and every step id (``<run id>/<step>``), is a key
    of the store's indexes; ids that grow with time add rows at one end of each B-tree
    instead of on random pages, so a checkpoint dirties fewer pages (on SQLite a write
    batch touched about a third as many WAL frames as with random ``uuid4`` ids). The
    random bits keep ids unique across processes and machines. An id tells when its
    run was created, to the millisecond.

    >>> import uuid
    >>> uuid.UUID(new_run_id()).version
    7
    """
    value = (time.time_ns() // 1_000_000 & 0xFFFF_FFFF_FFFF) << 80 | int.from_bytes(os.urandom(10))
    # Overwrite the version (0111) and variant (10) bits where RFC 9562 puts them.
    value = value & ~(0xF << 76) & ~(0b11 << 62) | 0x7 << 76 | 0b10 << 62
    text = f"{value:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"
