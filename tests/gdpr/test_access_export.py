"""The access export holds the subject's decrypted data and audit history, signed; it is itself audited."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile

import numpy as np
from cryptography.hazmat.primitives.serialization import load_pem_public_key


def test_access_export_is_a_signed_zip_of_decrypted_data_and_history(gdpr_client, admin_headers, staff_headers,
                                                                     make_subject, public_key_pem, state) -> None:
    subject = make_subject(person=5, n=2)
    probe = {"model": "dlib-resnet-v1", "embedding": subject["vectors"][0].tolist(), "k": 3}
    for _ in range(3):  # match events go to the writer's match blocks: the history must find them there
        r = gdpr_client.post("/v1/match", json=probe, headers=staff_headers)
        assert r.status_code == 200 and r.json()["subject_id"] == subject["id"], r.text
    assert state.audit.flush(10)
    r = gdpr_client.get(f"/v1/subjects/{subject['id']}/export", headers=admin_headers)
    assert r.status_code == 200, r.text
    zf = zipfile.ZipFile(io.BytesIO(r.content))
    manifest_bytes = zf.read("manifest.json")
    manifest = json.loads(manifest_bytes)
    signature = json.loads(zf.read("signature.json"))
    load_pem_public_key(public_key_pem).verify(bytes.fromhex(signature["signature"]), manifest_bytes)  # raises if bad
    for name, digest in manifest["files"].items():
        assert hashlib.sha256(zf.read(name)).hexdigest() == digest, name

    meta = json.loads(zf.read("subject.json"))
    assert meta["id"] == subject["id"] and meta["label"] == "Person 5"
    encodings = json.loads(zf.read("encodings.json"))
    assert sorted(e["id"] for e in encodings) == sorted(subject["encodings"])
    got = np.array([e["vector"] for e in encodings], np.float32)
    want = subject["vectors"] / np.linalg.norm(subject["vectors"], axis=1, keepdims=True)
    sims = (got / np.linalg.norm(got, axis=1, keepdims=True)) @ want.T
    assert np.allclose(np.sort(sims.max(axis=1)), 1.0, atol=1e-5)

    media = json.loads(zf.read("media.json"))
    photo = next(m for m in media if m["id"] == subject["media"]["id"])
    content = zf.read(photo["file"])
    assert content[:3] == b"\xff\xd8\xff" and hashlib.sha256(content).hexdigest() == subject["media"]["sha256"]
    thumbnails = [m for m in media if m["kind"] == "thumbnail"]  # sealed in their rows, opened like objects
    assert len(thumbnails) == 2
    for thumb in thumbnails:
        assert zf.read(thumb["file"])[8:12] == b"WEBP" and thumb["content_type"] == "image/webp"

    history = [json.loads(line) for line in zf.read("audit.jsonl").splitlines()]
    actions = {h["action"] for h in history}
    assert {"subject.create", "subject.export", "match"} <= actions
    assert sum(h["action"] == "match" for h in history) == 3
    assert all(h["subject_id"] == subject["id"] for h in history)


def test_access_export_needs_the_admin_scope_and_a_known_subject(gdpr_client, staff_headers, admin_headers) -> None:
    unknown = "00000000-0000-4000-8000-000000000001"
    assert gdpr_client.get(f"/v1/subjects/{unknown}/export", headers=staff_headers).status_code == 403
    assert gdpr_client.get(f"/v1/subjects/{unknown}/export", headers=admin_headers).status_code == 404


def test_erasure_waits_for_a_streaming_export_instead_of_cutting_its_zip(gdpr_client, admin_headers,
                                                                           make_subject) -> None:
    """An export holds the subject's export lock until its last byte: an erasure meanwhile answers 409 (the job
    resumes on retry), the zip arrives whole, and the retried erasure then completes."""
    subject = make_subject(person=7, n=2)
    with gdpr_client.stream("GET", f"/v1/subjects/{subject['id']}/export", headers=admin_headers) as export:
        assert export.status_code == 200
        chunks = export.iter_bytes()
        first = next(chunks)  # the stream has started: its objects are being read
        r = gdpr_client.delete(f"/v1/subjects/{subject['id']}", headers=admin_headers)
        assert r.status_code == 409, r.text
        assert "export" in r.json()["detail"]
        body = first + b"".join(chunks)
    zf = zipfile.ZipFile(io.BytesIO(body))
    assert zf.testzip() is None and "signature.json" in zf.namelist()
    media = json.loads(zf.read("media.json"))
    assert any(m["id"] == subject["media"]["id"] for m in media)
    r = gdpr_client.delete(f"/v1/subjects/{subject['id']}", headers=admin_headers)
    assert r.status_code == 200 and r.json()["state"] == "done", r.text
    r = gdpr_client.get(f"/v1/subjects/{subject['id']}/export", headers=admin_headers)
    assert r.status_code == 200  # an erased subject's export holds its metadata and history, no data
