"""Freeze a process for a test: SIGSTOP, then wait until the kernel has stopped every thread.

``kill(SIGSTOP)`` returns once the signal is queued. One thread takes it and stops the others one by
one, and on a busy host the rest run on for milliseconds: long enough for a frozen Vault to answer a
request (seen in CI), or a frozen audit writer to commit a batch.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def thread_states(pid: int) -> list[str]:
    """The scheduler state letter of each thread of ``pid`` (R, S, D, T, t, Z …); threads that exit
    while being read are left out."""
    states = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        states.append(stat.rsplit(")", 1)[1].split()[0])
    return states


def freeze(pid: int, timeout: float = 10.0) -> None:
    """SIGSTOP ``pid`` and return only when all of its threads are stopped."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while True:
        states = thread_states(pid)
        if states and all(s in "Tt" for s in states):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} was not stopped {timeout:g}s after SIGSTOP (threads: {states})")
        time.sleep(0.001)
