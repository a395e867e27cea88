"""Erasure: nothing of the subject remains, no match returns it once the call returns, a crash at any
step resumes to the same receipt, and the receipt verifies with the exported public key."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest

from appliance.gdpr import erasure
from appliance.gdpr.receipts import verify_receipt
from tests.gdpr.conftest import MODEL, holdings, object_versions


def _expected_destroyed(before: dict) -> dict:  # type: ignore[type-arg]
    return {
        "encodings": len(before["encodings"]),
        "index_labels": sorted(int(r[1]) for r in before["encodings"]),
        "media_rows_at_least": 1 if before["media"] else 0,
        "object_keys": sorted(key for _, key in before["media"] if key is not None),
        "subject_key_id": str(before["key"][0][0]) if before["key"] else None,
    }


def _assert_receipt(receipt: dict, before: dict, subject_id: str) -> None:  # type: ignore[type-arg]
    want = _expected_destroyed(before)
    got = receipt["destroyed"]
    assert receipt["subject_id"] == subject_id
    assert got["encodings"] == want["encodings"]
    assert got["index_labels"] == want["index_labels"]
    assert got["object_keys"] == want["object_keys"]
    assert got["media_rows"] >= want["media_rows_at_least"]
    assert got["subject_key_id"] == want["subject_key_id"]
    owner = got["owner_key"]
    assert owner["verified_absent"] and owner["existed"], owner
    assert f"subject-{subject_id}" in owner["location"] or owner["location"].startswith("slot "), owner
    assert receipt["unrecoverable"]["since"] == owner["destroyed_at"]
    assert "database backups" in receipt["unrecoverable"]["copies"]
    assert any("protected templates" in c for c in receipt["caveats"])  # never claims more than is true
    assert set(receipt["steps"]) == set(erasure.STEPS[:-1])
    assert receipt["vacuumed_tables"] == list(erasure.VACUUM_TABLES)


def _assert_nothing_remains(state, admin_dsn: str, subject_id: str, before: dict) -> None:  # type: ignore[no-untyped-def,type-arg]
    after = holdings(admin_dsn, subject_id)
    assert after["encodings"] == [] and after["media"] == [] and after["key"] == []
    assert after["subject"] == [("erased", None, None, None, None)]
    for _, key in before["media"]:
        if key is not None:
            assert object_versions(state, key) == [], key


def test_erasure_destroys_everything_and_returns_a_receipt_verifiable_with_the_exported_key(
    gdpr_client, state, admin_dsn, admin_headers, make_subject, public_key_pem
) -> None:
    subject = make_subject(person=1)
    before = holdings(admin_dsn, subject["id"])
    assert before["encodings"] and before["media"] and before["key"]
    r = gdpr_client.delete(f"/v1/subjects/{subject['id']}", headers=admin_headers)
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["state"] == "done"
    _assert_receipt(job["receipt"], before, subject["id"])
    assert verify_receipt(job["receipt"], job["receipt_signature"], public_key_pem)
    assert not verify_receipt({**job["receipt"], "subject_id": "someone-else"}, job["receipt_signature"],
                              public_key_pem)
    _assert_nothing_remains(state, admin_dsn, subject["id"], before)
    again = gdpr_client.delete(f"/v1/subjects/{subject['id']}", headers=admin_headers).json()
    assert again["receipt"] == job["receipt"] and again["receipt_signature"] == job["receipt_signature"]
    progress = gdpr_client.get(f"/v1/erasures/{job['id']}", headers=admin_headers).json()
    assert progress["state"] == "done" and progress["receipt"] == job["receipt"]


def test_no_match_returns_the_subject_once_erasure_returns(gdpr_client, admin_headers, staff_headers,
                                                           make_subject) -> None:
    subject = make_subject(person=2, photo=False)
    probe = {"model": MODEL, "embedding": subject["vectors"][0].tolist(), "k": 5}
    results: list[tuple[float, bool]] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            started = time.monotonic()
            r = gdpr_client.post("/v1/match", json=probe, headers=staff_headers)
            assert r.status_code == 200, r.text
            body = r.json()
            found = body["subject_id"] == subject["id"] or any(
                c["subject_id"] == subject["id"] for c in body["candidates"])
            results.append((started, found))

    def wait_for(condition: Callable[[], bool]) -> None:
        """Wait on the loops' progress, not on the clock: a slow host only makes this take longer."""
        deadline = time.monotonic() + 60
        while not condition() and time.monotonic() < deadline and all(t.is_alive() for t in threads):
            time.sleep(0.02)

    threads = [threading.Thread(target=loop) for _ in range(3)]
    for t in threads:
        t.start()
    wait_for(lambda: sum(found for _, found in results) >= 3)
    r = gdpr_client.delete(f"/v1/subjects/{subject['id']}", headers=admin_headers)
    returned = time.monotonic()
    assert r.status_code == 200, r.text
    wait_for(lambda: sum(started > returned for started, _ in results) >= 30)
    stop.set()
    for t in threads:
        t.join()
    assert any(found for started, found in results if started < returned), "the subject matched before erasure"
    late = [found for started, found in results if started > returned]
    assert late and not any(late)


@pytest.mark.parametrize("step", erasure.STEPS[:-1])
def test_a_crash_after_any_step_resumes_to_the_same_receipt(
    step, gdpr_client, state, admin_dsn, admin_headers, make_subject, public_key_pem
) -> None:
    subject = make_subject(person=3, n=2, photo=step in ("tombstone", "delete_data"))
    before = holdings(admin_dsn, subject["id"])
    job_id = erasure.start_erasure(state, subject["id"], "test:crash", "req-crash-" + step)
    erasure.fail_after = step
    try:
        with pytest.raises(erasure.InjectedFailure):
            erasure.run_erasure(state, job_id)
    finally:
        erasure.fail_after = None
    status = gdpr_client.get(f"/v1/erasures/{job_id}", headers=admin_headers).json()
    assert status["state"] == "running" and status["step"] == step
    r = gdpr_client.delete(f"/v1/subjects/{subject['id']}", headers=admin_headers)
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["id"] == str(job_id)
    _assert_receipt(job["receipt"], before, subject["id"])
    assert job["receipt"]["request_id"] == "req-crash-" + step
    assert verify_receipt(job["receipt"], job["receipt_signature"], public_key_pem)
    _assert_nothing_remains(state, admin_dsn, subject["id"], before)


def test_a_killed_cli_erasure_finishes_at_the_next_start(gdpr_client, state, stack, admin_dsn, make_subject,
                                                         public_key_pem) -> None:
    subject = make_subject(person=4, n=2)
    before = holdings(admin_dsn, subject["id"])
    env = {**os.environ, "APPLIANCE_CONFIG": str(stack.config_file), "APPLIANCE_ERASURE_FAIL_AFTER": "shred_key",
           "APPLIANCE_ERASURE_FAIL_MODE": "exit"}
    run = subprocess.run([sys.executable, "-m", "appliance", "subject", "erase", subject["id"]], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 75, run.stderr[-2000:]
    assert holdings(admin_dsn, subject["id"])["key"] == []  # it died right after the crypto-shred
    assert erasure.resume_unfinished(state) >= 1  # what the startup hook runs
    with state.pool.connection() as conn:
        job = conn.execute("SELECT id FROM erasure_jobs WHERE subject_id = %s", (subject["id"],)).fetchone()
        done = erasure.get_job(conn, job[0])
    assert done["state"] == "done"
    _assert_receipt(done["receipt"], before, subject["id"])
    assert verify_receipt(done["receipt"], done["receipt_signature"], public_key_pem)
    _assert_nothing_remains(state, admin_dsn, subject["id"], before)


def test_erasing_an_unknown_subject_is_404(gdpr_client, admin_headers) -> None:
    r = gdpr_client.delete("/v1/subjects/00000000-0000-4000-8000-000000000000", headers=admin_headers)
    assert r.status_code == 404
    assert gdpr_client.delete("/v1/subjects/00000000-0000-4000-8000-000000000000",
                              headers={"Authorization": "Bearer nope"}).status_code == 401
