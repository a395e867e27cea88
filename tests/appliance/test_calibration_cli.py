"""`appliance models calibrate` on an appliance enrolled with the LFW embeddings, against a running
2-worker `appliance serve`: the table and the plot, a refusal with the count needed, and `--apply`
changing every worker's decisions through the change feed (the PostgreSQL re-read is set to 5 minutes,
so only the feed can deliver it within the test's seconds).

The site has a PostgreSQL of its own (Redis, S3 and Vault are the session stack's), so the thresholds it
applies never reach the other tests' appliance."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import psycopg
import pytest

from appliance.stack.process import free_port
from tests.appliance.own_servers import start_postgres
from tests.conftest import FACES, _load
from vector import calibration as cal

LFW = FACES.parent / "faces_more_dlib128.npz"
MODEL = "dlib-resnet-v1"


@dataclass
class Site:
    url: str
    headers: dict[str, str]
    config: Path
    log: Path
    admin_dsn: str
    vectors: np.ndarray  # unit rows, as enrolled
    people: np.ndarray


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def site(stack, tmp_path_factory) -> Iterator[Site]:  # type: ignore[no-untyped-def]
    from appliance.auth import create_key

    root = tmp_path_factory.mktemp("calibration-site")
    pg, dsn, admin = start_postgres(root / "pg")
    proc = None
    try:
        values = _load(stack.config_file)
        # Its own PostgreSQL, so its own Redis database too: the change feed's sequence numbers (and its
        # tombstones) belong to one PostgreSQL, and the session's API follows the stream of logical db 0.
        values.update(var_dir=str(root / "var"), database_url=dsn, database_admin_url=admin,
                      redis_url=values["redis_url"].rsplit("/", 1)[0] + "/7",
                      model_threshold_refresh_interval=300.0, log_level="INFO", log_json=True)
        config = root / "appliance.toml"
        config.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in values.items()) + "\n")
        with psycopg.connect(admin) as conn:
            _, token = create_key(conn, "calibration-test", ["admin"])
        port, log = free_port(), root / "api.log"
        env = {**os.environ, "APPLIANCE_CONFIG": str(config)}
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "appliance", "serve", "--port", str(port), "--workers", "2"],
                                    env=env, stdout=out, stderr=subprocess.STDOUT)
        url, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}"}
        _wait(lambda: _get(url + "/healthz") == 200, 60, "the API did not start")
        data = np.load(LFW)
        vectors, people = _unit(data["vectors"].astype(np.float32)), data["labels"]
        body = b"".join(json.dumps({"external_ref": str(p), "model": MODEL, "vector": v.tolist()}).encode() + b"\n"
                        for v, p in zip(vectors, people, strict=True))
        r = httpx.post(url + "/v1/encodings:bulk", content=body, timeout=600,
                       headers={**headers, "Idempotency-Key": "lfw", "Content-Type": "application/x-ndjson"})
        assert r.status_code == 200 and r.json()["encodings_total"] == len(vectors), r.text
        yield Site(url, headers, config, log, admin, vectors, people)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)


def _get(url: str) -> int:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return 0


def _wait(check, timeout: float, message: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, message
        time.sleep(0.1)


def _cli(site: Site, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "APPLIANCE_CONFIG": str(site.config), "APPLIANCE_LOG_LEVEL": "WARNING"}
    return subprocess.run([sys.executable, "-m", "appliance", "models", *args], env=env, capture_output=True,
                          text=True, timeout=300)


def _match(site: Site, probes: np.ndarray, threshold: float | None = None) -> list[dict[str, object]]:
    """Each probe on a connection of its own, so the kernel hands them to either worker."""
    out = []
    for q in probes:
        body: dict[str, object] = {"model": MODEL, "embedding": q.tolist()}
        if threshold is not None:
            body["threshold"] = threshold
        with httpx.Client(base_url=site.url, headers=site.headers, timeout=10) as c:
            r = c.post("/v1/match", json=body)
        assert r.status_code == 200, r.text
        out.append(r.json())
    return out


def _match_track(site: Site, probes: np.ndarray) -> list[dict[str, object]]:
    """The probes as one track's frames, each on a connection of its own (either worker)."""
    track, out = f"t-{time.monotonic_ns()}", []
    for q in probes:
        with httpx.Client(base_url=site.url, headers=site.headers, timeout=10) as c:
            r = c.post("/v1/match", json={"model": MODEL, "embedding": q.tolist(), "camera_id": "door",
                                          "track_id": track})
        assert r.status_code == 200, r.text
        out.append(r.json())
    return out


def test_calibrate_prints_the_table_and_writes_the_plot_and_report(site: Site, tmp_path: Path) -> None:
    run = _cli(site, "calibrate", "--model", MODEL, "--target-far", "0.01", "--out", str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert "1570 subjects, 5924 encodings" in run.stdout and "FAR ≤ (95 %)" in run.stdout
    expected = cal.threshold_for(cal.score_sets(site.vectors, site.people), 1e-2)  # the raw data, no server
    row = re.search(r"^\s+0\.01\s+(0\.\d{4})\s", run.stdout, re.MULTILINE)
    assert row is not None, run.stdout
    # protected templates: inner products are preserved, up to float32 rounding at a 4-decimal grid step
    assert abs(float(row.group(1)) - expected.threshold) <= 1e-4
    assert "needs ≥ 2995 enrolled subjects (have 1570)" in run.stdout  # the 1e-3 row
    assert (tmp_path / f"calibration-{MODEL}.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / f"calibration-{MODEL}-track.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((tmp_path / f"calibration-{MODEL}.json").read_text())
    assert (report["subjects"], report["encodings"], report["template_version"]) == (1570, 5924, 1)
    # the track threshold: stranger tracks of every subject, genuine 3-frame tracks, its own table row
    track = re.search(r"^tracks .*\n.*\n\s+0\.01\s+(0\.\d{4})\s+(\d+\.\d+)%", run.stdout, re.MULTILINE)
    assert track is not None, run.stdout
    assert report["track"]["chosen"]["threshold"] == float(track.group(1)) < float(row.group(1))
    assert report["track"]["chosen"]["far_upper_bound"] <= 0.01 and report["track"]["subjects"] == 1570
    # the raw data's track threshold: the random subject ids order the simulated draws, so the two runs
    # see different random tracks; seen apart by up to 5 grid steps (0.9573 against 0.9578): allow 10
    raw = cal.threshold_for(cal.track_scores(site.vectors, site.people).scores(3), 1e-2).threshold
    assert abs(float(track.group(1)) - raw) <= 1e-3, (track.group(1), raw)
    assert set(report["track"]["tar_by_frames"]) >= {"tar_3_frames", "tar_5_frames"}
    r = httpx.get(f"{site.url}/v1/models/{MODEL}/calibration", headers=site.headers)
    assert r.status_code == 200 and r.json()["applied"] is False
    assert r.json()["report"]["chosen"]["threshold"] == float(row.group(1))
    assert r.json()["track_threshold"] == float(track.group(1))  # stored, not applied
    with psycopg.connect(site.admin_dsn) as conn:
        audited = conn.execute("SELECT details::jsonb FROM audit_log WHERE action = 'model.calibrate'").fetchall()
    assert [d[0]["encodings"] for d in audited] == [5924]


def test_too_little_data_is_refused_with_the_count_needed(site: Site, tmp_path: Path) -> None:
    run = _cli(site, "calibrate", "--model", MODEL, "--target-far", "0.001", "--apply", "--out", str(tmp_path))
    assert run.returncode == 2
    said = run.stderr.replace("\n", " ")
    assert "refused to apply: 1570 enrolled subjects; a FAR target of 0.001 needs at least 2995" in said
    r = httpx.get(f"{site.url}/v1/models", headers=site.headers)
    assert next(m for m in r.json() if m["model"] == MODEL)["source"] == "configured default"


def _probes_between(site: Site, low: float, high: float, n: int) -> np.ndarray:
    """Queries whose best similarity in the gallery lies strictly between ``low`` and ``high``."""
    rng = np.random.default_rng(7)
    target = (low + high) / 2
    found: list[np.ndarray] = []
    for i in rng.permutation(len(site.vectors)):
        v = site.vectors[i]
        noise = rng.normal(size=v.shape).astype(np.float32)
        noise -= (noise @ v) * v
        q = target * v + np.sqrt(1 - target**2) * noise / np.linalg.norm(noise)
        best = float((site.vectors @ q).max())
        if low + 2e-4 < best < high - 2e-4:
            found.append(q.astype(np.float32))
            if len(found) == n:
                break
    return np.array(found)


def test_apply_changes_the_decisions_of_every_worker_within_seconds(site: Site, tmp_path: Path) -> None:
    default = next(m for m in httpx.get(f"{site.url}/v1/models", headers=site.headers).json()
                   if m["model"] == MODEL)["default_threshold"]
    expected = cal.threshold_for(cal.score_sets(site.vectors, site.people), 0.05).threshold
    assert expected < default - 1e-3
    probes = _probes_between(site, expected + 1e-4, default, 30)
    assert len(probes) == 30
    before = _match(site, probes)
    assert {r["decision"] for r in before} == {"unknown"} and {r["threshold"] for r in before} == {default}

    run = _cli(site, "calibrate", "--model", MODEL, "--target-far", "0.05", "--apply", "--out", str(tmp_path))
    assert run.returncode == 0, run.stderr
    version = int(re.search(r"applied as \S+ v(\d+)", run.stdout).group(1))  # type: ignore[union-attr]
    threshold = float(re.search(r"^\s+0\.05\s+(0\.\d{4})\s", run.stdout, re.MULTILINE).group(1))  # type: ignore[union-attr]
    track_threshold = float(re.search(r"track threshold for FAR ≤ 0\.05 .*: (0\.\d{4}), TAR",  # type: ignore[union-attr]
                                      run.stdout).group(1))
    assert track_threshold < threshold, run.stdout

    def workers_applied() -> set[int]:
        lines = [json.loads(x) for x in site.log.read_text().splitlines() if "model_threshold_applied" in x]
        return {x["worker"] for x in lines if x.get("source", "").startswith(f"calibrated v{version} ")}

    _wait(lambda: len(workers_applied()) == 2, 10, "both workers did not log the new threshold")
    after = _match(site, probes)
    assert {r["threshold"] for r in after} == {threshold}
    assert {r["decision"] for r in after} == {"match"}, "every probe lies above the calibrated threshold"
    # a request's own threshold still wins
    assert {r["decision"] for r in _match(site, probes[:3], threshold=default)} == {"unknown"}

    models = {m["model"]: m for m in httpx.get(f"{site.url}/v1/models", headers=site.headers).json()}
    assert models[MODEL]["threshold"] == threshold and models[MODEL]["calibrated"]["version"] == version
    assert models[MODEL]["track_threshold"] == models[MODEL]["calibrated"]["track_threshold"] == track_threshold
    # a track without a threshold of its own fuses at the applied track threshold, on either worker
    track = [c for c in _match_track(site, probes[:2])]
    assert [t["track"]["threshold"] for t in track] == [track_threshold] * 2
    assert [t["threshold"] for t in track] == [threshold] * 2
    assert models[MODEL]["source"].startswith(f"calibrated v{version} at ") and " by cli:" in models[MODEL]["source"]
    with psycopg.connect(site.admin_dsn) as conn:
        audit = conn.execute("SELECT actor, details::jsonb FROM audit_log WHERE action = 'model.threshold.apply'"
                             ).fetchall()
    assert len(audit) == 1 and audit[0][0].startswith("cli:")
    assert (audit[0][1]["threshold"], audit[0][1]["subjects"], audit[0][1]["encodings"]) == (threshold, 1570, 5924)
    assert audit[0][1]["track_threshold"] == track_threshold

    listed = _cli(site, "list")
    assert (f"threshold {threshold:.4f}  track {track_threshold:.4f}  (calibrated v{version} at "
            in listed.stdout), listed.stdout

    run = _cli(site, "reset", "--model", MODEL)
    assert run.returncode == 0, run.stderr
    _wait(lambda: {r["threshold"] for r in _match(site, probes[:6])} == {default}, 10, "reset did not reach workers")
    default_track = next(m for m in httpx.get(f"{site.url}/v1/models", headers=site.headers).json()
                         if m["model"] == MODEL)["default_track_threshold"]
    _wait(lambda: {t["track"]["threshold"] for t in _match_track(site, probes[:2])} == {default_track}, 10,
          "the track threshold did not go back to its default")


def test_models_api_validates_and_needs_admin(site: Site) -> None:
    assert httpx.get(f"{site.url}/v1/models").status_code == 401
    r = httpx.get(f"{site.url}/v1/models/no-such-model/calibration", headers=site.headers)
    assert r.status_code == 404 and r.headers["content-type"].startswith("application/problem+json")
    r = httpx.get(f"{site.url}/v1/models/bad%20name!/calibration", headers=site.headers)
    assert r.status_code == 422
    r = httpx.get(f"{site.url}/v1/models/arcface-r100/calibration", headers=site.headers)
    assert r.status_code == 404 and "appliance models calibrate" in r.json()["detail"]
