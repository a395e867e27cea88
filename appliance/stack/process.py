"""Child-process plumbing shared by every local service: free ports, PIDs, waiting, stopping.

The local stack owns its servers by PID (recorded under ``var/``), never by name, so ``down``
cannot kill a process it did not start.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

LOOPBACK = "127.0.0.1"


class StackError(RuntimeError):
    """A local service could not be started, checked or stopped."""


GRPC_OFFSET = 10000  # SeaweedFS serves gRPC on each HTTP port + 10000
_FIRST_PORT = 15000  # below: ports that well-known services claim (8080, 8333, 9000, 9333 …)


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for the local ports of outgoing connections."""
    try:
        low, high = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default
    return low, high


def listen_candidates(offsets: Sequence[int] = (GRPC_OFFSET,)) -> list[int]:
    """Ports that, with each ``port + offset``, lie outside the ephemeral range.

    An outgoing connection can take any ephemeral port between our choice and the server's bind; a
    server then exits at once (weed: "Port allocation failed"). Outside that range only another
    listener can, and ``port_free`` sees those.
    """
    low, high = ephemeral_range()
    top = 65535 - max(offsets, default=0)
    return [
        p for p in range(_FIRST_PORT, top + 1) if not any(low <= p + o <= high for o in (0, *offsets))
    ]


def free_port(avoid: set[int] | None = None, offsets: Sequence[int] = (GRPC_OFFSET,)) -> int:
    """A loopback TCP port nothing listens on, with each ``port + offset`` free too; the port and its
    neighbours are added to ``avoid`` so one allocation round never hands out a port twice."""
    avoid = set() if avoid is None else avoid
    candidates = listen_candidates(offsets)
    for _ in range(500):
        port = random.choice(candidates) if candidates else _kernel_port()
        wanted = [port + o for o in (0, *offsets)]
        if any(p in avoid or p > 65535 for p in wanted) or not all(port_free(p) for p in wanted):
            continue
        avoid.update(wanted)
        return port
    raise StackError("no free TCP port found on loopback")


def _kernel_port() -> int:
    """An ephemeral port, for a host whose ephemeral range leaves nothing outside it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def port_free(port: int) -> bool:
    """True when a server could bind ``port`` now: no listener, no live connection on it. Servers set
    SO_REUSEADDR, so a socket in TIME_WAIT (ours, from a stopped server) does not count."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def port_open(port: int, host: str = LOOPBACK, timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def pid_alive(pid: int | None) -> bool:
    """True when ``pid`` runs and is not a zombie."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def pid_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def spawn(
    argv: Sequence[str],
    log_path: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    preexec_user: tuple[int, int] | None = None,
) -> int:
    """Start ``argv`` in its own session, output appended to ``log_path``; returns its PID."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        kwargs: dict[str, object] = {}
        if preexec_user is not None:
            kwargs["user"], kwargs["group"] = preexec_user
            kwargs["extra_groups"] = []
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
            **kwargs,  # type: ignore[arg-type]
        )
    return proc.pid


def wait_until(
    check: Callable[[], bool],
    timeout: float,
    what: str,
    interval: float = 0.1,
    *,
    pid: int | None = None,
    log: Path | None = None,
) -> None:
    """Poll ``check`` until it is true. With ``pid``, a server that exits fails the wait at once
    instead of at the deadline; errors name the last failure of ``check`` and the tail of ``log``."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception as exc:  # any failure of a probe means "not yet"
            last = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
        if pid is not None and not pid_alive(pid):
            _reap(pid)
            raise StackError(f"the server exited while waiting for {what}{log_tail(log)}")
        time.sleep(interval)
    detail = f" (last check: {last})" if last else ""
    raise StackError(f"timed out after {timeout:.0f}s waiting for {what}{detail}{log_tail(log)}")


_SECRET_WORDS = ("token", "key", "secret", "password", "passwd")


def log_tail(log: Path | None, lines: int = 12) -> str:
    """The end of a server's log for an error message; lines that may carry a secret (OpenBao's dev
    mode prints its root token) are withheld, since the message reaches a terminal or a CI log."""
    if log is None or not log.exists():
        return ""
    with open(log, "rb") as f:
        f.seek(max(0, log.stat().st_size - 8192))
        tail = f.read().decode(errors="replace").splitlines()[-lines:]
    shown = ["    [line withheld]" if any(w in t.lower() for w in _SECRET_WORDS) else f"    {t[:300]}" for t in tail]
    return f"\n  last lines of {log}:\n" + "\n".join(shown) if shown else ""


def stop_pid(pid: int | None, sig: int = signal.SIGTERM, timeout: float = 15.0) -> bool:
    """Signal ``pid`` and wait for it to exit; SIGKILL after ``timeout``. True if it was running."""
    if not pid_alive(pid):
        return False
    assert pid is not None
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pid)
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        _reap(pid)
        if not pid_alive(pid):
            break
        time.sleep(0.05)
    return True


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def write_secret(path: Path, content: str) -> None:
    """Write a file readable only by its owner (0600), creating parents at 0700."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(content)
    os.chmod(path, 0o600)
