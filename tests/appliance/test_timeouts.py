"""Bounded waits for PostgreSQL (appliance.db.pool): a stopped server costs a request ~3 s and a 503,
never a hang, and a request that answered 503 does not commit after the server resumes.

The servers are the ``isolated`` API's own (tests/appliance/conftest.py): freezing the session
stack's PostgreSQL would stall every other test. "Frozen" is SIGSTOP of every server process, as in
the probe of issue 17: the kernel keeps accepting bytes, so only the client's own clock can help.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from appliance.db.pool import BoundedConnection, DatabaseTimeout, connect_bounded, serve_requests
from tests.appliance.own_servers import frozen

# The configured bound is 3 s (db_request_timeout); 10 s proves "answered, did not wait for the server".
ANSWERED_WITHIN = 10.0


def _count(admin_dsn: str, sql: str, *params: Any) -> int:
    with psycopg.connect(admin_dsn) as conn:
        return int(conn.execute(sql, params).fetchone()[0])  # type: ignore[index]


# A frozen backend that may still process what it was sent: not idle, and past its startup.
_BUSY = "pid = ANY(%s) AND state NOT IN ('idle', 'starting')"


def _wait_settled(admin_dsn: str, pids: list[int], timeout: float = 30.0) -> None:
    """Until every backend that was frozen has exited or is idle outside a transaction: whatever it
    had been sent while stopped is then processed (committed) or refused. A backend still ``starting``
    (a connection attempt caught by the freeze, which the client gave up on) has no session yet, so it
    can commit nothing; it waits for its startup packet until authentication_timeout and is not waited for."""
    deadline = time.monotonic() + timeout
    while True:
        busy = _count(admin_dsn, f"SELECT count(*) FROM pg_stat_activity WHERE {_BUSY}", pids)
        if busy == 0:
            return
        if time.monotonic() >= deadline:
            with psycopg.connect(admin_dsn) as conn:
                what = conn.execute("SELECT pid, state, wait_event_type, wait_event, left(query, 200) "
                                    f"FROM pg_stat_activity WHERE {_BUSY}", (pids,)).fetchall()
            raise AssertionError(f"{busy} frozen backends still busy {timeout:g}s after the thaw: {what}")
        time.sleep(0.1)


def test_frozen_postgres_makes_subject_requests_503_within_the_bound_and_commits_nothing_later(isolated) -> None:  # type: ignore[no-untyped-def]
    client, headers = isolated.client, isolated.headers
    created = client.post("/v1/subjects", json={}, headers=headers)
    assert created.status_code == 201, created.text
    sid = created.json()["id"]
    assert client.get(f"/v1/subjects/{sid}", headers=headers).status_code == 200  # pool warm, key cached
    before = _count(isolated.admin_dsn, "SELECT count(*) FROM subjects")

    with frozen(isolated.pg) as pids:
        for method, path, body in (("POST", "/v1/subjects", {}), ("GET", f"/v1/subjects/{sid}", None)):
            started = time.monotonic()
            r = client.request(method, path, json=body, headers=headers)
            took = time.monotonic() - started
            print(f"{method} {path.split('/')[2]} with PostgreSQL frozen: {r.status_code} after {took:.2f}s")
            assert r.status_code == 503, (method, r.status_code, r.text)
            assert r.headers["content-type"] == "application/problem+json" and r.headers["retry-after"]
            assert took < ANSWERED_WITHIN, f"{method} {path} waited {took:.1f}s on a stopped PostgreSQL"

    _wait_settled(isolated.admin_dsn, pids)
    assert _count(isolated.admin_dsn, "SELECT count(*) FROM subjects") == before, "a 503 was committed later"
    # And the pool recovers by itself once the server answers again.
    deadline = time.monotonic() + 30
    while (r := client.get(f"/v1/subjects/{sid}", headers=headers)).status_code != 200:
        assert time.monotonic() < deadline, r.text
        time.sleep(0.2)


@pytest.fixture
def probe_table(isolated) -> str:  # type: ignore[no-untyped-def]
    with psycopg.connect(isolated.admin_dsn) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS timeout_probe (marker text)")
        conn.execute("GRANT SELECT, INSERT ON timeout_probe TO appliance")
    return "timeout_probe"


def _commit_to_a_stopped_server(isolated, cls: type[BoundedConnection], guard: float | None) -> tuple[str, bool]:  # type: ignore[no-untyped-def]
    """Insert a marker and commit while ``cls`` stops the server at its chosen moment; returns the
    marker and whether the client was told the commit failed."""
    marker = uuid.uuid4().hex
    conn = connect_bounded(isolated.settings, cls=cls)
    conn.commit_guard = guard
    pid = conn.info.backend_pid
    failed = False
    with contextlib.ExitStack() as thaw:
        conn.thaw = thaw  # type: ignore[attr-defined]  # the test classes stop the server from here on
        try:
            with conn.transaction():
                conn.execute("INSERT INTO timeout_probe VALUES (%s)", (marker,))
        except DatabaseTimeout:
            failed = True
        assert getattr(conn, "stopped", False), "the server was never stopped"
    _wait_settled(isolated.admin_dsn, [pid])
    conn.close()
    return marker, failed


class _StopsServerAfterTheGuard(BoundedConnection):
    """Stops the server between the guard's reply and the COMMIT: the COMMIT waits unread in its socket."""

    server: Any = None
    thaw: contextlib.ExitStack | None = None  # set once the transaction under test begins

    def _send_commit_guard(self) -> Iterator[Any]:  # type: ignore[override]
        result = yield from super()._send_commit_guard()
        if self.thaw is not None:
            self.thaw.enter_context(frozen(self.server))
            self.stopped = True
        return result


class _StopsServerBeforeCommit(BoundedConnection):
    """Without a guard: stops the server just before the COMMIT is sent (the probe's lost acknowledgement)."""

    server: Any = None
    thaw: contextlib.ExitStack | None = None

    def _exec_command(self, command: Any, result_format: Any = psycopg.pq.Format.TEXT) -> Iterator[Any]:  # type: ignore[override]
        if command == b"COMMIT" and self.thaw is not None:  # not the session setup's commit
            self.thaw.enter_context(frozen(self.server))
            self.stopped = True
        return (yield from super()._exec_command(command, result_format))


def test_a_commit_that_reached_a_stopped_server_is_refused_when_it_resumes(isolated, probe_table) -> None:  # type: ignore[no-untyped-def]
    cls = type("Stops", (_StopsServerAfterTheGuard,), {"server": isolated.pg})
    marker, failed = _commit_to_a_stopped_server(isolated, cls, isolated.settings.db_commit_guard)
    assert failed, "the client must answer within its bound, not when the server resumes"
    assert _count(isolated.admin_dsn, "SELECT count(*) FROM timeout_probe WHERE marker = %s", marker) == 0


def test_without_the_guard_the_same_commit_lands_after_the_client_gave_up(isolated, probe_table) -> None:  # type: ignore[no-untyped-def]
    """The control: proves the test above can fail, and that the guard is what prevents the late commit."""
    cls = type("Stops", (_StopsServerBeforeCommit,), {"server": isolated.pg})
    marker, failed = _commit_to_a_stopped_server(isolated, cls, None)
    assert failed
    assert _count(isolated.admin_dsn, "SELECT count(*) FROM timeout_probe WHERE marker = %s", marker) == 1


def test_request_connections_get_the_short_statement_timeout_and_jobs_the_long_one(isolated) -> None:  # type: ignore[no-untyped-def]
    """A live but slow server cancels a request's statement itself (the connection stays usable);
    background work in the same pool keeps ``db_job_timeout``."""
    pool = isolated.client.app.state.appliance.pool
    with pool.connection() as conn:
        assert conn.execute("SHOW statement_timeout").fetchone()[0] == "5min"
        assert conn.execute("SHOW lock_timeout").fetchone()[0] == "1s"

    def request() -> None:
        serve_requests()
        with pool.connection() as conn:
            assert conn.execute("SHOW statement_timeout").fetchone()[0] == "2500ms"
            started = time.monotonic()
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("SELECT pg_sleep(30)")
            assert time.monotonic() - started < ANSWERED_WITHIN
            conn.rollback()
            assert conn.execute("SELECT 1").fetchone() == (1,)

    contextvars.copy_context().run(request)
