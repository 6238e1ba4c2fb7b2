"""How a single fault is built on a real adapter, named, and made resolvable by URL.

A :class:`Fault` describes one deliberate mistake in the SQLite or PostgreSQL adapter:
one query fragment, one column declaration or one method body changed. Each fault is
its own adapter class (a subclass of the real one: nothing is copied), registered as
its own adapter with its own URL scheme, so ``open_storage(url)`` (the kit's threads
and processes) finds the faulty adapter again, never the intact one.

How the three kinds of change reach the real code without copying it:

* **query fragments** — both adapters run their named queries from ``queries.sql``
  through one connection object. The fault's adapter wraps that connection and
  substitutes the patched text for the original text of that one query (an exact
  string match; a fragment that is not found exactly ``count`` times is an error at
  import, so a change to ``queries.sql`` cannot silently leave a fault intact);
* **column declarations** — the same substitution applied to one statement of the
  schema script (SQLite's ``schema.sql``, PostgreSQL's migration ``0001``/``0002``),
  which ``initialize`` runs on the same wrapped connection;
* **method bodies** — an override in the fault's subclass; for a split check-then-write
  the real method runs unchanged (identifier checks, encoding, notification) and only
  its storage work is split: SQLite's one writer job becomes two jobs, PostgreSQL's one
  statement becomes a check on another pooled connection and an unchecked write.

Child processes (the kit's ``*_processes`` cases) resolve the fault schemes through a
``reflow`` entry point of a throw-away distribution written by :func:`install` into a
temporary directory on ``sys.path`` (spawned children inherit ``sys.path``): exactly
how a third-party adapter is found, and nothing of the repository is changed.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import importlib.util
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reflow_core.errors import AdapterNotFoundError
from reflow_core.registry import (
    AdapterSpec,
    adapter_specs,
    get_adapter,
    register_adapter,
    unregister_adapter,
)

__all__ = [
    "TOPICS",
    "Fault",
    "Patch",
    "install",
    "uninstall",
    "patched_text",
    "statement_map",
]

HERE = Path(__file__).resolve().parent
PACKAGE_PARENT = HERE.parent
"""``tests/conformance``: put on ``sys.path`` so ``faults`` imports in every process."""


TOPICS = (
    "store clock",
    "held: lease checks",
    "lease fields",
    "recoveries",
    "holder round trip",
    "claims",
    "status updates",
    "status arguments",
    "values",
    "write-once",
    "steps",
    "driver errors",
    "idempotency",
    "keyset paging and filters",
    "events and keys",
    "consume atomicity",
    "requeue",
    "schedules",
    "notifications",
    "identifiers",
    "times are integers",
    "lifecycle",
)
"""The rules of ``reflow_core/storage.py`` (module docstring and method docstrings) the
faults are grouped by; every one has faults on both adapters where the adapter can break
it (``notifications``: PostgreSQL only, SQLite does not declare ``notify``)."""


@dataclass(frozen=True)
class Patch:
    """Replace ``old`` by ``new`` in the query called ``query`` (``count`` occurrences)."""

    query: str
    old: str
    new: str
    count: int = 1


@dataclass(frozen=True)
class Fault:
    """One adapter with one rule of the contract broken, and the cases that catch it."""

    name: str
    """Adapter name and URL scheme, e.g. ``fault-sqlite-claim-expiry-lt``."""
    base: str
    """``sqlite`` or ``postgres``: the real adapter it is built on."""
    kind: str
    """``query``, ``schema`` or ``method``."""
    rule: str
    """The rule of ``reflow_core/storage.py`` it breaks, in words."""
    topic: str
    """Which of :data:`TOPICS` that rule belongs to."""
    methods: tuple[str, ...]
    """Contract methods whose behaviour changes."""
    change: str
    """What was changed, as a reviewer would describe the bug."""
    caught_by: frozenset[str]
    """Case ids that must fail; ``select`` runs exactly these."""
    adapter: type[Any] = field(repr=False, compare=False)
    race: bool = False
    """A split check-then-write: only a race can catch it, so its kill rate is measured."""
    raced_by: frozenset[str] = frozenset()
    """Further race cases (other modes) that catch it too, by chance rather than every
    time: not asserted, but run and counted by ``bench/kit_kill_rate.py``."""

    @property
    def select(self) -> str:
        """The cases the test runs: ``caught_by``, and for a race every mode that races
        it (``raced_by``), since a race is caught by one mode or another."""
        return ",".join(sorted(self.measured if self.race else self.caught_by))

    @property
    def measured(self) -> frozenset[str]:
        """Every case expected to catch it: ``caught_by`` and ``raced_by``."""
        return self.caught_by | self.raced_by


def patched_text(text: str, old: str, new: str, count: int, where: str) -> str:
    """``text`` with ``old`` replaced by ``new``; ``old`` must occur exactly ``count`` times."""
    found = text.count(old)
    if found != count:
        raise ValueError(
            f"fault fragment {old!r} occurs {found} times in {where}, expected {count}: "
            "the adapter changed; update the fault"
        )
    patched = text.replace(old, new)
    if patched == text:
        raise ValueError(f"fault on {where} changes nothing")
    return patched


def statement_map(original: Iterable[str], patched: Iterable[str], where: str) -> dict[str, str]:
    """Pairs of statements that differ between two splits of one script."""
    before, after = list(original), list(patched)
    if len(before) != len(after):
        raise ValueError(f"a schema fault must keep the number of statements of {where}")
    changed = {old: new for old, new in zip(before, after, strict=True) if old != new}
    if not changed:
        raise ValueError(f"schema fault on {where} changes no statement")
    return changed


# -- registration ----------------------------------------------------------------------

_REGISTERED_HERE = False
"""True in the process that registered the faults by hand; the entry point then adds
nothing (the same names would clash). Children load them through the entry point."""

_site: Path | None = None


def specs() -> list[AdapterSpec]:
    """An :class:`AdapterSpec` per fault (imported lazily: PostgreSQL needs psycopg)."""
    from faults import all_faults
    from faults.postgres import spec as postgres_spec
    from faults.sqlite import spec as sqlite_spec

    builders: Mapping[str, Callable[[Fault], AdapterSpec]] = {
        "sqlite": sqlite_spec,
        "postgres": postgres_spec,
    }
    return [builders[f.base](f) for f in all_faults()]


def entry_point_specs() -> list[AdapterSpec]:
    """What the ``reflow`` entry point returns: every fault in a child, nothing here."""
    return [] if _REGISTERED_HERE else specs()


def _write_site() -> Path:
    """A throw-away site directory whose distribution names ``faults.plugin`` as a
    ``reflow`` entry point, for processes spawned from this one."""
    site = Path(tempfile.mkdtemp(prefix="reflow-single-faults-site-"))
    atexit.register(shutil.rmtree, site, ignore_errors=True)
    dist = site / "reflow_single_faults-0.0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: reflow-single-faults\nVersion: 0.0.0\n", "utf-8"
    )
    (dist / "entry_points.txt").write_text("[reflow]\nsingle_faults = faults.plugin\n", "utf-8")
    (dist / "top_level.txt").write_text("faults\n", "utf-8")
    return site


def install() -> None:
    """Register every fault in this process and make each scheme resolvable in children.

    Idempotent. The entry points of this process are loaded first, so the throw-away
    distribution is seen only by processes started afterwards.
    """
    global _REGISTERED_HERE, _site
    adapter_specs()  # load this process's entry points before the site is on sys.path
    _REGISTERED_HERE = True
    if str(PACKAGE_PARENT) not in sys.path:
        sys.path.insert(0, str(PACKAGE_PARENT))
    if _site is None:
        _site = _write_site()
        sys.path.append(str(_site))
        importlib.invalidate_caches()
    for spec in specs():
        try:
            get_adapter(spec.name)
        except AdapterNotFoundError:
            register_adapter(spec)


def uninstall() -> None:
    """Undo :func:`install` for this process: unregister the faults, leave ``sys.path``.

    The entry point stays silent here (the plugin manager may have loaded it meanwhile,
    and its faults would clash with nothing but would outlive the tests that need them).
    """
    global _site
    for spec in specs():
        unregister_adapter(spec.name)
    if _site is not None:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(_site))
        _site = None


def load_module_copy(module_name: str, copy_name: str) -> Any:
    """A private copy of a module (own globals), not entered in ``sys.modules``."""
    origin = importlib.import_module(module_name).__file__
    spec = importlib.util.spec_from_file_location(copy_name, origin)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
