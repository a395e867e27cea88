"""Margin, ``min_margin`` and track fusion through the API, on the session's appliance and, for the
2-worker rule, on a 2-worker ``appliance serve`` over the same stack. Real LFW dlib embeddings
(../shared/data/faces_more_dlib128.npz); thresholds are sent with each request, so a calibrated default
elsewhere in the suite cannot move them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from appliance.api.match import MatchResponse, render
from appliance.matching import MatchResult
from appliance.stack.process import free_port
from tests.conftest import FACES
from tests.vector.conftest import MODEL, unit
from vector.fusion import TrackDecision
from vector.matcher import Candidate

LFW = FACES.parent / "faces_more_dlib128.npz"
T = 0.94
RAW = {"Content-Type": "application/octet-stream"}


def _track_id() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def lfw_site(ready_client, enroll_headers, match_headers) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """60 LFW people with at least 6 images, 3 images each enrolled; their images 3-5 are genuine
    frames; strangers are 300 people never enrolled, 3 images each."""
    data = np.load(LFW)
    vectors, labels = data["vectors"].astype(np.float32), data["labels"]
    people = sorted(set(labels.tolist()))
    rows = {p: np.flatnonzero(labels == p) for p in people}
    enrolled = [p for p in people if len(rows[p]) >= 6][:60]
    subject_of = {}
    for p in enrolled:
        r = ready_client.post("/v1/subjects", json={"label": p, "external_ref": f"lfw-fusion-{uuid.uuid4().hex}"},
                              headers=enroll_headers)
        assert r.status_code == 201, r.text
        subject_of[p] = r.json()["id"]
        r = ready_client.post(f"/v1/subjects/{subject_of[p]}/encodings",
                              json={"model": MODEL, "vectors": vectors[rows[p][:3]].tolist()}, headers=enroll_headers)
        assert r.status_code == 201, r.text
    strangers = [p for p in people if p not in set(enrolled) and len(rows[p]) >= 3][:300]
    return {"vectors": vectors, "rows": rows, "enrolled": enrolled, "subject_of": subject_of, "strangers": strangers}


def _one_by_one(client: Any, headers: dict[str, str], frames: np.ndarray, track: str, **opts: Any) -> list[dict]:
    out = []
    for v in frames:
        r = client.post("/v1/match", json={"model": MODEL, "embedding": v.tolist(), "k": 3, "threshold": T,
                                           "camera_id": "door-1", "track_id": track, **opts}, headers=headers)
        assert r.status_code == 200, r.text
        out.append(r.json())
    return out


def test_stranger_tracks_crossing_the_threshold_once_stay_unknown(ready_client, match_headers, lfw_site) -> None:  # type: ignore[no-untyped-def]
    vectors, rows = lfw_site["vectors"], lfw_site["rows"]
    once = []
    for p in lfw_site["strangers"]:
        frames = vectors[rows[p][:3]]
        r = ready_client.post("/v1/match:batch", json={"model": MODEL, "embeddings": frames.tolist(), "threshold": T},
                              headers=match_headers)
        if sum(res["decision"] == "match" for res in r.json()["results"]) == 1:
            once.append(frames)
    assert len(once) >= 3, "no stranger of the sample crosses the threshold exactly once any more"
    for frames in once:
        for order in (frames, frames[::-1]):  # the crossing frame first, then last
            answers = _one_by_one(ready_client, match_headers, order, _track_id())
            assert sum(a["decision"] == "match" for a in answers) == 1  # the frames alone: one false accept
            assert [a["track"]["decision"] for a in answers] == ["unknown"] * 3
            assert [a["track"]["frames"] for a in answers] == [1, 2, 3]


def test_genuine_three_frame_tracks_name_the_right_person(ready_client, match_headers, lfw_site) -> None:  # type: ignore[no-untyped-def]
    vectors, rows, subject_of = lfw_site["vectors"], lfw_site["rows"], lfw_site["subject_of"]
    named = 0
    for p in lfw_site["enrolled"]:
        last = _one_by_one(ready_client, match_headers, vectors[rows[p][3:6]], _track_id())[-1]["track"]
        if last["decision"] == "match":
            assert last["subject_id"] == subject_of[p]
            assert last["score"] >= T
            named += 1
    assert named >= 0.9 * len(lfw_site["enrolled"]), named  # bench/accuracy.py: 0.93 at a 0.946 threshold


def test_without_a_threshold_the_track_applies_the_models_track_threshold(ready_client, match_headers,
                                                                         admin_headers, lfw_site) -> None:  # type: ignore[no-untyped-def]
    """No ``threshold`` in the request: each frame decides at the model's threshold, the track at its
    (lower) track threshold, so a genuine track is named although fewer than 2 of its frames match alone
    (before, the track was held to the frame threshold and needed 2 such frames)."""
    models = {m["model"]: m for m in ready_client.get("/v1/models", headers=admin_headers).json()}
    single, fused = models[MODEL]["threshold"], models[MODEL]["track_threshold"]
    assert fused < single
    vectors, rows, subject_of = lfw_site["vectors"], lfw_site["rows"], lfw_site["subject_of"]
    named_by_fusion = named = 0
    for p in lfw_site["enrolled"]:
        answers = []
        track = _track_id()
        for v in vectors[rows[p][3:6]]:
            r = ready_client.post("/v1/match", json={"model": MODEL, "embedding": v.tolist(), "k": 3,
                                                     "camera_id": "door-1", "track_id": track}, headers=match_headers)
            assert r.status_code == 200, r.text
            answers.append(r.json())
        assert {a["threshold"] for a in answers} == {single} and {a["track"]["threshold"] for a in answers} == {fused}
        last = answers[-1]["track"]
        if last["decision"] == "match":
            assert last["subject_id"] == subject_of[p] and last["score"] >= fused
            named += 1
            named_by_fusion += sum(a["decision"] == "match" and a["subject_id"] == subject_of[p] for a in answers) < 2
    assert named_by_fusion >= 1, "no genuine track needed the track threshold: the data no longer shows it"
    assert named > sum(1 for p in lfw_site["enrolled"]) * 0.3, named


def test_batch_of_a_track_answers_as_its_frames_one_by_one(ready_client, match_headers, lfw_site) -> None:  # type: ignore[no-untyped-def]
    vectors, rows = lfw_site["vectors"], lfw_site["rows"]
    p = lfw_site["enrolled"][0]
    frames = np.concatenate([vectors[rows[p][3:6]], vectors[rows[lfw_site["strangers"][0]][:2]]])
    singles = _one_by_one(ready_client, match_headers, frames, _track_id())
    r = ready_client.post("/v1/match:batch", json={"model": MODEL, "embeddings": frames.tolist(), "k": 3,
                                                   "threshold": T, "camera_id": "door-1", "track_id": _track_id()},
                          headers=match_headers)
    assert r.status_code == 200, r.text
    batch = r.json()["results"]
    assert [b["track"] for b in batch] == [s["track"] for s in singles]
    assert [b["track"]["frames"] for b in batch] == [1, 2, 3, 4, 5]
    raw = ready_client.post(f"/v1/match:batch?model={MODEL}&k=3&threshold={T}&camera_id=door-1&track_id={_track_id()}",
                            content=frames.astype("<f4").tobytes(), headers={**match_headers, **RAW})
    assert [b["track"] for b in raw.json()["results"]] == [s["track"] for s in singles]


def _two_subjects(rng: np.random.Generator, apart: float, new_subject, enrol) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    """Two new subjects of one template each, the second ``apart`` (noise norm) from the first."""
    a = unit(rng)[0]
    b = a + apart * unit(rng)[0]
    b /= np.linalg.norm(b)
    enrol(new_subject(), a[None])
    enrol(new_subject(), b[None])
    return a, b


def test_every_answer_carries_the_margin_to_the_runner_up(ready_client, match_headers, new_subject, enrol) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(11)
    a, b = _two_subjects(rng, 0.3, new_subject, enrol)
    for v in unit(rng, 3):  # at least k = 5 subjects, whatever other tests enrolled before this one
        enrol(new_subject(), v[None])
    probe = a + 0.05 * unit(rng)[0]
    for k in (1, 5):
        r = ready_client.post("/v1/match", json={"model": MODEL, "embedding": probe.tolist(), "k": k},
                              headers=match_headers)
        body = r.json()
        assert len(body["candidates"]) == k and body["track"] is None
        p = probe / np.linalg.norm(probe)
        assert body["margin"] == pytest.approx(float(p @ a) - float(p @ b), abs=1e-5)


def test_min_margin_answers_a_close_call_unknown(ready_client, match_headers, new_subject, enrol) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(12)
    a, b = _two_subjects(rng, 0.08, new_subject, enrol)
    probe = (a + b) / 2 + 0.002 * unit(rng)[0]
    base = {"model": MODEL, "embedding": probe.tolist(), "threshold": 0.9}
    plain = ready_client.post("/v1/match", json=base, headers=match_headers).json()
    assert plain["decision"] == "match" and plain["margin"] < 0.01
    strict = ready_client.post("/v1/match", json={**base, "min_margin": 0.01}, headers=match_headers).json()
    assert (strict["decision"], strict["subject_id"], strict["margin"]) == ("unknown", None, plain["margin"])
    raw = ready_client.post(f"/v1/match?model={MODEL}&threshold=0.9&min_margin=0.01",
                            content=probe.astype("<f4").tobytes(), headers={**match_headers, **RAW}).json()
    assert raw["decision"] == "unknown"
    loose = ready_client.post(f"/v1/match?model={MODEL}&threshold=0.9&min_margin=0",
                              content=probe.astype("<f4").tobytes(), headers={**match_headers, **RAW}).json()
    assert loose["decision"] == "match"
    bad = ready_client.post("/v1/match", json={**base, "min_margin": -0.1}, headers=match_headers)
    assert bad.status_code == 422 and bad.headers["content-type"] == "application/problem+json"


def test_the_match_audit_record_carries_the_track_outcome(ready_client, match_headers, lfw_site,
                                                          monkeypatch) -> None:  # type: ignore[no-untyped-def]
    audit = ready_client.app.state.appliance.audit
    seen: list[Any] = []
    submit = audit.submit

    def recording(event: Any) -> Any:
        seen.append(event)
        return submit(event)

    monkeypatch.setattr(audit, "submit", recording)
    p = lfw_site["enrolled"][1]
    track = _track_id()
    frames = lfw_site["vectors"][lfw_site["rows"][p][3:5]]
    _one_by_one(ready_client, match_headers, frames, track)
    ready_client.post("/v1/match", json={"model": MODEL, "embedding": frames[0].tolist()}, headers=match_headers)
    ours = [e for e in seen if e.action == "match" and e.details.get("track_id") == track]
    assert [e.details["track_frames"] for e in ours] == [1, 2]
    assert ours[0].details["track"] == "unknown"  # one frame never names anyone
    plain = [e for e in seen if e.action == "match" and e.details.get("track_id") is None]
    assert plain and all("track" not in e.details for e in plain)


def test_render_of_margin_and_track_is_the_documented_model() -> None:
    rng = np.random.default_rng(2)
    cands = [Candidate(uuid.uuid4().bytes, uuid.uuid4().bytes, i, float(rng.random())) for i in range(2)]
    for track in (None, TrackDecision("cam", "t", "match", cands[0].subject, 0.951234567, 3, True, 1.0, 2.0, 0.9578),
                  TrackDecision(None, "t", "unknown", None, -1.0, 1, False, 1.0, 1.0, 0.5)):
        r = MatchResult("match", cands, 0.5, "1.2", margin=0.1234567, track=track)
        doc = MatchResponse.model_validate_json(render(r))
        assert doc.margin == 0.123457
        if track is None:
            assert doc.track is None
        else:
            assert doc.track is not None
            assert (doc.track.decision, doc.track.frames, doc.track.changed) == (track.decision, track.frames,
                                                                                  track.changed)
            assert doc.track.subject_id == (uuid.UUID(bytes=track.subject) if track.subject else None)
            assert doc.track.score == round(track.score, 6) and doc.track.threshold == track.threshold
    assert MatchResponse.model_validate_json(render(MatchResult("unknown", [], 0.9, "1.0"))).margin is None


# --- two workers ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_workers(stack, ready_client, match_headers, lfw_site, tmp_path_factory) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """``appliance serve --workers 2`` on the session stack (its own var dir: snapshots, tombstone file)."""
    root = tmp_path_factory.mktemp("fusion-2workers")
    port = free_port()
    env = {**os.environ, "APPLIANCE_CONFIG": str(stack.config_file), "APPLIANCE_VAR_DIR": str(root),
           "APPLIANCE_LOG_LEVEL": "WARNING"}
    with open(root / "api.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "appliance", "serve", "--port", str(port), "--workers", "2"],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        ready = 0
        while ready < 20:  # fresh connections land on either worker: every one must be warm
            assert time.monotonic() < deadline and proc.poll() is None, (root / "api.log").read_text()[-2000:]
            try:
                r = httpx.get(url + "/v1/index", headers=match_headers, timeout=5)
                ready = ready + 1 if r.status_code == 200 and r.json()["ready"] else 0
            except httpx.TransportError:
                ready = 0
            if not ready:
                time.sleep(0.2)
        yield url
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)


def test_two_workers_share_a_tracks_evidence(lfw_site, two_workers, ready_client, match_headers) -> None:  # type: ignore[no-untyped-def]
    """Each frame on a new connection (so on either worker): the answers are the one-process answers."""
    vectors, rows = lfw_site["vectors"], lfw_site["rows"]
    p = lfw_site["enrolled"][2]
    frames = np.concatenate([vectors[rows[p][3:6]], vectors[rows[lfw_site["strangers"][1]][:3]]])
    expected = _one_by_one(ready_client, match_headers, frames, _track_id())
    track = _track_id()
    got = []
    for v in frames:
        with httpx.Client(base_url=two_workers, headers=match_headers, timeout=10) as c:
            r = c.post("/v1/match", json={"model": MODEL, "embedding": v.tolist(), "k": 3, "threshold": T,
                                          "camera_id": "door-1", "track_id": track})
        assert r.status_code == 200, r.text
        got.append(r.json()["track"])
    assert got == [e["track"] for e in expected]
    assert [g["frames"] for g in got] == [1, 2, 3, 4, 5, 6]
    assert json.dumps(got).count('"match"') >= 1  # the genuine frames named the person
