"""Refused requests (401, 403) in the audit trail, aggregated so a flood of bad keys cannot flood the log.

Each refusal is counted in memory under (minute, method, route template, status, caller). The
writer turns every bucket of a minute that has ended into one ``auth.denied`` record (at a flush or
shutdown, every bucket so far): how many requests, the first and last time. The caller is the key's
id (``apikey:<uuid>``, a valid key without the scope), the 12-hex-digit prefix of a key that did not
verify (``apikey-prefix:<prefix>``; never the secret), ``anonymous`` (no header) or ``malformed``.

At most ``MAX_CALLERS`` callers per (minute, method, route, status) are kept apart; the rest are summed
into one ``others`` bucket that says how many distinct callers it holds (counted up to 10,000). So a
burst of any number of bad keys adds at most ``MAX_CALLERS + 1`` records per route, status and
minute, and every refusal is counted in exactly one of them.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from appliance.audit import AuditEvent

MAX_CALLERS = 50
OTHERS = "others"
_PREFIX = re.compile(r"^\s*bearer\s+apl_([0-9a-f]{12})_", re.IGNORECASE)


@dataclass(slots=True)
class _Bucket:
    first: datetime
    last: datetime
    count: int = 0
    callers: set[str] = field(default_factory=set)  # the ``others`` bucket only


def caller_of(authorization: str | None, status: int, keys: Any = None) -> str:
    """Who was refused, never the secret: the key id for a 403 (``keys`` is the process's KeyCache),
    else the key prefix the header claims, ``anonymous`` or ``malformed``."""
    if not authorization:
        return "anonymous"
    if status == 403 and keys is not None:
        with contextlib.suppress(Exception):  # revoked meanwhile: fall back to the prefix
            return str(keys.authenticate(authorization).actor)  # verified headers are cached: a dict lookup
    found = _PREFIX.match(authorization)
    return f"apikey-prefix:{found.group(1).lower()}" if found else "malformed"


class DeniedRequests:
    """Refusal counts per minute, bounded in callers; ``take`` turns finished buckets into events."""

    def __init__(self, max_callers: int = MAX_CALLERS) -> None:
        self.max_callers = max_callers
        self._buckets: dict[tuple[int, str, str, int], dict[str, _Bucket]] = {}
        self._lock = threading.Lock()

    def note(self, method: str, route: str, status: int, caller: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        at = datetime.fromtimestamp(now, UTC)
        with self._lock:
            callers = self._buckets.setdefault((int(now // 60), method, route, status), {})
            bucket = callers.get(caller)
            if bucket is None:
                if len(callers) >= self.max_callers:
                    bucket = callers.get(OTHERS)
                    if bucket is None:
                        bucket = callers[OTHERS] = _Bucket(at, at)
                    if len(bucket.callers) < 10_000:  # memory stays bounded; ``count`` stays exact
                        bucket.callers.add(caller)
                else:
                    bucket = callers[caller] = _Bucket(at, at)
            bucket.count += 1
            bucket.last = max(bucket.last, at)

    def take(self, everything: bool = False, now: float | None = None) -> list[AuditEvent]:
        """One ``auth.denied`` event per bucket of a minute that has ended (``everything``: of any minute)."""
        minute = int((time.time() if now is None else now) // 60)
        with self._lock:
            due = [k for k in self._buckets if everything or k[0] < minute]
            taken = [(k, self._buckets.pop(k)) for k in due]
        events = []
        for (_, method, route, status), callers in taken:
            for caller, b in callers.items():
                details: dict[str, Any] = {"method": method, "status": status, "count": b.count,
                                           "first": b.first.isoformat(timespec="microseconds"),
                                           "last": b.last.isoformat(timespec="microseconds")}
                if caller == OTHERS:
                    details["callers"] = len(b.callers)
                events.append(AuditEvent("auth.denied", caller, outcome="denied", object_id=route, details=details))
        return events
