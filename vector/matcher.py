"""Turning raw FAISS hits into an answer: drop tombstoned labels, keep the best encoding per subject.

Pure functions over ``Hits`` so the rules (never return a tombstoned label; one candidate per subject,
best first; every similarity a finite number in [-1, 1]) are tested without a server.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Container
from dataclasses import dataclass

import numpy as np

from vector.index import Hits


@dataclass(slots=True)
class Candidate:
    """One hit; ids stay raw 16-byte values until asked for (the match path only needs their text).

    Treated as immutable once made, but not ``frozen``: a frozen dataclass's ``__init__`` costs 3x
    more, and up to k are built per match on the hot path."""

    subject: bytes
    encoding: bytes
    label: int
    similarity: float

    @property
    def subject_id(self) -> uuid.UUID:
        return uuid.UUID(bytes=self.subject)

    @property
    def encoding_id(self) -> uuid.UUID:
        return uuid.UUID(bytes=self.encoding)


_UUID = np.dtype("V16")  # a 16-byte id as one opaque value: ``tolist()`` gives ``bytes``


def uuid_text(raw: bytes) -> str:
    """``str(uuid.UUID(bytes=raw))`` without building the object (6x cheaper; on the match path)."""
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def best_per_subject(hits: Hits, row: int, k: int, dead: Container[int]) -> tuple[list[Candidate], bool]:
    """Up to k candidates of query ``row``, one per subject, best first, skipping ``dead`` labels.

    Returns (candidates, exhausted): exhausted is True when the hit list ran out before k subjects,
    so the caller may search again with a larger k.
    """
    labels = hits.labels[row].tolist()
    if not labels or labels[-1] < 0 or (dead and not _disjoint(dead, labels)):
        return _best_per_subject_slow(hits, row, labels, k, dead)
    # Common case (no padding, no tombstone among the hits): walk the hits only until k subjects are
    # seen (~30 of 96 here), with every subject id made a bytes object by one C call (``_UUID`` view).
    first: dict[bytes, int] = {}
    for j, subject in enumerate(hits.subjects[row].reshape(-1).view(_UUID).tolist()):
        if subject not in first:
            first[subject] = j
            if len(first) == k:
                break
    encodings = hits.encodings[row].tobytes()  # one copy per row, then slices: no per-hit numpy calls
    sims = hits.sims[row].tolist()
    out = [Candidate(subject, encodings[16 * j: 16 * j + 16], labels[j], sims[j]) for subject, j in first.items()]
    return out, len(out) < k


def _disjoint(dead: Container[int], labels: list[int]) -> bool:
    if isinstance(dead, set | frozenset):
        return dead.isdisjoint(labels)
    return not any(label in dead for label in labels)


def _best_per_subject_slow(hits: Hits, row: int, labels: list[int], k: int,
                           dead: Container[int]) -> tuple[list[Candidate], bool]:
    out: list[Candidate] = []
    seen: set[bytes] = set()
    subjects = hits.subjects[row].tobytes()  # one copy per row, then slices: no per-hit numpy calls
    encodings = hits.encodings[row].tobytes()
    sims = hits.sims[row].tolist()
    for j, label in enumerate(labels):
        if label < 0 or label in dead:
            continue
        subject = subjects[16 * j: 16 * j + 16]
        if subject in seen:
            continue
        seen.add(subject)
        out.append(Candidate(subject, encodings[16 * j: 16 * j + 16], label, sims[j]))
        if len(out) == k:
            return out, False
    return out, True


def finite_similarities(sims: np.ndarray) -> np.ndarray:
    """Clamp inner products of unit vectors to [-1, 1] in place, NaN becoming -1 (``fmax`` ignores NaN).

    Validated queries and templates are unit vectors, so this only trims rounding; it is the guard
    that keeps a degenerate stored template (e.g. one enrolled before norms were checked) from ever
    putting ``inf``/``NaN`` into a reply, which JSON cannot carry."""
    np.fmax(sims, -1.0, out=sims)
    np.fmin(sims, 1.0, out=sims)
    return sims


def candidates_from_rows(rows: list[tuple[int, bytes, bytes, float]], k: int,
                         dead: Container[int]) -> list[Candidate]:
    """``best_per_subject`` over rows (label, subject bytes, encoding bytes, similarity), best first, as the
    cold path gets them from PostgreSQL: the same rules as the hot path's hits."""
    n = len(rows)
    hits = Hits(sims=finite_similarities(np.array([[r[3] for r in rows]], np.float64).reshape(1, n)),
                labels=np.array([[r[0] for r in rows]], np.int64).reshape(1, n),
                subjects=np.frombuffer(b"".join(r[1] for r in rows), np.uint8).reshape(1, n, 16),
                encodings=np.frombuffer(b"".join(r[2] for r in rows), np.uint8).reshape(1, n, 16))
    return best_per_subject(hits, 0, k, dead)[0]


def search_candidates(
    search: Callable[[int], Hits], nq: int, k: int, live: int, dead: Container[int], oversample: int = 4,
    width: int | None = None,
) -> list[list[Candidate]]:
    """Search with ``width`` (default k*oversample) hits, widening (x4) while queries lose too many to
    de-duplication or tombstones."""
    width = min(live, max(width or 0, k * oversample, k + 8))
    while True:
        hits = search(width)
        finite_similarities(hits.sims)
        results: list[list[Candidate]] = []
        short = False
        for row in range(nq):
            cands, exhausted = best_per_subject(hits, row, k, dead)
            results.append(cands)
            short |= exhausted and len(cands) < k
        if not short or width >= live:
            return results
        width = min(live, width * 4)
