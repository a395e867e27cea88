"""Threshold calibration from a gallery's own templates: genuine and impostor scores, FAR bounds, TAR, EER.

An open-set match answers "who is this?" mostly for faces that are not enrolled, so the threshold is a
promise about false accepts. The scores are those a deployment sees:

- **genuine**: every pair of encodings of one subject (a known face against its own enrolment);
- **impostor**: for each encoding, its *best* similarity against every other subject (leave one subject
  out: what an unenrolled face meets when it is searched against the whole gallery). One trial per
  encoding, so the FAR is per query, at this gallery's size.

A calibrated threshold is the lowest at which the one-sided 95 % Clopper-Pearson upper bound of the
FAR is at most the target. The bound counts people, not images (``far_upper_bounds``: false accepts
cluster on look-alikes), so a target needs at least ``trials_needed(target)`` enrolled subjects (about
3/target, the rule of three: no error seen among n independent people bounds the rate by ~3/n).
Templates are the protected ones (inner products are preserved), so nothing here needs a key.

A track's fused decision (``vector.fusion``) gets its own threshold from the same method on simulated
tracks (``track_scores``): the same FAR target, per stranger *track* instead of per query.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CONFIDENCE = 0.95
REPORTED_FARS = (1e-2, 1e-3, 1e-4)
BLOCK_ROWS = 1024  # rows per matrix product: 1024 x N float32 (24 MB at N = 6k)
THRESHOLD_DECIMALS = 4  # a calibrated threshold is rounded *up* to this many decimals (never more FAR)


class InsufficientData(ValueError):
    """Too few impostor trials (or genuine pairs) for the requested FAR target."""

    def __init__(self, message: str, needed: int, have: int) -> None:
        super().__init__(message)
        self.needed = needed
        self.have = have


@dataclass(frozen=True)
class Scores:
    genuine: np.ndarray  # float64, ascending: one per pair of encodings of one subject
    impostor: np.ndarray  # float64, ascending: one per encoding (its best score against other subjects)
    subjects: int
    encodings: int
    impostor_subjects: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # code per impostor


def score_sets(templates: np.ndarray, subjects: np.ndarray, block_rows: int = BLOCK_ROWS) -> Scores:
    """Genuine and leave-one-subject-out impostor scores of unit-norm ``templates`` (n, d).

    ``subjects`` (n,) or (n, k) identifies each row's subject (ids of any dtype, or 16-byte uuids).
    Blocked matrix products: memory is ``block_rows x n`` floats, whatever ``n``.
    """
    x = np.ascontiguousarray(templates, dtype=np.float32)
    if x.ndim != 2 or len(x) != len(subjects):
        raise ValueError("templates must be (n, d) with one subject per row")
    ids = np.asarray(subjects)
    if ids.ndim == 2:
        ids = np.ascontiguousarray(ids).view(np.dtype((np.void, ids.dtype.itemsize * ids.shape[1]))).ravel()
    _, code = np.unique(ids, return_inverse=True)
    code = code.ravel()
    n = len(x)
    genuine: list[np.ndarray] = []
    impostor = np.full(n, -np.inf, dtype=np.float32)
    cols = np.arange(n)
    for start in range(0, n, block_rows):
        stop = min(start + block_rows, n)
        sims = x[start:stop] @ x.T
        same = code[start:stop, None] == code[None, :]
        genuine.append(sims[same & (cols[None, :] > cols[start:stop, None])])
        sims[same] = -np.inf
        impostor[start:stop] = sims.max(axis=1)
    g = np.sort(np.concatenate(genuine).astype(np.float64)) if genuine else np.empty(0)
    subjects_n = int(code.max()) + 1 if n else 0
    order = np.argsort(impostor, kind="stable") if subjects_n > 1 else np.empty(0, np.int64)
    return Scores(genuine=np.clip(g, -1.0, 1.0), impostor=np.clip(impostor[order].astype(np.float64), -1.0, 1.0),
                  subjects=subjects_n, encodings=n, impostor_subjects=code[order].astype(np.int64))


def far_upper_bound(errors: int, trials: int, confidence: float = CONFIDENCE) -> float:
    """One-sided exact (Clopper-Pearson) upper confidence bound of a rate seen as ``errors`` in ``trials``.

    With no errors it is ``1 - (1 - confidence) ** (1 / trials)``, which the rule of three (3/n) rounds.
    """
    if trials <= 0:
        return 1.0
    if errors >= trials:
        return 1.0
    alpha = 1.0 - confidence
    if errors == 0:
        return 1.0 - alpha ** (1.0 / trials)
    lo, hi = errors / trials, 1.0
    for _ in range(100):  # bisection on P(X <= errors | trials, p) = alpha (decreasing in p)
        mid = (lo + hi) / 2
        if _binom_cdf(errors, trials, mid) > alpha:
            lo = mid
        else:
            hi = mid
    return hi


def _binom_cdf(k: int, n: int, p: float) -> float:
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0 if k < n else 1.0
    lf = _log_factorials(n)
    i = np.arange(k + 1)
    logs = lf[n] - lf[i] - lf[n - i] + i * math.log(p) + (n - i) * math.log1p(-p)
    return float(np.exp(logs).sum())


@functools.lru_cache(maxsize=8)
def _log_factorials(n: int) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1, dtype=np.float64)))])


def far_upper_bounds(scores: Scores, thresholds: np.ndarray, confidence: float = CONFIDENCE) -> np.ndarray:
    """Upper confidence bound of the FAR at each threshold, counting *people*, not images: the exact
    binomial bound of (subjects with any image accepted as someone else) among (subjects), or of the
    image count among images if that is larger.

    False accepts cluster on look-alike people (every image of one person meets the same near-twin), so
    images are not independent trials. Split by person (calibrate on some LFW people, measure on the
    others), a bound over images was exceeded on 7 of 20 splits at FAR 1e-2, the bound over people on
    none of 10 (tests/vector/test_calibration.py).
    """
    t = np.asarray(thresholds, dtype=np.float64)
    imp, n, codes = scores.impostor, len(scores.impostor), scores.impostor_subjects
    if not n:
        return np.ones(len(t))
    errors = n - np.searchsorted(imp, t, side="left")
    out = _bounds(errors, n, confidence)
    if len(codes) == n:
        # highest impostor score of each subject: a subject is falsely accepted at t when that is >= t
        top = np.full(scores.subjects, -np.inf)
        np.maximum.at(top, codes, imp)
        top = np.sort(top[np.isfinite(top)])
        people = len(top) - np.searchsorted(top, t, side="left")
        out = np.maximum(out, _bounds(people, len(top), confidence))
    return out


def _bounds(errors: np.ndarray, trials: int, confidence: float) -> np.ndarray:
    """``far_upper_bound`` of each count, computed once per distinct count (grids share most counts)."""
    distinct, inverse = np.unique(errors, return_inverse=True)
    return np.array([far_upper_bound(int(k), trials, confidence) for k in distinct])[inverse.ravel()]


def trials_needed(target_far: float, confidence: float = CONFIDENCE) -> int:
    """The fewest independent trials (here: enrolled subjects) whose upper bound can reach ``target_far``
    at all, with no error seen."""
    if not 0.0 < target_far < 1.0:
        raise ValueError("target FAR must be in (0, 1)")
    return math.ceil(math.log(1.0 - confidence) / math.log1p(-target_far))


def allowed_errors(target_far: float, trials: int, confidence: float = CONFIDENCE) -> int:
    """Most false accepts among ``trials`` whose upper bound stays at or below ``target_far`` (-1: none)."""
    lo, hi = -1, trials - 1  # the bound grows with the count: bisect for the last count within the target
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if far_upper_bound(mid, trials, confidence) <= target_far:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass(frozen=True)
class OperatingPoint:
    """What a threshold does on the calibration data."""

    threshold: float
    tar: float  # genuine pairs at or above the threshold / genuine pairs
    genuine_pairs: int
    far: float  # impostor trials at or above / impostor trials
    false_accepts: int
    impostor_trials: int
    false_accepted_subjects: int  # subjects with at least one image accepted as someone else
    impostor_subjects: int
    far_upper_bound: float  # one-sided 95 % Clopper-Pearson, over people (far_upper_bounds)


def operating_point(scores: Scores, threshold: float, confidence: float = CONFIDENCE) -> OperatingPoint:
    """TAR and FAR (with its upper bound) of ``threshold`` on these scores (decision: score >= threshold)."""
    g, imp = scores.genuine, scores.impostor
    accepted = int(len(imp) - np.searchsorted(imp, threshold, side="left"))
    true_acc = int(len(g) - np.searchsorted(g, threshold, side="left"))
    codes = scores.impostor_subjects
    people = len(np.unique(codes[imp >= threshold])) if len(codes) == len(imp) else accepted
    return OperatingPoint(
        threshold=float(threshold), tar=true_acc / len(g) if len(g) else 0.0, genuine_pairs=len(g),
        far=accepted / len(imp) if len(imp) else 0.0, false_accepts=accepted, impostor_trials=len(imp),
        false_accepted_subjects=people, impostor_subjects=scores.subjects if len(imp) else 0,
        far_upper_bound=float(far_upper_bounds(scores, np.array([threshold]), confidence)[0]))


def threshold_for(scores: Scores, target_far: float, confidence: float = CONFIDENCE) -> OperatingPoint:
    """The lowest threshold (rounded up to 4 decimals) whose FAR upper bound is at most ``target_far``.

    Raises InsufficientData when the impostor trials are too few for the target (the count needed is
    on the exception) or when there is no genuine pair (no subject with two encodings).
    """
    need, have = trials_needed(target_far, confidence), (scores.subjects if len(scores.impostor) else 0)
    if have < need:
        raise InsufficientData(f"{have} enrolled subjects; a FAR target of {target_far:g} needs at least {need} "
                               f"(false accepts are counted per person)", needed=need, have=have)
    if not len(scores.genuine):
        raise InsufficientData("no genuine pair: enrol at least two encodings of some subject", needed=1, have=0)
    scale = 10 ** THRESHOLD_DECIMALS
    n = len(scores.impostor)
    k = allowed_errors(target_far, n, confidence)  # the bound over images (the looser one) allows this many
    lowest = float(scores.impostor[::-1][min(max(k, 0), n - 1)])
    grid = np.arange(math.floor(lowest * scale), scale + 1) / scale  # 4-decimal thresholds from there to 1
    ok = np.nonzero(far_upper_bounds(scores, grid, confidence) <= target_far)[0]
    if not len(ok):
        raise InsufficientData(f"no threshold up to 1.0 keeps the FAR bound under {target_far:g}",
                               needed=need, have=have)
    return operating_point(scores, round(float(grid[ok[0]]), THRESHOLD_DECIMALS), confidence)


def equal_error_rate(scores: Scores) -> tuple[float, float]:
    """(EER, threshold): where the impostor accept rate meets the genuine reject rate."""
    g, imp = scores.genuine, scores.impostor
    if not len(g) or not len(imp):
        return float("nan"), float("nan")
    cand = np.unique(np.concatenate([g, imp]))
    far = (len(imp) - np.searchsorted(imp, cand, side="left")) / len(imp)
    frr = np.searchsorted(g, cand, side="left") / len(g)
    i = int(np.argmin(np.abs(far - frr)))
    return float((far[i] + frr[i]) / 2), float(cand[i])


def curve(scores: Scores, points: int = 400) -> dict[str, list[float]]:
    """ROC/DET points (threshold, FAR, TAR) over the score range, for plots and JSON."""
    g, imp = scores.genuine, scores.impostor
    both = np.concatenate([g, imp])
    if not len(g) or not len(imp):
        return {"threshold": [], "far": [], "tar": []}
    ts = np.unique(np.quantile(both, np.linspace(0, 1, points)))
    far = (len(imp) - np.searchsorted(imp, ts, side="left")) / len(imp)
    tar = (len(g) - np.searchsorted(g, ts, side="left")) / len(g)
    return {"threshold": [round(float(x), 6) for x in ts], "far": [float(x) for x in far],
            "tar": [float(x) for x in tar]}


@dataclass
class Report:
    """One calibration: the data it saw, the operating points, and the chosen threshold (if any)."""

    subjects: int
    encodings: int
    genuine_pairs: int
    impostor_trials: int
    confidence: float
    target_far: float
    subjects_needed: int
    chosen: OperatingPoint | None
    refused: str | None
    eer: float
    eer_threshold: float
    points: dict[str, OperatingPoint | dict[str, Any]] = field(default_factory=dict)
    curve: dict[str, list[float]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON (NaN, e.g. the EER without genuine pairs, becomes null: JSON and jsonb have no NaN)."""
        return _finite(asdict(self))


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def calibrate(scores: Scores, target_far: float, fars: tuple[float, ...] = REPORTED_FARS,
              confidence: float = CONFIDENCE) -> Report:
    """The whole report: an operating point per reported FAR (or the trials it would need), EER, curve."""
    points: dict[str, OperatingPoint | dict[str, Any]] = {}
    for far in sorted({*fars, target_far}, reverse=True):
        try:
            points[f"{far:g}"] = threshold_for(scores, far, confidence)
        except InsufficientData as exc:
            points[f"{far:g}"] = {"refused": str(exc), "subjects_needed": exc.needed, "subjects": exc.have}
    chosen = points[f"{target_far:g}"]
    eer, eer_t = equal_error_rate(scores)
    return Report(
        subjects=scores.subjects, encodings=scores.encodings, genuine_pairs=len(scores.genuine),
        impostor_trials=len(scores.impostor), confidence=confidence, target_far=target_far,
        subjects_needed=trials_needed(target_far, confidence),
        chosen=chosen if isinstance(chosen, OperatingPoint) else None,
        refused=None if isinstance(chosen, OperatingPoint) else chosen["refused"],
        eer=eer, eer_threshold=eer_t, points=points, curve=curve(scores))


def _points(report: Report, tar: str, who: str) -> list[str]:
    """The column header and one row per FAR target of a TAR/FAR table (frames or tracks: the same
    columns, ``tar`` naming the TAR column); a target the data cannot show says how many ``who`` it needs."""
    w = max(7, len(tar))
    lines = [f"{'FAR target':>10}  {'threshold':>9}  {tar:>{w}}  {'false acc.':>11}  {'people':>9}  {'FAR':>8}  "
             f"{'FAR ≤ (95 %)':>12}"]
    for name, p in report.points.items():
        if isinstance(p, OperatingPoint):
            lines.append(f"{name:>10}  {p.threshold:9.4f}  {p.tar:{w}.2%}  {p.false_accepts:>5}/{p.impostor_trials:<5}"
                         f"  {p.false_accepted_subjects:>4}/{p.impostor_subjects:<4}  {p.far:8.2e}  "
                         f"{p.far_upper_bound:12.2e}")
        else:
            lines.append(f"{name:>10}  needs ≥ {p['subjects_needed']} {who} (have {p['subjects']})")
    return lines


def table(report: Report) -> str:
    """The TAR/FAR table as plain text (CLI output)."""
    lines = [f"{report.subjects} subjects, {report.encodings} encodings: {report.genuine_pairs} genuine pairs, "
             f"{report.impostor_trials} impostor trials (each encoding's best match among the other subjects)",
             *_points(report, "TAR", "enrolled subjects")]
    lines.append(f"EER {report.eer:.2%} at threshold {report.eer_threshold:.4f}")
    return "\n".join(lines)


def plot(report: Report, path: Path, title: str) -> Path:
    """ROC (TAR against FAR) and DET (FRR against FAR), log FAR axis, as a PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    far = np.asarray(report.curve.get("far", []))
    tar = np.asarray(report.curve.get("tar", []))
    floor = 0.5 / max(report.impostor_trials, 1)
    fig, (roc, det) = plt.subplots(1, 2, figsize=(10, 4.2))
    roc.semilogx(np.maximum(far, floor), tar)
    roc.set(xlabel="FAR (impostor best match accepted)", ylabel="TAR (genuine pairs accepted)", title="ROC")
    det.loglog(np.maximum(far, floor), np.maximum(1 - tar, 0.5 / max(report.genuine_pairs, 1)))
    det.set(xlabel="FAR", ylabel="FRR", title="DET")
    if report.chosen is not None:
        c = report.chosen
        roc.plot([max(c.far, floor)], [c.tar], "o", label=f"threshold {c.threshold:.4f}")
        roc.axvline(report.target_far, ls="--", c="grey", label=f"target FAR {report.target_far:g}")
        det.axvline(report.target_far, ls="--", c="grey")
        roc.legend(loc="lower right")
    for ax in (roc, det):
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --- the track threshold: the fused decision's own calibration --------------------------------------------

TRACK_GENUINE_FRAMES = (3, 5)  # genuine track lengths whose TAR is reported (the first one decides)
TRACKS_PER_SUBJECT = 10  # simulated tracks per subject and side (seeded; LFW: the threshold is the same for seeds 0-2)


@dataclass(frozen=True)
class TrackScores:
    """Simulated tracks on a gallery's own encodings (``track_scores``).

    ``impostor``: one score per stranger track, ascending: the highest threshold at which *any* fused
    answer along the track (after each of its frames) names someone. ``genuine[n]``: one score per
    n-frame genuine track, the highest threshold at which the answer after its n frames names the right
    subject (-2: never, e.g. someone else is named).
    """

    impostor: np.ndarray
    impostor_subjects: np.ndarray  # subject code of each stranger track (the bound counts people)
    genuine: dict[int, np.ndarray]
    subjects: int  # subjects with a stranger track (at least ``min_frames`` encodings)
    encodings: int
    min_frames: int
    window: int

    def scores(self, frames: int) -> Scores:
        """As ``Scores`` (``genuine`` = the ``frames``-frame tracks), for ``threshold_for`` and ``calibrate``."""
        return Scores(genuine=self.genuine.get(frames, np.empty(0)), impostor=self.impostor,
                      subjects=self.subjects, encodings=self.encodings, impostor_subjects=self.impostor_subjects)


def _top_other_subjects(x: np.ndarray, code: np.ndarray, k: int, block_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` best *other* subjects (codes, similarities: best first), a subject's similarity
    being its best encoding's, as the match path lists candidates. Memory: ``block_rows x (n + subjects)``."""
    order = np.argsort(code, kind="stable")
    xs, cs = x[order], code[order]
    starts = np.flatnonzero(np.r_[True, cs[1:] != cs[:-1]])  # group i holds subject code i
    n, k = len(x), min(k, len(starts) - 1)
    top_c, top_s = np.zeros((n, k), np.int64), np.zeros((n, k), np.float64)
    if k <= 0:
        return top_c, top_s
    for start in range(0, n, block_rows):
        stop = min(start + block_rows, n)
        per = np.maximum.reduceat(x[start:stop] @ xs.T, starts, axis=1)
        per[np.arange(stop - start), code[start:stop]] = -np.inf
        part = np.argpartition(-per, k - 1, axis=1)[:, :k]
        vals = np.take_along_axis(per, part, axis=1)
        o = np.argsort(-vals, axis=1, kind="stable")
        top_c[start:stop] = np.take_along_axis(part, o, axis=1)
        top_s[start:stop] = np.clip(np.take_along_axis(vals, o, axis=1), -1.0, 1.0)
    return top_c, top_s


def track_scores(templates: np.ndarray, subjects: np.ndarray, min_frames: int = 2, window: int = 10,
                 genuine_frames: tuple[int, ...] = (1, *TRACK_GENUINE_FRAMES),
                 tracks_per_subject: int = TRACKS_PER_SUBJECT,
                 seed: int = 0, block_rows: int = BLOCK_ROWS) -> TrackScores:
    """Stranger and genuine tracks simulated from the gallery's own encodings, scored by the fusion rule.

    - **stranger**: a subject left out of the gallery (as ``score_sets``), its encodings in a random
      order make one passer-by of ``min(encodings, window)`` frames; each frame lists the best
      ``FRAME_CANDIDATES`` *other* subjects. False accept: the fused answer after any of its frames
      names someone (``vector.fusion.naming_threshold`` of every prefix).
    - **genuine** (n frames, per n in ``genuine_frames``): n encodings of a subject with more than n are
      the frames, its *other* encodings are its enrolment (leave the track's own images out), every
      other subject is enrolled in full. Accepted: the answer after the n frames names that subject
      (n = 1: the frame's own decision, its best subject, as a single-frame baseline on the same tracks).

    Up to ``tracks_per_subject`` tracks per subject and side (random orders and subsets, ``seed``).
    """
    from vector.fusion import FRAME_CANDIDATES, Frame, naming_threshold  # same layer; fusion has no numpy deps

    x = np.ascontiguousarray(templates, dtype=np.float32)
    ids = np.asarray(subjects)
    if x.ndim != 2 or len(x) != len(ids):
        raise ValueError("templates must be (n, d) with one subject per row")
    if ids.ndim == 2:
        ids = np.ascontiguousarray(ids).view(np.dtype((np.void, ids.dtype.itemsize * ids.shape[1]))).ravel()
    _, code = np.unique(ids, return_inverse=True)
    code = code.ravel().astype(np.int64)
    rng = np.random.default_rng([seed, 0])  # stranger orders
    draw = np.random.default_rng([seed, 1])  # genuine subsets: their own stream (the threshold never moves with them)
    top_c, top_s = _top_other_subjects(x, code, FRAME_CANDIDATES, block_rows)
    key = [int(c).to_bytes(16, "big") for c in range(int(code.max()) + 1 if len(code) else 0)]

    def frame(row: int, own: float | None, who: int) -> Frame:
        pairs = list(zip(top_s[row].tolist(), top_c[row].tolist(), strict=True))
        if own is not None:
            pairs.append((own, who))
            pairs.sort(key=lambda p: (-p[0], p[1]))
        pairs = pairs[:FRAME_CANDIDATES]
        return Frame(tuple(key[c] for _, c in pairs), tuple(s for s, _ in pairs))

    impostor: list[float] = []
    impostor_of: list[int] = []
    genuine: dict[int, list[float]] = {n: [] for n in genuine_frames}
    rows_of = np.split(np.argsort(code, kind="stable"), np.cumsum(np.bincount(code))[:-1]) if len(code) else []
    for who, rows in enumerate(rows_of):
        if len(rows) < min_frames:
            continue
        stranger = [frame(int(r), None, who) for r in rows]
        for _ in range(1 if len(rows) <= min_frames else tracks_per_subject):  # 2 images: 1 distinct track
            pick = rng.permutation(len(rows))[:window]
            track = [stranger[i] for i in pick]
            best = max(naming_threshold(track[:j], min_frames)[1] for j in range(min_frames, len(track) + 1))
            impostor.append(best)
            impostor_of.append(who)
        own = x[rows] @ x[rows].T
        for n in genuine_frames:
            if len(rows) <= n:
                continue
            seen: set[frozenset[int]] = set()
            for _ in range(4 * tracks_per_subject):  # distinct subsets only: a repeat is not another trial
                if len(seen) == min(tracks_per_subject, math.comb(len(rows), n)):
                    break
                pick = draw.permutation(len(rows))
                probes, enrolled = pick[:n], pick[n:]
                if frozenset(probes.tolist()) in seen:
                    continue
                seen.add(frozenset(probes.tolist()))
                frames = [frame(int(rows[i]), float(np.clip(own[i, enrolled].max(), -1.0, 1.0)), who) for i in probes]
                if n == 1:  # the single frame's own decision, for comparison under the same protocol
                    named, score = frames[0].subjects[0], frames[0].sims[0]
                else:
                    named, score = naming_threshold(frames[-window:], min_frames)
                genuine[n].append(score if named == key[who] else -2.0)
    order = np.argsort(np.asarray(impostor, np.float64), kind="stable")
    return TrackScores(
        impostor=np.asarray(impostor, np.float64)[order], impostor_subjects=np.asarray(impostor_of, np.int64)[order],
        genuine={n: np.sort(np.asarray(v, np.float64)) for n, v in genuine.items()},
        subjects=len(set(impostor_of)), encodings=len(x), min_frames=min_frames, window=window)


def track_tar(track: TrackScores, threshold: float) -> dict[str, float | int]:
    """TAR of each genuine track length at ``threshold`` (``"3"``: 3-frame tracks), and their counts."""
    out: dict[str, float | int] = {}
    for n, g in track.genuine.items():
        out[f"tar_{n}_frames"] = float((g >= threshold).mean()) if len(g) else float("nan")
        out[f"tracks_{n}_frames"] = len(g)
    return out


def track_table(report: Report, tar: dict[str, float | int] | None, min_frames: int, window: int) -> str:
    """The track threshold's TAR/FAR table (CLI output): one row per FAR target, like ``table``."""
    lines = [f"tracks (fused: mean over up to {window} frames, ≥ {min_frames} frames agreeing): "
             f"{report.impostor_trials} stranger tracks of {report.subjects} subjects, each left out of the "
             f"gallery (a false accept: any answer along the track names someone); {report.genuine_pairs} "
             f"genuine {TRACK_GENUINE_FRAMES[0]}-frame tracks (their images left out of the subject's own)",
             *_points(report, "TAR 3 fr.", f"subjects with ≥ {min_frames} encodings")]
    if tar and report.chosen is not None:
        lines.append(f"at the track threshold {report.chosen.threshold:.4f}: " + ", ".join(
            f"TAR {tar[f'tar_{n}_frames']:.2%} over {tar[f'tracks_{n}_frames']} {n}-frame tracks"
            for n in TRACK_GENUINE_FRAMES if tar.get(f"tracks_{n}_frames")))
    return "\n".join(lines)
