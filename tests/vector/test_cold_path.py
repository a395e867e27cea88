"""While a worker's hot index warms, matches are answered from PostgreSQL (``"path": "cold"``) through the
same route (so with the same audit event, which carries the path), and never return a tombstoned subject;
once warm, the same request is answered by the hot index."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from psycopg.rows import dict_row

from appliance.audit.export import records_of
from appliance.index_admin import tombstone_subject
from appliance.matching import IndexService, ServiceConfig
from tests.vector.conftest import MODEL, unit, wait_until


@pytest.fixture
def warming(ready_client, tmp_path) -> Iterator[Callable[[str], tuple[IndexService, threading.Event]]]:  # type: ignore[no-untyped-def]
    """Swaps the API's worker for one whose warm-up is held at ``stage``: "key" (template key known,
    nothing loaded: the cold path searches PostgreSQL) or "loaded" (templates loaded, HNSW not built:
    the cold path searches them in process, plus PostgreSQL for anything newer)."""
    state = ready_client.app.state.appliance
    hot = state.matcher
    started: list[tuple[IndexService, threading.Event]] = []

    def start(stage: str) -> tuple[IndexService, threading.Event]:
        gate = threading.Event()
        config = ServiceConfig.from_settings(state.settings)
        config.snapshot_dir = tmp_path / "snap"
        config.warm_gate, config.warm_gate_stage = gate, stage
        held = IndexService(state.settings, state.pool, state.redis, lambda: state.keys, config)
        held.start()
        started.append((held, gate))
        loaded = (lambda: held._cold.get(MODEL) is not None and held._cold[MODEL].batch is not None) \
            if stage == "loaded" else (lambda: MODEL in held._cold)
        assert wait_until(loaded, 30), held.last_error
        state.matcher = held
        return held, gate

    try:
        yield start
    finally:
        state.matcher = hot
        for held, gate in started:
            gate.set()
            held.stop(save=False)


def _match(client, headers, v: np.ndarray) -> dict:  # type: ignore[no-untyped-def, type-arg]
    r = client.post("/v1/match", json={"model": MODEL, "embedding": v.tolist(), "k": 5}, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


@pytest.mark.parametrize("stage", ["key", "loaded"])
def test_matches_are_answered_cold_while_warming_then_hot(ready_client, match_headers, new_subject, enrol,
                                                          warming, stage):
    state = ready_client.app.state.appliance
    rng = np.random.default_rng(2024 if stage == "key" else 2025)
    v, w, u = unit(rng, 3)
    sid, gone, late = new_subject(), new_subject(), new_subject()
    enrol(sid, np.stack([v, v + 0.05 * unit(rng, 1)[0]]))
    enrol(gone, w[None, :])
    held, gate = warming(stage)
    enrol(late, u[None, :])  # after the warming worker loaded its templates: found through PostgreSQL
    tombstone_subject(state, uuid.UUID(gone))  # erased while this worker warms: known only from the host file
    assert not held.ready and (held._cold[MODEL].batch is not None) == (stage == "loaded")

    newest = _match(ready_client, match_headers, u)
    assert (newest["path"], newest["subject_id"]) == ("cold", late)
    cold = _match(ready_client, match_headers, v)
    assert (cold["path"], cold["decision"], cold["subject_id"]) == ("cold", "match", sid)
    assert cold["similarity"] == pytest.approx(1.0, abs=1e-4)
    assert len({c["subject_id"] for c in cold["candidates"]}) == len(cold["candidates"])  # one per subject
    erased = _match(ready_client, match_headers, w)
    assert erased["path"] == "cold" and gone not in {c["subject_id"] for c in erased["candidates"]}
    assert state.audit.flush(10)  # audited like a hot match, the record saying which path answered
    with state.pool.connection() as conn:
        cur = conn.cursor(row_factory=dict_row)
        rows = cur.execute("SELECT * FROM audit_log WHERE class = 'match' AND %s = ANY(subjects)",
                           (uuid.UUID(sid),)).fetchall()
    mine = [r for row in rows for r in records_of(row) if r["action"] == "match" and r["subject_id"] == sid]
    outcomes = [(rec["outcome"], rec["details"]["path"]) for rec in mine]
    assert outcomes == [("match", "cold")]

    gate.set()
    assert held.wait_ready(60), held.last_error
    hot = _match(ready_client, match_headers, v)
    assert (hot["path"], hot["subject_id"]) == ("hot", sid)
    assert hot["candidates"][0]["encoding_id"] == cold["candidates"][0]["encoding_id"]  # the same best encoding
    erased = _match(ready_client, match_headers, w)
    assert erased["path"] == "hot" and gone not in {c["subject_id"] for c in erased["candidates"]}


def test_cold_path_off_answers_503_while_warming(ready_client, match_headers, warming):
    held, _gate = warming("key")
    held.config.cold_timeout = 0
    probe = unit(np.random.default_rng(1), 1)[0].tolist()
    r = ready_client.post("/v1/match", json={"model": MODEL, "embedding": probe}, headers=match_headers)
    assert r.status_code == 503 and r.headers["content-type"] == "application/problem+json"


def test_start_returns_once_every_model_can_answer_cold(ready_client, tmp_path):  # type: ignore[no-untyped-def]
    """``start`` runs in the lifespan, before uvicorn listens: when it returns, every model's template key
    is known, so the first request of a first start is answered cold rather than 503 (bench/match.py saw
    3 such 503s at 100k before this wait)."""
    state = ready_client.app.state.appliance
    gate = threading.Event()
    config = ServiceConfig.from_settings(state.settings)
    config.snapshot_dir = tmp_path / "snap"
    config.warm_gate, config.warm_gate_stage = gate, "key"  # held right after the key: never warm here
    held = IndexService(state.settings, state.pool, state.redis, lambda: state.keys, config)
    try:
        held.start()
        assert not held.ready
        assert all(model in held._cold for model in held.dims)
        answer = held.identify(MODEL, unit(np.random.default_rng(7), 1), 3)
        assert answer[0].path == "cold"
    finally:
        gate.set()
        held.stop(save=False)
