"""``/v1/match`` over HTTP, through the same middleware and error map as every route: each failure is a
problem document carrying the request id, refusals say how to authenticate, request ids and metrics are
kept, successful matches stay out of the access log. Also the hand-written JSON reply."""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

import numpy as np
import pytest

from appliance.api.match import render
from appliance.matching import MatchResult
from tests.vector.conftest import DIM, MODEL, unit
from vector.matcher import Candidate, uuid_text

PROBLEM = "application/problem+json"
REQUESTS: list[tuple[str, dict[str, Any], int]] = [
    ("json", {"json": {"model": MODEL, "embedding": [0.3] * DIM, "k": 3}}, 200),
    ("batch", {"path": "/v1/match:batch", "json": {"model": MODEL, "embeddings": [[0.3] * DIM, [-0.2] * DIM]}}, 200),
    ("raw", {"path": f"/v1/match?model={MODEL}&k=4&threshold=0.5", "raw": np.full(DIM, 0.25, "<f4").tobytes()}, 200),
    ("wrong-dim", {"json": {"model": MODEL, "embedding": [0.3] * (DIM - 1)}}, 422),
    ("unknown-model", {"json": {"model": "nope", "embedding": [0.3] * DIM}}, 422),
    ("k-101", {"json": {"model": MODEL, "embedding": [0.3] * DIM, "k": 101}}, 422),
    ("bad-query", {"path": f"/v1/match?model={MODEL}&k=x", "raw": np.full(DIM, 0.25, "<f4").tobytes()}, 422),
    ("text-plain", {"text": "hello"}, 415),
    ("raw-ragged", {"path": f"/v1/match?model={MODEL}", "raw": b"\x00" * 10}, 422),
    ("nan", {"path": f"/v1/match?model={MODEL}", "raw": np.full(DIM, np.nan, "<f4").tobytes()}, 422),
    ("too-large", {"raw": b"\x00" * (4 * 1024 * 1024 + 1), "path": f"/v1/match?model={MODEL}"}, 413),
]


def _send(client: Any, headers: dict[str, str], req: dict[str, Any]) -> Any:
    path = req.get("path", "/v1/match")
    if "json" in req:
        return client.post(path, json=req["json"], headers=headers)
    if "raw" in req:
        return client.post(path, content=req["raw"], headers={**headers, "Content-Type": "application/octet-stream"})
    return client.post(path, content=req["text"], headers={**headers, "Content-Type": "text/plain"})


@pytest.mark.parametrize(("name", "req", "status"), REQUESTS, ids=[r[0] for r in REQUESTS])
def test_each_match_request_gets_its_answer_or_a_problem_with_its_request_id(ready_client, match_headers, name, req,
                                                                            status):  # type: ignore[no-untyped-def]
    r = _send(ready_client, match_headers, req)
    assert r.status_code == status, r.text
    rid = r.headers["x-request-id"]
    assert len(rid) == 32
    if status == 200:
        assert r.headers["content-type"] == "application/json"
        results = r.json()["results"] if name == "batch" else [r.json()]
        assert all(res["decision"] in ("match", "unknown") for res in results)
        return
    assert r.headers["content-type"] == PROBLEM
    problem = r.json()
    assert problem["status"] == status and problem["request_id"] == rid
    assert problem["instance"] == req.get("path", "/v1/match").split("?")[0]


def test_auth_errors_are_problems(ready_client, make_key):  # type: ignore[no-untyped-def]
    enroll_only = make_key("enroll", name="http-enroll")
    body = {"model": MODEL, "embedding": [0.3] * DIM}
    for headers, status in (({}, 401), ({"Authorization": "Bearer apl_nope_nope"}, 401), (enroll_only, 403)):
        r = ready_client.post("/v1/match", json=body, headers=headers)
        assert r.status_code == status
        assert r.headers["content-type"] == PROBLEM and r.json()["status"] == status
        assert (r.headers.get("www-authenticate") == "Bearer") == (status == 401)


def test_match_keeps_request_id_and_metrics(ready_client, match_headers):  # type: ignore[no-untyped-def]
    rid = "camera-7:track-42"
    r = ready_client.post("/v1/match", json={"model": MODEL, "embedding": unit(np.random.default_rng(3))[0].tolist()},
                          headers={**match_headers, "X-Request-ID": rid})
    assert r.status_code == 200 and r.headers["x-request-id"] == rid
    metrics = ready_client.get("/metrics").text
    assert 'appliance_http_requests_total{method="POST",route="/v1/match",status="200"}' in metrics


def test_successful_matches_stay_out_of_the_access_log(ready_client, match_headers, caplog):  # type: ignore[no-untyped-def]
    """Each match is in the audit trail already (``access_log_matches`` is off); a failed one is logged."""

    def logged() -> list[int]:
        return [rec.msg["status"] for rec in caplog.records if isinstance(rec.msg, dict)
                and rec.msg.get("event") == "request" and rec.msg.get("route") == "/v1/match"]

    with caplog.at_level(logging.INFO, logger="appliance.access"):
        good = ready_client.post("/v1/match", json={"model": MODEL, "embedding": [0.3] * DIM}, headers=match_headers)
        assert good.status_code == 200
        assert logged() == []
        bad = ready_client.post("/v1/match", json={"model": MODEL, "embedding": [0.3] * 3}, headers=match_headers)
        assert bad.status_code == 422
        assert logged() == [422]


def test_uuid_text_matches_uuid_str() -> None:
    for _ in range(200):
        u = uuid.uuid4()
        assert uuid_text(u.bytes) == str(u)


def test_render_is_the_documented_json() -> None:
    rng = np.random.default_rng(1)
    cands = [Candidate(uuid.uuid4().bytes, uuid.uuid4().bytes, i, float(np.float32(rng.random()))) for i in range(3)]
    for decision, threshold, path in (("match", 0.5, "hot"), ("unknown", 0.94, "cold")):
        r = MatchResult(decision, cands, threshold, "3.1234", path=path)
        got = json.loads(render(r))
        best = cands[0] if decision == "match" else None
        assert got == {
            "decision": decision,
            "subject_id": str(best.subject_id) if best else None,
            "similarity": round(cands[0].similarity, 6),
            "margin": None,
            "track": None,
            "threshold": threshold,
            "candidates": [{"subject_id": str(c.subject_id), "encoding_id": str(c.encoding_id),
                            "similarity": round(c.similarity, 6)} for c in cands],
            "index_version": "3.1234",
            "path": path,
        }
    empty = json.loads(render(MatchResult("unknown", [], 0.94, "1.0")))
    assert empty["candidates"] == [] and empty["subject_id"] is None and empty["similarity"] is None
