"""Erasure is final on disk: what someone holding the disk *and* the appliance's credentials can recover.

The probe this answers (issue 17): after an erasure returned ``done`` and a CHECKPOINT, the erased
subject's wrapped DEK sat in a dead tuple of ``subject_keys``, unwrapped with the appliance's own
AppRole, and opened the sealed raw vectors carved from ``encodings``; the external reference was in
the clear in ``subjects`` and the WAL. Here we enrol a subject with real face vectors, a label, an
external reference and a photo, erase it, CHECKPOINT, then scan every file of the PostgreSQL data
directory (heap, indexes, WAL), of the object store and of the index snapshots for every value the
subject ever had, and try to open each wrapped key found with the appliance's own credentials.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest

from appliance import clients
from appliance.enrolment import encoding_aad, label_aad
from appliance.subject_keys import owner_name, wrap_context
from crypto.errors import CryptoError
from crypto.seal import open_sealed
from tests.gdpr.conftest import MODEL


def _files(*roots: Path) -> Iterator[Path]:
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                yield path


def _find(needles: dict[str, bytes], roots: list[Path]) -> dict[str, list[str]]:
    """Where each needle occurs on disk: ``{name: ["file@offset", ...]}``."""
    found: dict[str, list[str]] = {name: [] for name in needles}
    for path in _files(*roots):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        for name, needle in needles.items():
            at = data.find(needle)
            while at >= 0:
                found[name].append(f"{path}@{at}")
                at = data.find(needle, at + 1)
    return found


def _openers(provider: Any, subject_id: uuid.UUID, wrapped: bytes) -> list[str]:
    """Every way the appliance's credentials could open a wrapped DEK; returns those that worked."""
    opened = []
    attempts = {"KEK": lambda: provider.unwrap(wrapped, wrap_context(subject_id))}
    if hasattr(provider, "unwrap_owned"):
        attempts["owner key"] = lambda: provider.unwrap_owned(owner_name(subject_id), wrapped, wrap_context(subject_id))
    for how, attempt in attempts.items():
        try:
            attempt()
        except (CryptoError, ValueError):
            continue
        opened.append(how)
    return opened


WAL_PAGE = 8192


def _value_ending_at(data: bytes, end: int, length: int, wal: bool) -> bytes:
    """The ``length`` bytes of a value that ends at ``end``. In a WAL segment a record that crosses a page
    boundary has the next page's header in between (40 bytes on a segment's first page, 24 on the
    others), which is not part of the value: skip it, as PostgreSQL does when it reads the record back."""
    if not wal:
        return data[end - length : end]
    out, pos, need = b"", end, length
    while need > 0:
        page = (pos - 1) // WAL_PAGE * WAL_PAGE
        first = page + (40 if page == 0 else 24)
        start = max(pos - need, first)
        out = data[start:pos] + out
        need -= pos - start
        pos = page
    return out


@pytest.fixture
def erased_subject(gdpr_client, staff_headers, admin_headers, admin_dsn, faces) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """Enrol a subject with everything it can have, note every stored value, erase it and CHECKPOINT."""
    label = f"Forensic Label {uuid.uuid4().hex}"
    ref = f"forensic-ref-{uuid.uuid4().hex}"
    r = gdpr_client.post("/v1/subjects", json={"label": label, "external_ref": ref}, headers=staff_headers)
    assert r.status_code == 201, r.text
    sid = uuid.UUID(r.json()["id"])
    labels = faces["labels"]
    vectors = faces["vectors"][np.flatnonzero(labels == np.unique(labels)[5])[:3]]
    r = gdpr_client.post(f"/v1/subjects/{sid}/encodings", json={"model": MODEL, "vectors": vectors.tolist()},
                         headers=staff_headers)
    assert r.status_code == 201, r.text
    from tests.media.samples import jpeg, photo

    r = gdpr_client.post("/v1/media", params={"subject_id": str(sid), "kind": "image"}, content=jpeg(photo(seed=77)),
                         headers={**staff_headers, "Content-Type": "image/jpeg"})
    assert r.status_code == 201, r.text
    media_id = r.json()["id"]
    stored_image = gdpr_client.get(f"/v1/media/{media_id}", headers=staff_headers).content  # the plaintext kept
    with psycopg.connect(admin_dsn) as conn:
        wrapped = bytes(conn.execute("SELECT wrapped_dek FROM subject_keys WHERE subject_id = %s", (sid,))
                        .fetchone()[0])
        sealed = [(row[0], bytes(row[1])) for row in conn.execute(
            "SELECT id, raw_sealed FROM encodings WHERE subject_id = %s", (sid,)).fetchall()]
        label_sealed = bytes(conn.execute("SELECT label_sealed FROM subjects WHERE id = %s", (sid,)).fetchone()[0])
    r = gdpr_client.delete(f"/v1/subjects/{sid}", headers=admin_headers)
    assert r.status_code == 200 and r.json()["state"] == "done", r.text
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute("CHECKPOINT")
    return {"id": sid, "label": label, "ref": ref, "vectors": vectors, "wrapped": wrapped, "sealed": sealed,
            "label_sealed": label_sealed, "image": stored_image, "receipt": r.json()["receipt"]}


def test_erased_subject_cannot_be_recovered_from_disk_with_the_appliance_credentials(
    erased_subject, stack, settings, state
) -> None:  # type: ignore[no-untyped-def]
    s = erased_subject
    pg_data = Path(stack.postgres.dir) / "data"
    roots = [pg_data, Path(stack.s3.dir) / "data", Path(settings.var_dir) / "index"]
    raw32 = np.asarray(s["vectors"], "<f4")
    unit = (raw32 / np.linalg.norm(raw32, axis=1, keepdims=True)).astype("<f4")
    image = s["image"]
    needles = {
        "wrapped DEK": s["wrapped"][-40:],  # a tail is enough to find a copy; the copy is read whole below
        "label (plaintext)": s["label"].encode(),
        "external_ref (plaintext)": s["ref"].encode(),
        "label (sealed)": s["label_sealed"][-32:],
        **{f"raw vector {i} (plaintext)": raw32[i].tobytes()[:64] for i in range(len(raw32))},
        **{f"unit vector {i} (plaintext)": unit[i].tobytes()[:64] for i in range(len(unit))},
        **{f"sealed encoding {i}": blob[-32:] for i, (_, blob) in enumerate(s["sealed"])},
        "stored image (plaintext)": image[len(image) // 2 : len(image) // 2 + 64],
    }
    found = _find(needles, roots)

    # Plaintext never appears anywhere, in any file.
    for name, where in found.items():
        if "plaintext" in name:
            assert where == [], f"{name} found on disk: {where[:3]}"

    # The sealed copies are still on disk (dead tuples, WAL): that is what the shred must make useless.
    assert found["wrapped DEK"], "the scan found no copy of the wrapped DEK: it is not looking where PostgreSQL writes"
    provider = clients.key_provider(settings)  # the appliance's own credentials, fresh (no cache)
    try:
        for place in found["wrapped DEK"]:
            path, offset = place.rsplit("@", 1)
            data = Path(path).read_bytes()
            copy = _value_ending_at(data, int(offset) + 40, len(s["wrapped"]), wal="pg_wal" in Path(path).parts)
            assert copy == s["wrapped"], f"a different value ends like the wrapped DEK at {place}"
            assert _openers(provider, s["id"], copy) == [], f"the erased subject's wrapped DEK opens ({place})"
        # And nothing else would open the sealed blobs: no DEK is recoverable, so try the ones we can make.
        assert _openers(provider, s["id"], s["wrapped"]) == []
    finally:
        provider.close()
    for enc_id, blob in s["sealed"]:
        with pytest.raises(CryptoError):
            open_sealed(bytes(32), blob, encoding_aad(s["id"], enc_id, MODEL))
    with pytest.raises(CryptoError):
        open_sealed(bytes(32), s["label_sealed"], label_aad(s["id"]))

    # The receipt says what was destroyed and from when it became unrecoverable, and no more.
    receipt = s["receipt"]
    assert receipt["destroyed"]["owner_key"]["verified_absent"] is True
    assert receipt["unrecoverable"]["since"] is not None
    assert not state.keys.owned_exists(owner_name(s["id"]))


def test_template_rekey_makes_stale_templates_of_an_erased_subject_noise(
    gdpr_client, staff_headers, admin_headers, admin_dsn, faces, stack, settings, state
) -> None:  # type: ignore[no-untyped-def]
    """Protected templates are rotations, not seals: stale copies of an erased subject's templates stay on
    disk and are invertible with the model's template seed until the re-key destroys that seed."""
    from pgvector.psycopg import register_vector

    from appliance.index_admin import models_to_rekey, rotate_template_key
    from crypto.errors import KeyNotFound
    from crypto.template import TemplateKey
    from vector.templates import seed_context, seed_owner

    r = gdpr_client.post("/v1/subjects", json={"label": "template probe"}, headers=staff_headers)
    sid = r.json()["id"]
    labels = faces["labels"]
    vectors = faces["vectors"][np.flatnonzero(labels == np.unique(labels)[6])[:2]]
    r = gdpr_client.post(f"/v1/subjects/{sid}/encodings", json={"model": MODEL, "vectors": vectors.tolist()},
                         headers=staff_headers)
    assert r.status_code == 201, r.text
    with psycopg.connect(admin_dsn) as conn:
        register_vector(conn)
        rows = conn.execute("SELECT template, template_version FROM encodings WHERE subject_id = %s ORDER BY label",
                            (sid,)).fetchall()
        version = rows[0][1]
        dim, wrapped_seed = conn.execute("SELECT dim, wrapped_seed FROM template_keys WHERE model = %s AND "
                                         "version = %s", (MODEL, version)).fetchone()
    templates = np.stack([np.asarray(t.to_numpy() if hasattr(t, "to_numpy") else t, "<f4") for t, _ in rows])
    assert gdpr_client.delete(f"/v1/subjects/{sid}", headers=admin_headers).json()["state"] == "done"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute("CHECKPOINT")
    found = _find({"template": templates[0].tobytes()[:64]}, [Path(stack.postgres.dir) / "data"])
    assert found["template"], "no stale copy of the erased template on disk: the scan is not looking"

    provider = clients.key_provider(settings)
    try:
        # Before the re-key: the appliance's credentials open the seed and invert the stale template.
        seed = provider.unwrap_owned(seed_owner(MODEL, version), bytes(wrapped_seed), seed_context(MODEL, version))
        recovered = templates @ TemplateKey.from_seed(seed, MODEL, version, dim)._matrix
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        assert np.allclose(recovered, unit, atol=1e-4)  # the caveat in the receipt is real

        assert MODEL in models_to_rekey(state)
        result = rotate_template_key(state, MODEL, actor="test:rekey")
        assert result is not None and result.from_version == version
        with pytest.raises(KeyNotFound):  # the seed of that version is gone for everyone
            provider.unwrap_owned(seed_owner(MODEL, version), bytes(wrapped_seed), seed_context(MODEL, version))
        assert not provider.owned_exists(seed_owner(MODEL, version))
    finally:
        provider.close()
    with psycopg.connect(admin_dsn) as conn:
        destroyed = conn.execute("SELECT destroyed_at FROM template_keys WHERE model = %s AND version = %s",
                                 (MODEL, version)).fetchone()[0]
        audited = conn.execute("SELECT count(*) FROM audit_log WHERE action = 'key.destroy' "
                               "AND details::jsonb ->> 'version' = %s", (str(version),)).fetchone()[0]
    assert destroyed is not None and audited >= 1
    assert MODEL not in models_to_rekey(state)
