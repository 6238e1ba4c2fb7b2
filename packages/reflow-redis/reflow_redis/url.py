"""Redis URLs: redis-py's own, plus Reflow's ``reflow_prefix`` query parameter.

``redis://[[user]:password@]host[:port][/db][?reflow_prefix=NAME]`` (``rediss://`` for
TLS). The prefix names the store inside the database, so it is part of the URL that
``open_storage`` gets in another process; redis-py never sees it.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from reflow_core.errors import ConfigError

from .keys import DEFAULT_PREFIX, check_prefix

__all__ = ["PREFIX_PARAM", "SCHEMES", "split_url", "with_prefix"]

SCHEMES = ("redis", "rediss")
PREFIX_PARAM = "reflow_prefix"


def split_url(url: str) -> tuple[str, str | None]:
    """``(url for redis-py, prefix from the URL or None)``; ConfigError if not a Redis URL."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in SCHEMES or not parts.netloc:
        raise ConfigError(
            f"not a Redis URL: {url!r}; use redis://host:6379/0 or rediss://... "
            f"(optionally ?{PREFIX_PARAM}=NAME)"
        )
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefix = None
    kept = []
    for name, value in query:
        if name == PREFIX_PARAM:
            prefix = check_prefix(value)
        else:
            kept.append((name, value))
    return urlunsplit(parts._replace(query=urlencode(kept))), prefix


def with_prefix(url: str, prefix: str) -> str:
    """``url`` with ``reflow_prefix`` set (the default prefix is left implicit)."""
    base, _ = split_url(url)
    if prefix == DEFAULT_PREFIX:
        return base
    parts = urlsplit(base)
    query = [*parse_qsl(parts.query, keep_blank_values=True), (PREFIX_PARAM, prefix)]
    return urlunsplit(parts._replace(query=urlencode(query)))
