"""Fixtures for the vector feature: API keys, a ready index service, helpers to enrol through the API."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

MODEL = "dlib-resnet-v1"
DIM = 128


@pytest.fixture(scope="session")
def enroll_headers(make_key):  # type: ignore[no-untyped-def]
    return make_key("enroll", name="vector-enroll")


@pytest.fixture(scope="session")
def match_headers(make_key):  # type: ignore[no-untyped-def]
    return make_key("match", name="vector-match")


@pytest.fixture(scope="session")
def ready_client(client):  # type: ignore[no-untyped-def]
    """The session client once this process's hot indexes are warm."""
    service = client.app.state.appliance.matcher
    assert service.wait_ready(120), service.last_error
    return client


def unit(rng: np.random.Generator, n: int = 1, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def new_subject(ready_client, enroll_headers) -> Callable[..., str]:  # type: ignore[no-untyped-def]
    def make(label: str | None = None, external_ref: str | None = None) -> str:
        body: dict[str, Any] = {"label": label, "external_ref": external_ref or f"t-{uuid.uuid4().hex}"}
        r = ready_client.post("/v1/subjects", json=body, headers=enroll_headers)
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    return make


@pytest.fixture
def enrol(ready_client, enroll_headers) -> Callable[..., list[dict[str, Any]]]:  # type: ignore[no-untyped-def]
    def run(subject_id: str, vectors: np.ndarray, model: str = MODEL) -> list[dict[str, Any]]:
        r = ready_client.post(f"/v1/subjects/{subject_id}/encodings",
                              json={"model": model, "vectors": np.asarray(vectors).tolist()}, headers=enroll_headers)
        assert r.status_code == 201, r.text
        return r.json()["encodings"]  # type: ignore[no-any-return]

    return run


def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()
