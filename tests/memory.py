"""Peak memory of a server process, read from /proc (Linux): what the memory-budget tests measure."""

from __future__ import annotations

from pathlib import Path


def status(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` size field (``VmRSS``, ``VmHWM``, …) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak(pid: int) -> int:
    """Reset the peak-RSS mark (clear_refs 5) and return the current RSS, the baseline of a measurement."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return status(pid, "VmRSS")
