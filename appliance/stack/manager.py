"""``appliance stack up | down | status``: the embedded default stack under one ``var/`` folder.

``up`` is idempotent (running, healthy services are left alone), writes the settings file that
``appliance serve`` reads, provisions the database roles and the Vault AppRole, and returns only
when every service answers its health check. ``down`` stops each service by its own PID.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.stack.process import (
    LOOPBACK,
    StackError,
    free_port,
    pid_alive,
    port_open,
    spawn,
    stop_pid,
    wait_until,
    write_secret,
)
from appliance.stack.services import BIN, LocalService, ObjectStore, Postgres, Redis, Vault

SERVICE_ROLE = "appliance"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    state: str  # running | unhealthy | stopped | crashed
    pid: int | None
    ports: list[int]
    detail: str = ""


class Stack:
    """The local servers of one ``var/`` folder, their persisted ports and generated secrets."""

    def __init__(self, var_dir: Path, persistent_vault: bool = True, api_port: int = 8080) -> None:
        self.var_dir = var_dir.resolve()
        self.root = self.var_dir / "stack"
        self.state_file = self.root / "state.json"
        self.config_file = self.var_dir / "appliance.toml"
        self._state: dict[str, dict[str, Any]] = self._load()
        self._state.setdefault("api", {}).setdefault("port", api_port)
        self.postgres = Postgres(self.root, self._state.setdefault("postgres", {}))
        self.redis = Redis(self.root, self._state.setdefault("redis", {}))
        self.s3 = ObjectStore(self.root, self._state.setdefault("s3", {}))
        self.vault = Vault(self.root, self._state.setdefault("vault", {}), persistent=persistent_vault)
        self.services: list[LocalService] = [self.postgres, self.redis, self.s3, self.vault]

    # --- state ---------------------------------------------------------------------------
    def _load(self) -> dict[str, dict[str, Any]]:
        if self.state_file.exists():
            return json.loads(self.state_file.read_text())
        return {}

    def _save(self) -> None:
        write_secret(self.state_file, json.dumps(self._state, indent=2, sort_keys=True))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise up/down of one var/ folder (two shells, or pytest-xdist workers)."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._state.update({k: v for k, v in self._load().items() if k not in self._state})
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # --- commands ------------------------------------------------------------------------
    def require_servers(self) -> None:
        """Fail before anything starts when a server's wheel is missing (installed without the ``stack`` extra)."""
        for service in self.services:
            service.executable()

    def up(self, with_api: bool = False) -> None:
        self.require_servers()
        with self._locked():
            taken = {p for service in self.services for p in service.ports()} | {self._state["api"]["port"]}
            for service in self.services:
                service.allocate(lambda: free_port(taken))
            self._save()
            try:
                for service in self.services:
                    if service.running() and _safe(service.healthy):
                        continue
                    if service.running():
                        service.stop()
                    for note in service.move_busy_ports(lambda: free_port(taken)):
                        log.warning("stack: port taken by another program, moved: %s", note)
                    service.start()
                    self._save()
                self._provision()
                if with_api:
                    self._start_api()
            finally:
                # Even a failed start records the PIDs it spawned, so `down` can stop them.
                self._save()

    def down(self) -> list[str]:
        stopped: list[str] = []
        with self._locked():
            if stop_pid(self._state["api"].get("pid"), timeout=20):
                stopped.append("api")
            self._state["api"].pop("pid", None)
            for service in reversed(self.services):
                if service.stop():
                    stopped.append(service.name)
            self._save()
        return stopped

    def status(self) -> list[ServiceStatus]:
        out = []
        for service in self.services:
            pid = service.pid
            if service.running():
                ok = _safe(service.healthy)
                out.append(ServiceStatus(service.name, "running" if ok else "unhealthy", pid, service.ports()))
            elif pid:
                detail = "recorded PID is gone; run `appliance stack up` to restart it"
                out.append(ServiceStatus(service.name, "crashed", pid, service.ports(), detail))
            else:
                out.append(ServiceStatus(service.name, "stopped", None, service.ports()))
        api = self._state["api"]
        if pid_alive(api.get("pid")):
            ok = port_open(api["port"])
            out.append(ServiceStatus("api", "running" if ok else "unhealthy", api["pid"], [api["port"]]))
        elif api.get("pid"):
            out.append(ServiceStatus("api", "crashed", api["pid"], [api["port"]], "API process exited"))
        return out

    # --- provisioning --------------------------------------------------------------------
    def _provision(self) -> None:
        """Create the service DB role and database and the Vault AppRole; write the settings file."""
        secrets_dir = self.root / "secrets"
        pw_file = secrets_dir / "postgres-appliance"
        if not pw_file.exists():
            write_secret(pw_file, secrets.token_urlsafe(24))
        service_pw = pw_file.read_text().strip()
        _ensure_database(self.postgres, service_pw)

        approle_file = secrets_dir / "vault-approle.json"
        from crypto.vault_setup import bootstrap_vault

        # Every `up` re-applies the policy (an upgrade may grant new paths, e.g. the owner keys);
        # the secret_id it issues replaces ours only when we had none (earlier ones stay valid).
        role_id, secret_id = bootstrap_vault(self.vault.addr, self.vault.root_token())
        if not approle_file.exists() or not self.vault.state["persistent"]:
            write_secret(approle_file, json.dumps({"role_id": role_id, "secret_id": secret_id}))
        approle = json.loads(approle_file.read_text())
        pg = self.postgres
        values: dict[str, Any] = {
            "var_dir": str(self.var_dir),
            "port": self._state["api"]["port"],
            "database_url": pg.dsn(SERVICE_ROLE, service_pw, pg.state["db"]),
            "database_admin_url": pg.dsn(db=pg.state["db"]),
            "redis_url": self.redis.url(),
            "s3_endpoint": self.s3.endpoint(),
            "s3_access_key": self.s3.state["access_key"],
            "s3_secret_key": self.s3.secret_key,
            "s3_secure": False,
            "key_provider": "vault",
            "vault_addr": self.vault.addr,
            "vault_role_id": approle["role_id"],
            "vault_secret_id": approle["secret_id"],
        }
        lines = ["# Written by `appliance stack up` for the local stack. Holds secrets: mode 0600."]
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
        write_secret(self.config_file, "\n".join(lines) + "\n")

    def _start_api(self) -> None:
        api = self._state["api"]
        if pid_alive(api.get("pid")):
            return
        env = {**os.environ, "APPLIANCE_CONFIG": str(self.config_file)}
        argv = [str(BIN / "appliance"), "serve", "--port", str(api["port"])]
        if not (BIN / "appliance").exists():
            argv = [sys.executable, "-m", "appliance", "serve", "--port", str(api["port"])]
        api["pid"] = spawn(argv, self.root / "api" / "api.log", env=env)
        wait_until(lambda: port_open(api["port"]) or not pid_alive(api["pid"]), 60, "the API to listen")
        if not pid_alive(api["pid"]):
            raise StackError(f"the API exited at start; see {self.root / 'api' / 'api.log'}")


def _ensure_database(pg: Postgres, service_password: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (SERVICE_ROLE,)).fetchone()
        verb = "ALTER" if exists else "CREATE"
        conn.execute(
            sql.SQL(verb + " ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(SERVICE_ROLE), sql.Literal(service_password)
            )
        )
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'appliance_rw'").fetchone():
            conn.execute("CREATE ROLE appliance_rw NOLOGIN")
        conn.execute(sql.SQL("GRANT appliance_rw TO {}").format(sql.Identifier(SERVICE_ROLE)))
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (pg.state["db"],)).fetchone():
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(pg.state["db"])))


def _safe(check: Any) -> bool:
    try:
        return bool(check())
    except Exception:
        return False


def stack_for(var_dir: Path, persistent_vault: bool = True, api_port: int = 8080) -> Stack:
    return Stack(var_dir, persistent_vault=persistent_vault, api_port=api_port)


__all__ = ["LOOPBACK", "ServiceStatus", "Stack", "StackError", "stack_for"]
