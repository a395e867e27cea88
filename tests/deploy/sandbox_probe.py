"""Probe of appliance.service's sandbox, run by scripts/deploy-test.sh inside the booted converge root.

The converge test installs this file and a drop-in that makes it the unit's ExecStart, then starts
appliance.service under systemd with every hardening directive of systemd/appliance.service and
the site drop-in. It proves the allow-list lets the appliance's stack do its work (numpy and faiss
under W^X, the service's own code, PostgreSQL over the socket with peer authentication through
PrivateUsers=, Redis with the configured password, its data directory) and keeps out what it must
(every other path, W+X memory, other processes' /proc, netlink, binding another port).

It prints one JSON object and exits 0 when every expectation holds.
"""

from __future__ import annotations

import json
import mmap
import os
import socket
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

CONFIG = Path(os.environ.get("APPLIANCE_CONFIG", "/etc/appliance/appliance.toml"))
DATA = Path(os.environ.get("APPLIANCE_VAR_DIR", "/var/lib/appliance"))


def faiss_search() -> None:
    import faiss
    import numpy as np

    x = np.random.default_rng(0).standard_normal((2000, 128)).astype("float32")
    faiss.normalize_L2(x)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(128))
    index.add_with_ids(x, np.arange(len(x), dtype="int64"))
    _, ids = index.search(x[:10], 1)
    assert (ids[:, 0] == np.arange(10)).all()


def service_code() -> None:
    import appliance.api.app  # noqa: F401 - importing the app proves the code and its deps load


def postgresql_peer_login() -> None:
    import psycopg

    settings = tomllib.loads(CONFIG.read_text())
    with psycopg.connect(settings["database_url"], connect_timeout=5) as conn:
        user = conn.execute("SELECT current_user").fetchone()[0]
        assert user == "appliance", user


def redis_with_password() -> None:
    import redis

    settings = tomllib.loads(CONFIG.read_text())
    assert redis.Redis.from_url(settings["redis_url"], socket_timeout=3).ping()


def data_directory_writable() -> None:
    probe = DATA / "sandbox-probe.tmp"
    probe.write_text("ok")
    assert probe.read_text() == "ok"
    probe.unlink()


def write(path: str) -> Callable[[], None]:
    return lambda: Path(path).write_text("x")


def wx_mapping() -> None:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)


def read_meminfo() -> None:
    Path("/proc/meminfo").read_text()


def other_process() -> None:
    os.listdir("/proc/1/fd")


def netlink_socket() -> None:
    socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0).close()


def bind_other_port() -> None:
    # SocketBindDeny= is a cgroup BPF program: a container that may not load BPF cannot enforce it
    # (the runner says so in SANDBOX_PROBE_CGROUP_BPF=0), and then this check proves nothing.
    if os.environ.get("SANDBOX_PROBE_CGROUP_BPF") == "0":
        raise NotImplementedError("cgroup BPF is not available where this probe runs")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 9999))


MUST_WORK = {
    "numpy and faiss search under W^X": faiss_search,
    "the appliance's code imports": service_code,
    "PostgreSQL peer login as appliance": postgresql_peer_login,
    "Redis answers with the configured password": redis_with_password,
    "the data directory is writable": data_directory_writable,
}
MUST_FAIL = {
    "writing /etc/appliance": write("/etc/appliance/sandbox-probe"),
    "writing the virtualenv": write("/opt/appliance/venv/sandbox-probe"),
    "writing /var/lib outside the data directory": write("/var/lib/sandbox-probe"),
    "writing root's home": write("/root/sandbox-probe"),
    "a writable and executable mapping": wx_mapping,
    "reading /proc/meminfo (ProcSubset=pid)": read_meminfo,
    "looking into PID 1": other_process,
    "a netlink socket": netlink_socket,
    "binding a port other than the API's": bind_other_port,
}


def main() -> int:
    report: dict[str, str] = {}
    failures = 0
    for name, probe in MUST_WORK.items():
        try:
            probe()
            report[name] = "works (expected)"
        except Exception as exc:
            report[name] = f"FAILED: {type(exc).__name__}: {exc}"
            failures += 1
    for name, probe in MUST_FAIL.items():
        try:
            probe()
            report[name] = "ALLOWED (must be denied)"
            failures += 1
        except Exception as exc:
            report[name] = f"denied (expected): {type(exc).__name__}"
    print(json.dumps(report, indent=1), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
