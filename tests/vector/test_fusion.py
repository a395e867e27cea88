"""Track fusion (``vector.fusion``): the rule, its bounds, and the two evidence stores agreeing.

The rule tests run on frames made from the real LFW dlib embeddings (../shared/data) by exact search,
as ``bench/accuracy.py`` does; time is injected, never waited for. The Redis store runs on the test
stack's real Redis."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import redis

from tests.conftest import FACES
from vector.fusion import (
    Frame,
    MemoryTracks,
    RedisTracks,
    TrackConfig,
    TrackDecision,
    fuse,
    naming_threshold,
)

LFW = FACES.parent / "faces_more_dlib128.npz"
T = 0.94  # the dlib-resnet-v1 default when these tests were written; every assertion below states its own margin


def sid(i: int) -> bytes:
    return i.to_bytes(16, "big")


def frame(*pairs: tuple[int, float]) -> Frame:
    return Frame(tuple(sid(s) for s, _ in pairs), tuple(x for _, x in pairs))


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def lfw() -> tuple[np.ndarray, np.ndarray]:
    data = np.load(LFW)
    v = data["vectors"].astype(np.float64)
    return v / np.linalg.norm(v, axis=1, keepdims=True), data["labels"]


def gallery_frames(vectors: np.ndarray, labels: np.ndarray, enrolled: list[str],
                   probes: np.ndarray) -> list[Frame]:
    """Top-5 per-subject frames of ``probes`` against the first 3 images of each enrolled person (subject i)."""
    rows = [np.flatnonzero(labels == p)[:3] for p in enrolled]
    per = np.stack([(vectors[probes] @ vectors[r].T).max(axis=1) for r in rows], axis=1)
    top = np.argsort(-per, axis=1)[:, :5]
    return [Frame(tuple(sid(int(s)) for s in row), tuple(float(per[i, s]) for s in row)) for i, row in enumerate(top)]


# --- the rule ---------------------------------------------------------------------------------------


def test_one_frame_never_names_anyone_however_high() -> None:
    assert fuse([frame((1, 0.99), (2, 0.5))], T, min_frames=2).decision == "unknown"
    assert fuse([frame((1, 0.99), (2, 0.5))], T, min_frames=1).decision == "match"


def test_a_single_crossing_among_near_misses_stays_unknown() -> None:
    # mean 0.943 >= T, but only one frame reached T for subject 1
    frames = [frame((1, 0.97), (2, 0.8)), frame((1, 0.93), (2, 0.8)), frame((1, 0.93), (2, 0.8))]
    fused = fuse(frames, T, min_frames=2)
    assert fused.score >= T and fused.decision == "unknown"


def test_two_agreeing_frames_name_the_subject_and_score_is_the_mean() -> None:
    fused = fuse([frame((1, 0.95), (2, 0.90)), frame((1, 0.97), (2, 0.91))], T, min_frames=2)
    assert fused.decision == "match" and fused.subject == sid(1)
    assert fused.score == pytest.approx(0.96)
    assert fused.margin == pytest.approx(0.96 - 0.905)


def test_a_subject_missing_from_a_frame_counts_that_frames_lowest_similarity() -> None:
    frames = [frame((1, 0.96), (2, 0.90)), frame((3, 0.95), (2, 0.91))]
    fused = fuse(frames, T, min_frames=2)
    # 1: (0.96 + 0.91) / 2; 2: (0.90 + 0.91) / 2; 3: (0.90 + 0.95) / 2
    assert fused.subject == sid(1) and fused.score == pytest.approx(0.935)
    assert fused.decision == "unknown"  # frames disagree on who it is


def test_min_margin_turns_a_close_track_unknown() -> None:
    frames = [frame((1, 0.96), (2, 0.955)), frame((1, 0.96), (2, 0.955))]
    assert fuse(frames, T, 2).decision == "match"
    assert fuse(frames, T, 2, min_margin=0.01).decision == "unknown"


def test_naming_threshold_is_exactly_where_fuse_starts_naming() -> None:
    rng = np.random.default_rng(3)
    for _ in range(300):
        frames = []
        for _f in range(int(rng.integers(1, 6))):
            subjects = rng.choice(6, size=int(rng.integers(1, 4)), replace=False)
            sims = np.sort(rng.uniform(0.85, 1.0, len(subjects)))[::-1]
            frames.append(frame(*zip(subjects.tolist(), sims.tolist(), strict=True)))
        who, t = naming_threshold(frames, 2)
        for probe in (t - 1e-9, t, t + 1e-9):
            fused = fuse(frames, probe, 2)
            assert (fused.decision == "match") == (probe <= t and t > -2.0)
            if fused.decision == "match":
                assert fused.subject == who


def test_frames_round_trip_through_their_packed_form() -> None:
    f = frame((7, 0.9512345678), (9, -0.25))
    assert Frame.unpack(f.pack()) == f
    empty = Frame((), ())
    assert Frame.unpack(empty.pack()) == empty
    assert Frame.unpack_many(f.pack() + empty.pack() + f.pack()) == [f, empty, f]


# --- real embeddings ----------------------------------------------------------------------------------


def test_real_stranger_track_crossing_once_is_unknown_and_real_genuine_3_frames_named(lfw) -> None:  # type: ignore[no-untyped-def]
    vectors, labels = lfw
    people = sorted(set(labels.tolist()))
    counts = {p: int((labels == p).sum()) for p in people}
    enrolled = [p for p in people if counts[p] >= 6][:100]
    genuine_probes = [np.flatnonzero(labels == p)[3:6] for p in enrolled]
    # strangers: people not enrolled with >= 3 images; find tracks where exactly one frame crosses T
    strangers = [p for p in people if p not in set(enrolled) and counts[p] >= 3]
    rows = np.concatenate([np.flatnonzero(labels == p)[:3] for p in strangers])
    frames = gallery_frames(vectors, labels, enrolled, rows)
    crossing_once = []
    for i in range(0, len(frames), 3):
        track = frames[i: i + 3]
        crossed = [f for f in track if f.sims[0] >= T]
        if len(crossed) == 1:
            crossing_once.append(track)
    assert len(crossing_once) >= 10, "the data no longer has stranger tracks crossing once"
    for track in crossing_once:
        for order in (track, track[::-1]):  # whichever frame crosses, first or last
            assert fuse(order, T, 2).decision == "unknown"
            store = MemoryTracks(TrackConfig(), Clock())
            assert all(d.decision == "unknown" for d in store.observe("m", "cam", "t", order, T))
    named = 0
    for s, probes in enumerate(genuine_probes):
        fused = fuse(gallery_frames(vectors, labels, enrolled, probes), T, 2)
        if fused.decision == "match":
            assert fused.subject == sid(s)  # never the wrong enrolled person
            named += 1
    assert named / len(genuine_probes) >= 0.9, named  # bench/accuracy.py: TAR 0.93 at T 0.946 for 3 frames


# --- the memory store: bounds, with time injected ------------------------------------------------------


def test_track_is_forgotten_after_idle_timeout() -> None:
    clock = Clock()
    store = MemoryTracks(TrackConfig(idle=10.0), clock)
    f = frame((1, 0.97), (2, 0.5))
    assert store.observe("m", "cam", "t", [f], T)[0].frames == 1
    clock.now += 9.9
    d = store.observe("m", "cam", "t", [f], T)[0]
    assert (d.frames, d.decision, d.first_seen) == (2, "match", clock.now - 9.9)
    clock.now += 10.1
    d = store.observe("m", "cam", "t", [f], T)[0]
    assert (d.frames, d.decision, d.first_seen) == (1, "unknown", clock.now)


def test_idle_tracks_are_dropped_even_when_never_seen_again() -> None:
    clock = Clock()
    store = MemoryTracks(TrackConfig(idle=10.0), clock)
    for i in range(50):
        store.observe("m", "cam", f"t{i}", [frame((1, 0.5))], T)
    assert len(store) == 50
    clock.now += 11
    store.observe("m", "cam", "new", [frame((1, 0.5))], T)
    assert len(store) == 1


def test_least_recently_seen_track_is_dropped_beyond_max_tracks() -> None:
    clock = Clock()
    store = MemoryTracks(TrackConfig(max_tracks=2), clock)
    f = frame((1, 0.97))
    store.observe("m", "cam", "a", [f], T)
    store.observe("m", "cam", "b", [f], T)
    store.observe("m", "cam", "a", [f], T)  # a is now the most recent
    store.observe("m", "cam", "c", [f], T)  # drops b
    assert len(store) == 2
    assert store.observe("m", "cam", "a", [f], T)[0].frames == 3
    assert store.observe("m", "cam", "b", [f], T)[0].frames == 1


def test_window_keeps_only_the_latest_frames() -> None:
    store = MemoryTracks(TrackConfig(window=3), Clock())
    bad, good = frame((1, 0.5), (2, 0.4)), frame((1, 0.97), (2, 0.4))
    decisions = store.observe("m", "cam", "t", [bad, bad, bad, good, good], T)
    assert [d.decision for d in decisions] == ["unknown"] * 4 + ["unknown"]  # mean of (bad, good, good) < T
    d = store.observe("m", "cam", "t", [good], T)[0]
    assert (d.decision, d.frames, d.changed) == ("match", 6, True)


def test_same_track_id_on_two_cameras_or_models_are_two_tracks() -> None:
    store = MemoryTracks(TrackConfig(), Clock())
    f = frame((1, 0.97))
    store.observe("m", "cam1", "t", [f], T)
    assert store.observe("m", "cam2", "t", [f], T)[0].frames == 1
    assert store.observe("other", "cam1", "t", [f], T)[0].frames == 1
    assert store.observe("m", None, "t", [f], T)[0].frames == 1


def test_changed_marks_each_transition_of_the_fused_decision() -> None:
    one, two, low = frame((1, 0.97), (2, 0.3)), frame((2, 0.97), (1, 0.3)), frame((1, 0.9), (2, 0.55))
    store = MemoryTracks(TrackConfig(), Clock())  # means: .97 .97 .97 .9525 .942 .935
    got = [(d.decision, d.changed) for d in store.observe("m", "c", "t", [one, one, one, low, low, low], T)]
    assert got == [("unknown", True), ("match", True), ("match", False), ("match", False), ("match", False),
                   ("unknown", True)]
    store = MemoryTracks(TrackConfig(window=2), Clock())
    got = [(d.decision, d.subject, d.changed) for d in store.observe("m", "c", "t", [one, one, two, two], T)]
    assert got == [("unknown", None, True), ("match", sid(1), True), ("unknown", None, True), ("match", sid(2), True)]


# --- batch == one by one, and several workers sharing a track through Redis ---------------------------


FRAMES = [frame((1, 0.93), (2, 0.91)), frame((1, 0.96), (2, 0.90)), frame((1, 0.95), (3, 0.92)),
          frame((2, 0.97), (1, 0.93)), frame((1, 0.96), (2, 0.95))]


def _view(ds: list[TrackDecision]) -> list[tuple[object, ...]]:
    return [(d.decision, d.subject, round(d.score, 9), d.frames, d.changed) for d in ds]


def test_memory_store_batch_equals_one_by_one() -> None:
    one = MemoryTracks(TrackConfig(), Clock())
    singles = [one.observe("m", "c", "t", [f], T)[0] for f in FRAMES]
    batch = MemoryTracks(TrackConfig(), Clock()).observe("m", "c", "t", FRAMES, T)
    assert _view(batch) == _view(singles)
    assert any(d.decision == "match" for d in batch) and any(d.decision == "unknown" for d in batch)


@pytest.fixture
def redis_url(settings) -> str:  # type: ignore[no-untyped-def]
    return str(settings.redis_url.get_secret_value())


def test_two_workers_sharing_redis_answer_as_one_worker_would(redis_url) -> None:  # type: ignore[no-untyped-def]
    """Frames of one track alternating between two workers (two clients, two stores) give the decisions
    one process gives for the same frames in order; a batch through either gives them too."""
    config = TrackConfig()
    workers = [RedisTracks(redis.Redis.from_url(redis_url), config) for _ in range(2)]
    expected = _view(MemoryTracks(config, Clock()).observe("m", "c", "t", FRAMES, T))
    track = f"alt-{np.random.default_rng().integers(1 << 60)}"
    alternating = [workers[i % 2].observe("m", "c", track, [f], T)[0] for i, f in enumerate(FRAMES)]
    assert _view(alternating) == expected
    batch = workers[1].observe("m", "c", track + "-batch", FRAMES, T)
    assert _view(batch) == expected
    assert alternating[-1].first_seen <= alternating[0].last_seen


def test_shared_evidence_expires_after_idle_and_names_no_one_in_its_keys(redis_url) -> None:  # type: ignore[no-untyped-def]
    client = redis.Redis.from_url(redis_url)
    store = RedisTracks(client, TrackConfig(idle=10.0, window=3))
    store.observe("m", "cam-7", "secret-track", FRAMES, T)
    frames_key, meta_key = store.keys("m", "cam-7", "secret-track")
    for key in (frames_key, meta_key):
        assert 0 < client.pttl(key) <= 10_000
        assert b"cam-7" not in key.encode() and b"secret-track" not in key.encode()
    assert client.llen(frames_key) == 4  # window + 1
    assert int(client.hget(meta_key, "n")) == len(FRAMES)  # type: ignore[arg-type]


def test_redis_down_falls_back_to_this_workers_own_evidence() -> None:
    from appliance.stack.process import free_port

    dead = redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.2, socket_timeout=0.2)
    store = RedisTracks(dead, TrackConfig(), Clock())
    decisions = [store.observe("m", "c", "t", [f], T)[0] for f in FRAMES]
    assert _view(decisions) == _view(MemoryTracks(TrackConfig(), Clock()).observe("m", "c", "t", FRAMES, T))


def test_settings_refuse_a_track_that_could_never_name_anyone() -> None:
    from pydantic import ValidationError

    from appliance.settings import Settings

    with pytest.raises(ValidationError, match="track_min_frames"):
        Settings(track_window=3, track_min_frames=4)
    assert Settings(track_window=3, track_min_frames=3).track_min_frames == 3


def test_auto_store_is_shared_exactly_when_there_are_several_workers(redis_url) -> None:  # type: ignore[no-untyped-def]
    from appliance.matching import track_store
    from appliance.settings import Settings

    client = redis.Redis.from_url(redis_url)
    assert isinstance(track_store(Settings(workers=1), client), MemoryTracks)
    assert isinstance(track_store(Settings(workers=2), client), RedisTracks)
    assert isinstance(track_store(Settings(workers=2, track_store="memory"), client), MemoryTracks)
    assert isinstance(track_store(Settings(workers=1, track_store="redis"), client), RedisTracks)


def test_redis_refusing_writes_falls_back_instead_of_failing_the_match(redis_url) -> None:  # type: ignore[no-untyped-def]
    """A Redis that answers but refuses the write (here: an ACL user without write rights; in the field:
    maxmemory with noeviction) must not turn a match into a 500."""
    admin = redis.Redis.from_url(redis_url)
    user, password = f"fusion-ro-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    admin.acl_setuser(user, enabled=True, passwords=[f"+{password}"], keys=["*"],
                      commands=["+@read", "+@scripting", "+@connection", "-@write"])
    try:
        kw = admin.connection_pool.connection_kwargs
        client = redis.Redis(host=kw["host"], port=kw["port"], username=user, password=password)
        store = RedisTracks(client, TrackConfig(), Clock())
        decisions = [store.observe("m", "c", "t", [f], T)[0] for f in FRAMES]
        assert _view(decisions) == _view(MemoryTracks(TrackConfig(), Clock()).observe("m", "c", "t", FRAMES, T))
    finally:
        admin.acl_deluser(user)
