"""Refused requests (401/403) reach the audit trail, aggregated: a flood of bad keys adds a bounded
number of records, and every refusal is counted in one of them."""

from __future__ import annotations

import json
import secrets
import time
from datetime import UTC, datetime, timedelta

from appliance.audit.denied import MAX_CALLERS, OTHERS, DeniedRequests, caller_of


def test_callers_beyond_the_bound_are_summed_and_every_refusal_is_counted() -> None:
    denied = DeniedRequests(max_callers=3)
    t0 = 60 * 1_000_000.0  # the start of a minute
    for i in range(1000):
        denied.note("POST", "/v1/match", 401, f"apikey-prefix:{i % 10:012x}", now=t0 + i * 0.01)
    denied.note("POST", "/v1/match", 401, "anonymous", now=t0 + 61)  # the next minute
    assert denied.take(now=t0 + 30) == []  # the minute is not over
    events = denied.take(now=t0 + 61)
    assert len(events) == 4  # three callers apart, the other seven summed
    assert sum(e.details["count"] for e in events) == 1000
    others = next(e for e in events if e.actor == OTHERS)
    assert others.details["callers"] == 7 and others.outcome == "denied" and others.object_id == "/v1/match"
    assert [e.actor for e in denied.take(everything=True)] == ["anonymous"]


def test_the_caller_is_the_key_prefix_never_the_secret() -> None:
    secret = secrets.token_urlsafe(32)
    assert caller_of(f"Bearer apl_0123456789ab_{secret}", 401) == "apikey-prefix:0123456789ab"
    assert caller_of(None, 401) == "anonymous"
    assert caller_of(f"Basic {secret}", 401) == "malformed"


def test_a_burst_of_bad_keys_adds_a_bounded_number_of_verifiable_records(settings, make_key, keys) -> None:
    """10,000 refused requests to /v1/match and to a subject's page, from 2,000 made-up keys:
    at most MAX_CALLERS + 1 records per route, status and minute, their counts sum to the requests, the
    export verifies, and no secret is in it."""
    from fastapi.testclient import TestClient

    from appliance.api.app import create_app
    from appliance.audit.export import ExportFilter, export_lines
    from appliance.audit.verify import verify_export

    match_only = make_key("match", name="denied-match-only")
    tokens = [f"apl_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}" for _ in range(2000)]
    sent: dict[tuple[str, int], int] = {}
    started = time.time()
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        for i in range(10_000):
            headers = {} if i % 100 == 0 else {"Authorization": f"Bearer {tokens[i % len(tokens)]}"}
            if i % 2:
                resp = client.post("/v1/match", json={"model": "dlib-resnet-v1", "embedding": [0.1] * 128},
                                   headers=headers)
                route = "/v1/match"
            else:
                resp = client.get(f"/v1/subjects/{i}", headers=headers)
                route = "/v1/subjects/{subject_id}"
            assert resp.status_code == 401, resp.text
            sent[(route, 401)] = sent.get((route, 401), 0) + 1
        for _ in range(20):
            assert client.get("/v1/audit/export", headers=match_only).status_code == 403
        sent[("/v1/audit/export", 403)] = 20
        audit = client.app.state.appliance.audit
        assert audit.flush(30)
        chain = audit.chains["audit"].name
    minutes = int(time.time() // 60) - int(started // 60) + 1
    flt = ExportFilter.build(datetime.fromtimestamp(started, UTC) - timedelta(seconds=1), None, None, "auth.denied")
    data = b"".join(export_lines(settings.database_url.get_secret_value(), keys, flt))
    report = verify_export(data, keys.public_key_pem())
    assert report.verified, [str(p) for p in report.problems]
    assert not any(t.split("_", 2)[2].encode() in data for t in tokens)
    records = [r for r in map(json.loads, data.splitlines()) if r["type"] == "record" and r["chain"] == chain]
    counted: dict[tuple[str, int], int] = {}
    for r in records:
        key = (r["object_id"], r["details"]["status"])
        counted[key] = counted.get(key, 0) + r["details"]["count"]
    assert counted == sent
    assert len(records) <= (MAX_CALLERS + 1) * 2 * minutes + 1
    (forbidden,) = [r for r in records if r["details"]["status"] == 403]
    assert forbidden["actor"].startswith("apikey:") and forbidden["outcome"] == "denied"
