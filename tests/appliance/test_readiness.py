"""/readyz reports each real server, turns 503 when one stops and 200 once it is back."""

from __future__ import annotations

import threading
import time

import pytest


def _ready(client) -> tuple[int, dict]:  # type: ignore[no-untyped-def,type-arg]
    r = client.get("/readyz")
    return r.status_code, r.json()


def _wait_ready(client, timeout: float = 30.0) -> dict:  # type: ignore[no-untyped-def,type-arg]
    deadline = time.monotonic() + timeout
    while True:
        code, body = _ready(client)
        if code == 200 or time.monotonic() > deadline:
            assert code == 200, body
            return body
        time.sleep(0.3)


def test_all_four_dependencies_ok(client) -> None:  # type: ignore[no-untyped-def]
    body = _wait_ready(client)
    assert set(body["checks"]) == {"postgres", "redis", "s3", "vault"}
    assert all(c["ok"] for c in body["checks"].values())


@pytest.mark.parametrize("service", ["postgres", "redis", "s3", "vault"])
def test_readiness_turns_503_when_a_server_stops_and_recovers(client, stack, service) -> None:  # type: ignore[no-untyped-def]
    _wait_ready(client)
    target = getattr(stack, {"s3": "s3"}.get(service, service))
    target.stop()
    try:
        started = time.monotonic()
        code, body = _ready(client)
        assert code == 503
        assert body["checks"][service]["ok"] is False and body["checks"][service]["error"]
        others = {k: v["ok"] for k, v in body["checks"].items() if k != service}
        assert all(others.values()), others
        assert time.monotonic() - started < 5, "readiness must not hang on a dead server"
    finally:
        target.start()
        stack._save()
    _wait_ready(client)


@pytest.mark.parametrize("service", ["s3", "postgres"])
def test_a_frozen_server_is_the_only_dependency_readiness_names(isolated, service) -> None:  # type: ignore[no-untyped-def]
    """Issue 17: with S3 frozen (SIGSTOP) and uploads waiting on it, /readyz reported Vault down too,
    in 3 of 8 polls. Each dependency is checked on a thread of its own, so only the frozen one fails."""
    from tests.appliance.own_servers import frozen
    from tests.media import samples

    client = isolated.client
    _wait_ready(client)
    photo = samples.jpeg()
    target = {"s3": isolated.s3, "postgres": isolated.pg}[service]
    uploads: list[threading.Thread] = []
    with frozen(target):
        for _ in range(4):  # work that waits on the frozen server meanwhile, as in the probe
            upload = threading.Thread(target=client.post, args=("/v1/media",), daemon=True, kwargs={
                "content": photo, "headers": {**isolated.headers, "Content-Type": "image/jpeg"}})
            upload.start()
            uploads.append(upload)
        for _ in range(8):
            started = time.monotonic()
            code, body = _ready(client)
            assert code == 503, body
            assert sorted(k for k, v in body["checks"].items() if not v["ok"]) == [service], body
            assert time.monotonic() - started < 5, "readiness must not hang on a frozen server"
    for upload in uploads:
        upload.join(60)
    _wait_ready(client)
