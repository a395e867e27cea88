"""Enrolment and matching through the API, against the real stack."""

from __future__ import annotations

import numpy as np

from tests.vector.conftest import DIM, MODEL, unit


def test_enrolled_subject_is_matched_and_a_stranger_is_unknown(ready_client, new_subject, enrol, match_headers):
    rng = np.random.default_rng(1)
    sid = new_subject(label="Ada")
    v = unit(rng)[0]
    enrolled = enrol(sid, np.stack([v, v + 0.05 * unit(rng)[0]]))
    assert len(enrolled) == 2
    probe = v + 0.01 * unit(rng)[0]
    r = ready_client.post("/v1/match", json={"model": MODEL, "embedding": probe.tolist(), "k": 5},
                          headers=match_headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["decision"] == "match" and body["subject_id"] == sid
    assert [c["subject_id"] for c in body["candidates"]].count(sid) == 1  # one candidate per subject
    stranger = unit(rng)[0]
    r = ready_client.post("/v1/match", json={"model": MODEL, "embedding": stranger.tolist()}, headers=match_headers)
    assert r.json()["decision"] == "unknown" and r.json()["subject_id"] is None


def test_raw_float32_bodies_enrol_and_match(ready_client, new_subject, enroll_headers, match_headers):
    rng = np.random.default_rng(2)
    sid = new_subject()
    v = unit(rng, 3) * 7.0  # not normalised: the appliance normalises
    r = ready_client.post(f"/v1/subjects/{sid}/encodings?model={MODEL}", content=v.astype("<f4").tobytes(),
                          headers={**enroll_headers, "Content-Type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    r = ready_client.post(f"/v1/match:batch?model={MODEL}&k=3", content=v.astype("<f4").tobytes(),
                          headers={**match_headers, "Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 3 and all(x["subject_id"] == sid and x["similarity"] > 0.999 for x in results)


def test_subject_metadata_and_label_never_expose_vectors(ready_client, new_subject, enrol, enroll_headers):
    sid = new_subject(label="Grace")
    enrol(sid, unit(np.random.default_rng(3), 2))
    r = ready_client.get(f"/v1/subjects/{sid}", headers=enroll_headers)
    assert r.status_code == 200
    body = r.json()
    assert body["label"] == "Grace" and body["encoding_count"] == 2 and "vector" not in r.text
    r = ready_client.patch(f"/v1/subjects/{sid}", json={"label": "Grace H."}, headers=enroll_headers)
    assert r.status_code == 200 and r.json()["label"] == "Grace H."
    page = ready_client.get("/v1/subjects", params={"limit": 2}, headers=enroll_headers).json()
    assert len(page["items"]) == 2 and page["next_after"]
    nxt = ready_client.get("/v1/subjects", params={"limit": 2, "after": page["next_after"]}, headers=enroll_headers)
    assert nxt.status_code == 200 and nxt.json()["items"][0]["id"] > page["next_after"]


def test_postgres_holds_no_raw_vector(ready_client, new_subject, enrol, admin_dsn):
    import psycopg
    from pgvector.psycopg import register_vector

    rng = np.random.default_rng(4)
    raw = unit(rng, 4) * 3.0
    sid = new_subject(label="secret label")
    ids = [e["encoding_id"] for e in enrol(sid, raw)]
    normalised = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    with psycopg.connect(admin_dsn) as conn:
        register_vector(conn)
        rows = conn.execute("SELECT id::text, template, raw_sealed FROM encodings WHERE id::text = ANY(%s)",
                            (ids,)).fetchall()
        label_sealed = conn.execute("SELECT label_sealed FROM subjects WHERE id = %s", (sid,)).fetchone()[0]
    assert len(rows) == 4
    templates = np.stack([r[1].to_numpy() for r in rows])
    # Protected templates keep norms and mutual similarities, yet are far from every raw input.
    assert np.allclose(np.linalg.norm(templates, axis=1), 1, atol=1e-5)
    assert np.abs(templates @ normalised.T).max() < 0.5
    assert np.allclose(np.sort((templates @ templates.T).ravel()), np.sort((normalised @ normalised.T).ravel()),
                       atol=1e-5)
    for r in rows:
        blob = bytes(r[2])
        assert all(x.astype("<f4").tobytes()[:16] not in blob for x in np.vstack([raw, normalised]))
    assert b"secret label" not in bytes(label_sealed)


def test_index_dimension_matches_model(ready_client):
    service = ready_client.app.state.appliance.matcher
    assert service.models[MODEL].dim == DIM
