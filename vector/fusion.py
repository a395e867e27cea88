"""Track fusion: several frames of one passer-by decide together before anyone is named.

A camera pipeline sends every frame of a face track with the same ``camera_id`` + ``track_id``. One
frame of a stranger can look like an enrolled person (LFW, dlib: a stranger's best cosine reaches 0.97);
several frames of the same stranger agree on the same wrong person less often. The rule, chosen on the
LFW embeddings by ``bench/accuracy.py`` (docs/benchmarks.md, "Accuracy"):

    a subject's track score is the mean, over the track's last ``window`` frames, of its similarity in
    each frame (a frame that did not list it counts its lowest listed similarity, an upper bound);
    the track names the best-scoring subject when that mean reaches the threshold AND at least
    ``min_frames`` of those frames reached the threshold for that same subject on their own.

So one lucky frame never names anyone (``min_frames`` ≥ 2), and a run of near misses does not either.
The threshold is the model's *track* threshold (``ModelSpec.track_threshold``, calibrated for the same
FAR per stranger track as the single-frame threshold per query: ``vector.calibration.track_scores``),
or the request's own ``threshold`` when it names one. A frame's own decision keeps the single-frame one.

Evidence is bounded: at most ``max_tracks`` tracks per process (least recently seen dropped first), each
forgotten ``idle`` seconds after its last frame, each holding its last ``window + 1`` frames of at most
``FRAME_CANDIDATES`` (subject, similarity) pairs — no embedding. Two stores give the same answers:
``MemoryTracks`` (one worker) and ``RedisTracks`` (several workers: the frames of one track may land on
any of them, so they share the evidence, one Redis round trip per frame or per batch).
"""

from __future__ import annotations

import hashlib
import struct
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import redis

FRAME_CANDIDATES = 5  # (subject, similarity) pairs kept per frame: enough to score the runner-up subjects


@dataclass(slots=True)
class TrackDecision:
    """The fused answer for one track after the frame just matched (contract with ``appliance.visits``)."""

    camera_id: str | None
    track_id: str
    decision: str  # "match" | "unknown"
    subject: bytes | None  # 16-byte subject id when decision == "match"
    score: float  # the fused score of ``subject`` (or of the best subject seen, when unknown)
    frames: int  # frames of this track seen so far, this one included
    changed: bool  # the fused decision (or its subject) changed with this frame
    first_seen: float  # unix seconds
    last_seen: float  # unix seconds
    threshold: float  # what the fused decision applied (the model's track threshold or the request's own)


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame's evidence: its best subjects (best first, one entry each) and their similarities."""

    subjects: tuple[bytes, ...]
    sims: tuple[float, ...]

    @classmethod
    def of(cls, candidates: Sequence[Any]) -> Frame:
        """From ``vector.matcher.Candidate``-like objects (``.subject``, ``.similarity``), best first."""
        top = candidates[:FRAME_CANDIDATES]
        return cls(tuple(c.subject for c in top), tuple(float(c.similarity) for c in top))

    def pack(self) -> bytes:
        """The Redis store's value: a count byte, then a 16-byte subject + float64 similarity per candidate."""
        return bytes((len(self.subjects),)) + b"".join(
            _PAIR.pack(s, x) for s, x in zip(self.subjects, self.sims, strict=True))

    @classmethod
    def unpack(cls, raw: bytes) -> Frame:
        return cls.unpack_many(raw)[0]

    @classmethod
    def unpack_many(cls, blob: bytes) -> list[Frame]:
        """Packed frames one after another (what the Redis store hands back in one reply)."""
        out, pos = [], 0
        while pos < len(blob):
            end = pos + 1 + blob[pos] * _PAIR.size
            pairs = list(_PAIR.iter_unpack(blob[pos + 1: end]))
            out.append(cls(tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)))
            pos = end
        return out


_PAIR = struct.Struct("<16sd")


@dataclass(frozen=True, slots=True)
class Fused:
    decision: str  # "match" | "unknown"
    subject: bytes | None  # the best-scoring subject (named only when decision == "match")
    score: float
    margin: float | None  # best subject's score minus the runner-up's


def _tally(frames: Sequence[Frame]) -> tuple[float, dict[bytes, float]]:
    """Threshold-free sums in one pass: the frames' floors (each frame's lowest listed similarity, what an
    unlisted subject is counted), and each subject's excess over them (a mean = (floors + excess) / n)."""
    excess: dict[bytes, float] = {}  # sum over frames of (similarity - that frame's floor)
    floor_sum = 0.0
    for f in frames:
        sims = f.sims
        floor = sims[-1] if sims else -1.0
        floor_sum += floor
        for s, x in zip(f.subjects, sims, strict=True):
            excess[s] = excess.get(s, 0.0) + (x - floor)
    return floor_sum, excess


def _listed(frames: Sequence[Frame], subject: bytes) -> list[float]:
    """``subject``'s own similarity in each frame that listed it (a frame lists a subject at most once)."""
    return [f.sims[f.subjects.index(subject)] for f in frames if subject in f.subjects]


def fuse(frames: Sequence[Frame], threshold: float, min_frames: int, min_margin: float | None = None) -> Fused:
    """The module rule over ``frames`` (oldest first). Deterministic: ties go to the smaller subject id,
    so every worker that sees the same frames gives the same answer. One pass, no sort: it runs once or
    twice per frame with a ``track_id`` on the match path."""
    floor_sum, excess = _tally(frames)
    if not excess:
        return Fused("unknown", None, -1.0, None)
    best = second = b""
    top = runner = float("-inf")
    for s, e in excess.items():
        if e > top or (e == top and s < best):
            second, runner, best, top = best, top, s, e
        elif e > runner or (e == runner and s < second):
            second, runner = s, e
    n = len(frames)
    score = (floor_sum + top) / n
    margin = (top - runner) / n if len(excess) > 1 else None
    named = n >= min_frames and score >= threshold and (min_margin is None or margin is None or margin >= min_margin)
    if named:  # ``_listed``, counted in place (per tracked frame on the match path)
        agree = 0
        for f in frames:
            if best in f.subjects and f.sims[f.subjects.index(best)] >= threshold:
                agree += 1
        named = agree >= min_frames
    return Fused("match" if named else "unknown", best, score, margin)


def naming_threshold(frames: Sequence[Frame], min_frames: int) -> tuple[bytes | None, float]:
    """Whom ``fuse`` would name and the highest threshold at which it still would (no ``min_margin``):
    one number per track, so ``bench/accuracy.py`` can draw a ROC of the rule itself. -2 (below every
    threshold) when it would name nobody at any threshold."""
    floor_sum, excess = _tally(frames)
    if not excess or len(frames) < min_frames:
        return None, -2.0
    best, top = min(excess.items(), key=lambda kv: (-kv[1], kv[0]))
    sims = sorted(_listed(frames, best), reverse=True)
    if len(sims) < min_frames:
        return best, -2.0
    return best, min((floor_sum + top) / len(frames), sims[min_frames - 1] if min_frames > 0 else 1.0)


@dataclass(frozen=True, slots=True)
class TrackConfig:
    window: int = 10  # frames fused (the most recent)
    min_frames: int = 2
    idle: float = 10.0  # seconds after a track's last frame before it is forgotten
    max_tracks: int = 10_000  # per process (memory store)


def _decide(frames: Sequence[Frame], config: TrackConfig, threshold: float, min_margin: float | None,
            camera_id: str | None, track_id: str, seen: int, first: float, now: float,
            before: Fused | None = None) -> tuple[TrackDecision, Fused]:
    """The decision after the newest of ``frames`` (which holds up to ``window + 1``: the extra one is
    only for the decision before this frame, so ``changed`` compares like with like). ``before``: that
    earlier decision when the caller still has it (same frames, same options: the same value)."""
    frames = list(frames)  # a deque does not slice
    fused = fuse(frames[-config.window:], threshold, config.min_frames, min_margin)
    if before is None and seen > 1:
        before = fuse(frames[:-1][-config.window:], threshold, config.min_frames, min_margin)
    named = fused.subject if fused.decision == "match" else None
    changed = before is None or before.decision != fused.decision or (
        fused.decision == "match" and before.subject != fused.subject)
    return TrackDecision(camera_id, track_id, fused.decision, named, fused.score, seen, changed, first, now,
                         threshold), fused


class TrackStore(Protocol):
    def observe(self, model: str, camera_id: str | None, track_id: str, frames: Sequence[Frame],
                threshold: float, min_margin: float | None = None) -> list[TrackDecision]:
        """Add ``frames`` (in order) to the track's evidence; one decision per frame, as if sent one by one."""
        ...


@dataclass(slots=True)
class _Track:
    frames: deque[Frame]
    seen: int
    first_seen: float
    last_seen: float
    last: tuple[float, float | None, Fused] | None = None  # (threshold, min_margin, decision) of the last frame


class MemoryTracks:
    """Evidence in this process: an LRU of tracks, each dropped after ``idle`` seconds without a frame."""

    def __init__(self, config: TrackConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self._tracks: OrderedDict[tuple[str, str | None, str], _Track] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._tracks)

    def observe(self, model: str, camera_id: str | None, track_id: str, frames: Sequence[Frame],
                threshold: float, min_margin: float | None = None) -> list[TrackDecision]:
        key = (model, camera_id, track_id)
        out: list[TrackDecision] = []
        with self._lock:
            now = self.clock()
            self._expire(now)
            track = self._tracks.pop(key, None)
            if track is None or now - track.last_seen > self.config.idle:
                track = _Track(deque(maxlen=self.config.window + 1), 0, now, now)
            for frame in frames:
                track.frames.append(frame)
                track.seen += 1
                track.last_seen = now
                last = track.last
                before = last[2] if last is not None and last[:2] == (threshold, min_margin) else None
                decision, fused = _decide(track.frames, self.config, threshold, min_margin, camera_id, track_id,
                                          track.seen, track.first_seen, now, before)
                track.last = (threshold, min_margin, fused)
                out.append(decision)
            self._tracks[key] = track  # most recently seen last
            while len(self._tracks) > self.config.max_tracks:
                self._tracks.popitem(last=False)
        return out

    def _expire(self, now: float) -> None:
        """Drop idle tracks from the least recently seen end (amortised O(1) per frame)."""
        tracks = self._tracks
        while tracks:
            oldest = next(iter(tracks.values()))
            if now - oldest.last_seen <= self.config.idle:
                break
            tracks.popitem(last=False)


# One atomic step per frame: count it, remember when the track began, append it, keep the last
# window + 1 frames, push both keys' expiry to ``idle`` from now, and hand back what the worker fuses.
_OBSERVE = """
local n = redis.call('HINCRBY', KEYS[2], 'n', 1)
if n == 1 then redis.call('HSET', KEYS[2], 'first', ARGV[2]) end
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[3]), -1)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return {n, redis.call('HGET', KEYS[2], 'first'), table.concat(redis.call('LRANGE', KEYS[1], 0, -1))}
"""


class RedisTracks:
    """Evidence shared by every worker of the host through Redis (several uvicorn workers: a track's
    frames land on any of them). Keys are a hash of (model, camera, track) and hold no id in clear; both
    expire ``idle`` seconds after the track's last frame. While Redis is unreachable each worker fuses
    the frames it sees itself (``fallback``), so matching never waits on Redis being back."""

    PREFIX = "appliance:track:"

    def __init__(self, client: redis.Redis, config: TrackConfig, clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.config = config
        self.clock = clock
        self.fallback = MemoryTracks(config, clock)
        self._script = client.register_script(_OBSERVE)

    def keys(self, model: str, camera_id: str | None, track_id: str) -> tuple[str, str]:
        digest = hashlib.blake2b(f"{model}\0{camera_id or ''}\0{camera_id is None}\0{track_id}".encode(),
                                 digest_size=12).hexdigest()
        base = f"{self.PREFIX}{{{digest}}}"  # hash tag: both keys in one slot on a Redis Cluster
        return base + ":frames", base + ":meta"

    def observe(self, model: str, camera_id: str | None, track_id: str, frames: Sequence[Frame],
                threshold: float, min_margin: float | None = None) -> list[TrackDecision]:
        keys = self.keys(model, camera_id, track_id)
        now = self.clock()
        ttl_ms = max(1, int(self.config.idle * 1000))
        try:
            if len(frames) == 1:
                replies = [self._script(keys, [frames[0].pack(), repr(now), self.config.window + 1, ttl_ms])]
            else:
                pipe = self.client.pipeline(transaction=False)
                for frame in frames:
                    self._script(keys, [frame.pack(), repr(now), self.config.window + 1, ttl_ms], client=pipe)
                replies = pipe.execute()
        except redis.RedisError:  # down, slow, or refusing writes (maxmemory): a match never fails for it
            return self.fallback.observe(model, camera_id, track_id, frames, threshold, min_margin)
        out = []
        for seen, first, raw in replies:
            window = Frame.unpack_many(raw)  # one bulk reply: cheaper to parse than one per frame
            out.append(_decide(window, self.config, threshold, min_margin, camera_id, track_id,
                               int(seen), float(first), now)[0])
        return out
