"""The shared-memory ring (``appliance.audit._ring``) hands the writer process exactly what
``chain.event_tuple`` makes of each event: every field and detail value comes back equal and of the
same type (floats bit for bit), events C cannot pack exactly are refused without a write, records
wrap around the ring's end, a full ring writes nothing, and a malformed or foreign buffer raises
instead of crashing. One test maps the same memfd from a child process. Without the compiled module
(a machine with no compiler) these tests are skipped, unless ``APPLIANCE_REQUIRE_FASTCHAIN=1``
(``make test``) demands it."""

from __future__ import annotations

import ast
import math
import mmap
import os
import pickle
import random
import struct
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from appliance.audit import AuditEvent
from appliance.audit.chain import event_tuple
from bench.audit import _event

try:  # compiled by setup.py when a C compiler is there
    from appliance.audit import _ring as _RING_MODULE
except ImportError:  # pragma: no cover - depends on the build
    _RING_MODULE = None
ring: Any = _RING_MODULE

needs_ring = pytest.mark.skipif(_RING_MODULE is None, reason="appliance.audit._ring is not built")

HEADER = 192
SMALL = HEADER + 4096  # the smallest ring init accepts
ROOT = Path(__file__).resolve().parents[2]
UUID_A = uuid.UUID("5eed0000-0000-4000-8000-0000000000a1")


def test_the_ring_is_built_where_required() -> None:
    """``make test`` sets APPLIANCE_REQUIRE_FASTCHAIN=1: a build that silently left the ring out fails here."""
    if os.environ.get("APPLIANCE_REQUIRE_FASTCHAIN") == "1":
        assert _RING_MODULE is not None, "appliance.audit._ring did not build (C compiler?)"


def _new(size: int = HEADER + (1 << 20)) -> mmap.mmap:
    buf = mmap.mmap(-1, size)
    ring.init(buf)
    return buf


def _typed(value: Any) -> Any:
    """value with every type made part of it and floats as their bits, so == also compares types."""
    if type(value) is float:
        return float, struct.pack("<d", value)
    if type(value) is dict:
        return dict, [(_typed(k), _typed(v)) for k, v in value.items()]
    if type(value) in (tuple, list):
        return type(value), [_typed(v) for v in value]
    return type(value), value


def _drain(buf: mmap.mmap) -> list[Any]:
    """Everything not yet released, taken and released."""
    _, _, read_pos, _, _ = ring.state(buf)
    items, pos = ring.take(buf, read_pos, 1 << 30)
    ring.release(buf, pos, len(items))
    return items  # type: ignore[no-any-return]


def _round_trip(event: AuditEvent) -> Any:
    buf = _new()
    assert ring.put_event(buf, event) == 1
    items = _drain(buf)
    assert len(items) == 1
    return items[0]


# --- round trips ------------------------------------------------------------------------------------


@needs_ring
def test_bench_events_come_back_as_event_tuple_makes_them() -> None:
    events = [_event(i) for i in range(2000)]
    buf = _new()
    for e in events:
        assert ring.put_event(buf, e) == 1
    items = _drain(buf)
    expected = [event_tuple(e) for e in events]
    assert items == expected
    assert [_typed(t) for t in items] == [_typed(t) for t in expected]
    assert {type(t[4]) for t in items} == {int, type(None)}  # UUID subjects cross as their int
    write_pos, write_count, read_pos, read_count, _ = ring.state(buf)
    assert (write_count, read_count, read_pos) == (2000, 2000, write_pos)


@needs_ring
def test_recurring_short_strings_come_back_as_one_object_and_long_ones_fresh() -> None:
    """take shares one str object per short text (cheaper dicts, and the formatter's identity shortcuts
    hit); equal values either way, and a text that displaces another from its slot is still right."""
    events = [_event(i) for i in range(3000)]
    buf = _new()
    for e in events:
        assert ring.put_event(buf, e) == 1
    items = _drain(buf)
    assert items == [event_tuple(e) for e in events]
    assert len({id(t[2]) for t in items}) == 1  # the actor
    assert len({id(k) for t in items for k in t[7] if k == "camera_id"}) == 1
    assert len({id(t[6]) for t in items[:100]}) == 100  # request ids (unique): never shared
    many = [AuditEvent("match", f"apikey:{i}", details={f"k{i}": f"v{i % 7}"}) for i in range(5000)]
    for e in many:
        assert ring.put_event(buf, e) == 1
    assert _drain(buf) == [event_tuple(e) for e in many]


@needs_ring
@pytest.mark.parametrize("value", [-0.0, 0.0, math.nan, -math.nan, math.inf, -math.inf, 5e-324, 1.7976931348623157e308,
                                   struct.unpack("<d", struct.pack("<Q", 0x7FF8_0000_DEAD_BEEF))[0]])
def test_floats_cross_bit_for_bit(value: float) -> None:
    got = _round_trip(AuditEvent("a", "b", details={"x": value}))[7]["x"]
    assert type(got) is float and struct.pack("<d", got) == struct.pack("<d", value)


@needs_ring
def test_subjects_times_and_optional_fields() -> None:
    cases = [
        AuditEvent("a", "b", subject_id=UUID_A, object_id="o", request_id="r", details={}),
        AuditEvent("a", "b", subject_id=uuid.UUID(int=2**128 - 1), details=None),  # type: ignore[arg-type]
        AuditEvent("a", "b", subject_id=uuid.UUID(int=0), ts=datetime(1, 1, 1)),
        AuditEvent("", "", "", subject_id="text subject", ts=datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)),  # type: ignore[arg-type]
        AuditEvent("a", "b", ts=datetime(1969, 12, 31, 23, 59, 59, 999999)),
        AuditEvent("a", "b", ts=datetime(2024, 2, 29, 12, 0, 0, 1, tzinfo=timezone(timedelta(0)))),  # the UTC singleton
        AuditEvent("a", "b", details={"t": True, "f": False, "n": None, "i": -(2**63), "j": 2**63 - 1, "s": ""}),
    ]
    for e in cases:
        got = _round_trip(e)
        assert _typed(got) == _typed(event_tuple(e))


_text = st.text(st.characters(codec="utf-8"), max_size=40)  # non-ASCII, control characters, NUL
_values = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(), _text)
_times = st.datetimes(timezones=st.sampled_from([None, UTC]))
_events = st.builds(
    AuditEvent,
    action=_text, actor=_text, outcome=_text,
    subject_id=st.one_of(st.none(), st.uuids(), _text),
    object_id=st.none() | _text, request_id=st.none() | _text,
    details=st.none() | st.dictionaries(_text, _values, max_size=12),
    ts=_times,
)


@needs_ring
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_events, min_size=1, max_size=8))
@example([AuditEvent("m\u00e9\u20ac\U0001f600\x00\x1f", "\n", details={"\u2028": "\ud7ff\ue000"},
                     ts=datetime.max)])
def test_random_events_round_trip(events: list[AuditEvent]) -> None:
    buf = _new(HEADER + 65536)
    for e in events:
        assert ring.put_event(buf, e) == 1
    items = _drain(buf)
    assert [_typed(t) for t in items] == [_typed(event_tuple(e)) for e in events]


# --- events C does not pack: -1, nothing written ----------------------------------------------------


class _Str(str):
    pass


class _Dict(dict):  # type: ignore[type-arg]
    pass


_UNPACKABLE: list[dict[str, Any]] = [
    {"details": {"nested": {"a": 1}}},
    {"details": {"list": [1, 2]}},
    {"details": {"tuple": (1,)}},
    {"details": {"big": 2**63}},
    {"details": {"small": -(2**63) - 1}},
    {"details": {"bytes": b"x"}},
    {"details": {_Str("k"): 1}},
    {"details": {"k": _Str("v")}},
    {"details": {1: "int key"}},
    {"details": {"k": "\ud800"}},
    {"details": {"\udfff": 1}},
    {"details": _Dict(a=1)},
    {"details": [("a", 1)]},
    {"details": "{}"},
    {"action": "\ud800"},
    {"action": _Str("match")},
    {"action": None},
    {"actor": 1},
    {"outcome": b"ok"},
    {"object_id": 5},
    {"request_id": _Str("r")},
    {"subject_id": 5},
    {"subject_id": UUID_A.bytes},
    {"subject_id": "\udc80"},
    {"ts": datetime(2026, 1, 1, tzinfo=timezone(timedelta(hours=1)))},
    {"ts": datetime(2026, 1, 1).date()},
    {"ts": 1_700_000_000},
    {"ts": None},
]


@needs_ring
@pytest.mark.parametrize("change", _UNPACKABLE, ids=lambda c: f"{next(iter(c))}={next(iter(c.values()))!r}"[:40])
def test_what_c_cannot_pack_exactly_is_refused_without_a_write(change: dict[str, Any]) -> None:
    buf = _new()
    assert ring.put_event(buf, _event(1)) == 1
    before = ring.state(buf), buf[:]
    event = _event(2)
    for name, value in change.items():
        setattr(event, name, value)
    assert ring.put_event(buf, event) == -1  # and no exception left set (that would be a SystemError)
    assert (ring.state(buf), buf[:]) == before


@needs_ring
def test_a_uuid_subclass_and_a_foreign_object_are_refused() -> None:
    class _UUID(uuid.UUID):
        pass

    buf = _new()
    event = _event(0)
    event.subject_id = _UUID(int=7)
    assert ring.put_event(buf, event) == -1
    assert ring.put_event(buf, object()) == -1
    assert ring.put_event(buf, event_tuple(_event(0))) == -1
    assert ring.state(buf)[:2] == (0, 0)


@needs_ring
def test_an_event_bigger_than_a_record_is_refused() -> None:
    buf = _new()
    assert ring.put_event(buf, AuditEvent("a", "b", details={"x": "y" * 65_000})) == 1
    assert ring.put_event(buf, AuditEvent("a", "b", details={"x": "y" * 65_536})) == -1
    assert ring.put_event(buf, AuditEvent("a", "b", details={f"k{i}": i for i in range(8000)})) == -1
    assert ring.state(buf)[1] == 1


@needs_ring
@settings(max_examples=200, deadline=None)
@given(st.dictionaries(_text, _values, max_size=4), st.sampled_from(_UNPACKABLE[:11]))
def test_one_bad_detail_among_good_ones_refuses_the_event(good: dict[str, Any], bad: dict[str, Any]) -> None:
    buf = _new(SMALL)
    details = {**{k: v for k, v in good.items() if k not in bad["details"]}, **bad["details"]}
    before = ring.state(buf)
    assert ring.put_event(buf, AuditEvent("a", "b", details=details)) == -1
    assert ring.state(buf) == before


# --- pickled records, markers, wrap-around, a full ring ----------------------------------------------


@needs_ring
def test_markers_and_pickled_records() -> None:
    buf = _new()
    data = pickle.dumps(event_tuple(_event(3)), protocol=5)
    assert ring.put_pickled(buf, data) is True
    assert ring.put_marker(buf, 0) is True
    assert ring.put_marker(buf, 2**64 - 1) is True
    assert ring.put_pickled(buf, b"") is True
    assert _drain(buf) == [data, 0, 2**64 - 1, b""]
    for bad in (-1, 2**64):
        with pytest.raises(ValueError):
            ring.put_marker(buf, bad)
    with pytest.raises(TypeError):
        ring.put_marker(buf, "1")
    with pytest.raises(TypeError):
        ring.put_pickled(buf, bytearray(b"x"))
    with pytest.raises(ValueError, match="never fit"):
        ring.put_pickled(buf, bytes(65_536 - 4))  # 4 + 1 + len > MAX_RECORD
    assert ring.put_pickled(buf, bytes(65_536 - 5)) is True
    with pytest.raises(ValueError, match="never fit"):
        ring.put_pickled(_new(SMALL), bytes(4096))  # larger than that ring


@needs_ring
def test_records_wrap_around_a_small_ring_in_order() -> None:
    rnd = random.Random(7)
    buf = _new(SMALL)
    expected: list[Any] = []  # written, not yet taken
    pos, taken, wrapped = 0, 0, 0
    for cycle in range(400):
        for _ in range(rnd.randrange(1, 12)):
            kind = rnd.random()
            before = ring.state(buf)
            if kind < 0.6:
                e = _event(cycle)
                e.details["pad"] = "\u00e9" * rnd.randrange(0, 400)
                done, item = ring.put_event(buf, e), event_tuple(e)
            elif kind < 0.8:
                item = pickle.dumps(("p", cycle, "x" * rnd.randrange(0, 900)))
                done = int(ring.put_pickled(buf, item))
            else:
                item = rnd.randrange(2**64)
                done = int(ring.put_marker(buf, item))
            if done == 0:
                assert ring.state(buf) == before
                break
            assert done == 1
            expected.append(item)
            start, end = before[0] % 4096, ring.state(buf)[0] % 4096
            wrapped += end < start
        items, new_pos = ring.take(buf, pos, rnd.randrange(1, 8))
        assert [_typed(i) for i in items] == [_typed(i) for i in expected[:len(items)]]
        del expected[:len(items)]
        pos, taken = new_pos, taken + len(items)
        if rnd.random() < 0.7:  # the consumer releases after "its COPY commits", sometimes later
            ring.release(buf, pos, taken - ring.state(buf)[3])
    items, pos = ring.take(buf, pos, 1 << 20)
    assert [_typed(i) for i in items] == [_typed(i) for i in expected]
    assert wrapped > 20  # records did straddle the end


@needs_ring
def test_a_full_ring_writes_nothing_until_released() -> None:
    buf = _new(SMALL)
    events = [_event(i) for i in range(40)]  # (each with its own time and request id)
    n = 0
    while (done := ring.put_event(buf, events[n])) == 1:
        n += 1
    assert done == 0 and n > 5
    full = ring.state(buf), buf[:]
    assert ring.put_event(buf, events[n]) == 0
    assert ring.put_pickled(buf, b"x" * 400) is False
    assert (ring.state(buf), buf[:]) == full
    items, pos = ring.take(buf, 0, 1)
    assert ring.put_event(buf, events[n]) == 0  # taken is not released
    ring.release(buf, pos, 1)
    assert ring.state(buf)[2:4] == (pos, 1)
    assert ring.put_event(buf, events[n]) == 1
    rest, _ = ring.take(buf, pos, 1 << 20)
    assert items + rest == [event_tuple(e) for e in events[:n + 1]]


@needs_ring
def test_take_honours_limit_and_continues_exactly() -> None:
    buf = _new()
    events = {i: _event(i) for i in range(10) if i % 3}
    expected = [event_tuple(events[i]) if i % 3 else i for i in range(10)]
    ends = []
    for i in range(10):
        if i % 3:
            assert ring.put_event(buf, events[i]) == 1
        else:
            assert ring.put_marker(buf, i) is True
        ends.append(ring.state(buf)[0])
    assert ring.take(buf, 0, 0) == ([], 0)
    first, pos = ring.take(buf, 0, 3)
    assert first == expected[:3] and pos == ends[2]
    second, pos = ring.take(buf, pos, 4)
    assert second == expected[3:7] and pos == ends[6]
    assert ring.take(buf, ends[6], 100) == (expected[7:], ends[9])
    assert ring.take(buf, ends[9], 100) == ([], ends[9])
    assert ring.take(buf, ends[4], 1) == ([expected[5]], ends[5])  # any record boundary will do
    assert ring.state(buf)[2:4] == (0, 0)  # take releases nothing


# --- bounds and malformed input ---------------------------------------------------------------------


@needs_ring
def test_positions_outside_the_stream_are_refused() -> None:
    buf = _new()
    for i in range(3):
        ring.put_event(buf, _event(i))
    write_pos = ring.state(buf)[0]
    _, mid = ring.take(buf, 0, 1)
    ring.release(buf, mid, 1)
    for pos in (write_pos + 1, mid - 1, -1, 2**64):
        with pytest.raises(ValueError):
            ring.take(buf, pos, 10)
        with pytest.raises(ValueError):
            ring.release(buf, pos, 0)
    with pytest.raises(ValueError):
        ring.release(buf, write_pos, -1)
    with pytest.raises(ValueError):
        ring.take(buf, mid, -1)
    assert ring.state(buf)[2:4] == (mid, 1)
    ring.release(buf, write_pos, 2)
    assert ring.state(buf) == (write_pos, 3, write_pos, 3, 1 << 20)


@needs_ring
def test_buffers_that_are_not_rings_are_refused() -> None:
    with pytest.raises(ValueError):
        ring.init(mmap.mmap(-1, HEADER + 4095))
    blank = mmap.mmap(-1, SMALL)
    for call in (lambda: ring.state(blank), lambda: ring.put_event(blank, _event(0)),
                 lambda: ring.put_marker(blank, 1), lambda: ring.take(blank, 0, 1), lambda: ring.release(blank, 0, 0)):
        with pytest.raises(ValueError, match="magic"):
            call()
    assert blank[:] == bytes(SMALL)
    with pytest.raises((TypeError, BufferError)):
        ring.init(bytes(SMALL))
    with pytest.raises((TypeError, BufferError)):
        ring.state(bytes(_new(SMALL)))  # a read-only copy of a ring
    grown = bytearray(_new(SMALL)) + bytes(8)  # capacity no longer matches
    with pytest.raises(ValueError, match="capacity"):
        ring.state(grown)
    with pytest.raises(TypeError):
        ring.state()


def _put_header(buf: mmap.mmap, offset: int, value: int) -> None:
    struct.pack_into("<Q", buf, offset, value)


@needs_ring
@pytest.mark.parametrize(("corrupt", "reason"), [
    ("kind", "unknown record kind"), ("length", "beyond write_pos"), ("short", "truncated record header"),
    ("utf8", "invalid UTF-8"), ("flags", "unknown event flags"), ("tag", "unknown detail value tag"),
    ("trailing", "trailing bytes"), ("marker", "not 8 bytes"),
])
def test_a_malformed_record_raises_naming_its_position(corrupt: str, reason: str) -> None:
    buf = _new()
    ring.put_marker(buf, 1)
    at = ring.state(buf)[0]  # the damaged record's position
    ring.put_event(buf, AuditEvent("match", "actor", details={"k": 1}))
    end = ring.state(buf)[0]
    rec = HEADER + at
    if corrupt == "kind":
        buf[rec + 4] = ord("X")
    elif corrupt == "length":
        struct.pack_into("<I", buf, rec, end - at)  # one byte beyond write_pos
    elif corrupt == "short":
        _put_header(buf, 64, at + 3)
    elif corrupt == "utf8":
        buf[buf.find(b"match")] = 0xFF
    elif corrupt == "flags":
        buf[rec + 13] |= 0x80
    elif corrupt == "tag":
        buf[end + HEADER - 9] = ord("Q")  # the int's tag
    elif corrupt == "trailing":
        struct.pack_into("<I", buf, rec, end - at - 4 + 1)
        buf[end + HEADER] = 0
        _put_header(buf, 64, end + 1)
    elif corrupt == "marker":
        struct.pack_into("<I", buf, HEADER, 5)  # the marker before: 4 payload bytes
        at = 0
    with pytest.raises(ValueError, match=f"position {at}: .*{reason}"):
        ring.take(buf, 0, 10)


@needs_ring
def test_a_corrupt_header_raises() -> None:
    buf = _new()
    ring.put_marker(buf, 1)
    _put_header(buf, 128, 100)  # read_pos beyond write_pos
    with pytest.raises(ValueError, match="corrupt"):
        ring.put_event(buf, _event(0))
    with pytest.raises(ValueError, match="corrupt"):
        ring.take(buf, 100, 1)


@needs_ring
@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=600), st.integers(0, 4095))
def test_garbage_in_the_ring_never_crashes(garbage: bytes, start: int) -> None:
    buf = _new(SMALL)
    for i, byte in enumerate(garbage):
        buf[HEADER + (start + i) % 4096] = byte
    _put_header(buf, 128, start)
    _put_header(buf, 64, start + len(garbage))
    try:
        _, pos = ring.take(buf, start, 1000)
    except ValueError as e:
        assert "position" in str(e)
    else:
        assert start <= pos <= start + len(garbage)


# --- two processes ----------------------------------------------------------------------------------

_CHILD = """
import mmap, os, sys
from appliance.audit import _ring
fd = int(sys.argv[1])
buf = mmap.mmap(fd, os.fstat(fd).st_size)
items, pos = _ring.take(buf, _ring.state(buf)[2], 1000)
_ring.release(buf, pos, len(items))
print(repr((items, pos)))
"""


@needs_ring
def test_a_child_process_takes_what_the_parent_put() -> None:
    fd = os.memfd_create("test-audit-ring")
    try:
        os.ftruncate(fd, HEADER + (1 << 16))
        buf = mmap.mmap(fd, HEADER + (1 << 16))
        ring.init(buf)
        events = [_event(i) for i in range(50)]
        for e in events:
            assert ring.put_event(buf, e) == 1
        ring.put_marker(buf, 77)
        write_pos = ring.state(buf)[0]
        out = subprocess.run([sys.executable, "-c", _CHILD, str(fd)], pass_fds=(fd,), capture_output=True,
                             text=True, check=True, cwd=ROOT, timeout=60)
        items, pos = ast.literal_eval(out.stdout)
        assert items == [*(event_tuple(e) for e in events), 77]
        assert pos == write_pos
        assert ring.state(buf) == (write_pos, 51, write_pos, 51, 1 << 16)  # the child's release, seen here
        assert ring.put_event(buf, _event(50)) == 1
        buf.close()
    finally:
        os.close(fd)
