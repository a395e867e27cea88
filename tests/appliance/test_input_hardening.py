"""Issue 17's probe findings, each a test against the real stack: bad input is a 422 problem document
(never a 500, never stored), vectors must normalise in float32, replies never carry inf/NaN, match is as
strict as its schema, clips are parsed, each parameter has one source, times are ISO."""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from appliance.api.match import render
from appliance.matching import MatchResult
from tests.media import samples
from tests.vector.conftest import DIM, MODEL
from vector.index import Hits
from vector.matcher import search_candidates

PROBLEM = "application/problem+json"
GOOD = [0.1] * DIM
FAKE_CLIP = (16).to_bytes(4, "big") + b"ftypmp42" + b"\x00" * 4 + random.Random(3).randbytes(64 * 1024)


@pytest.fixture(scope="module")
def ready(client):  # type: ignore[no-untyped-def]
    service = client.app.state.appliance.matcher
    assert service.wait_ready(120), service.last_error
    return client


@pytest.fixture(scope="module")
def keys(make_key) -> dict[str, dict[str, str]]:  # type: ignore[no-untyped-def]
    return {scope: make_key(scope, name=f"hardening-{scope}") for scope in ("match", "enroll", "media", "audit",
                                                                            "admin")}


@pytest.fixture
def subject(ready, keys) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """A fresh subject, erased afterwards so its encodings cannot answer other tests' probes."""
    r = ready.post("/v1/subjects", json={"external_ref": f"hardening-{uuid.uuid4().hex}"}, headers=keys["enroll"])
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    yield sid
    assert ready.delete(f"/v1/subjects/{sid}", headers=keys["admin"]).status_code == 200


def _no_constants(token: str) -> Any:
    raise AssertionError(f"reply holds {token}, which is not JSON")


def strict_json(text: str) -> Any:
    return json.loads(text, parse_constant=_no_constants)


def assert_problem(r: Any, status: int = 422) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    return strict_json(r.text)  # type: ignore[no-any-return]


def raw(vectors: Any) -> bytes:
    return np.asarray(vectors, "<f4").tobytes()


# --- NUL and other control characters in text -----------------------------------------------------


@pytest.mark.parametrize("bad", ["a\x00b", "tab\there", "line\nbreak", "del\x7f", "c1\x85"])
def test_control_characters_in_subject_text_are_422(ready, keys, bad):
    h = keys["enroll"]
    assert_problem(ready.post("/v1/subjects", json={"external_ref": bad}, headers=h))
    assert_problem(ready.post("/v1/subjects", json={"external_ref": f"ok-{uuid.uuid4().hex}", "label": bad},
                              headers=h))
    assert_problem(ready.get("/v1/subjects", params={"external_ref": bad}, headers=h))


def test_nul_in_a_label_patch_is_422_and_the_label_is_unchanged(ready, keys, subject):
    h = keys["enroll"]
    assert ready.patch(f"/v1/subjects/{subject}", json={"label": "Front door"}, headers=h).status_code == 200
    assert_problem(ready.patch(f"/v1/subjects/{subject}", json={"label": "x\x00"}, headers=h))
    assert ready.get(f"/v1/subjects/{subject}", headers=h).json()["label"] == "Front door"


@pytest.mark.parametrize("field", ["camera_id", "track_id", "model"])
def test_nul_in_match_options_is_422(ready, keys, field):
    h = keys["match"]
    body = {"model": MODEL, "embedding": GOOD, field: "cam\x00era"}
    assert_problem(ready.post("/v1/match", json=body, headers=h))
    query = {"model": MODEL, field: "cam\x00era"}
    assert_problem(ready.post("/v1/match", params=query, content=raw(GOOD),
                              headers={**h, "Content-Type": "application/octet-stream"}))
    batch = {"model": MODEL, "embeddings": [GOOD], field: "\x00"}
    assert_problem(ready.post("/v1/match:batch", json=batch, headers=h))


def test_nul_in_media_parameters_is_422(ready, keys):
    h = keys["media"]
    jpeg = samples.jpeg()
    assert_problem(ready.post("/v1/media", params={"camera_id": "gate\x00"}, content=jpeg,
                              headers={**h, "Content-Type": "application/octet-stream"}))
    assert_problem(ready.post("/v1/media", files={"file": ("x.jpg", jpeg, "image/jpeg")},
                              data={"camera_id": "gate\x00"}, headers=h))
    assert_problem(ready.get("/v1/media", params={"camera_id": "gate\x00"}, headers=h))
    assert_problem(ready.get("/v1/media", params={"cursor": "\x00"}, headers=h))


def test_nul_in_audit_export_filters_is_422(ready, keys):
    for params in ({"action": "match\x00"}, {"subject_id": "\x00"}):
        assert_problem(ready.get("/v1/audit/export", params=params, headers=keys["audit"]))


def _bulk(client: Any, headers: dict[str, str], lines: list[dict[str, Any]]) -> Any:
    body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    return client.post("/v1/encodings:bulk", content=body, headers={
        **headers, "Content-Type": "application/x-ndjson", "Idempotency-Key": f"hardening-{uuid.uuid4().hex}"})


@pytest.mark.parametrize("line", [
    {"external_ref": "bulk\x00ref", "model": MODEL, "vector": GOOD},
    {"external_ref": "ok", "model": MODEL + "\x00", "vector": GOOD},
    {"external_ref": "ok", "model": MODEL, "vector": ["0.1"] * DIM},
    {"external_ref": "ok", "model": MODEL, "vector": [True] * DIM},
    {"external_ref": "ok", "model": MODEL, "vector": [1e19] * DIM},
    {"external_ref": "ok", "model": MODEL, "vector": [1e-30] * DIM},
    {"external_ref": "ok", "model": MODEL, "vector": GOOD, "label": "not a line field"},
], ids=["nul-ref", "nul-model", "string-numbers", "booleans", "norm-overflow", "norm-underflow", "unknown-key"])
def test_bad_bulk_lines_are_422_naming_the_line(ready, keys, line):
    good = {"external_ref": f"hardening-{uuid.uuid4().hex}", "model": MODEL, "vector": GOOD}
    r = _bulk(ready, keys["enroll"], [line, good])
    problem = assert_problem(r)
    assert problem["line"] == 1 and problem["lines_committed"] == 0
    assert "0.1" not in r.text and "1e+19" not in r.text


# --- vector norms: finite, non-degenerate, normalisable in float32 ------------------------------------


@pytest.mark.parametrize("value", [1e-30, 1e-20, 1e19, 3e38], ids=["1e-30", "1e-20", "1e19", "3e38"])
def test_degenerate_norms_are_422_at_enrolment(ready, keys, subject, value):
    h = keys["enroll"]
    assert_problem(ready.post(f"/v1/subjects/{subject}/encodings", json={"model": MODEL, "vectors": [[value] * DIM]},
                              headers=h))
    assert_problem(ready.post(f"/v1/subjects/{subject}/encodings", params={"model": MODEL}, content=raw([value] * DIM),
                              headers={**h, "Content-Type": "application/octet-stream"}))
    assert ready.get(f"/v1/subjects/{subject}", headers=h).json()["encoding_count"] == 0


@pytest.mark.parametrize("value", [1e-30, 1e-20, 1e19, 3e38], ids=["1e-30", "1e-20", "1e19", "3e38"])
def test_degenerate_norms_are_422_for_every_match_body(ready, keys, value):
    h = keys["match"]
    vec = [value] * DIM
    sends = [
        lambda: ready.post("/v1/match", json={"model": MODEL, "embedding": vec}, headers=h),
        lambda: ready.post("/v1/match:batch", json={"model": MODEL, "embeddings": [GOOD, vec]}, headers=h),
        lambda: ready.post("/v1/match", params={"model": MODEL}, content=raw(vec),
                           headers={**h, "Content-Type": "application/octet-stream"}),
        lambda: ready.post("/v1/match:batch", params={"model": MODEL}, content=raw([GOOD, vec]),
                           headers={**h, "Content-Type": "application/octet-stream"}),
    ]
    for send in sends:
        problem = assert_problem(send())
        assert "norm" in problem["detail"] or "infinite" in problem["detail"]


def test_constant_vectors_match_with_a_finite_similarity(ready, keys, subject):
    """The probe's case: a constant vector enrolled, then matched (it answered ``"similarity": inf``)."""
    r = ready.post(f"/v1/subjects/{subject}/encodings", json={"model": MODEL, "vectors": [[0.5] * DIM]},
                   headers=keys["enroll"])
    assert r.status_code == 201, r.text
    h = keys["match"]
    for value in (0.5, 1e-12, 1e12, -0.25):
        vec = [value] * DIM
        sends = [
            lambda vec=vec: ready.post("/v1/match", json={"model": MODEL, "embedding": vec, "k": 1}, headers=h),
            lambda vec=vec: ready.post("/v1/match", params={"model": MODEL, "k": 1}, content=raw(vec),
                               headers={**h, "Content-Type": "application/octet-stream"}),
        ]
        for send in sends:
            r = send()
            assert r.status_code == 200, r.text
            out = strict_json(r.text)
            assert -1.0 <= out["similarity"] <= 1.0
            if value > 0:
                assert out["decision"] == "match" and out["subject_id"] == subject
                assert out["similarity"] == pytest.approx(1.0, abs=1e-5)
        r = ready.post("/v1/match:batch", json={"model": MODEL, "embeddings": [vec, GOOD], "k": 1}, headers=h)
        assert r.status_code == 200
        assert all(-1.0 <= res["similarity"] <= 1.0 for res in strict_json(r.text)["results"])


def test_similarities_are_clamped_before_they_reach_a_reply():
    """The last guard: whatever the index returns (a degenerate stored template), replies stay JSON."""
    sims = np.array([[np.inf, 1.0000004, np.nan, -np.inf]], np.float32)
    ids = np.arange(4 * 16, dtype=np.uint8).reshape(1, 4, 16)
    hits = Hits(sims, np.arange(4, dtype=np.int64)[None, :], ids, ids.copy())
    [cands] = search_candidates(lambda w: hits, 1, 4, 4, set(), oversample=1)
    assert [c.similarity for c in cands] == [1.0, 1.0, -1.0, -1.0]
    out = strict_json(render(MatchResult("match", cands, 0.5, "1.1")))
    assert out["similarity"] == 1.0 and all(-1.0 <= c["similarity"] <= 1.0 for c in out["candidates"])


# --- match validates types exactly as the schema says ---------------------------------------------------


@pytest.mark.parametrize(("change", "loc"), [
    ({"embedding": ["0.1"] * DIM}, ["embedding", 0]),
    ({"embedding": [True] * DIM}, ["embedding", 0]),
    ({"k": True}, ["k"]),
    ({"k": 1.5}, ["k"]),
    ({"k": "3"}, ["k"]),
    ({"threshold": "0.5"}, ["threshold"]),
    ({"threshold": True}, ["threshold"]),
    ({"camera_id": 7}, ["camera_id"]),
], ids=["string-numbers", "booleans", "k-bool", "k-float", "k-string", "threshold-string", "threshold-bool",
        "camera-int"])
def test_lax_types_are_422_at_match(ready, keys, change, loc):
    body = {"model": MODEL, "embedding": [0.123456] * DIM, **change}
    r = ready.post("/v1/match", json=body, headers=keys["match"])
    problem = assert_problem(r)
    assert loc in [e["loc"] for e in problem["errors"]]
    assert "0.123456" not in r.text and "'0.1'" not in r.text  # never echo vector values


def test_strict_types_still_take_integers_as_numbers(ready, keys):
    body = {"model": MODEL, "embedding": [1] * (DIM - 1) + [2], "k": 2, "threshold": 1}
    r = ready.post("/v1/match", json=body, headers=keys["match"])
    assert r.status_code == 200, r.text


def test_lax_types_are_422_at_json_enrolment(ready, keys, subject):
    for vectors in (["0.1"] * DIM, [True] * DIM):
        assert_problem(ready.post(f"/v1/subjects/{subject}/encodings", json={"model": MODEL, "vectors": [vectors]},
                                  headers=keys["enroll"]))


def test_nan_and_infinite_thresholds_are_422(ready, keys):
    h = {**keys["match"], "Content-Type": "application/octet-stream"}
    for value in ("nan", "inf", "-inf"):
        assert_problem(ready.post("/v1/match", params={"model": MODEL, "threshold": value}, content=raw(GOOD),
                                  headers=h))


# --- clips are parsed, not sniffed ----------------------------------------------------------------------


def test_a_fake_mp4_is_422_and_not_stored(ready, keys):
    h = keys["media"]
    camera = f"fake-{uuid.uuid4().hex[:8]}"
    assert_problem(ready.post("/v1/media", params={"camera_id": camera}, content=FAKE_CLIP,
                              headers={**h, "Content-Type": "video/mp4"}))
    assert_problem(ready.post("/v1/media", files={"file": ("clip.mp4", FAKE_CLIP, "video/mp4")},
                              data={"camera_id": camera}, headers=h))
    truncated = samples.mp4(50_000)[:-100]
    assert_problem(ready.post("/v1/media", params={"camera_id": camera}, content=truncated,
                              headers={**h, "Content-Type": "video/mp4"}))
    assert ready.get("/v1/media", params={"camera_id": camera}, headers=h).json()["items"] == []


def test_real_container_structures_are_accepted(ready, keys):
    h = {**keys["media"], "Content-Type": "application/octet-stream"}
    for body, ctype in ((samples.mp4(40_000, moov_first=False), "video/mp4"), (samples.webm(40_000), "video/webm"),
                        (samples.webm(40_000, None, live=True), "video/webm")):
        r = ready.post("/v1/media", content=body, headers=h)
        assert r.status_code == 201, r.text
        assert r.json()["content_type"] == ctype and r.json()["size_bytes"] == len(body)


# --- one source per parameter ---------------------------------------------------------------------------


def test_a_parameter_in_both_query_and_form_is_422(ready, keys, subject):
    h = keys["media"]
    files = {"file": ("x.jpg", samples.jpeg(), "image/jpeg")}
    problem = assert_problem(ready.post("/v1/media", params={"camera_id": "a"}, files=files,
                                        data={"camera_id": "b"}, headers=h))
    assert "camera_id" in problem["detail"] and problem["conflicting"] == ["camera_id"]
    other = str(uuid.uuid4())
    problem = assert_problem(ready.post("/v1/media", params={"subject_id": subject}, files=files,
                                        data={"subject_id": other}, headers=h))
    assert "subject_id" in problem["detail"]
    assert_problem(ready.post("/v1/media", params=[("camera_id", "a"), ("camera_id", "b")], content=samples.jpeg(),
                              headers={**h, "Content-Type": "application/octet-stream"}))
    assert_problem(ready.post("/v1/media", files=files, data={"camera": "misspelt"}, headers=h))
    r = ready.post("/v1/media", params={"subject_id": subject}, files=files, data={"camera_id": "b"}, headers=h)
    assert r.status_code == 201 and r.json()["subject_id"] == subject and r.json()["camera_id"] == "b"


def test_match_and_enrol_options_have_one_source(ready, keys, subject):
    h = keys["match"]
    json_and_query = lambda: ready.post("/v1/match", params={"model": MODEL},  # noqa: E731
                                        json={"model": MODEL, "embedding": GOOD}, headers=h)
    repeated = lambda: ready.post("/v1/match", params=[("model", MODEL), ("k", "1"), ("k", "9")],  # noqa: E731
                                  content=raw(GOOD), headers={**h, "Content-Type": "application/octet-stream"})
    for send in (json_and_query, repeated):
        assert_problem(send())
    assert_problem(ready.post(f"/v1/subjects/{subject}/encodings", params={"model": MODEL},
                              json={"model": MODEL, "vectors": [GOOD]}, headers=keys["enroll"]))


# --- times are ISO 8601 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["6.1e-05", "1700000000", "0", "-1"])
def test_numeric_times_are_422(ready, keys, value):
    audit, media = keys["audit"], keys["media"]
    assert_problem(ready.get("/v1/audit/export", params={"to": value}, headers=audit))
    assert_problem(ready.get("/v1/audit/export", params={"from": value}, headers=audit))
    assert_problem(ready.get("/v1/media", params={"from": value}, headers=media))
    assert_problem(ready.post("/v1/media", params={"captured_at": value}, content=samples.jpeg(),
                              headers={**media, "Content-Type": "application/octet-stream"}))
    assert_problem(ready.post("/v1/media", files={"file": ("x.jpg", samples.jpeg(), "image/jpeg")},
                              data={"captured_at": value}, headers=media))


def test_iso_times_still_work(ready, keys):
    r = ready.get("/v1/audit/export", params={"from": "2026-01-01T00:00:00Z", "to": "2099-01-01T00:00:00+00:00",
                                              "action": "none"}, headers=keys["audit"])
    assert r.status_code == 200, r.text
    r = ready.get("/v1/media", params={"from": "2026-01-01", "to": "2099-01-01T00:00:00Z"}, headers=keys["media"])
    assert r.status_code == 200, r.text
