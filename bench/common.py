"""Shared pieces of the vector benchmarks: a stack in var/bench, `appliance serve` as a subprocess,
clustered synthetic identities, keep-alive HTTP timing, result files."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from appliance.stack.process import free_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MODEL = "dlib-resnet-v1"


def start_stack(name: str = "bench") -> Any:
    """A Stack under var/<name> (kept between runs so data and Vault survive), migrated."""
    from appliance.db.migrate import migrate
    from appliance.stack.manager import Stack
    from appliance.stack.services import StackExtraMissing

    stack = Stack(ROOT / "var" / name, persistent_vault=True, api_port=free_port())
    try:
        stack.up()
    except StackExtraMissing as exc:
        raise SystemExit(f"the benchmarks run against the local stack: {exc}") from exc
    migrate(settings_of(stack).database_admin_url.get_secret_value())
    return stack


def settings_of(stack: Any) -> Any:
    import tomllib

    from appliance.settings import Settings

    values = tomllib.loads(Path(stack.config_file).read_text())
    values.pop("port", None)
    return Settings(**values, log_json=True)


def api_key(stack: Any, scopes: list[str], name: str) -> str:
    import psycopg

    from appliance.auth import create_key

    with psycopg.connect(settings_of(stack).database_admin_url.get_secret_value()) as conn:
        _, token = create_key(conn, name, scopes)
    return token


class Server:
    """`appliance serve` in its own process group; ``ready_seconds`` is spawn → index ready."""

    def __init__(self, stack: Any, token: str, workers: int = 1, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.token = token
        full_env = {**os.environ, "APPLIANCE_CONFIG": str(stack.config_file), "APPLIANCE_LOG_LEVEL": "WARNING",
                    **(env or {})}
        log = open(Path(stack.var_dir) / f"serve-{self.port}.log", "wb")  # noqa: SIM115 - lives with the process
        started = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "appliance", "serve", "--port", str(self.port), "--workers", str(workers)],
            env=full_env, stdout=log, stderr=log, start_new_session=True)
        self.ready_seconds = self.wait_ready(started)

    def wait_ready(self, started: float, timeout: float = 1800) -> float:
        while time.perf_counter() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                if self.index_ready():
                    return time.perf_counter() - started
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError("server not ready")

    def index_ready(self) -> bool:
        """One ``GET /v1/index`` on a fresh connection: does the worker that answers say ready?"""
        status, body = request(self.conn(), "GET", "/v1/index", None, self.token)
        return status == 200 and bool(json.loads(body)["ready"])

    def wait_all_workers(self, tries: int = 40, timeout: float = 1800) -> None:
        """With several uvicorn workers, /v1/index on fresh connections until every one says ready."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if all(self.index_ready() for _ in range(tries)):
                return
            time.sleep(0.2)
        raise TimeoutError("not every worker became ready")

    def conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)

    def rss_bytes(self) -> int:
        import psutil

        proc = psutil.Process(self.proc.pid)
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(120)


def request(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None, token: str,
            ctype: str = "application/json", extra: dict[str, str] | None = None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": ctype, **(extra or {})}
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    return resp.status, resp.read()


class RawClient:
    """A minimal keep-alive HTTP/1.1 client (pre-built request bytes, no header objects), so the load
    generator spends ~10x less CPU per request than http.client on a 2-core box it shares with the server."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    @staticmethod
    def build(path: str, body: bytes, token: str, ctype: str = "application/octet-stream") -> bytes:
        return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body

    def send(self, raw_request: bytes) -> tuple[int, bytes]:
        self.sock.sendall(raw_request)
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.sock.recv(65536)
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        while len(rest) < length:
            rest += self.sock.recv(65536)
        self.buf = rest[length:]
        return status, rest[:length]


def identities(n_encodings: int, dim: int = 128, per_identity: int = 10, seed: int = 7,
               spread: float = 0.35) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clustered synthetic data: (vectors (n, dim) float32, identity index per row, centres).

    Each sample is a random centre plus noise of norm ≈ ``spread`` (genuine cosine ≈ 0.94, impostor ≈ 0).
    """
    rng = np.random.default_rng(seed)
    n_ids = n_encodings // per_identity
    centres = rng.standard_normal((n_ids, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    ident = np.repeat(np.arange(n_ids), per_identity)
    noise = rng.standard_normal((n_ids * per_identity, dim)).astype(np.float32) * (spread / np.sqrt(dim))
    x = centres[ident] + noise
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), ident, centres


def probes(centres: np.ndarray, n: int, seed: int = 99, spread: float = 0.35) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    who = rng.choice(len(centres), size=n, replace=n > len(centres))
    noise = rng.standard_normal((n, centres.shape[1])).astype(np.float32) * (spread / np.sqrt(centres.shape[1]))
    q = centres[who] + noise
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32), who


def pct(values: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(values), p)) if values else float("nan")


def write_result(name: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return path


WRK_SCRIPT = r"""
-- Cycles through pre-built bodies (n x size bytes in BODIES) and writes latency percentiles as JSON.
local f = assert(io.open(os.getenv("WRK_BODIES"), "rb"))
local blob = f:read("*a")
f:close()
local size = tonumber(os.getenv("WRK_BODY_SIZE"))
local path = os.getenv("WRK_PATH")
local headers = {["Authorization"] = "Bearer " .. os.getenv("WRK_TOKEN"),
                 ["Content-Type"] = os.getenv("WRK_CTYPE")}
local reqs, n = {}, math.floor(#blob / size)
local counter = 0

function init(args)
  for i = 0, n - 1 do
    reqs[i] = wrk.format("POST", path, headers, blob:sub(i * size + 1, (i + 1) * size))
  end
end

function request()
  counter = counter + 1
  return reqs[counter % n]
end

function done(summary, latency, requests)
  local out = assert(io.open(os.getenv("WRK_OUT"), "w"))
  out:write(string.format(
    '{"requests": %d, "seconds": %.6f, "non_2xx": %d, "socket_errors": %d, "p50_us": %d, "p90_us": %d, '
    .. '"p99_us": %d, "max_us": %d, "mean_us": %.1f}',
    summary.requests, summary.duration / 1e6, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
  out:close()
end
"""


def wrk_available() -> bool:
    import shutil

    return shutil.which("wrk") is not None


def wrk_run(port: int, path: str, bodies: list[bytes], token: str, connections: int, seconds: float,
            threads: int = 1, ctype: str = "application/octet-stream") -> dict[str, float]:
    """Drive ``path`` with wrk (C, keep-alive, ``connections`` concurrent): a load generator that costs
    a few microseconds per request, so a 2-core box measures the server rather than the client."""
    import tempfile

    size = len(bodies[0])
    assert all(len(b) == size for b in bodies)
    with tempfile.TemporaryDirectory() as tmp:
        script, blob, out = Path(tmp) / "match.lua", Path(tmp) / "bodies.bin", Path(tmp) / "out.json"
        script.write_text(WRK_SCRIPT)
        blob.write_bytes(b"".join(bodies))
        env = {**os.environ, "WRK_BODIES": str(blob), "WRK_BODY_SIZE": str(size), "WRK_PATH": path,
               "WRK_TOKEN": token, "WRK_CTYPE": ctype, "WRK_OUT": str(out)}
        done = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
                               "--timeout", "5s", "-s", str(script), f"http://127.0.0.1:{port}"],
                              env=env, capture_output=True, text=True)
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip()[-500:]}")
        raw = json.loads(out.read_text())
    return {"n": raw["requests"], "p50_ms": round(raw["p50_us"] / 1e3, 3), "p99_ms": round(raw["p99_us"] / 1e3, 3),
            "per_second": round(raw["requests"] / raw["seconds"], 1), "non_2xx": raw["non_2xx"],
            "socket_errors": raw["socket_errors"], "load_generator": f"wrk -t{threads} -c{connections}"}


class WrkLoad:
    """wrk driving ``path`` from now until ``stop()`` (SIGINT: wrk stops and still reports), for a load
    that must last exactly as long as a measurement made beside it, not a fixed duration."""

    def __init__(self, port: int, path: str, bodies: list[bytes], token: str, connections: int, threads: int = 1,
                 ctype: str = "application/octet-stream") -> None:
        import tempfile

        size = len(bodies[0])
        assert all(len(b) == size for b in bodies)
        self._tmp = tempfile.TemporaryDirectory()
        tmp = Path(self._tmp.name)
        script, blob, self._out = tmp / "load.lua", tmp / "bodies.bin", tmp / "out.json"
        script.write_text(WRK_SCRIPT)
        blob.write_bytes(b"".join(bodies))
        env = {**os.environ, "WRK_BODIES": str(blob), "WRK_BODY_SIZE": str(size), "WRK_PATH": path,
               "WRK_TOKEN": token, "WRK_CTYPE": ctype, "WRK_OUT": str(self._out)}
        self.generator = f"wrk -t{threads} -c{connections}"
        self._proc = subprocess.Popen(["wrk", f"-t{threads}", f"-c{connections}", "-d86400s", "--timeout", "5s",
                                       "-s", str(script), f"http://127.0.0.1:{port}"],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def stop(self) -> dict[str, Any]:
        """Stop wrk; its counts and latency percentiles over the whole run (as ``wrk_run`` reports)."""
        self._proc.send_signal(signal.SIGINT)
        _, err = self._proc.communicate(timeout=60)
        try:
            if self._proc.returncode != 0 or not self._out.exists():
                raise RuntimeError(f"wrk failed ({self._proc.returncode}): {err.strip()[-500:]}")
            raw = json.loads(self._out.read_text())
        finally:
            self._tmp.cleanup()
        return {"n": raw["requests"], "p50_ms": round(raw["p50_us"] / 1e3, 3),
                "p99_ms": round(raw["p99_us"] / 1e3, 3), "per_second": round(raw["requests"] / raw["seconds"], 1),
                "non_2xx": raw["non_2xx"], "socket_errors": raw["socket_errors"], "load_generator": self.generator}
