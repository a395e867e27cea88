"""Servers of a test's own, for tests that freeze one (SIGSTOP): the session stack's stay untouched.

A PostgreSQL server is many processes (postmaster, one backend per connection, writers): freezing
it means stopping all of them, postmaster first so that nothing new is forked meanwhile.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from appliance.stack.process import free_port
from appliance.stack.services import LocalService, ObjectStore, Postgres
from tests.freeze import freeze, thread_states


def start_postgres(root: Path) -> tuple[Postgres, str, str]:
    """A migrated PostgreSQL with the service role; returns it, the service DSN and the owner DSN."""
    from appliance.db.migrate import migrate
    from appliance.stack.manager import SERVICE_ROLE, _ensure_database

    pg = Postgres(root, {})
    pg.allocate(free_port)
    pg.start()
    password = secrets.token_urlsafe(16)
    _ensure_database(pg, password)
    admin = pg.dsn(db=pg.state["db"])
    migrate(admin)
    return pg, pg.dsn(SERVICE_ROLE, password, pg.state["db"]), admin


def start_object_store(root: Path) -> ObjectStore:
    s3 = ObjectStore(root, {})
    s3.allocate(free_port)
    s3.start()
    return s3


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants, parents first."""
    found = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                found += _process_tree(int(child))
    return found


def _exited(pid: int) -> bool:
    try:
        return all(state in "ZX" for state in thread_states(pid))
    except OSError:
        return True


@contextlib.contextmanager
def frozen(service: LocalService) -> Iterator[list[int]]:
    """Every process of ``service`` stopped (all threads) for the block, which gets their PIDs; always
    continued after it."""
    assert service.pid is not None
    stopped: list[int] = []
    try:
        freeze(service.pid)
        stopped.append(service.pid)
        for pid in _process_tree(service.pid)[1:]:  # the root is stopped: its tree cannot grow
            if _exited(pid):
                continue  # a zombie: its stopped parent cannot reap it, and it runs nothing
            try:
                freeze(pid)
            except ProcessLookupError:
                continue
            except AssertionError:
                if not _exited(pid):  # exiting while being stopped is fine; anything else is not
                    raise
            stopped.append(pid)
        yield stopped
    finally:
        for pid in reversed(stopped):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def settings_with(settings: Any, **values: Any) -> Any:
    """The session settings with some values replaced (validated again, as ``appliance serve`` would)."""
    return type(settings)(**{**settings.model_dump(), **values})
