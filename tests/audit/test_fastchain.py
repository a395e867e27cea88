"""The compiled match loop (``appliance.audit._fastchain``) writes exactly the bytes of the Python
reference (``chain._format_one``): each batch is formatted twice, on twin chain heads, once with the
compiled loop and once without, and every output is compared; the records also verify as the offline
verifier checks them. Without the compiled module (a machine with no compiler) the same tests prove
the Python fallback, unless ``APPLIANCE_REQUIRE_FASTCHAIN=1`` (``make test``) demands the module."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.audit import chain
from appliance.audit.chain import (
    BLOCK_COLUMNS,
    ChainHead,
    EventTuple,
    Formatted,
    event_tuple,
    format_copy_batch,
    header_hash,
    header_of,
    micros,
    unpack_block,
)
from bench.audit import _event

MATCH_ACTIONS = frozenset({"match", "match.batch"})
START = datetime(2026, 1, 31, 23, 59, 58, 500_000, tzinfo=UTC)  # batches below cross seconds and a month
T0 = micros(START) + 1_000_000
CACHES = (chain._ACTIONS, chain._ACTORS, chain._OUTCOMES, chain._SUBJECTS, chain._SECONDS, chain._KEY_OK,
          chain._SAFE_TEXT, chain._PLAIN_KEYS, chain._SUBJECT_DIGESTS)
UUID_A = uuid.UUID("5eed0000-0000-4000-8000-0000000000a1")

# (outputs per batch, the heads after, redactions reported, events the Python path formatted per batch)
Run = tuple[list[Formatted], dict[str, ChainHead], list[tuple[str, list[str]]], list[int]]


def test_the_compiled_loop_is_built_where_required() -> None:
    """``make test`` sets APPLIANCE_REQUIRE_FASTCHAIN=1: a build that silently fell back fails here."""
    if os.environ.get("APPLIANCE_REQUIRE_FASTCHAIN") == "1":
        assert chain._FAST_MODULE is not None, "appliance.audit._fastchain did not build (C compiler, libssl-dev?)"
    if chain._FAST_MODULE is None:  # the pure-Python fallback still hashes as the verifier does
        _verify(_same([[event_tuple(_event(i)) for i in range(50)]])[0])


@pytest.fixture
def cold_caches() -> Iterator[None]:
    """Start from empty caches, as a fresh writer process does (the first batch is the Python path's)."""
    for cache in CACHES:
        cache.clear()
    yield


def _heads() -> dict[str, ChainHead]:
    heads = {}
    for cls in ("audit", "match"):
        head = heads[cls] = ChainHead(f'w:h"ost\u00e9:1:ab:{cls}', cls)
        head.seq, head.hash, head.ts = 41, bytes(range(32)), START
    return heads


def _run(fast: Any, batches: list[list[Any]]) -> Run:
    """Format the batches in order on fresh heads, with the compiled loop ``fast`` (or None: Python only)."""
    heads, redacted, outs, calls = _heads(), [], [], []
    reference = chain._format_one

    def counted(*args: Any) -> None:
        calls[-1] += 1
        reference(*args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(chain, "_FAST", fast)
        mp.setattr(chain, "_format_one", counted)
        for batch in batches:
            calls.append(0)
            outs.append(format_copy_batch(list(batch), heads, MATCH_ACTIONS,
                                          lambda action, keys: redacted.append((action, keys))))
    return outs, heads, redacted, calls


def _same(batches: list[list[Any]]) -> Run:
    """Both runs wrote the same bytes and left the same heads; returns the compiled one's."""
    compiled, python = _run(chain._FAST_MODULE, batches), _run(None, batches)
    for out_c, out_p in zip(compiled[0], python[0], strict=True):
        assert out_c.elements == out_p.elements
        assert out_c.digests == out_p.digests
        assert out_c.times == out_p.times
        assert out_c.subjects == out_p.subjects
        assert out_c.lines == out_p.lines
        if out_p.elements:  # (with none, the compiled run has set up the match chain: unused, as blocks() is [])
            assert (out_c.match_chain.name, out_c.match_seq, out_c.first_prev) == \
                   (out_p.match_chain.name, out_p.match_seq, out_p.first_prev)
        assert _moved(out_c.heads) == _moved(out_p.heads)
    assert {k: (h.seq, h.hash, h.ts) for k, h in compiled[1].items()} == \
           {k: (h.seq, h.hash, h.ts) for k, h in python[1].items()}
    assert compiled[2] == python[2]  # the same redactions reported
    assert python[3] == [len(b) for b in batches]
    return compiled


def _moved(heads: dict[str, Any]) -> dict[str, tuple[Any, ...]]:
    return {name: (chain_head.name, seq, digest, ts) for name, (chain_head, seq, digest, ts) in heads.items()}


def _verify(outs: list[Formatted]) -> None:
    """Each match record, rebuilt from its block row, hashes as the verifier computes and links to the last."""
    prev = bytes(range(32)).hex()
    n = 0
    for out in outs:
        for row in out.blocks():
            for rec in unpack_block(dict(zip(BLOCK_COLUMNS.split(", "), row, strict=True))):
                assert rec["prev_hash"] == prev, rec["seq"]
                assert header_hash(header_of(rec)).hex() == rec["hash"], rec["seq"]
                prev = rec["hash"]
                n += 1
    assert n == sum(len(out.elements) for out in outs)


def _ev(ts: int, action: str = "match", actor: str = "apikey:x", outcome: str = "match", subject: Any = None,
        object_id: Any = None, request_id: Any = "r-1", details: Any = None) -> EventTuple:
    return (ts, action, actor, outcome, subject, object_id, request_id, {} if details is None else details)


def test_bench_events_hash_identically_and_warm_ones_never_leave_the_compiled_loop(cold_caches: None) -> None:
    events = [event_tuple(_event(i)) for i in range(400)]
    later = [(*e[:6], uuid.uuid4().hex, e[7]) for e in events]  # the same people, cameras, tracks: all cached
    outs, _heads, _redacted, python_calls = _same([events, later])
    _verify(outs)
    if chain._FAST_MODULE is not None:
        assert 0 < python_calls[0] < len(events) and python_calls[1] == 0


ESCAPED = ['q"uote', "back\\slash", "tab\there", "nl\nx\r", "ctl\x01\x1f\x7f", "sep\u2028\u2029",
           "caf\u00e9 \u6f22 \U0001f600", "", "/"]


def test_escaped_and_non_ascii_text_hashes_identically(cold_caches: None) -> None:
    batch = []
    for i, text in enumerate(ESCAPED):
        batch.append(_ev(T0 + i, actor="apikey:" + text, outcome=text or "ok", request_id=text, object_id=text,
                         details={"camera_id": text, "k\u00e9y" + text: i, "model": "m\u00fc"}))
        batch.append(_ev(T0 + i, "match.batch", actor=text, request_id=text[::-1], object_id="o/" + text,
                         details={text: text}))
    outs, _heads, _redacted, python_calls = _same([batch, batch])  # the second batch finds all cached
    _verify(outs)
    if chain._FAST_MODULE is not None:
        assert python_calls[1] == 0


@pytest.mark.parametrize("details", [
    None, {}, {"ok": True, "no": False, "none": None}, {"k": 0, "neg": -5, "big": 2**63, "bigger": -(2**70)},
    {"x": 0.0}, {"x": -0.0}, {"x": 1e16}, {"x": 1e15}, {"x": -1e15}, {"x": 1e15 - 1}, {"x": 999999999999999.9},
    {"x": 1e-300}, {"x": 5e-324}, {"x": 0.1 + 0.2}, {"x": float("nan")}, {"x": float("inf")}, {"x": 2.5, "y": -0.001},
    {"s": "a" * 64}, {"s": "a" * 65}, {"s": "a" * 200}, {"s": "a" * 201}, {"s": "\u00e9" * 64},
    {"token": "t", "model": "m"}, {"api_key": "secret"}, {"key_id": "k-1"}, {"auth": "Bearer abc"},
    {"nested": {"a": 1}}, {"list": [1, 2]}, {"vector": [0.5] * 20}, {"bytes": b"raw"}, {"t": (1, 2)},
    {1: "int key"}, {"when": START}, {f"k{i}": i for i in range(16)}, {f"k{i}": i for i in range(17)},
    {"nul\x00key": 1}, {"v": "nul\x00value"}, {"z": 1, "a": 2, "\u00e9": 3, "B": 4, "_": 5, "aa": 6, "a\x7f": 7},
])
def test_details_hash_identically_whoever_formats_them(details: Any, cold_caches: None) -> None:
    """Plain details are the compiled loop's; anything to sanitise, redact or round is Python's."""
    batch = [_ev(T0 + i, subject=UUID_A.int, details=details) for i in range(3)]
    outs, _heads, _redacted, _calls = _same([batch, batch])
    _verify(outs)


def test_consecutive_details_of_other_keys_and_many_floats_hash_identically(cold_caches: None) -> None:
    """Neither the last key set nor a float's text is taken for another's (the compiled loop remembers both)."""
    shapes = [{"a": 1, "b": 2.5}, {"c": 1, "d": 2.5}, {"b": 1, "a": 2.5}, {"a": 1, "c": "x"}, {"a": 1},
              {"a": 1, "b": 2.5, "c": None}, {"aa": 1, "a": 2}, {"a": 2, "aa": 1}]
    floats = [i / 7 for i in range(1, 3000)] + [0.1 + 0.2, 1e-7, 1e14 + 0.5, 123456789012345.6, 5e-324, -1e-310, 1e-5,
                                               -0.0001, 1 / 3, 2.0**49, -(2.0**49) - 0.5]
    batch = [_ev(T0 + i, details=shapes[i % len(shapes)]) for i in range(3 * len(shapes))]
    batch += [_ev(T0 + 100, details={"similarity": f, "k": 5}) for f in floats]
    outs, _heads, _redacted, python_calls = _same([batch, batch])
    _verify(outs)
    if chain._FAST_MODULE is not None:
        assert python_calls[1] == 0


def test_times_are_clamped_and_cross_seconds_and_months_identically(cold_caches: None) -> None:
    times = [T0 - 5_000_000, T0, T0 + 999_999, T0 + 1_000_000, T0 + 3, T0 + 2_500_000, T0 + 1_000_000, 0,
             T0 + 10_000_000, T0 + 10_000_001]
    batch = [_ev(t, request_id=f"r{i}") for i, t in enumerate(times)]
    outs, heads, _redacted, _calls = _same([batch, batch])
    _verify(outs)
    assert outs[0].times[0] == micros(START) and outs[1].times[0] == T0 + 10_000_001
    assert len(outs[0].blocks()) == 2  # cut at the month's end
    assert micros(heads["match"].ts) == T0 + 10_000_001


def test_subjects_in_every_form_hash_identically(cold_caches: None) -> None:
    forms = [UUID_A, UUID_A.int, str(UUID_A), str(UUID_A).upper(), None, uuid.UUID(int=7), 7]
    batch = [_ev(T0 + i, subject=s) for i, s in enumerate(forms)]
    outs, _heads, _redacted, _calls = _same([batch, batch])
    _verify(outs)
    assert outs[1].subjects == [str(UUID_A)] * 3 + [str(UUID_A).upper(), None] + [str(uuid.UUID(int=7))] * 2
    _same([[_ev(T0, subject="person-7"), _ev(T0 + 1, subject=" x ")]] * 2)


def test_mixed_classes_link_each_chain_identically(cold_caches: None) -> None:
    actions = ["match", "subject.read", "match.batch", "match", "enrol", "erasure", "match", "match"]
    batch = [_ev(T0 + i, action=a, subject=UUID_A if i % 2 else None, details={"i": i}) for i, a in enumerate(actions)]
    outs, heads, _redacted, _calls = _same([batch, batch])
    _verify(outs)
    assert len(outs[1].lines) == 3 and heads["audit"].seq == 41 + 6 and heads["match"].seq == 41 + 10


class _TupleSubclass(tuple):  # type: ignore[type-arg]
    pass


def test_what_the_compiled_loop_cannot_take_is_left_to_python(cold_caches: None) -> None:
    """Odd fields (not str, too long, NUL, not a tuple of 8) and odd times are Python's to bound or refuse."""
    odd: list[Any] = [
        _ev(T0, request_id="r" * 100), _ev(T0, request_id="r" * 101), _ev(T0, request_id=12),
        _ev(T0, request_id="a\x00b"), _ev(T0, object_id="o" * 1024), _ev(T0, object_id="o" * 1025),
        _ev(T0, object_id=uuid.UUID(int=3)), _ev(T0, object_id="\x00"), _ev(T0, actor="a" * 201),
        _ev(T0, actor=5), _ev(T0, outcome="o" * 41), _ev(T0, action="m" * 101), _ev(START.replace(tzinfo=None)),
        _ev(START), list(_ev(T0 + 5)), _TupleSubclass(_ev(T0 + 6)), _ev(T0 + 7, details={"d": 1}), _ev(T0 + 8),
    ]
    outs, _heads, _redacted, _calls = _same([odd, odd])
    _verify(outs)


def test_a_string_utf8_cannot_encode_fails_as_in_python(cold_caches: None) -> None:
    for bad in (_ev(T0, request_id="\ud800"), _ev(T0, details={"s": "\udfff"}), _ev(T0, details={"\ud800": 1})):
        for fast in (None, chain._FAST_MODULE):  # Python first: the compiled loop then finds it cached
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(chain, "_FAST", fast)
                with pytest.raises(UnicodeEncodeError):
                    format_copy_batch([bad, bad], _heads(), MATCH_ACTIONS)


_TEXT = st.one_of(st.sampled_from([*ESCAPED, "apikey:x", "match", "unknown", "ok"]), st.text(max_size=70),
                  st.text(max_size=260))
_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.integers(-1000, 1000),
                    st.floats(), st.sampled_from([0.5, 0.94, 0.9312, -0.0, 1e15, 1e300]), _TEXT,
                    st.sampled_from(["apl_0123456789_secret", "hvs.abc", "Bearer x"]),
                    st.lists(st.integers(), max_size=3))
_KEYS = st.one_of(st.sampled_from(["model", "k", "similarity", "camera_id", "token", "key_id", "\u00e9", 'a"b',
                                   "x\\y"]), st.text(max_size=8))
_EVENTS = st.lists(st.tuples(
    st.integers(T0 - 3_000_000, T0 + 3_000_000),
    st.sampled_from(["match", "match.batch", "subject.read", 'a"\u00fc\n']),
    _TEXT, _TEXT, st.one_of(st.none(), st.uuids(), st.uuids().map(lambda u: u.int), _TEXT),
    st.one_of(st.none(), _TEXT, st.text(min_size=1000, max_size=1100)), st.one_of(st.none(), _TEXT),
    st.one_of(st.dictionaries(_KEYS, _VALUES, max_size=18), st.just({}))), max_size=40)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=_EVENTS)
def test_random_batches_hash_identically(events: list[EventTuple]) -> None:
    """Any mix of classes, escapes, lengths, subjects, details and times: the same bytes either way."""
    _same([events, events])  # the second time round, most of it is cached and compiled
