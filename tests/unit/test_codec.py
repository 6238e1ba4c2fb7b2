"""The codec's exactness rule: what it accepts comes back equal and of the same type."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest
from hypothesis import given
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
            assert a.utcoffset() == b.utcoffset()


scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
    | st.datetimes()
    | st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30))]))
)
tag_like_keys = st.sampled_from(["$datetime", "$dict", "$", "$x", "plain"]) | st.text()
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(tag_like_keys, inner, max_size=4),
    max_leaves=20,
)


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
