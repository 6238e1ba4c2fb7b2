"""Schema versions on command: the optional :class:`MigratableStorage` protocol.

An adapter's :meth:`~reflow_core.storage.StorageAdapter.initialize` creates or migrates
its tables. That is right for a worker allowed to migrate, and wrong for everything
else: a read-only command (``reflow runs list``) must never change a schema, and a store
at an older schema version should say what to run instead of being altered by whoever
happens to open it. An adapter with a schema implements this protocol so that callers
can look before they leap:

* :meth:`MigratableStorage.connect` opens connections *without* touching the schema;
* :meth:`MigratableStorage.schema_status` reads which migrations are applied, creating
  nothing (a store that does not exist yet answers version 0);
* :meth:`MigratableStorage.migration_sql` returns the DDL that ``initialize()`` would
  run, as text, without connecting (``reflow db sql``).

:func:`open_without_migrating` is the one call a caller needs: connect, check the
version, and raise :class:`SchemaNotCurrentError` (saying what to run) when it is not
current. An adapter without a schema (the memory adapter) need not implement the
protocol; such a store is simply initialized.
"""

from __future__ import annotations

from typing import ClassVar, Protocol, runtime_checkable

import msgspec

from reflow_core.errors import ReflowError
from reflow_core.storage import StorageAdapter

__all__ = [
    "MigratableStorage",
    "PendingMigration",
    "SchemaNotCurrentError",
    "SchemaStatus",
    "open_without_migrating",
]


class PendingMigration(msgspec.Struct, frozen=True, kw_only=True):
    """One numbered migration not yet applied (``0003_claim_and_purge_indexes``)."""

    version: int
    name: str


class SchemaStatus(msgspec.Struct, frozen=True, kw_only=True):
    """Where a store's schema stands, as read by :meth:`MigratableStorage.schema_status`.

    ``current`` is the highest applied migration (0: no Reflow tables, or no store at
    all); ``latest`` is the highest this Reflow ships; ``pending`` lists what
    ``initialize()`` (``reflow db migrate``) would apply, oldest first. ``exists`` is
    ``False`` when the container itself is missing (no SQLite file, no PostgreSQL
    schema): then a mistyped URL is the likelier cause than a new deployment.
    ``location`` names what was inspected (a file path, a schema name), for messages.
    """

    current: int
    latest: int
    pending: tuple[PendingMigration, ...] = ()
    exists: bool = True
    location: str = ""

    @property
    def up_to_date(self) -> bool:
        """``True`` when nothing is pending and the store is not newer than this Reflow."""
        return self.current == self.latest

    @property
    def too_new(self) -> bool:
        """``True`` when a newer Reflow migrated this store: upgrade, do not migrate."""
        return self.current > self.latest


class SchemaNotCurrentError(ReflowError):
    """A store is not at the schema version this Reflow needs, and this caller may not
    migrate it. The message says what was found and the command to run."""

    code: ClassVar[str] = "SCHEMA_NOT_CURRENT"

    def __init__(self, status: SchemaStatus, url: str | None = None) -> None:
        self.status = status
        where = status.location or url or "the store"
        target = f" --storage '{url}'" if url else ""
        if status.too_new:
            text = (
                f"{where} has schema version {status.current}, newer than this Reflow "
                f"(which knows up to {status.latest}); upgrade Reflow to use it"
            )
        elif not status.exists:
            text = (
                f"{where} does not exist (no Reflow store there); check the URL for a "
                f"typo, or create it with: reflow db migrate{target}"
            )
        else:
            names = ", ".join(f"{m.version:04d}_{m.name}" for m in status.pending)
            text = (
                f"{where} is at schema version {status.current} but this Reflow needs "
                f"{status.latest} (pending: {names or 'none'}); apply the migrations with: "
                f"reflow db migrate{target} (or print them with: reflow db sql{target})"
            )
        super().__init__(text)


@runtime_checkable
class MigratableStorage(Protocol):
    """Optional adapter protocol: open without migrating, read and print the schema.

    ``initialize()`` stays what migrates. Every method here must leave the schema as it
    was, whatever the state of the store (none at all, an older or a newer version).
    """

    async def connect(self) -> None:
        """Open connections like ``initialize()`` but create and alter nothing.

        Idempotent. Afterwards the contract methods work if the schema is current;
        ``initialize()`` may still be called later to migrate. A store that does not
        exist is not created (a SQLite file is not created; a PostgreSQL schema is not).
        """
        ...

    async def schema_status(self) -> SchemaStatus:
        """Read the applied migrations; write nothing. Connects if needed (as
        :meth:`connect`). A missing store answers ``current=0, exists=False``."""
        ...

    def migration_sql(self, from_version: int = 0) -> str:
        """The DDL ``initialize()`` would run on a store at ``from_version``, including
        the statements recording each version, as one script; no connection needed.

        An empty string when ``from_version`` is the latest.
        """
        ...


async def open_without_migrating(storage: StorageAdapter) -> SchemaStatus | None:
    """Make ``storage`` usable without changing its schema; return its status.

    A :class:`MigratableStorage` is connected and its version checked: anything but
    current raises :class:`SchemaNotCurrentError` naming the command to run (the store
    is left as it was). Any other adapter has no schema to manage and is initialized
    as usual (``None`` is returned).
    """
    if not isinstance(storage, MigratableStorage):
        await storage.initialize()
        return None
    status = await storage.schema_status()
    if not status.up_to_date:
        raise SchemaNotCurrentError(status, storage.url)
    await storage.connect()
    return status
