"""/readyz reports each real server, turns 503 when one stops and 200 once it is back."""

from __future__ import annotations

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
