"""Bad input to the match and enrol endpoints is a 4xx problem+json that never echoes the vector."""

from __future__ import annotations

import numpy as np
import pytest

from tests.vector.conftest import DIM, MODEL

GOOD = [0.1] * DIM


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"model": MODEL, "embedding": [0.1] * (DIM - 1)}, 422),
        ({"model": MODEL, "embedding": [0.0] * DIM}, 422),
        ({"model": MODEL, "embedding": [1e39] + [0.1] * (DIM - 1)}, 422),
        ({"model": "no-such-model", "embedding": GOOD}, 422),
        ({"model": MODEL, "embedding": GOOD, "k": 0}, 422),
        ({"model": MODEL, "embedding": GOOD, "k": 101}, 422),
        ({"model": MODEL, "embedding": GOOD, "threshold": 1.5}, 422),
        ({"model": MODEL, "embedding": GOOD, "extra": 1}, 422),
    ],
    ids=["wrong-dim", "zero", "inf", "unknown-model", "k-zero", "k-101", "threshold", "unknown-field"],
)
def test_bad_match_requests_are_problems(ready_client, match_headers, body, status):
    r = ready_client.post("/v1/match", json=body, headers=match_headers)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert "0.1, 0.1" not in r.text


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_json_values_are_rejected(ready_client, match_headers, token):
    text = '{"model": "%s", "embedding": [%s%s]}' % (MODEL, token, ", 0.1" * (DIM - 1))  # noqa: UP031
    r = ready_client.post("/v1/match", content=text, headers={**match_headers, "Content-Type": "application/json"})
    assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json")


def test_raw_body_with_nan_or_partial_vector_is_rejected(ready_client, match_headers):
    x = np.full(DIM, 0.1, "<f4")
    x[3] = np.nan
    for body in (x.tobytes(), x.tobytes()[:-4]):
        r = ready_client.post(f"/v1/match?model={MODEL}", content=body,
                              headers={**match_headers, "Content-Type": "application/octet-stream"})
        assert r.status_code == 422, r.text


def test_batch_over_256_and_body_over_the_cap_are_rejected(ready_client, match_headers, settings):
    r = ready_client.post("/v1/match:batch", json={"model": MODEL, "embeddings": [GOOD] * 257}, headers=match_headers)
    assert r.status_code == 422
    big = b"\0" * (settings.max_body_bytes + 4)
    r = ready_client.post(f"/v1/match?model={MODEL}", content=big,
                          headers={**match_headers, "Content-Type": "application/octet-stream"})
    assert r.status_code == 413 and r.headers["content-type"].startswith("application/problem+json")


def test_match_needs_the_match_scope_and_enrol_the_enroll_scope(ready_client, match_headers, enroll_headers,
                                                                new_subject):
    r = ready_client.post("/v1/match", json={"model": MODEL, "embedding": GOOD}, headers=enroll_headers)
    assert r.status_code == 403
    r = ready_client.post("/v1/match", json={"model": MODEL, "embedding": GOOD})
    assert r.status_code == 401
    sid = new_subject()
    r = ready_client.post(f"/v1/subjects/{sid}/encodings", json={"model": MODEL, "vectors": [GOOD]},
                          headers=match_headers)
    assert r.status_code == 403


def test_bad_enrolments_are_problems(ready_client, enroll_headers, new_subject):
    sid = new_subject()
    cases = [
        ({"model": MODEL, "vectors": [[0.1] * 5]}, 422),
        ({"model": MODEL, "vectors": [[0.0] * DIM]}, 422),
        ({"model": "nope", "vectors": [GOOD]}, 422),
    ]
    for body, status in cases:
        r = ready_client.post(f"/v1/subjects/{sid}/encodings", json=body, headers=enroll_headers)
        assert r.status_code == status, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
    r = ready_client.post("/v1/subjects/00000000-0000-0000-0000-000000000001/encodings",
                          json={"model": MODEL, "vectors": [GOOD]}, headers=enroll_headers)
    assert r.status_code == 404
    r = ready_client.post(f"/v1/subjects/{sid}/encodings", content=b"\0" * 100,
                          headers={**enroll_headers, "Content-Type": "application/octet-stream"})
    assert r.status_code == 422  # no ?model=
