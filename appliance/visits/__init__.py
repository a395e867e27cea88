"""Visits: who passed which camera when, one row per passage (DESIGN.md, "Visits and retention").

A visit is a fused track (every frame of one ``camera_id`` + ``track_id``) or one match without a
track: first and last seen, camera, decision, subject when known, best similarity, frames. Nothing
else: no embedding, template or image, so an unknown visitor stays unknown.

- ``recorder``: the match path's side (an in-memory buffer) and the writer thread that upserts it.
- ``queries``: list, summary (with the hourly roll-up), erasure, export and retention of visits.
"""

from __future__ import annotations

from appliance.visits.recorder import VisitRecorder

__all__ = ["VisitRecorder"]
