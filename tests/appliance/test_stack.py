"""The local stack: real servers, loopback only, idempotent up, honest status, clean down."""

from __future__ import annotations

import re
import subprocess

from appliance.stack.manager import Stack
from appliance.stack.process import pid_alive


def _listening_pids_ports() -> list[tuple[str, int]]:
    out = subprocess.run(["ss", "-H", "-ltnp"], capture_output=True, text=True, check=True).stdout
    return [(line.split()[3], int(pid)) for line in out.splitlines() for pid in re.findall(r"pid=(\d+)", line)]


def _descendants(pids: set[int]) -> set[int]:
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True, check=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        pid, ppid = map(int, line.split())
        children.setdefault(ppid, []).append(pid)
    seen, todo = set(pids), list(pids)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return seen


def test_every_stack_server_listens_on_loopback_only(stack: Stack) -> None:
    ours = _descendants({s.pid for s in stack.services if s.pid})
    sockets = [(addr, pid) for addr, pid in _listening_pids_ports() if pid in ours]
    assert len(sockets) >= 4, sockets  # at least one listener per server
    for addr, pid in sockets:
        host = addr.rsplit(":", 1)[0]
        assert host in ("127.0.0.1", "[::1]"), f"pid {pid} listens on {addr}"


def test_stack_up_twice_is_harmless_and_keeps_the_same_processes(stack: Stack) -> None:
    before = {s.name: s.pid for s in stack.services}
    again = Stack(stack.var_dir, persistent_vault=True)
    again.up()
    after = {s.name: s.pid for s in again.services}
    assert before == after
    assert all(st.state == "running" for st in again.status())


def test_status_reports_a_crashed_server_and_up_restarts_it(stack: Stack) -> None:
    import os
    import signal

    pid = stack.redis.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    probe = Stack(stack.var_dir, persistent_vault=True)
    import time

    for _ in range(50):
        if not pid_alive(pid):
            break
        time.sleep(0.05)
    states = {s.name: s.state for s in probe.status()}
    assert states["redis"] == "crashed"
    probe.up()
    assert {s.name: s.state for s in probe.status()}["redis"] == "running"
    stack.redis.state["pid"] = probe.redis.pid


def test_settings_file_is_private_and_holds_every_endpoint(stack: Stack) -> None:
    mode = stack.config_file.stat().st_mode & 0o777
    assert mode == 0o600
    text = stack.config_file.read_text()
    for key in ("database_url", "redis_url", "s3_endpoint", "vault_addr", "vault_role_id"):
        assert key in text
    assert "root" not in text.lower().split("vault_role_id")[0]  # never the Vault root token


def test_cli_stack_up_status_down_leaves_nothing_running(tmp_path, stack: Stack) -> None:
    """`appliance stack up|status|down` end to end on a second, throwaway var dir."""
    import os
    import sys

    env = {**os.environ, "APPLIANCE_VAR_DIR": str(tmp_path / "var")}
    cli = [sys.executable, "-m", "appliance", "stack"]
    up = subprocess.run([*cli, "up", "--dev-vault"], env=env, capture_output=True, text=True, timeout=180)
    assert up.returncode == 0, up.stderr
    status = subprocess.run([*cli, "status", "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0
    import json

    pids = [s["pid"] for s in json.loads(status.stdout)]
    assert len(pids) == 4 and all(pid_alive(p) for p in pids)
    family = _descendants(set(pids))
    down = subprocess.run([*cli, "down"], env=env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    assert not [p for p in family if pid_alive(p)]
    after = subprocess.run([*cli, "status", "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert after.returncode == 1
    assert {s["state"] for s in json.loads(after.stdout)} == {"stopped"}
