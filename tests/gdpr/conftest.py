"""GDPR fixtures: a subject with real dlib encodings, a capture, and what the appliance holds about it."""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import psycopg
import pytest

from tests.conftest import FACES as DATA

MODEL = "dlib-resnet-v1"


@pytest.fixture(scope="session")
def faces() -> dict[str, np.ndarray]:
    d = np.load(DATA)
    return {"vectors": d["vectors"].astype(np.float32), "labels": d["labels"]}


@pytest.fixture(scope="session")
def gdpr_client(client):  # type: ignore[no-untyped-def]
    service = client.app.state.appliance.matcher
    assert service.wait_ready(120), service.last_error
    return client


@pytest.fixture(scope="session")
def state(gdpr_client):  # type: ignore[no-untyped-def]
    return gdpr_client.app.state.appliance


@pytest.fixture(scope="session")
def staff_headers(make_key):  # type: ignore[no-untyped-def]
    return make_key("enroll", "media", "match", name="gdpr-staff")


@pytest.fixture(scope="session")
def public_key_pem(gdpr_client, make_key) -> bytes:  # type: ignore[no-untyped-def]
    """The public key as an auditor gets it: from the header of an audit export."""
    import json

    r = gdpr_client.get("/v1/audit/export", params={"action": "none"}, headers=make_key("audit"))
    assert r.status_code == 200
    return json.loads(r.content.split(b"\n", 1)[0])["public_key_pem"].encode()


@pytest.fixture
def make_subject(gdpr_client, staff_headers, faces, make_key):  # type: ignore[no-untyped-def]
    """A subject with a label, ``n`` encodings of one real person and optionally one photo.

    Every subject made here is erased at teardown (idempotent if the test erased it already), so the
    real faces do not linger in the shared index and confuse other tests' rank-1 checks.
    """
    created: list[str] = []

    def make(person: int = 0, n: int = 3, photo: bool = True) -> dict[str, Any]:
        r = gdpr_client.post("/v1/subjects", json={"label": f"Person {person}", "external_ref": uuid.uuid4().hex},
                             headers=staff_headers)
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        created.append(sid)
        labels = faces["labels"]
        idx = np.flatnonzero(labels == np.unique(labels)[person])[:n]
        vectors = faces["vectors"][idx]
        r = gdpr_client.post(f"/v1/subjects/{sid}/encodings", json={"model": MODEL, "vectors": vectors.tolist()},
                             headers=staff_headers)
        assert r.status_code == 201, r.text
        encodings = [e["encoding_id"] for e in r.json()["encodings"]]
        media = None
        if photo:
            from tests.media.samples import jpeg

            r = gdpr_client.post("/v1/media", params={"subject_id": sid, "kind": "image"}, content=jpeg(),
                                 headers={**staff_headers, "Content-Type": "image/jpeg"})
            assert r.status_code == 201, r.text
            media = r.json()
        return {"id": sid, "vectors": vectors, "encodings": encodings, "media": media}

    yield make
    admin = make_key("admin", name="gdpr-cleanup")
    for sid in created:
        gdpr_client.delete(f"/v1/subjects/{sid}", headers=admin)


def holdings(admin_dsn: str, subject_id: str) -> dict[str, Any]:
    """Everything stored about the subject, read with the owner role."""
    queries = {
        "encodings": "SELECT id, label FROM encodings WHERE subject_id = %(s)s ORDER BY label",
        # (id, object_key): thumbnails keep their sealed bytes in the row, so their object_key is NULL.
        "media": "SELECT id, object_key FROM media WHERE subject_id = %(s)s "
                 "OR parent_id IN (SELECT id FROM media WHERE subject_id = %(s)s) ORDER BY id",
        "key": "SELECT key_id FROM subject_keys WHERE subject_id = %(s)s",
        "subject": "SELECT state, label_sealed, external_ref, external_ref_hash, external_ref_sealed FROM subjects "
                   "WHERE id = %(s)s",
    }
    with psycopg.connect(admin_dsn) as conn:
        return {name: conn.execute(q, {"s": subject_id}).fetchall() for name, q in queries.items()}


def object_versions(state: Any, key: str) -> list[Any]:
    return [o for o in state.s3.list_objects(state.settings.s3_bucket, prefix=key, include_version=True)
            if o.object_name == key]
