"""Whether a Redis server keeps what it acknowledged: the ``durable`` question.

Redis keeps data in memory. It survives a crash or restart of the server only if the
append-only file is on (``appendonly yes``) and written to disk often enough:

* ``appendfsync always``: every write is fsynced before the reply: nothing acknowledged
  is lost, even on power loss;
* ``appendfsync everysec`` (Redis's recommended setting): the AOF is written before the
  reply and fsynced once a second: a crash of the Redis *process* loses nothing, a crash
  of the *machine* (power, kernel) loses up to about two seconds of writes;
* ``appendfsync no``: the OS decides when; minutes may be lost. RDB snapshots alone
  (``save``) lose everything since the last snapshot.

Reflow counts ``always`` and ``everysec`` as durable (the same line PostgreSQL draws
with ``synchronous_commit`` defaults is stricter; the README states the window).
"""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = ["DURABLE_FSYNC", "Persistence", "read_persistence"]

DURABLE_FSYNC = frozenset({"always", "everysec"})


class Persistence(msgspec.Struct, frozen=True, kw_only=True):
    """What a server said about its persistence."""

    appendonly: str | None
    """``yes``/``no``, or ``None`` if the server would not say."""
    appendfsync: str | None
    source: str
    """Where the answer came from (``CONFIG GET`` or ``INFO persistence``)."""

    @property
    def durable(self) -> bool:
        """AOF on with an fsync policy of ``always`` or ``everysec``."""
        return self.appendonly == "yes" and self.appendfsync in DURABLE_FSYNC

    def describe(self) -> str:
        """One line for an error message or a skip reason."""
        if self.durable:
            return f"the server persists (appendonly yes, appendfsync {self.appendfsync})"
        return (
            f"the server keeps nothing it acknowledged safe on disk (appendonly "
            f"{self.appendonly or 'unknown'}, appendfsync {self.appendfsync or 'unknown'}, "
            f"from {self.source}): a restart or crash of Redis loses every run; set "
            "appendonly yes and appendfsync everysec or always"
        )


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


async def read_persistence(client: Any) -> Persistence:
    """Ask the server (``CONFIG GET``, or ``INFO persistence`` where CONFIG is disabled,
    as on many managed services, which then cannot tell the fsync policy)."""
    from redis.exceptions import ResponseError

    try:
        config = await client.config_get("append*")
    except ResponseError:
        info = await client.info("persistence")
        enabled = info.get("aof_enabled")
        return Persistence(
            appendonly=None if enabled is None else ("yes" if int(enabled) else "no"),
            appendfsync=None,
            source="INFO persistence",
        )
    values = {_text(k): _text(v) for k, v in config.items()}
    return Persistence(
        appendonly=values.get("appendonly"),
        appendfsync=values.get("appendfsync"),
        source="CONFIG GET",
    )
