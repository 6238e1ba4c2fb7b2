"""``mysql://`` and ``mariadb://`` URLs: what to connect to, and which namespace to use.

``mysql://user:password@host:port/database?reflow_prefix=reflow_`` — the database is
required; ``reflow_prefix`` (default ``reflow_``) prefixes every table, so several
stores can share one database (the conformance kit gives each case its own prefix).
``unix_socket=/path`` connects through a socket instead of TCP. :attr:`url` rebuilds
the URL with the prefix in it, so ``open_storage(storage.url)`` opens the same store.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from reflow_core.errors import ConfigError

__all__ = ["DEFAULT_PREFIX", "PREFIX_PARAM", "Target", "parse_url"]

PREFIX_PARAM = "reflow_prefix"
DEFAULT_PREFIX = "reflow_"
SCHEMES = ("mysql", "mariadb")
_PREFIX = re.compile(r"[a-z0-9_]{0,40}")
_KNOWN_PARAMS = (PREFIX_PARAM, "unix_socket", "connect_timeout")


@dataclass(frozen=True)
class Target:
    """Where the store lives: server, credentials, database and table prefix."""

    scheme: str
    host: str
    port: int
    user: str
    password: str
    database: str
    prefix: str
    unix_socket: str | None = None
    connect_timeout: float = 10.0

    @property
    def url(self) -> str:
        """The URL that opens this store again (prefix included)."""
        auth = quote(self.user, safe="")
        if self.password:
            auth += ":" + quote(self.password, safe="")
        query: dict[str, str] = {PREFIX_PARAM: self.prefix}
        if self.unix_socket:
            query["unix_socket"] = self.unix_socket
        host = f"[{self.host}]" if ":" in self.host else self.host
        return (
            f"{self.scheme}://{auth}@{host}:{self.port}/{quote(self.database, safe='')}"
            f"?{urlencode(query)}"
        )

    @property
    def namespace(self) -> str:
        """``database.prefix``: what the migration lock and error messages name."""
        return f"{self.database}.{self.prefix}"

    def redacted(self) -> str:
        """The URL without the password, for messages."""
        return (
            self.url.replace(":" + quote(self.password, safe="") + "@", ":***@", 1)
            if (self.password)
            else self.url
        )


def check_prefix(prefix: str) -> str:
    """``prefix`` if it is a valid table prefix; :class:`ConfigError` otherwise."""
    if not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix):
        raise ConfigError(
            f"table prefix {prefix!r} is not allowed; use at most 40 lowercase letters, "
            "digits and underscores (e.g. 'reflow_')"
        )
    return prefix


def parse_url(url: str, *, prefix: str | None = None) -> Target:
    """The :class:`Target` a URL names; :class:`ConfigError` saying what is wrong."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme.split("+", 1)[0] not in SCHEMES:
        raise ConfigError(
            f"not a MySQL/MariaDB URL: {url.split('@')[-1]!r}; "
            "use mysql://user:password@host:3306/database"
        )
    database = unquote(parts.path.lstrip("/"))
    if not database or "/" in database:
        raise ConfigError(
            f"the MySQL URL names no database ({parts.path!r}); use mysql://user@host:3306/DATABASE"
        )
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = sorted(set(params) - set(_KNOWN_PARAMS))
    if unknown:
        raise ConfigError(
            f"unknown MySQL URL parameter(s) {', '.join(unknown)}; "
            f"known: {', '.join(_KNOWN_PARAMS)}"
        )
    try:
        port = parts.port or 3306
        timeout = float(params.get("connect_timeout", "10"))
    except ValueError as exc:
        raise ConfigError(f"invalid MySQL URL: {exc}") from None
    chosen = prefix if prefix is not None else params.get(PREFIX_PARAM, DEFAULT_PREFIX)
    return Target(
        scheme=scheme,
        host=parts.hostname or "127.0.0.1",
        port=port,
        user=unquote(parts.username or "root"),
        password=unquote(parts.password or ""),
        database=database,
        prefix=check_prefix(chosen),
        unix_socket=params.get("unix_socket") or None,
        connect_timeout=timeout,
    )
