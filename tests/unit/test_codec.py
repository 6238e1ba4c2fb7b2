"""The codec's exactness rule: what it accepts comes back equal and of the same type."""

from __future__ import annotations

import enum
import math
import os
import sys
import zoneinfo
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta, timezone, tzinfo
from typing import Any
from zoneinfo import ZoneInfo

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reflow_core import SerializationError, codec


def assert_exact(a: Any, b: Any) -> None:
    """Equal, and of the same type at every level (``True == 1 == 1.0`` is not enough)."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_exact(a[key], b[key])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_exact(x, y)
    elif isinstance(a, float) and a == 0:
        assert math.copysign(1, a) == math.copysign(1, b)
    else:
        assert a == b
        if isinstance(a, datetime):
            # Equal instants are not enough: the zone, its name and fold must survive too,
            # or arithmetic and formatting after a replay differ from the first execution.
            assert a.utcoffset() == b.utcoffset()
            assert type(a.tzinfo) is type(b.tzinfo), (a, b)
            assert a.tzname() == b.tzname()
            assert a.fold == b.fold
            assert getattr(a.tzinfo, "key", None) == getattr(b.tzinfo, "key", None)
            assert (a.tzinfo is UTC) == (b.tzinfo is UTC)


scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
    | st.datetimes()
    | st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30))]))
    | st.datetimes(timezones=st.timezones())
)
tag_like_keys = st.sampled_from(["$datetime", "$dict", "$", "$x", "plain"]) | st.text()
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(tag_like_keys, inner, max_size=4),
    max_leaves=20,
)


@settings(deadline=None)
@given(values)
def test_round_trip_is_exact(value: Any) -> None:
    assert_exact(codec.decode(codec.encode(value)), value)


@pytest.mark.parametrize(
    "value",
    [
        {"$datetime": "2024-01-01T00:00:00"},
        {"$dict": {"a": 1}},
        {"$dict": {"$datetime": "x"}, "other": 1},
        [{"$datetime": 5}],
        {"when": datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)},
        {"big": 2**100, "neg": -(2**70), "tiny": 5e-324, "huge": 1e300, "negzero": -0.0},
        {"text": "naïve ☃ \u0000 𝄞"},
    ],
)
def test_tricky_values_round_trip(value: Any) -> None:
    assert_exact(codec.decode(codec.encode(value)), value)


@pytest.mark.parametrize(
    ("value", "path", "fragment"),
    [
        (float("nan"), "$", "nan"),
        ({"a": [1, float("inf")]}, "$.a[1]", "inf"),
        ({"a": (1, 2)}, "$.a", "tuple"),
        ({"s": {1, 2}}, "$.s", "set"),
        ({"b": b"raw"}, "$.b", "bytes"),
        ({1: "x"}, "$", "not a str"),
        ({"deep": [{"x": [object()]}]}, "$.deep[0].x[0]", "object"),
        ({"key with space": float("nan")}, "$['key with space']", "nan"),
    ],
)
def test_non_persistable_values_name_their_path(value: Any, path: str, fragment: str) -> None:
    with pytest.raises(SerializationError) as info:
        codec.encode(value)
    assert info.value.path == path
    assert fragment in str(info.value)
    assert info.value.code == "SERIALIZATION"


def test_lone_surrogate_is_rejected() -> None:
    with pytest.raises(SerializationError):
        codec.encode({"s": "\ud800"})


def test_canonical_is_key_order_independent_and_type_strict() -> None:
    assert codec.canonical({"a": 1, "b": 2}) == codec.canonical({"b": 2, "a": 1})
    assert codec.canonical({"a": 1}) != codec.canonical({"a": 1.0})
    assert codec.canonical({"a": 1}) != codec.canonical({"a": True})


class Point(msgspec.Struct):
    x: int
    at: datetime


def test_declared_types_round_trip_as_themselves() -> None:
    point = Point(x=1, at=datetime(2024, 1, 1, tzinfo=UTC))
    plain = codec.to_plain(point, Point)
    stored = codec.decode(codec.encode(plain))
    assert codec.from_plain(stored, Point) == point
    assert codec.from_plain(
        codec.decode(codec.encode(codec.to_plain([point], list[Point]))), list[Point]
    ) == [point]


def test_undeclared_struct_is_refused() -> None:
    with pytest.raises(SerializationError, match="declared"):
        codec.to_plain(Point(x=1, at=datetime.now(UTC)))


# --- Every kind of value that used to get through check/encode but not come back exactly ---

PARIS = ZoneInfo("Europe/Paris")
NEW_YORK = ZoneInfo("America/New_York")


@pytest.fixture
def int_digit_limit() -> Iterator[None]:
    """Let a test change ``sys.set_int_max_str_digits`` (process-wide) and restore it."""
    saved = sys.get_int_max_str_digits()
    try:
        yield
    finally:
        sys.set_int_max_str_digits(saved)


def test_ints_are_limited_to_4300_digits_whatever_the_process_setting(
    int_digit_limit: None,
) -> None:
    assert codec.MAX_INT_DIGITS == 4300
    longest = 10**4300 - 1  # 4,300 nines
    for value in (longest, -longest, {"a": [longest]}):
        assert_exact(codec.decode(codec.encode(value)), value)
    for limit in (4300, 0):  # 0: this process lifted CPython's limit; the rule stays
        sys.set_int_max_str_digits(limit)
        for too_long in (10**4300, -(10**4300), 7**100_000):
            for check in (codec.encode, codec.check, codec.canonical):
                with pytest.raises(SerializationError) as info:
                    check({"a": [0, too_long]})
                assert info.value.path == "$.a[1]"
                assert "4300" in str(info.value)


def test_long_ints_are_written_and_read_under_a_lowered_process_limit(
    int_digit_limit: None,
) -> None:
    value = {"n": [10**4300 - 1, -(10**1000 + 7)], "$k": datetime(2024, 1, 1)}
    expected = codec.encode(value)
    sys.set_int_max_str_digits(640)  # the lowest CPython allows
    assert codec.encode(value) == expected
    assert_exact(codec.decode(expected), value)
    assert_exact(codec.decode(expected.decode()), value)
    assert codec.canonical(value) == codec.canonical(codec.decode(expected))


def test_long_ints_stored_by_a_process_without_a_limit_are_still_read(
    int_digit_limit: None,
) -> None:
    # Written before the limit existed, by a process that had lifted CPython's own.
    stored = b'{"n":[' + b"9" * 10_000 + b",-" + b"1" * 5_000 + b',1.5,"x",true,null]}'
    digits = int("9" * 500)
    for limit in (4300, 640):
        sys.set_int_max_str_digits(limit)
        value = codec.decode(stored)
        assert value["n"][0] == sum(digits * 10 ** (500 * i) for i in range(20))
        assert value["n"][1] == -sum(int("1" * 500) * 10 ** (500 * i) for i in range(10))
        assert_exact(value["n"][2:], [1.5, "x", True, None])
    with pytest.raises(msgspec.DecodeError):
        codec.decode(b"[1e400]")  # still not a float this codec could have written


def _nest(depth: int, shape: str, leaf: Any = 1) -> Any:
    """``depth`` containers around ``leaf``: dicts, ``$``-keyed dicts, lists or a mix."""
    value = leaf
    for level in range(depth):
        kind = shape if shape != "mixed" else ("list", "dict", "$dict")[level % 3]
        value = [value] if kind == "list" else {"a" if kind == "dict" else "$a": value}
    return value


def _nest_path(depth: int, shape: str) -> str:
    """The path of the innermost of ``depth`` containers built by :func:`_nest`."""
    segments = []
    for level in range(depth - 1, 0, -1):
        kind = shape if shape != "mixed" else ("list", "dict", "$dict")[level % 3]
        segments.append({"list": "[0]", "dict": ".a", "$dict": "['$a']"}[kind])
    return "$" + "".join(segments)


@pytest.mark.parametrize("shape", ["dict", "$dict", "list", "mixed"])
def test_nesting_is_limited_to_max_depth(shape: str) -> None:
    assert codec.MAX_DEPTH == 100
    leaves: list[Any] = [1, datetime(2024, 3, 31, 2, 30, tzinfo=PARIS), {"$datetime": "x"}, []]
    for leaf in leaves:
        depth = codec.MAX_DEPTH - (1 if type(leaf) in (dict, list) else 0)
        value = _nest(depth, shape, leaf)  # as deep as allowed, deepest JSON with tags
        assert_exact(codec.decode(codec.encode(value)), value)
        assert codec.canonical(codec.decode(codec.encode(value))) == codec.canonical(value)
    for depth in (codec.MAX_DEPTH + 1, 500, 5_000):
        for check in (codec.encode, codec.check, codec.canonical):
            with pytest.raises(SerializationError) as info:
                check(_nest(depth, shape))
            assert info.value.path == _nest_path(codec.MAX_DEPTH + 1, shape)
            assert "nested more than 100 levels" in str(info.value)


def test_a_value_containing_itself_is_refused() -> None:
    loop: list[Any] = [1]
    loop.append({"again": loop})
    with pytest.raises(SerializationError, match="contains itself") as info:
        codec.encode({"x": loop})
    assert info.value.path.startswith("$.x[1].again[1].again")


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ("\ud800", "$"),
        (["ok", "\udc80"], "$[1]"),
        ({"a": [1, "\ud800"]}, "$.a[1]"),
        ({"a": {"\ud800": 1}}, "$.a['\\ud800']"),
        ({"a": {"k\udfffey": [1, 2]}}, "$.a['k\\udfffey']"),
        ({"$k": [{"x": "ok\udbff"}]}, "$['$k'][0].x"),
        ({"when": datetime(2024, 1, 1), "s": {"$t": "\ud800"}}, "$.s['$t']"),
        ({"fine": "é", "list": [{"deep": ["\ud800x"]}]}, "$.list[0].deep[0]"),
    ],
)
def test_lone_surrogates_are_refused_at_their_path(value: Any, path: str) -> None:
    for check in (codec.encode, codec.check, codec.canonical):
        with pytest.raises(SerializationError) as info:
            check(value)
        assert info.value.path == path
        assert "surrogate" in str(info.value)


def test_zoned_datetime_keeps_its_zone() -> None:
    value = datetime(2024, 5, 1, 12, 0, tzinfo=PARIS)  # +02:00, summer time
    stored = codec.encode({"when": value})
    assert b'"2024-05-01T12:00:00+02:00[Europe/Paris]"' in stored  # RFC 9557, readable
    back = codec.decode(stored)["when"]
    assert_exact(back, value)
    assert back.tzinfo is PARIS
    later = back + timedelta(days=180)  # winter time: +01:00 in Paris
    assert later == value + timedelta(days=180)
    assert later.hour == 12
    assert later.utcoffset() == timedelta(hours=1)


@pytest.mark.parametrize(
    "value",
    [
        datetime(2024, 11, 3, 1, 30, tzinfo=NEW_YORK),  # ambiguous, first (EDT)
        datetime(2024, 11, 3, 1, 30, tzinfo=NEW_YORK, fold=1),  # ambiguous, second (EST)
        datetime(2024, 3, 10, 2, 30, tzinfo=NEW_YORK),  # in the spring-forward gap
        datetime(2024, 3, 10, 2, 30, tzinfo=NEW_YORK, fold=1),
        datetime(2024, 7, 1, tzinfo=NEW_YORK, fold=1),  # fold is kept where it is a no-op
        datetime(1, 1, 1, tzinfo=PARIS),  # local mean time, an offset with seconds
        datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=PARIS),
        datetime(2024, 1, 1, tzinfo=ZoneInfo("UTC")),  # a ZoneInfo stays a ZoneInfo
        datetime(2024, 1, 1, tzinfo=ZoneInfo.no_cache("Europe/Paris")),
        datetime(2024, 1, 1, tzinfo=UTC),  # comes back as timezone.utc itself
        datetime(2024, 1, 1, tzinfo=timezone(timedelta(0))),
        datetime(2024, 1, 1, tzinfo=timezone(timedelta(hours=-3, seconds=-7))),
        datetime(2024, 7, 1, tzinfo=timezone(timedelta(hours=2), "CEST")),  # keeps its name
        datetime(2024, 7, 1, tzinfo=timezone(timedelta(0), "Z")),
        datetime(2024, 7, 1, tzinfo=timezone(timedelta(hours=1), "a]b[c%d [_fold=1] é")),
        datetime(2024, 11, 3, 1, 30, fold=1),  # naive local time, second of two
        datetime(2024, 11, 3, 1, 30, tzinfo=UTC, fold=1),
    ],
)
def test_datetimes_keep_zone_kind_name_and_fold(value: datetime) -> None:
    back = codec.decode(codec.encode([value]))[0]
    assert_exact(back, value)
    assert codec.canonical(back) == codec.canonical(value)


class _ForeignZone(tzinfo):
    """Stands for a third-party tzinfo (dateutil, pytz...): it cannot come back as itself."""

    def utcoffset(self, dt: datetime | None) -> timedelta:
        return timedelta(hours=1)

    def dst(self, dt: datetime | None) -> timedelta:
        return timedelta(0)

    def tzname(self, dt: datetime | None) -> str:
        return "FOREIGN"


def _zone_from_file(data_of: str, key: str | None) -> ZoneInfo:
    """A ZoneInfo built from ``data_of``'s tz file but labelled ``key`` (or unlabelled)."""
    for root in zoneinfo.TZPATH:
        path = os.path.join(root, data_of)
        if os.path.isfile(path):
            with open(path, "rb") as file:
                return ZoneInfo.from_file(file, key=key)
    pytest.skip(f"no tz file for {data_of} on {zoneinfo.TZPATH}")


@pytest.mark.parametrize(
    ("zone", "fragment"),
    [
        (lambda: _ForeignZone(), "_ForeignZone"),
        (lambda: _zone_from_file("Europe/Paris", None), "key None"),
        (lambda: _zone_from_file("Asia/Tokyo", "Europe/Paris"), "rules differ"),
        (lambda: _zone_from_file("Asia/Tokyo", "Nowhere/Atlantis"), "no such zone"),
        (lambda: timezone(timedelta(microseconds=1)), "whole seconds"),
        (lambda: timezone(timedelta(hours=1), "\ud800"), "name"),
    ],
    ids=[
        "foreign-tzinfo",
        "zone-without-key",
        "zone-data-not-its-key",
        "unknown-key",
        "sub-second-offset",
        "unwritable-name",
    ],
)
def test_datetimes_whose_zone_cannot_come_back_are_refused_at_their_path(
    zone: Callable[[], tzinfo], fragment: str
) -> None:
    value = {"a": [1, datetime(2024, 1, 1, tzinfo=zone())]}
    for check in (codec.encode, codec.check, codec.canonical):
        with pytest.raises(SerializationError) as info:
            check(value)
        assert info.value.path == "$.a[1]"
        assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        (
            b'{"$datetime":"2024-05-01T12:00:00+02:00"}',
            datetime(2024, 5, 1, 12, tzinfo=timezone(timedelta(hours=2))),
        ),
        (b'{"$datetime":"2024-05-01T12:00:00+00:00"}', datetime(2024, 5, 1, 12, tzinfo=UTC)),
        (b'{"$datetime":"2024-05-01T12:00:00.000001"}', datetime(2024, 5, 1, 12, 0, 0, 1)),
        (
            b'{"$dict":{"$x":[{"$datetime":"0001-01-01T00:00:00-05:30"}]}}',
            {"$x": [datetime(1, 1, 1, tzinfo=timezone(-timedelta(hours=5, minutes=30)))]},
        ),
    ],
)
def test_values_stored_before_zones_were_kept_decode_as_before(
    stored: bytes, expected: Any
) -> None:
    assert_exact(codec.decode(stored), expected)


class _Color(enum.IntEnum):
    RED = 1


class _Name(enum.StrEnum):
    ADA = "ada"


class _Text(str):
    pass


class _Number(float):
    pass


_LATER = type("_Later", (datetime,), {})


@pytest.mark.parametrize(
    ("value", "refused_at"),
    [
        # Accepted: must come back exactly (type, sign of zero, every digit).
        (-0.0, None),
        (sys.float_info.max, None),
        (-sys.float_info.max, None),
        (5e-324, None),
        (1e16, None),
        (2.0**63, None),
        (float(2**53 + 1), None),
        (2**64, None),
        (-(2**63) - 1, None),
        ([True, 1, 1.0, False, 0, 0.0], None),
        ({"": {"$": {"$$": ""}}}, None),
        ({"\u0000": "\u0000", "é": "e\u0301"}, None),
        # Refused, with the path of the part that would not come back as itself.
        ({"a": [_Color.RED]}, "$.a[0]"),
        ({"a": [_Name.ADA]}, "$.a[0]"),
        ({"a": _Text("x")}, "$.a"),
        ({"a": _Number(1.5)}, "$.a"),
        ({"a": {_Text("k"): 1}}, "$.a"),
        ({"a": {True: 1}}, "$.a"),
        ({"a": {10**5000: 1}}, "$.a"),  # its repr alone would raise ValueError
        ({"a": OrderedDict(b=1)}, "$.a"),
        ({"a": defaultdict(int)}, "$.a"),
        ({"a": date(2024, 1, 1)}, "$.a"),
        ({"a": _LATER(2024, 1, 1)}, "$.a"),
        ({"a": [float("-inf")]}, "$.a[0]"),
        ({"a": [-float("nan")]}, "$.a[0]"),
    ],
)
def test_probed_edge_values_round_trip_exactly_or_are_refused_at_their_path(
    value: Any, refused_at: str | None
) -> None:
    if refused_at is None:
        assert_exact(codec.decode(codec.encode(value)), value)
        return
    with pytest.raises(SerializationError) as info:
        codec.encode(value)
    assert info.value.path == refused_at


# Everything the codec might be handed, persistable or not: whatever it accepts must
# come back exact (and canonicalise alike), whatever it refuses raises SerializationError.
_any_text = st.text(st.characters(exclude_categories=()), max_size=6)  # lone surrogates too
_zones = st.one_of(
    st.none(),
    st.just(UTC),
    st.timezones(),  # ZoneInfo, every key of the tz database
    st.integers(-86_399, 86_399).map(lambda s: timezone(timedelta(seconds=s))),
    st.builds(timezone, st.integers(-1439, 1439).map(lambda m: timedelta(minutes=m)), _any_text),
    st.just(_ForeignZone()),
    st.just(timezone(timedelta(microseconds=-1))),
)
_any_datetime = st.builds(
    lambda moment, fold: moment.replace(fold=fold),
    st.datetimes(timezones=_zones),
    st.integers(0, 1),
)
_any_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-(2**14000), 2**14000),  # up to ~4,200 digits
    # Around the 4,300-digit limit (built by map: Hypothesis cannot repr such bounds).
    st.tuples(st.integers(4298, 4301), st.integers(-2, 1), st.sampled_from([1, -1])).map(
        lambda t: t[2] * (10 ** t[0] + t[1])
    ),
    st.floats(),  # NaN and infinities too
    st.sampled_from([-0.0, 5e-324, 1e300, 2.0**63, sys.float_info.max]),
    st.text(),
    _any_text,
    st.sampled_from(["\ud800", "ok\udfff"]),
    _any_datetime,
    _any_datetime,
    st.sampled_from([(1, 2), {1}, b"x", _Color.RED, _Text("t"), date(2024, 1, 1)]),
)
_any_key = st.one_of(
    st.sampled_from(["$datetime", "$dict", "$", "$$", "$x", "", "plain", "[_fold=1]", 1]),
    st.text(max_size=6),
    _any_text,
)
_any_value = st.recursive(
    _any_scalar,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_any_key, inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_any_value)
def test_whatever_is_accepted_comes_back_exact_and_the_rest_is_refused(value: Any) -> None:
    refused: SerializationError | None = None
    try:
        stored = codec.encode(value)
    except SerializationError as exc:
        refused = exc
    if refused is not None:
        assert refused.path.startswith("$")
        with pytest.raises(SerializationError):
            codec.canonical(value)
        return
    back = codec.decode(stored)
    assert_exact(back, value)
    assert_exact(codec.decode(stored.decode()), value)
    assert codec.canonical(back) == codec.canonical(value)
