"""The raw ASGI match handler and the routed FastAPI endpoint are two doors to one implementation:
same answers, same problem documents, same audit and metrics. Also the hand-written JSON reply."""

from __future__ import annotations

import json
import uuid
from typing import Any

import numpy as np
import pytest

from appliance.api.match import render
from appliance.matching import MatchResult
from tests.vector.conftest import DIM, MODEL, unit
from vector.matcher import Candidate, uuid_text

FAST_KEYS = [("POST", "/v1/match"), ("POST", "/v1/match:batch")]


def _both(ready_client, send) -> tuple[Any, Any]:  # type: ignore[no-untyped-def]
    """``send()`` through the fast door, then again with it switched off (the routes stay registered)."""
    fast = send()
    table = ready_client.app.state.fast_routes
    saved = {k: table.pop(k) for k in FAST_KEYS}
    try:
        slow = send()
    finally:
        table.update(saved)
    return fast, slow


REQUESTS: list[tuple[str, dict[str, Any]]] = [
    ("json", {"json": {"model": MODEL, "embedding": [0.3] * DIM, "k": 3}}),
    ("batch", {"path": "/v1/match:batch", "json": {"model": MODEL, "embeddings": [[0.3] * DIM, [-0.2] * DIM]}}),
    ("raw", {"path": f"/v1/match?model={MODEL}&k=4&threshold=0.5", "raw": np.full(DIM, 0.25, "<f4").tobytes()}),
    ("wrong-dim", {"json": {"model": MODEL, "embedding": [0.3] * (DIM - 1)}}),
    ("unknown-model", {"json": {"model": "nope", "embedding": [0.3] * DIM}}),
    ("k-101", {"json": {"model": MODEL, "embedding": [0.3] * DIM, "k": 101}}),
    ("bad-query", {"path": f"/v1/match?model={MODEL}&k=x", "raw": np.full(DIM, 0.25, "<f4").tobytes()}),
    ("text-plain", {"text": "hello"}),
    ("raw-ragged", {"path": f"/v1/match?model={MODEL}", "raw": b"\x00" * 10}),
    ("nan", {"path": f"/v1/match?model={MODEL}", "raw": np.full(DIM, np.nan, "<f4").tobytes()}),
    ("too-large", {"raw": b"\x00" * (4 * 1024 * 1024 + 1), "path": f"/v1/match?model={MODEL}"}),
]


@pytest.mark.parametrize(("name", "req"), REQUESTS, ids=[r[0] for r in REQUESTS])
def test_fast_and_routed_doors_answer_alike(ready_client, match_headers, name, req):  # type: ignore[no-untyped-def]
    path = req.get("path", "/v1/match")

    def send() -> Any:
        if "json" in req:
            return ready_client.post(path, json=req["json"], headers=match_headers)
        if "raw" in req:
            return ready_client.post(path, content=req["raw"],
                                     headers={**match_headers, "Content-Type": "application/octet-stream"})
        return ready_client.post(path, content=req["text"], headers={**match_headers, "Content-Type": "text/plain"})

    fast, slow = _both(ready_client, send)
    assert fast.status_code == slow.status_code, (fast.text, slow.text)
    assert fast.headers["content-type"] == slow.headers["content-type"]
    a, b = fast.json(), slow.json()
    if fast.status_code >= 400:
        assert a["request_id"] != b["request_id"]
        a.pop("request_id"), b.pop("request_id")
        assert fast.headers["x-request-id"] and slow.headers["x-request-id"]
    assert a == b


def test_auth_errors_alike(ready_client, make_key):  # type: ignore[no-untyped-def]
    enroll_only = make_key("enroll", name="doors-enroll")
    body = {"model": MODEL, "embedding": [0.3] * DIM}
    for headers, status in (({}, 401), ({"Authorization": "Bearer apl_nope_nope"}, 401), (enroll_only, 403)):
        fast, slow = _both(ready_client, lambda h=headers: ready_client.post("/v1/match", json=body, headers=h))
        assert fast.status_code == slow.status_code == status
        assert fast.headers["content-type"] == slow.headers["content-type"] == "application/problem+json"
        if status == 401:
            assert fast.headers["www-authenticate"] == slow.headers["www-authenticate"] == "Bearer"


def test_fast_door_keeps_request_id_and_metrics(ready_client, match_headers):  # type: ignore[no-untyped-def]
    rid = "camera-7:track-42"
    r = ready_client.post("/v1/match", json={"model": MODEL, "embedding": unit(np.random.default_rng(3))[0].tolist()},
                          headers={**match_headers, "X-Request-ID": rid})
    assert r.status_code == 200 and r.headers["x-request-id"] == rid
    metrics = ready_client.get("/metrics").text
    assert 'appliance_http_requests_total{method="POST",route="/v1/match",status="200"}' in metrics


def test_uuid_text_matches_uuid_str() -> None:
    for _ in range(200):
        u = uuid.uuid4()
        assert uuid_text(u.bytes) == str(u)


def test_render_is_the_documented_json() -> None:
    rng = np.random.default_rng(1)
    cands = [Candidate(uuid.uuid4().bytes, uuid.uuid4().bytes, i, float(np.float32(rng.random()))) for i in range(3)]
    for decision, threshold in (("match", 0.5), ("unknown", 0.94)):
        r = MatchResult(decision, cands, threshold, "3.1234")
        got = json.loads(render(r))
        best = cands[0] if decision == "match" else None
        assert got == {
            "decision": decision,
            "subject_id": str(best.subject_id) if best else None,
            "similarity": round(cands[0].similarity, 6),
            "threshold": threshold,
            "candidates": [{"subject_id": str(c.subject_id), "encoding_id": str(c.encoding_id),
                            "similarity": round(c.similarity, 6)} for c in cands],
            "index_version": "3.1234",
        }
    empty = json.loads(render(MatchResult("unknown", [], 0.94, "1.0")))
    assert empty["candidates"] == [] and empty["subject_id"] is None and empty["similarity"] is None
