"""Turning raw FAISS hits into an answer: drop tombstoned labels, keep the best encoding per subject.

Pure functions over ``Hits`` so the rules (never return a tombstoned label; one candidate per subject,
best first) are tested without a server.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Container
from dataclasses import dataclass

from vector.index import Hits


@dataclass(frozen=True, slots=True)
class Candidate:
    subject_id: uuid.UUID
    encoding_id: uuid.UUID
    label: int
    similarity: float


def best_per_subject(hits: Hits, row: int, k: int, dead: Container[int]) -> tuple[list[Candidate], bool]:
    """Up to k candidates of query ``row``, one per subject, best first, skipping ``dead`` labels.

    Returns (candidates, exhausted): exhausted is True when the hit list ran out before k subjects,
    so the caller may search again with a larger k.
    """
    out: list[Candidate] = []
    seen: set[bytes] = set()
    labels = hits.labels[row]
    for j in range(labels.shape[0]):
        label = int(labels[j])
        if label < 0 or label in dead:
            continue
        subject = hits.subjects[row, j].tobytes()
        if subject in seen:
            continue
        seen.add(subject)
        out.append(Candidate(uuid.UUID(bytes=subject), uuid.UUID(bytes=hits.encodings[row, j].tobytes()),
                             label, float(hits.sims[row, j])))
        if len(out) == k:
            return out, False
    return out, True


def search_candidates(
    search: Callable[[int], Hits], nq: int, k: int, live: int, dead: Container[int], oversample: int = 4,
) -> list[list[Candidate]]:
    """Search with k*oversample hits, widening (doubling) for queries that lost too many to de-duplication."""
    width = min(live, max(k * oversample, k + 8))
    while True:
        hits = search(width)
        results: list[list[Candidate]] = []
        short = False
        for row in range(nq):
            cands, exhausted = best_per_subject(hits, row, k, dead)
            results.append(cands)
            short |= exhausted and len(cands) < k
        if not short or width >= live:
            return results
        width = min(live, width * 4)
