"""The one codec: exact round-trips of persistable values, as tagged JSON.

Persistable values are ``dict`` with ``str`` keys, ``list``, ``str``, ``int``,
finite ``float``, ``bool``, ``None`` and ``datetime`` (naive, or aware with a
``datetime.timezone`` or ``zoneinfo.ZoneInfo`` tzinfo). Whatever :func:`encode`
accepts, :func:`decode` returns equal and of the same type, so a replay after a
crash sees exactly what the first execution saw. Anything else raises
:class:`~reflow_core.errors.SerializationError` naming the offending path, before
any byte is written.

Limits, the same in every process (no process setting widens or narrows them):

* nesting: at most :data:`MAX_DEPTH` (100) containers deep, counting the outermost
  ``dict``/``list`` as level 1; a deeper (or self-containing) value is refused at the
  path of the first container past the limit;
* ``int``: at most :data:`MAX_INT_DIGITS` (4,300, CPython's default int/str limit)
  decimal digits. Such ints are written and read back even in a process that lowered
  its limit with ``sys.set_int_max_str_digits``; longer ints are refused even in one
  that lifted it, so every reader can load what any writer stored;
* ``str`` (values and keys): valid Unicode, i.e. no lone surrogates (UTF-8 cannot
  hold them);
* ``datetime``: a ``ZoneInfo`` tzinfo must have a key the time zone database can load
  (it comes back as ``ZoneInfo(key)``); a ``timezone`` must have a whole-second offset
  (it comes back fixed-offset, with its name; ``timezone.utc`` as ``timezone.utc``);
  any other tzinfo is refused. ``fold`` is kept.

JSON cannot tell a ``datetime`` from a ``str``, so two single-key tag objects are
used: ``{"$datetime": "<isoformat>"}`` and ``{"$dict": {...}}``. The second wraps
any user dict that has a key starting with ``$``, which is why a user dict that
happens to look like a tag still round-trips as the same dict. A datetime that the
ISO text alone does not pin down gets RFC 9557-style suffixes: ``[Europe/Paris]``
(the zone key), ``[_tzname=CEST]`` (a named fixed offset, percent-encoded) and
``[_fold=1]``. Plain ISO text, as written before these suffixes existed, decodes as it
always did. JSON text (not msgpack) keeps stored values readable and queryable in
SQLite and PostgreSQL.

>>> from datetime import UTC, datetime, timezone
>>> value = {"when": datetime(2024, 5, 1, tzinfo=timezone.utc), "$dict": [1, 2.0]}
>>> decode(encode(value)) == value
True
>>> encode({"n": float("nan")})  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
reflow_core.errors.SerializationError: $.n: float nan is not persistable (NaN and ...
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable
from contextvars import ContextVar, Token
from datetime import UTC, datetime, timezone
from typing import Any
from urllib.parse import quote, unquote
from zoneinfo import ZoneInfo

import msgspec

from reflow_core.errors import SerializationError, ValidationError

__all__ = [
    "MAX_DEPTH",
    "MAX_INT_DIGITS",
    "canonical",
    "check",
    "decode",
    "encode",
    "encoded_as",
    "forget",
    "from_plain",
    "to_plain",
    "to_stored",
]

MAX_DEPTH = 100
"""Deepest nesting of containers a persistable value may have (the outermost is level 1)."""

MAX_INT_DIGITS = 4300
"""Most decimal digits a persistable ``int`` may have (CPython's default int/str limit)."""

_DATETIME_TAG = "$datetime"
_DICT_TAG = "$dict"
_json_encoder = msgspec.json.Encoder()
_canonical_encoder = msgspec.json.Encoder(order="sorted")
_json_decoder = msgspec.json.Decoder()
_known: ContextVar[tuple[Any, bytes] | None] = ContextVar("reflow_codec_known", default=None)

_INT_BOUND = 10**MAX_INT_DIGITS  # |n| < bound <=> n has at most MAX_INT_DIGITS digits
_NEG_INT_BOUND = -_INT_BOUND
_DIGIT_CHUNK = 500  # digits per piece when converting past the process's int/str limit
_UTC = UTC
_TAGGABLE = frozenset({dict, list, datetime})  # types _tag may change
_CONTAINERS = frozenset({dict, list})
_ZONE_KEY = re.compile(r"[A-Za-z0-9_+\-]+(?:/[A-Za-z0-9_+\-]+)*")
_FOLD_SUFFIX = "[_fold=1]"
_TZNAME_PREFIX = "_tzname="
_TOO_DEEP = (
    f"value is nested more than {MAX_DEPTH} levels deep (or contains itself), "
    "which is not persistable"
)


class _Reject(Exception):
    """Internal: carries a rejection up the walk, collecting the path on the way."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        self.segments: list[str] = []


def _type_path(kind: type) -> str:
    name = kind.__qualname__
    return name if kind.__module__ == "builtins" else f"{kind.__module__}.{name}"


def _describe(value: Any) -> str:
    kind = type(value)
    name = _type_path(kind)
    hints: dict[type, str] = {
        tuple: " (use a list)",
        set: " (use a sorted list)",
        frozenset: " (use a sorted list)",
        bytes: " (encode it, e.g. base64, into a str)",
    }
    return f"a value of type {name}{hints.get(kind, '')}"


def _safe_repr(value: Any) -> str:
    """``repr`` for messages: never raises (huge ints, broken ``__repr__``), never huge."""
    try:
        text = repr(value)
    except Exception:
        return "<unprintable>"
    return text if len(text) <= 80 else f"{text[:77]}..."


def _key_segment(key: str) -> str:
    return f".{key}" if key.isidentifier() else f"[{key!r}]"


def _needs_tags(value: Any, depth: int = 0) -> bool:
    """Validate ``value``; return True if it holds datetimes or ``$``-keys that need tagging.

    ``depth`` is the number of containers around ``value``. Recursion is bounded by
    :data:`MAX_DEPTH`, so a deep or cyclic value is refused instead of exhausting the stack.
    Containers check their plain scalar items inline (this walk is on every step's path);
    anything else, including every scalar that is refused, goes through the full checks.
    """
    kind = type(value)
    if kind is dict:
        if depth >= MAX_DEPTH:
            raise _Reject(_TOO_DEEP)
        depth += 1
        tagged = False
        for key, item in value.items():
            if type(key) is not str:
                raise _Reject(
                    f"dict key {_safe_repr(key)} of type {_type_path(type(key))} is not a str "
                    "(JSON object keys must be str)"
                )
            if key[:1] == "$":
                tagged = True
            item_kind = type(item)
            if item_kind is str or item_kind is bool or item is None:
                continue
            if item_kind is int:
                if _NEG_INT_BOUND < item < _INT_BOUND:
                    continue
            elif item_kind is float and item - item == 0.0:  # finite: inf - inf is nan
                continue
            try:
                tagged = _needs_tags(item, depth) or tagged
            except _Reject as reject:
                reject.segments.append(_key_segment(key))
                raise
        return tagged
    if kind is list:
        if depth >= MAX_DEPTH:
            raise _Reject(_TOO_DEEP)
        depth += 1
        tagged = False
        for index, item in enumerate(value):
            item_kind = type(item)
            if item_kind is str or item_kind is bool or item is None:
                continue
            if item_kind is int:
                if _NEG_INT_BOUND < item < _INT_BOUND:
                    continue
            elif item_kind is float and item - item == 0.0:
                continue
            try:
                tagged = _needs_tags(item, depth) or tagged
            except _Reject as reject:
                reject.segments.append(f"[{index}]")
                raise
        return tagged
    if kind is str or kind is bool or value is None:
        return False
    if kind is int:
        if _NEG_INT_BOUND < value < _INT_BOUND:
            return False
        digits = int(value.bit_length() * math.log10(2)) + 1
        raise _Reject(
            f"int of about {digits} decimal digits is not persistable "
            f"(at most {MAX_INT_DIGITS}; store it as a str)"
        )
    if kind is float:
        if not math.isfinite(value):
            raise _Reject(
                f"float {value!r} is not persistable (NaN and infinities have no exact stored form)"
            )
        return False
    if kind is datetime:
        tz = value.tzinfo
        if tz is not None and tz is not _UTC:
            _check_tzinfo(value, tz)
        return True
    raise _Reject(f"{_describe(value)} is not persistable")


def _check_tzinfo(value: datetime, tz: Any) -> None:
    """Refuse a datetime whose tzinfo would not come back as the same kind and zone."""
    kind = type(tz)
    if kind is timezone:
        offset = value.utcoffset()
        if offset is not None and offset.microseconds:
            raise _Reject(
                f"datetime with UTC offset {offset} is not persistable "
                "(offsets must be whole seconds)"
            )
        if not _is_utf8(tz.tzname(None)):
            raise _Reject("datetime whose timezone name is not valid Unicode is not persistable")
        return
    if kind is ZoneInfo:
        key = tz.key
        if key is None or not _ZONE_KEY.fullmatch(key):
            raise _Reject(
                f"datetime with ZoneInfo key {key!r} is not persistable "
                "(use a zone loaded by its IANA key, e.g. ZoneInfo('Europe/Paris'))"
            )
        try:
            loaded = ZoneInfo(key)
        except Exception:
            raise _Reject(
                f"datetime with ZoneInfo key {key!r} is not persistable "
                "(the time zone database has no such zone)"
            ) from None
        if loaded is not tz and loaded.utcoffset(value) != value.utcoffset():
            raise _Reject(
                f"datetime with ZoneInfo key {key!r} is not persistable "
                "(its rules differ from the time zone database's zone of that key)"
            )
        return
    raise _Reject(
        f"datetime with a tzinfo of type {_type_path(kind)} is not persistable "
        "(use datetime.timezone or zoneinfo.ZoneInfo)"
    )


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _datetime_text(value: datetime) -> str:
    text = value.isoformat()
    tz = value.tzinfo
    if tz is not None and tz is not _UTC:
        if type(tz) is ZoneInfo:
            text = f"{text}[{tz.key}]"
        else:
            name = tz.tzname(None)
            offset = value.utcoffset()
            if offset is not None and name != timezone(offset).tzname(None):
                text = f"{text}[{_TZNAME_PREFIX}{quote(name or '', safe='')}]"
    if value.fold:
        text += _FOLD_SUFFIX
    return text


def _datetime_from_text(text: str) -> datetime:
    """Decode ISO text with RFC 9557-style suffixes (``[Europe/Paris]``, ``[_fold=1]``...)."""
    base, _, suffixes = text.partition("[")
    value = datetime.fromisoformat(base)
    zone_key: str | None = None
    fold = 0
    for part in suffixes[:-1].split("]["):
        if part == "_fold=1":
            fold = 1
        elif part.startswith(_TZNAME_PREFIX):
            offset = value.utcoffset()
            if offset is None:
                raise ValueError(f"a timezone name without a UTC offset: {text!r}")
            value = value.replace(tzinfo=timezone(offset, unquote(part[len(_TZNAME_PREFIX) :])))
        else:
            zone_key = part
    if zone_key is None:
        return value.replace(fold=fold) if fold else value
    zone = ZoneInfo(zone_key)
    local = value.replace(tzinfo=zone, fold=fold)
    if local.utcoffset() == value.utcoffset():
        return local
    # The reader's time zone database disagrees with the writer's: keep the instant.
    return value.astimezone(zone)


def _tag(value: Any) -> Any:
    kind = type(value)
    if kind is dict:
        body = {key: _tag(item) if type(item) in _TAGGABLE else item for key, item in value.items()}
        for key in value:
            if key[:1] == "$":
                return {_DICT_TAG: body}
        return body
    if kind is list:
        return [_tag(item) if type(item) in _TAGGABLE else item for item in value]
    if kind is datetime:
        tz = value.tzinfo
        if (tz is None or tz is _UTC) and not value.fold:
            return {_DATETIME_TAG: value.isoformat()}
        return {_DATETIME_TAG: _datetime_text(value)}
    return value


def _untag(value: Any) -> Any:
    kind = type(value)
    if kind is dict:
        if len(value) == 1:
            if _DATETIME_TAG in value:
                text = value[_DATETIME_TAG]
                if text[-1:] != "]":
                    return datetime.fromisoformat(text)  # plain ISO text, also every legacy value
                return _datetime_from_text(text)
            if _DICT_TAG in value:
                value = value[_DICT_TAG]
        return {
            key: _untag(item) if type(item) in _CONTAINERS else item for key, item in value.items()
        }
    if kind is list:
        return [_untag(item) if type(item) in _CONTAINERS else item for item in value]
    return value


def _rejection(reject: _Reject) -> SerializationError:
    path = "$" + "".join(reversed(reject.segments))
    return SerializationError(f"{path}: {reject.reason}", path=path)


def _find_unwritable_str(value: Any) -> None:
    """Raise :class:`_Reject` at the first string (value or key) that is not valid Unicode.

    Only run after the JSON encoder failed, so valid values pay nothing for it. ``value``
    was already walked by :func:`_needs_tags`, so it is acyclic and at most
    :data:`MAX_DEPTH` deep.
    """
    kind = type(value)
    if kind is str:
        if not _is_utf8(value):
            raise _Reject(f"str {value!r} holds a lone surrogate, which UTF-8 cannot store")
    elif kind is list:
        for index, item in enumerate(value):
            try:
                _find_unwritable_str(item)
            except _Reject as reject:
                reject.segments.append(f"[{index}]")
                raise
    elif kind is dict:
        for key, item in value.items():
            try:
                if not _is_utf8(key):
                    raise _Reject(
                        f"dict key {key!r} holds a lone surrogate, which UTF-8 cannot store"
                    )
                _find_unwritable_str(item)
            except _Reject as reject:
                reject.segments.append(_key_segment(key))
                raise


def _int_text(value: int) -> str:
    """Decimal text of ``value``, even past this process's int/str digit limit."""
    try:
        return str(value)
    except ValueError:
        pass
    chunk = 10**_DIGIT_CHUNK
    rest = abs(value)
    pieces: list[int] = []
    while rest:
        rest, low = divmod(rest, chunk)
        pieces.append(low)
    head = str(pieces.pop())
    tail = "".join(f"{piece:0{_DIGIT_CHUNK}d}" for piece in reversed(pieces))
    return f"{'-' if value < 0 else ''}{head}{tail}"


def _int_from_text(text: str) -> int:
    """``int(text)``, even past this process's int/str digit limit."""
    try:
        return int(text)
    except ValueError:
        pass
    digits = text.lstrip("-")
    value = 0
    for start in range(0, len(digits), _DIGIT_CHUNK):
        piece = digits[start : start + _DIGIT_CHUNK]
        value = value * 10 ** len(piece) + int(piece)
    return -value if text.startswith("-") else value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number out of range: {text}")
    return value


def _no_constant(text: str) -> Any:
    raise ValueError(f"invalid JSON constant: {text}")


def _raw_big_ints(value: Any) -> Any:
    """``value`` (already tagged) with long ints as raw JSON, bypassing the int/str limit."""
    kind = type(value)
    if kind is int and not -(2**64) < value < 2**64:
        return msgspec.Raw(_int_text(value).encode())
    if kind is list:
        return [_raw_big_ints(item) for item in value]
    if kind is dict:
        return {key: _raw_big_ints(item) for key, item in value.items()}
    return value


def _encode_with(encoder: msgspec.json.Encoder, value: Any) -> bytes:
    # Keep in step with encode(), which inlines this for speed.
    try:
        tagged = _needs_tags(value)
    except _Reject as reject:
        raise _rejection(reject) from None
    except RecursionError:
        # Only when the caller's own stack is nearly exhausted: the walk is bounded.
        raise SerializationError("$: value is nested too deeply to persist", path="$") from None
    plain = _tag(value) if tagged else value
    try:
        return encoder.encode(plain)
    except (msgspec.EncodeError, ValueError, OverflowError) as exc:
        return _encode_slowly(encoder, value, plain, exc)


def _encode_slowly(encoder: msgspec.json.Encoder, value: Any, plain: Any, exc: Exception) -> bytes:
    """The encoder refused a value the walk accepted: find the path, or work around it."""
    try:
        _find_unwritable_str(value)
    except _Reject as reject:
        raise _rejection(reject) from None
    if isinstance(exc, ValueError) and not isinstance(exc, UnicodeError):
        # An int within MAX_INT_DIGITS but past this process's lowered int/str limit.
        try:
            return encoder.encode(_raw_big_ints(plain))
        except (msgspec.EncodeError, ValueError, OverflowError):
            pass
    raise SerializationError(f"$: value cannot be written as UTF-8 JSON: {exc}") from exc


def check(value: Any) -> None:
    """Raise :class:`SerializationError` if ``value`` is not persistable; write nothing."""
    _encode_with(_json_encoder, value)


def encoded_as(value: Any, data: bytes) -> Token[tuple[Any, bytes] | None]:
    """Declare that ``value`` (this very object) encodes to ``data``, which :func:`encode`
    produced: until the returned token is passed to :func:`forget`, :func:`encode` of
    that object in the current task (context) returns ``data`` without encoding again.

    The engine encodes a step's output once (it keeps the bytes for ``prev``) and then
    hands the value to storage, which encodes it again: this lets the second encode be
    free, and the checkpoint is exactly the bytes the engine kept.
    """
    return _known.set((value, data))


forget: Callable[[Token[tuple[Any, bytes] | None]], None] = _known.reset
"""End what :func:`encoded_as` declared (call in the same task, in a ``finally``).

The context variable's own ``reset``: called after every checkpoint, with no Python
frame of its own."""


def encode(value: Any) -> bytes:
    """Encode a persistable value as tagged JSON bytes.

    Raises :class:`SerializationError` naming the path of the first part that would not
    come back exactly.
    """
    known = _known.get()
    if known is not None and known[0] is value:
        return known[1]
    try:
        tagged = _needs_tags(value)
    except _Reject as reject:
        raise _rejection(reject) from None
    except RecursionError:
        raise SerializationError("$: value is nested too deeply to persist", path="$") from None
    plain = _tag(value) if tagged else value
    try:
        return _json_encoder.encode(plain)
    except (msgspec.EncodeError, ValueError, OverflowError) as exc:
        return _encode_slowly(_json_encoder, value, plain, exc)


def decode(data: bytes | str | memoryview) -> Any:
    """Decode bytes written by :func:`encode` back to an equal value of the same types."""
    if isinstance(data, memoryview):
        data = bytes(data)
    try:
        value = _json_decoder.decode(data)
    except msgspec.ValidationError as exc:
        # An int past this process's int/str digit limit (``sys.set_int_max_str_digits``),
        # e.g. stored by a process that had lifted it: read it anyway.
        try:
            value = json.loads(
                data,
                parse_int=_int_from_text,
                parse_float=_finite_float,
                parse_constant=_no_constant,
            )
        except ValueError:
            raise exc from None
    # find, not ``in``: ``marker in data`` on bytes first tries the marker as an int
    # (``65 in b"A"``), raising and discarding a TypeError on every call.
    tagged = data.find('"$') if isinstance(data, str) else data.find(b'"$')
    if tagged >= 0:
        return _untag(value)
    return value


def canonical(value: Any) -> bytes:
    """Key-order-independent encoding: equal values give equal bytes, and ``1 != 1.0 != True``."""
    return _encode_with(_canonical_encoder, value)


def _is_declared(declared: Any) -> bool:
    return declared is not None and declared is not Any


def to_plain(value: Any, declared: Any = None) -> Any:
    """Turn a value of a declared type (Struct, dataclass, TypedDict...) into plain data.

    With a declared type, instances (also nested ones) become dicts and lists, keeping
    ``datetime`` as is, so :func:`from_plain` rebuilds them exactly. Without one, plain
    values pass through and a Struct or dataclass instance is refused: it could not come
    back as itself.
    """
    if _is_declared(declared):
        return msgspec.to_builtins(value, builtin_types=(datetime,))
    if not _is_plain(value):
        raise SerializationError(
            f"$: {_describe(value)} is not persistable unless its type is declared "
            "(annotate the step's return type or the workflow's input type)"
        )
    return value


def to_stored(value: Any, declared: Any = None) -> tuple[Any, bytes]:
    """``(to_plain(value, declared), encode(...))`` in one call: every step's output
    takes this path. A new value, so :func:`encoded_as` is not consulted.

    >>> to_stored({"n": 1})
    ({'n': 1}, b'{"n":1}')
    """
    if type(value) in _PLAIN_TYPES and (declared is None or declared is Any):
        plain = value
    else:
        plain = to_plain(value, declared)
    return plain, _encode_with(_json_encoder, plain)  # encode(), without its memo lookup


def from_plain(value: Any, declared: Any = None) -> Any:
    """Rebuild a value of ``declared`` type from plain data; plain data passes through."""
    if not _is_declared(declared):
        return value
    try:
        return msgspec.convert(value, declared, builtin_types=(datetime,))
    except msgspec.ValidationError as exc:
        raise ValidationError(f"value does not match {_type_name(declared)}: {exc}") from exc


def validate(value: Any, declared: Any) -> Any:
    """Check ``value`` against ``declared`` and return it as an instance of that type.

    Raises :class:`ValidationError` with msgspec's path-carrying message on mismatch.
    """
    if not _is_declared(declared):
        return value
    if isinstance(declared, type) and isinstance(value, declared):
        return value
    plain = msgspec.to_builtins(value, builtin_types=(datetime,)) if not _is_plain(value) else value
    return from_plain(plain, declared)


_PLAIN_TYPES = frozenset({dict, list, str, int, float, bool, type(None)})


def _is_plain(value: Any) -> bool:
    if type(value) in _PLAIN_TYPES:  # what nearly every step returns: skip the checks
        return True
    return not (
        isinstance(value, msgspec.Struct)
        or (dataclasses.is_dataclass(value) and not isinstance(value, type))
    )


def _type_name(declared: Any) -> str:
    return getattr(declared, "__qualname__", None) or repr(declared)
