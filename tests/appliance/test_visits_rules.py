"""The rules of visits and of face expiry, as pure functions (no server needed)."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta

import pytest

from appliance.gdpr.retention import expiry_of
from appliance.visits.queries import VisitFilter, VisitQueryError, decode_cursor, encode_cursor, retention_cutoff
from appliance.visits.recorder import Passage, VisitRecorder, visit_id

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def test_a_match_frame_wins_over_unknown_and_frames_add_up() -> None:
    p = Passage("door", "t1", 100.0, 101.0, "unknown", None, 0.5, 1)
    p.fold(Passage("door", "t1", 99.0, 105.0, "match", b"s" * 16, 0.9, 2))
    p.fold(Passage("door", "t1", 106.0, 107.0, "unknown", None, 0.4, 1))
    assert (p.first_seen, p.last_seen, p.frames) == (99.0, 107.0, 4)
    assert (p.decision, p.subject, p.similarity) == ("match", b"s" * 16, 0.9)


def test_every_worker_derives_the_same_visit_id_for_a_track_on_a_day() -> None:
    day = date(2026, 3, 1)
    assert visit_id("door", "42", day) == visit_id("door", "42", day)
    assert visit_id("door", "42", day) != visit_id("door", "42", day + timedelta(days=1))
    assert visit_id("door", "42", day) != visit_id("gate", "42", day)
    assert visit_id(None, "4", day) != visit_id("4", "", day)  # the separator keeps fields apart


def test_a_track_that_crosses_midnight_in_one_process_keeps_its_first_day() -> None:
    rec = VisitRecorder(pool=None, buffer_size=100)  # type: ignore[arg-type]
    before = datetime(2026, 3, 1, 23, 59, 58, tzinfo=UTC).timestamp()
    rec.record("door", "7", "unknown", None, 0.3, before, before)
    first = rec.rows(rec._pending, before)
    after = before + 4  # 00:00:02 the next day, next flush
    second = rec.rows({("door", "7"): Passage("door", "7", after, after, "unknown", None, 0.3, 1)}, after)
    assert first[0][0] == second[0][0] == date(2026, 3, 1)
    assert first[0][1] == second[0][1]
    assert second[0][4] == datetime.fromtimestamp(before, UTC)  # first_seen stays inside its day partition


def test_the_buffer_is_bounded_and_counts_what_it_drops() -> None:
    from appliance.visits.recorder import DROPPED

    rec = VisitRecorder(pool=None, buffer_size=100)  # type: ignore[arg-type]
    dropped = DROPPED._value.get()
    for i in range(150):
        rec.record("door", None, "unknown", None, None, 1.0 + i, 1.0 + i)
    rec.record("door", "track-a", "unknown", None, None, 1.0, 1.0)
    assert len(rec._pending) == 100
    assert DROPPED._value.get() - dropped == 51


def test_frames_of_a_buffered_track_still_fold_when_the_buffer_is_full() -> None:
    rec = VisitRecorder(pool=None, buffer_size=100)  # type: ignore[arg-type]
    rec.record("door", "t", "unknown", None, None, 1.0, 1.0)
    for i in range(99):
        rec.record("door", None, "unknown", None, None, 1.0 + i, 1.0 + i)
    rec.record("door", "t", "match", b"x" * 16, 0.9, 2.0, 2.0)
    assert rec._pending[("door", "t")].frames == 2 and rec._pending[("door", "t")].decision == "match"


def test_filters_refuse_empty_long_and_zone_less_ranges() -> None:
    with pytest.raises(VisitQueryError, match="before"):
        VisitFilter.build(T0, T0)
    with pytest.raises(VisitQueryError, match="400 days"):
        VisitFilter.build(T0 - timedelta(days=401), T0)
    with pytest.raises(VisitQueryError, match="time zone"):
        VisitFilter.build(T0.replace(tzinfo=None), None)
    with pytest.raises(VisitQueryError, match="decision"):
        VisitFilter.build(None, T0, decision="maybe")
    flt = VisitFilter.build(None, T0)
    assert flt.start == T0 - timedelta(days=1) and flt.end == T0


def test_cursors_round_trip_and_foreign_ones_are_refused() -> None:
    vid = uuid.uuid4()
    assert decode_cursor(encode_cursor(T0, vid)) == (T0, vid)
    for bad in ("nope", "", encode_cursor(T0, vid)[:-3], "MjAyNi0wMy0wMXxub3QtYS11dWlk"):
        with pytest.raises(VisitQueryError):
            decode_cursor(bad)


def test_visits_older_than_their_retention_go_by_whole_days() -> None:
    assert retention_cutoff(datetime(2026, 3, 31, 5, tzinfo=UTC), 30) == date(2026, 3, 1)


def test_a_face_expires_after_its_latest_enrolment_or_recognition() -> None:
    created, enrolled, seen = T0, T0 + timedelta(days=10), T0 + timedelta(days=100)
    at, why = expiry_of(None, created, enrolled, seen, 730)
    assert at == seen + timedelta(days=730) and "last recognised" in why
    at, why = expiry_of(None, created, enrolled, None, 730)
    assert at == enrolled + timedelta(days=730) and "last enrolled" in why
    at, why = expiry_of(None, created, None, None, 730)
    assert at == created + timedelta(days=730) and "created" in why


def test_retain_until_overrides_the_rule_and_null_days_keep_faces() -> None:
    until = T0 + timedelta(days=5)
    assert expiry_of(until, T0, None, T0 + timedelta(days=900), 730)[0] == until
    assert expiry_of(until, T0, None, None, None)[0] == until
    assert expiry_of(None, T0, None, None, None) == (None, "subject_retention_days is null")
