"""Ports and start-up failures of the local stack: chosen where no outgoing connection can take them,
moved when another program holds them, and a server that dies at start reported at once with its log."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from appliance.stack.manager import Stack
from appliance.stack.process import (
    GRPC_OFFSET,
    LOOPBACK,
    StackError,
    ephemeral_range,
    free_port,
    pid_alive,
    wait_until,
)
from appliance.stack.services import ObjectStore


def _listen(port: int) -> socket.socket:
    s = socket.socket()
    s.bind((LOOPBACK, port))
    s.listen()
    return s


def test_ports_and_their_grpc_twins_lie_outside_the_ephemeral_range() -> None:
    low, high = ephemeral_range()
    taken: set[int] = set()
    ports = [free_port(taken) for _ in range(40)]
    assert len(set(ports)) == 40
    for port in ports:
        for p in (port, port + GRPC_OFFSET):
            assert not low <= p <= high and p <= 65535
            assert p in taken
    pairs = [free_port(taken, offsets=(1,)) for _ in range(10)]
    assert not {p + 1 for p in pairs} & set(ports) and not set(pairs) & set(ports)


def test_a_held_port_is_never_handed_out() -> None:
    port = free_port()
    with _listen(port):
        assert all(free_port() != port for _ in range(200))


def test_a_server_that_exits_while_awaited_fails_the_wait_with_its_log_and_no_secret(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    script = "echo starting; echo 'Root Token: s.supersecret'; echo 'port 15001 is not available'; exit 3"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["sh", "-c", script], stdout=out, stderr=subprocess.STDOUT)
    with pytest.raises(StackError) as failed:
        wait_until(lambda: False, 60, "the server to answer", pid=proc.pid, log=log)
    message = str(failed.value)
    assert "exited while waiting for the server to answer" in message  # not "timed out after 60s"
    assert "port 15001 is not available" in message and "starting" in message
    assert "supersecret" not in message and "[line withheld]" in message


def test_a_timeout_names_the_last_failed_check() -> None:
    def check() -> bool:
        raise ConnectionRefusedError("nothing listens on 127.0.0.1:1")

    with pytest.raises(StackError, match=r"timed out after 0s .*last check: ConnectionRefusedError: nothing listens"):
        wait_until(check, 0.3, "a probe", interval=0.05)


def test_seaweedfs_whose_port_is_taken_is_reported_with_its_own_words(tmp_path: Path) -> None:
    """weed exits at once when a port it was given is taken; the start must say so, not wait a minute."""
    root = tmp_path / "stack"
    store = ObjectStore(root, {})
    taken: set[int] = set()
    store.allocate(lambda: free_port(taken))
    with _listen(store.state["volume_port"]), pytest.raises(StackError) as failed:
        store.start()
    message = str(failed.value)
    assert "exited while waiting for SeaweedFS" in message
    assert f"port {store.state['volume_port']}" in message and "not available" in message
    assert store.secret_key not in message
    assert not pid_alive(store.pid)


def test_up_moves_a_stopped_servers_port_that_another_program_took(tmp_path: Path) -> None:
    stack = Stack(tmp_path / "var", persistent_vault=False, api_port=free_port())
    try:
        stack.up()
        old = stack.redis.state["port"]
        stack.redis.stop()
        with _listen(old):
            again = Stack(stack.var_dir, persistent_vault=False)
            again.up()
            new = again.redis.state["port"]
            assert new != old
            assert again.redis.running() and again.redis.healthy()
            assert f"redis://{LOOPBACK}:{new}/0" in again.config_file.read_text()
            assert {s.name: s.state for s in again.status()}["redis"] == "running"
            assert again.postgres.state["port"] == stack.postgres.state["port"]  # the others stay put
    finally:
        Stack(tmp_path / "var", persistent_vault=False).down()
