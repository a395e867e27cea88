"""The service's PostgreSQL pool; every multi-statement write runs inside ``conn.transaction()``.

Every wait for PostgreSQL is bounded (docs/operations.md, "Bounded waits"), because a server that is stopped, not
dead, answers nothing and refuses nothing: the kernel still accepts our bytes, so neither
``statement_timeout`` (the server's own clock is stopped too) nor TCP keepalives ever fire.

- **Requests** (an HTTP request's context, see ``serve_requests``): at most ``db_request_timeout``
  for a pooled connection and for each reply; then the connection is closed and the request answers
  503 (``DatabaseTimeout`` is an ``OperationalError``). The server cancels a slow statement first
  (``statement_timeout = db_statement_timeout``), so a live but slow server keeps its connection.
- **Background work** in the service (index warm-up, sweeps, the API-key refresh): the same, with
  ``db_job_timeout``. CLI jobs that open their own connections (migrate, backup, audit export,
  erasure's VACUUM) have no bound: they are long by design and an operator watches them.
- **Every COMMIT** is preceded by ``SET LOCAL idle_in_transaction_session_timeout = db_commit_guard``.
  PostgreSQL arms that timer before it says "ready", i.e. before our COMMIT can arrive; a server
  stopped with our COMMIT unread finds the timer expired when it resumes and ends the session
  before reading it. Since the guard is shorter than the client's wait, a request that answered 503
  never commits later, unless the server stalls *inside* its own commit (after the WAL write) for
  longer than ``db_request_timeout - db_commit_guard``; such a commit was durable before the 503.
- TCP keepalives and ``tcp_user_timeout`` notice a vanished host (power, network) on idle pooled
  connections too.
"""

from __future__ import annotations

import contextlib
import math
import time
from contextvars import ContextVar
from typing import Any

import psycopg
from pgvector.psycopg import register_vector
from psycopg import Connection
from psycopg.abc import RV, PQGen
from psycopg.errors import IdleInTransactionSessionTimeout
from psycopg.pq import Format, TransactionStatus
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool

from appliance.settings import Settings

_SERVING_REQUEST: ContextVar[bool] = ContextVar("appliance_db_serving_request", default=False)


def serve_requests() -> None:
    """Mark the current context as an HTTP request's: its database waits get the request bounds.

    Set by the API dependencies in the request's task; the threads FastAPI runs sync endpoints on
    copy that context, background threads never see it (they keep the job bounds)."""
    _SERVING_REQUEST.set(True)


def serving_request() -> bool:
    return _SERVING_REQUEST.get()


class DatabaseTimeout(psycopg.OperationalError):
    """PostgreSQL did not answer within the bound; the connection was closed (503 to API callers)."""


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class BoundedConnection(Connection[TupleRow]):
    """A connection whose every wait for the server is bounded, and whose COMMITs carry the guard.

    ``reply_timeout``/``commit_guard`` are set by ``BoundedPool`` (or ``connect_bounded``); None
    means unbounded, as a plain psycopg connection."""

    reply_timeout: float | None = None
    commit_guard: float | None = None
    serving_request: bool | None = None  # which statement_timeout the session has: request or job

    _deadline = math.inf

    def wait(self, gen: PQGen[RV], interval: float = 0.1, timeout: float | None = None) -> RV:
        """Every network wait of psycopg (execute, fetch, COPY, commit) goes through here."""
        bound = self.reply_timeout
        if bound is None or timeout is not None:
            return super().wait(gen, interval, timeout)
        self._deadline = time.monotonic() + bound
        try:
            return super().wait(self._bounded(gen), interval)
        except DatabaseTimeout:
            # Mid-protocol: the connection cannot be reused. Closing it means a statement the server
            # has not read yet is rolled back when (if) the server resumes and finds the client gone.
            self.close()
            raise

    def _bounded(self, gen: PQGen[RV]) -> PQGen[RV]:
        """Pass psycopg's generator through; give up once the server has been silent past ``_deadline``.

        psycopg's wait functions wake the generator every ``interval`` with "nothing ready", which is
        when the deadline is checked; replies that keep arriving are never cut."""
        try:
            state = next(gen)
            while True:
                ready = yield state
                if not ready and time.monotonic() > self._deadline:
                    raise DatabaseTimeout(f"PostgreSQL sent no reply within {self.reply_timeout:g}s; "
                                          "connection closed")
                state = gen.send(ready)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    def _exec_command(self, command: Any, result_format: Format = Format.TEXT) -> PQGen[Any]:
        """The guard before COMMIT (module doc); psycopg sends every COMMIT through here."""
        guarded = (command == b"COMMIT" and self.commit_guard is not None and not self._pipeline
                   and self.pgconn.transaction_status == TransactionStatus.INTRANS)
        if guarded:
            yield from self._send_commit_guard()
            # The COMMIT gets a whole bound of its own: it must outlast the guard (module doc).
            self._deadline = time.monotonic() + (self.reply_timeout or math.inf)
        try:
            return (yield from super()._exec_command(command, result_format))
        except IdleInTransactionSessionTimeout:
            if not guarded:
                raise
            raise DatabaseTimeout("PostgreSQL did not read the COMMIT within the commit guard "
                                  "(was it stopped?); it ended the session: nothing was committed") from None

    def _send_commit_guard(self) -> PQGen[Any]:
        guard = _ms(self.commit_guard or 0)
        return (yield from super()._exec_command(f"SET LOCAL idle_in_transaction_session_timeout = {guard}".encode()))

    def bind(self, settings: Settings, request: bool) -> None:
        """Apply the request or job bounds (one round trip, only when the mode changes)."""
        self.commit_guard = settings.db_commit_guard
        self.reply_timeout = settings.db_request_timeout if request else _job_reply(settings)
        if self.serving_request is request:
            return
        statement = settings.db_statement_timeout if request else settings.db_job_timeout
        autocommit = self.autocommit
        self.autocommit = True
        try:
            self.execute(f"SET statement_timeout = {_ms(statement)}".encode())
        finally:
            self.autocommit = autocommit
        self.serving_request = request


def _job_reply(settings: Settings) -> float:
    """Longer than the job's statement_timeout: a live server gets to cancel the statement first."""
    return settings.db_job_timeout + settings.db_request_timeout


def connection_kwargs(settings: Settings) -> dict[str, Any]:
    """libpq options: connect timeout, and keepalives plus ``tcp_user_timeout`` for a vanished host."""
    kwargs: dict[str, Any] = {"connect_timeout": max(1, round(settings.db_connect_timeout))}
    if settings.db_tcp_user_timeout > 0:
        idle = max(1, round(settings.db_tcp_user_timeout / 2))
        kwargs |= {"keepalives": 1, "keepalives_idle": idle, "keepalives_interval": max(1, idle // 3),
                   "keepalives_count": 3, "tcp_user_timeout": _ms(settings.db_tcp_user_timeout)}
    return kwargs


def _session_setup(conn: Connection, settings: Settings) -> None:
    """Session settings of every service connection; starts in job mode (``BoundedConnection.bind``)."""
    statements = [
        "SET application_name = 'appliance'",
        f"SET lock_timeout = {_ms(settings.db_lock_timeout)}",
        f"SET statement_timeout = {_ms(settings.db_job_timeout)}",
        f"SET idle_in_transaction_session_timeout = {_ms(settings.db_job_timeout)}",
    ]
    if conn.info.server_version >= 140000:
        # A statement the client gave up on is cancelled within a second, not run to its end.
        statements.append("SET client_connection_check_interval = 1000")
    conn.execute("; ".join(statements).encode())
    conn.commit()
    if isinstance(conn, BoundedConnection):
        conn.serving_request = False


class BoundedPool(ConnectionPool[BoundedConnection]):
    """A ``ConnectionPool`` whose checkouts get the bounds of their context (request or job)."""

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        self.settings = settings
        super().__init__(connection_class=BoundedConnection, **kwargs)

    def getconn(self, timeout: float | None = None) -> BoundedConnection:
        request = serving_request()
        if request:
            bound = self.settings.db_request_timeout
            timeout = bound if timeout is None else min(timeout, bound)
        conn = super().getconn(timeout)
        try:
            conn.bind(self.settings, request)
        except BaseException:
            self.putconn(conn)
            raise
        return conn


def _configure(settings: Settings) -> Any:
    def configure(conn: Connection) -> None:
        if isinstance(conn, BoundedConnection):
            conn.reply_timeout = settings.db_connect_timeout  # a server frozen right after accepting us
        # Before the first migration the vector type does not exist yet; readiness still works.
        with contextlib.suppress(psycopg.ProgrammingError):
            register_vector(conn)
        conn.rollback()
        _session_setup(conn, settings)

    return configure


def open_pool(settings: Settings, wait: bool = False) -> BoundedPool:
    """Open the pool lazily so the API starts (and reports not-ready) while PostgreSQL is down."""
    pool = BoundedPool(
        settings,
        conninfo=settings.database_url.get_secret_value(),
        min_size=settings.db_pool_min,
        max_size=settings.db_pool_max,
        kwargs=connection_kwargs(settings),
        configure=_configure(settings),
        timeout=settings.db_connect_timeout,
        reconnect_timeout=0,
        open=False,
        name="appliance",
    )
    pool.open(wait=wait)
    return pool


def connect_bounded(settings: Settings, cls: type[BoundedConnection] = BoundedConnection) -> BoundedConnection:
    """One service connection outside the pool, with the request bounds (the readiness probe's)."""
    conn = cls.connect(settings.database_url.get_secret_value(), **connection_kwargs(settings))
    conn.reply_timeout = settings.db_connect_timeout
    try:
        _session_setup(conn, settings)
        conn.bind(settings, request=True)
    except BaseException:
        conn.close()
        raise
    return conn


def admin_dsn(settings: Settings) -> str:
    """The owner DSN for migrations; falls back to the service DSN when no owner is configured."""
    url = settings.database_admin_url or settings.database_url
    return url.get_secret_value()
