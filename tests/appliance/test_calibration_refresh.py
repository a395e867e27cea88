"""The PostgreSQL re-read behind calibrated thresholds: a worker that never gets the feed message still
applies a new threshold within ``model_threshold_refresh_interval`` (and a reset just as well)."""

from __future__ import annotations

import time

import psycopg

MODEL = "arcface-r100"  # no other API test matches with it: its threshold can change here safely
PROBE = [1.0] + [0.0] * 511


def _insert(admin_dsn: str, threshold: float | None, track: float | None = None) -> int:
    """An applied row written straight into PostgreSQL: no feed message is published."""
    with psycopg.connect(admin_dsn) as conn:
        row = conn.execute(
            "INSERT INTO model_thresholds (model, version, applied, threshold, track_threshold, created_by) "
            "SELECT %s, coalesce(max(version), 0) + 1, true, %s, %s, 'test:refresh' FROM model_thresholds "
            "WHERE model = %s RETURNING version", (MODEL, threshold, track, MODEL)).fetchone()
    assert row is not None
    return int(row[0])


def _applied(client, headers) -> tuple[float, str, float]:  # type: ignore[no-untyped-def]
    models = {m["model"]: m for m in client.get("/v1/models", headers=headers).json()}
    used = client.post("/v1/match", json={"model": MODEL, "embedding": PROBE}, headers=headers)
    assert used.status_code == 200, used.text
    return models[MODEL]["threshold"], models[MODEL]["source"], used.json()["threshold"]


def _track_threshold(client, headers) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """(GET /v1/models's track_threshold, what a track's fused answer applied)."""
    models = {m["model"]: m for m in client.get("/v1/models", headers=headers).json()}
    used = client.post("/v1/match", json={"model": MODEL, "embedding": PROBE, "track_id": f"t-{time.monotonic_ns()}"},
                       headers=headers)
    assert used.status_code == 200, used.text
    return models[MODEL]["track_threshold"], used.json()["track"]["threshold"]


def _wait_for(client, headers, want: float, timeout: float) -> tuple[float, str, float]:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        seen = _applied(client, headers)
        if (seen[0] == want and seen[2] == want) or time.monotonic() > deadline:
            return seen
        time.sleep(0.2)


def test_a_worker_rereads_applied_thresholds_from_postgresql(client, settings, admin_dsn, admin_headers):
    default = settings.models[MODEL].threshold
    deadline = time.monotonic() + 60
    while client.post("/v1/match", json={"model": MODEL, "embedding": PROBE}, headers=admin_headers).status_code != 200:
        assert time.monotonic() < deadline, "the index did not warm"
        time.sleep(0.2)
    assert _applied(client, admin_headers) == (default, "configured default", default)
    budget = settings.model_threshold_refresh_interval + 5
    version = _insert(admin_dsn, 0.55)
    try:
        threshold, source, used = _wait_for(client, admin_headers, 0.55, budget)
        assert (threshold, used) == (0.55, 0.55)
        assert source.startswith(f"calibrated v{version} at ") and source.endswith(" by test:refresh")
        # a request's own threshold still wins over the calibrated one
        own = client.post("/v1/match", json={"model": MODEL, "embedding": PROBE, "threshold": 0.7},
                          headers=admin_headers)
        assert own.json()["threshold"] == 0.7
        # a row without a track threshold (applied before migration 0012): the track uses its threshold
        assert _track_threshold(client, admin_headers) == (0.55, 0.55)
        _insert(admin_dsn, 0.55, 0.5)
        deadline = time.monotonic() + budget
        while _track_threshold(client, admin_headers) != (0.5, 0.5) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _track_threshold(client, admin_headers) == (0.5, 0.5)
        # a request's own threshold wins for the track too
        own = client.post("/v1/match", json={"model": MODEL, "embedding": PROBE, "threshold": 0.7, "track_id": "t-own"},
                          headers=admin_headers)
        assert own.json()["track"]["threshold"] == 0.7
    finally:
        _insert(admin_dsn, None)  # reset: back to the configured default
    assert _wait_for(client, admin_headers, default, budget) == (default, "configured default", default)
    track_default = settings.models[MODEL].fused_threshold
    assert _track_threshold(client, admin_headers) == (track_default, track_default)
