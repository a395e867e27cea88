"""Track fusion: several frames of one passer-by decide together before anyone is named.

A camera pipeline sends every frame of a face track with the same ``camera_id`` + ``track_id``. One
frame of a stranger can look like an enrolled person (LFW: a stranger's best cosine reaches 0.97 at
dlib's scale); several frames of the same stranger rarely agree on the same wrong person. The rule and
its numbers are in docs/benchmarks.md ("Track fusion"); this module holds it and the bounded evidence.
"""

from __future__ import annotations

from dataclasses import dataclass


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
