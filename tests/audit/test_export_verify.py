"""An export verifies offline with only the public key, and verify pinpoints each kind of tampering."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from appliance.audit import AuditEvent
from appliance.audit.chain import canonical_json, header_hash, header_of
from appliance.audit.export import ExportFilter, export_lines
from appliance.audit.verify import verify_export

SUBJECT_A, SUBJECT_B = uuid.uuid4(), uuid.uuid4()


@pytest.fixture(scope="module")
def window(service_pool, keys, settings):  # type: ignore[no-untyped-def]
    """Events of two subjects on a writer chain and the tx chains, checkpointed; returns the time window."""
    from appliance.audit.log import AuditLog

    log = AuditLog(service_pool, keys=lambda: keys, flush_interval=0.05, checkpoint_interval=0)
    start = datetime.now(UTC)
    for i in range(40):
        subject = SUBJECT_A if i % 2 else SUBJECT_B
        log.submit(AuditEvent("match" if i % 3 else "media.read", "apikey:t", subject_id=subject, details={"i": i}))
        if i % 10 == 0:
            with service_pool.connection() as conn, conn.transaction():
                log.record(conn, AuditEvent("subject.read", "apikey:t", subject_id=subject, details={"i": i}))
    assert log.flush(10)
    log.stop(checkpoint=False)
    log.checkpoint("manual")
    return start, datetime.now(UTC) + timedelta(milliseconds=1)


def _export(settings, keys, **filters) -> bytes:  # type: ignore[no-untyped-def]
    flt = ExportFilter.build(filters.get("start"), filters.get("end"), filters.get("subject_id"), filters.get("action"))
    fmt = filters.get("fmt", "jsonl")
    return b"".join(export_lines(settings.database_url.get_secret_value(), keys, flt, fmt))


@pytest.fixture(scope="module")
def exported(window, settings, keys) -> bytes:  # type: ignore[no-untyped-def]
    return _export(settings, keys, start=window[0], end=window[1])


def _lines(data: bytes) -> list[bytes]:
    return data.rstrip(b"\n").split(b"\n")


def _join(lines: list[bytes]) -> bytes:
    return b"\n".join(lines) + b"\n"


def _record_indexes(lines: list[bytes], chain_suffix: str = ":audit") -> list[int]:
    """Indexes of full records of our writer chain (the longest one of class audit)."""
    recs = [(i, json.loads(x)) for i, x in enumerate(lines) if b'"type":"record"' in x]
    chains: dict[str, list[int]] = {}
    for i, r in recs:
        if r["chain"].startswith("w:") and r["chain"].endswith(chain_suffix):
            chains.setdefault(r["chain"], []).append(i)
    return max(chains.values(), key=len)


def _kinds(report) -> list[tuple[str, int | None]]:  # type: ignore[no-untyped-def]
    return [(p.kind, p.line) for p in report.problems]


def test_untouched_export_verifies_with_the_public_key(exported, keys) -> None:
    report = verify_export(exported, keys.public_key_pem())
    assert report.ok, [str(p) for p in report.problems]
    assert report.records >= 44 and report.checkpoints >= 1


def test_csv_export_verifies_too(window, settings, keys) -> None:
    data = _export(settings, keys, start=window[0], end=window[1], fmt="csv")
    assert data.startswith(b"type,chain,seq,")
    assert verify_export(data, keys.public_key_pem()).ok


@pytest.mark.parametrize("chain", [":audit", ":match"])  # a row per record; records from match blocks
def test_one_changed_byte_is_pinpointed(exported, keys, chain) -> None:
    lines = _lines(exported)
    i = _record_indexes(lines, chain)[3]
    lines[i] = lines[i].replace(b'"actor":"apikey:t"', b'"actor":"apikey:u"')
    report = verify_export(_join(lines), keys.public_key_pem())
    assert _kinds(report) == [("changed", i + 1)]


@pytest.mark.parametrize("chain", [":audit", ":match"])  # a row per record; records from match blocks
def test_a_deleted_record_is_pinpointed(exported, keys, chain) -> None:
    lines = _lines(exported)
    i = _record_indexes(lines, chain)[4]
    del lines[i]
    report = verify_export(_join(lines), keys.public_key_pem())
    assert _kinds(report) == [("removed", i + 1)]
    assert "removed" in str(report.problems[0])


@pytest.mark.parametrize("chain", [":audit", ":match"])  # a row per record; records from match blocks
def test_two_swapped_records_are_pinpointed(exported, keys, chain) -> None:
    lines = _lines(exported)
    a, b = _record_indexes(lines, chain)[2:4]
    lines[a], lines[b] = lines[b], lines[a]
    report = verify_export(_join(lines), keys.public_key_pem())
    assert _kinds(report) == [("reordered", b + 1)]


@pytest.mark.parametrize("chain", [":audit", ":match"])  # a row per record; records from match blocks
def test_an_inserted_record_is_pinpointed_even_with_a_recomputed_hash(exported, keys, chain) -> None:
    lines = _lines(exported)
    i = _record_indexes(lines, chain)[5]
    forged = json.loads(lines[i])
    forged["details"] = {"i": 999}
    forged["hash"] = header_hash(header_of(forged)).hex()
    lines.insert(i + 1, canonical_json(forged))
    report = verify_export(_join(lines), keys.public_key_pem())
    assert _kinds(report) == [("inserted", i + 2)]


def test_a_window_that_cuts_match_blocks_exports_exactly_its_records(service_pool, keys, settings) -> None:
    """Blocks hold up to 1000 match records: a time window ending inside one (and starting inside
    another) exports exactly the records of the window, with the neighbours' stubs, and verifies."""
    from appliance.audit.log import AuditLog

    log = AuditLog(service_pool, keys=lambda: keys, flush_interval=0.05, checkpoint_interval=0, batch_max=250)
    base = datetime.now(UTC) - timedelta(minutes=5)
    for i in range(600):
        log.submit(AuditEvent("match", "apikey:blocks", outcome="unknown", ts=base + timedelta(milliseconds=i),
                              details={"i": i}))
    assert log.flush(10)
    log.stop(checkpoint=False)
    log.checkpoint("manual")
    chain = log.chains["match"].name
    data = _export(settings, keys, start=base + timedelta(milliseconds=120), end=base + timedelta(milliseconds=410))
    report = verify_export(data, keys.public_key_pem())
    assert report.ok, [str(p) for p in report.problems]
    ours = [json.loads(x) for x in _lines(data) if chain.encode() in x and b'"type":"checkpoint"' not in x]
    records = [r for r in ours if r["type"] == "record"]
    assert [r["details"]["i"] for r in records] == list(range(120, 410))
    assert [(r["reason"], r["seq"]) for r in ours if r["type"] == "stub"] == [("before", records[0]["seq"] - 1),
                                                                               ("after", records[-1]["seq"] + 1)]
    empty = _export(settings, keys, start=base + timedelta(milliseconds=120, microseconds=1),
                    end=base + timedelta(milliseconds=120, microseconds=500))
    assert chain.encode() not in empty and verify_export(empty, keys.public_key_pem()).ok


def test_a_cut_tail_is_pinpointed(exported, keys) -> None:
    lines = _lines(exported)
    report = verify_export(_join(lines[:-4]), keys.public_key_pem())
    kinds = {k for k, _ in _kinds(report)}
    assert kinds == {"truncated"}
    assert any("was cut after seq" in str(p) for p in report.problems)
    assert any("signed end line is missing" in str(p) for p in report.problems)


def test_another_public_key_rejects_every_signature(exported) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    other = Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    report = verify_export(exported, other)
    assert report.problems and {p.kind for p in report.problems} <= {"signature", "truncated", "unanchored"}


def test_subject_filtered_export_verifies_and_hides_other_subjects(window, settings, keys) -> None:
    data = _export(settings, keys, start=window[0], end=window[1], subject_id=SUBJECT_A)
    assert str(SUBJECT_B).encode() not in data
    assert verify_export(data, keys.public_key_pem()).ok
    records = [json.loads(x) for x in _lines(data) if b'"type":"record"' in x]
    assert records and all(r["subject_id"] == str(SUBJECT_A) for r in records)


def test_a_matching_record_disguised_as_a_stub_is_detected(window, settings, keys) -> None:
    from appliance.audit.chain import stub_of

    lines = _lines(_export(settings, keys, start=window[0], end=window[1], subject_id=SUBJECT_A))
    i = next(i for i, x in enumerate(lines) if b'"type":"record"' in x)
    rec = json.loads(lines[i])
    rec.pop("type")
    lines[i] = canonical_json({"type": "stub", "reason": "filtered", **stub_of(rec)})
    report = verify_export(_join(lines), keys.public_key_pem())
    assert ("changed", i + 1) in _kinds(report)


def test_export_api_streams_a_verifiable_file_for_the_audit_scope(client, make_key, window, keys) -> None:
    params = {"from": window[0].isoformat(), "to": window[1].isoformat(), "subject_id": str(SUBJECT_B)}
    resp = client.get("/v1/audit/export", params=params, headers=make_key("audit"))
    assert resp.status_code == 200, resp.text
    assert verify_export(resp.content, keys.public_key_pem()).ok
    assert client.get("/v1/audit/export", headers=make_key("match")).status_code == 403
