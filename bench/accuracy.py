"""Accuracy of "who is this?" on real face embeddings: single frames against fused tracks.

Open set, as at a door: some people are enrolled (3 images each), everyone else is a stranger. For
each split (``--seeds``) ``--enrolled`` people with at least 6 LFW images are enrolled; their other
images are genuine probes, every image of everyone else is a stranger probe. A frame's candidates are
the exact per-subject best cosine similarities, top ``FRAME_CANDIDATES`` (what the API returns).
Tracks are simulated by sampling ``n`` images of one person (genuine: from the enrolled person's
probes; stranger: from a stranger's images; at most ``--tracks-per-person`` per person and length).

Rules compared (each one score per probe; a ROC sweeps the threshold):
- ``single``: one frame, its best similarity (the appliance without a track id);
- ``best_frame``: the best frame of the track (what a pipeline gets by asking frame by frame and
  naming whoever is first accepted);
- ``mean``: the mean of a subject's similarity over the track, alone;
- ``two_frames``: at least 2 frames reach the threshold for the same subject, alone;
- ``fused``: the appliance's rule (``vector.fusion``: mean AND 2 frames agree), through
  ``vector.fusion.naming_threshold``; the appliance applies it at the model's *track* threshold
  (``ModelSpec.track_threshold``, bench/thresholds.py), frames at the single-frame one.
A genuine probe counts as accepted only when the named subject is the right one.

Only dlib-resnet-v1 embeddings exist here (../shared/data); there is no ArcFace data on this machine,
so arcface-r100 is not measured. Writes bench/results/accuracy.json and accuracy.png.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance.settings import DEFAULT_MODELS
from bench.common import RESULTS, write_result
from vector.fusion import FRAME_CANDIDATES, Frame, naming_threshold

SHARED = Path(os.environ.get("APPLIANCE_SHARED_DIR", Path(__file__).resolve().parent.parent.parent / "shared"))
DATA = SHARED / "data" / "faces_more_dlib128.npz"
MODEL = "dlib-resnet-v1"
ENROL_IMAGES = 3
FARS = (1e-2, 1e-3)
RULES = ("best_frame", "mean", "two_frames", "fused")


def load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(path)
    v = data["vectors"].astype(np.float64)
    return v / np.linalg.norm(v, axis=1, keepdims=True), data["labels"]


def frames_of(vectors: np.ndarray, gallery: np.ndarray, owner: np.ndarray, n_subjects: int) -> list[Frame]:
    """Each probe's top FRAME_CANDIDATES subjects by best similarity over that subject's gallery images;
    subject ids are 16-byte values as on the match path."""
    sims = vectors @ gallery.T
    per = np.full((len(vectors), n_subjects), -1.0)
    for s in range(n_subjects):
        per[:, s] = sims[:, owner == s].max(axis=1)
    top = np.argsort(-per, axis=1)[:, :FRAME_CANDIDATES]
    return [Frame(tuple(int(s).to_bytes(16, "big") for s in row), tuple(float(per[i, s]) for s in row))
            for i, row in enumerate(top)]


def rule_score(rule: str, frames: list[Frame]) -> tuple[bytes | None, float]:
    """(named subject, highest threshold at which the rule names it) for one track."""
    if rule == "fused":
        return naming_threshold(frames, 2)
    per: dict[bytes, list[float]] = {}
    floors = [f.sims[-1] for f in frames]
    for i, f in enumerate(frames):
        for s in f.subjects:
            per.setdefault(s, list(floors))[i] = f.sims[f.subjects.index(s)]
    if rule == "best_frame":
        return max(((s, max(x)) for s, x in per.items()), key=lambda t: t[1])
    if rule == "mean":
        return max(((s, float(np.mean(x))) for s, x in per.items()), key=lambda t: t[1])
    if rule == "two_frames":
        return max(((s, sorted(x, reverse=True)[1]) for s, x in per.items()), key=lambda t: t[1])
    raise ValueError(rule)


def split(rng: np.random.Generator, vectors: np.ndarray, labels: np.ndarray, enrolled: int, track_len: list[int],
          per_person: int) -> dict[str, Any]:
    """One enrolled/stranger split: every probe's frame, and tracks as lists of probe rows."""
    people = sorted(set(labels.tolist()))
    rows = {p: np.flatnonzero(labels == p) for p in people}
    pool = [p for p in people if len(rows[p]) >= ENROL_IMAGES + 3]
    chosen = sorted(rng.choice(pool, enrolled, replace=False).tolist())
    gallery, owner, genuine = [], [], {}
    for s, p in enumerate(chosen):
        r = rng.permutation(rows[p])
        gallery += r[:ENROL_IMAGES].tolist()
        owner += [s] * ENROL_IMAGES
        genuine[s] = r[ENROL_IMAGES:]
    strangers = [rows[p] for p in people if p not in set(chosen)]
    probe_rows = np.concatenate([*genuine.values(), *strangers])
    frames = frames_of(vectors[probe_rows], vectors[gallery], np.array(owner), enrolled)
    frame_at = {int(r): f for r, f in zip(probe_rows, frames, strict=True)}

    def tracks(of: np.ndarray, n: int) -> list[list[int]]:
        combos = list(itertools.combinations(of.tolist(), n))
        if len(combos) > per_person:
            combos = [combos[i] for i in rng.choice(len(combos), per_person, replace=False)]
        return [list(c) for c in combos]

    out: dict[str, Any] = {"frame": frame_at, "single_genuine": [(s, int(r)) for s, rs in genuine.items() for r in rs],
                           "single_stranger": [int(r) for rs in strangers for r in rs], "tracks": {}}
    for n in track_len:
        out["tracks"][n] = {
            "genuine": [(s, t) for s, rs in genuine.items() if len(rs) >= n for t in tracks(rs, n)],
            "stranger": [t for rs in strangers if len(rs) >= n for t in tracks(rs, n)],
        }
    return out


def roc(genuine: np.ndarray, correct: np.ndarray, stranger: np.ndarray) -> dict[str, Any]:
    """TAR (right subject named) against FAR (a stranger named) over every threshold that changes either."""
    thresholds = np.unique(np.concatenate([genuine, stranger]))[::-1]
    s_sorted = np.sort(stranger)
    g_ok = np.sort(genuine[correct])
    far = 1.0 - np.searchsorted(s_sorted, thresholds, side="left") / len(stranger)
    tar = (len(g_ok) - np.searchsorted(g_ok, thresholds, side="left")) / len(genuine)
    return {"thresholds": thresholds, "far": far, "tar": tar}


def at_far(genuine: np.ndarray, correct: np.ndarray, stranger: np.ndarray, target: float) -> dict[str, Any]:
    """The lowest threshold whose measured FAR is ≤ target, and the TAR there. ``upper_far``: 95 % upper
    bound on the true FAR from the count of strangers accepted (rule of three when none)."""
    s = np.sort(stranger)[::-1]
    allowed = int(np.floor(target * len(s)))
    t = float(np.nextafter(s[allowed], 2.0)) if allowed < len(s) else -1.0
    accepted = int((stranger >= t).sum())
    tar = float(((genuine >= t) & correct).mean())
    return {"target_far": target, "threshold": round(t, 4), "tar": round(tar, 4), "far": accepted / len(s),
            "strangers": len(s), "strangers_accepted": accepted, "upper_far_95": round(_upper(accepted, len(s)), 5),
            "genuine": len(genuine)}


def _upper(k: int, n: int) -> float:
    """One-sided 95 % upper bound on a rate seen k times in n (rule of three at k = 0, else a Wilson bound)."""
    if k == 0:
        return 3.0 / n
    p, z = k / n, 1.645
    return (p + z * z / (2 * n) + z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / (1 + z * z / n)


def at_threshold(genuine: np.ndarray, correct: np.ndarray, stranger: np.ndarray, t: float) -> dict[str, float]:
    return {"threshold": round(t, 4), "tar": round(float(((genuine >= t) & correct).mean()), 4),
            "far": round(float((stranger >= t).mean()), 5)}


def scores(pairs: list[tuple[int, bytes | None, float]]) -> tuple[np.ndarray, np.ndarray]:
    return (np.array([p[2] for p in pairs]), np.array([p[1] == int(p[0]).to_bytes(16, "big") for p in pairs]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--seeds", type=int, default=5, help="enrolled/stranger splits, pooled")
    ap.add_argument("--enrolled", type=int, default=100, help="people enrolled per split")
    ap.add_argument("--tracks", type=int, action="append", help="track lengths (repeatable); default 2, 3, 5")
    ap.add_argument("--tracks-per-person", type=int, default=60)
    args = ap.parse_args()
    lengths = args.tracks or [2, 3, 5]
    started = time.perf_counter()
    vectors, labels = load(args.data)
    single_g: list[tuple[int, bytes | None, float]] = []
    single_s: list[float] = []
    tr_g: dict[tuple[str, int], list[tuple[int, bytes | None, float]]] = {}
    tr_s: dict[tuple[str, int], list[float]] = {}
    for seed in range(args.seeds):
        sp = split(np.random.default_rng(seed), vectors, labels, args.enrolled, lengths, args.tracks_per_person)
        fr = sp["frame"]
        single_g += [(s, fr[r].subjects[0], fr[r].sims[0]) for s, r in sp["single_genuine"]]
        single_s += [fr[r].sims[0] for r in sp["single_stranger"]]
        for n, tracks in sp["tracks"].items():
            for rule in RULES:
                tr_g.setdefault((rule, n), []).extend(
                    (s, *rule_score(rule, [fr[r] for r in t])) for s, t in tracks["genuine"])
                tr_s.setdefault((rule, n), []).extend(
                    rule_score(rule, [fr[r] for r in t])[1] for t in tracks["stranger"])
    g, ok = scores(single_g)
    st = np.array(single_s)
    default = DEFAULT_MODELS[MODEL].threshold  # what an appliance applies unless calibrated or told otherwise
    track_default = DEFAULT_MODELS[MODEL].fused_threshold  # what the appliance's fused decision applies
    single = {"probes": {"genuine": len(g), "stranger": len(st)}, "at_far": [at_far(g, ok, st, x) for x in FARS],
              "at_default_threshold": at_threshold(g, ok, st, default),
              "at_track_default_threshold": at_threshold(g, ok, st, track_default)}
    op = {str(x): single["at_far"][i]["threshold"] for i, x in enumerate(FARS)}  # the single-frame thresholds
    op["default"] = default
    op["track_default"] = track_default
    curves = {"single": roc(g, ok, st)}
    tracks_out: dict[str, Any] = {}
    for (rule, n), pairs in tr_g.items():
        tg, tok = scores(pairs)
        ts = np.array(tr_s[(rule, n)])
        tracks_out[f"{rule}/{n}"] = {
            "rule": rule, "frames": n, "tracks": {"genuine": len(tg), "stranger": len(ts)},
            "at_far": [at_far(tg, tok, ts, x) for x in FARS],
            # the single-frame thresholds applied to the track (the appliance before track thresholds), and
            # "track_default": the model's track threshold, what the appliance's fused decision now applies
            "at_single_threshold": {name: at_threshold(tg, tok, ts, t) for name, t in op.items()},
        }
        if rule in ("fused", "best_frame"):
            curves[f"{rule}/{n}"] = roc(tg, tok, ts)
    result = {
        "model": MODEL, "data": args.data.name, "seeds": args.seeds, "enrolled": args.enrolled,
        "enrol_images": ENROL_IMAGES, "frame_candidates": FRAME_CANDIDATES, "single": single, "tracks": tracks_out,
        "arcface-r100": "not measured: no ArcFace embeddings on this machine",
        "seconds": round(time.perf_counter() - started, 1),
    }
    path = write_result("accuracy", result)
    plot(curves, RESULTS / "accuracy.png", args)
    print(summary(result))
    print(f"wrote {path} and {RESULTS / 'accuracy.png'}")


def plot(curves: dict[str, dict[str, Any]], path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, c in curves.items():
        far, tar = np.maximum(c["far"], 1e-5), c["tar"]
        a.plot(far, tar, label=name)
        b.plot(far, np.maximum(1 - tar, 1e-4), label=name)
    a.set(xscale="log", xlim=(1e-4, 1), ylim=(0.4, 1.0), xlabel="FAR (stranger named)",
          ylabel="TAR (right person named)", title="ROC")
    b.set(xscale="log", yscale="log", xlim=(1e-4, 1), ylim=(1e-3, 1), xlabel="FAR", ylabel="FRR", title="DET")
    for ax in (a, b):
        ax.grid(True, which="both", alpha=0.3)
        ax.axvline(1e-3, color="grey", lw=0.5)
        ax.axvline(1e-2, color="grey", lw=0.5)
    a.legend(fontsize=8)
    fig.suptitle(f"{MODEL}, LFW: {args.enrolled} enrolled x {ENROL_IMAGES} images, {args.seeds} splits pooled")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(result: dict[str, Any]) -> str:
    def cells(rows: list[dict[str, Any]]) -> str:
        return "    ".join(f"{r['tar']:.3f} ({r['threshold']:.4f})" for r in rows)

    def at(r: dict[str, Any]) -> str:
        return f"{r['tar']:.3f} / {r['far']:.5f}"

    d = result["single"]["at_default_threshold"]["threshold"]
    td = result["single"]["at_track_default_threshold"]["threshold"]
    lines = [f"rule/frames        TAR@FAR1e-2 (thr)   TAR@FAR1e-3 (thr)   TAR / FAR at single-frame 1e-2 thr"
             f" | at default {d} | at track default {td}"]
    s = result["single"]
    lines.append(f"{'single':18} {cells(s['at_far'])}    {at(s['at_far'][0])}    {at(s['at_default_threshold'])}"
                 f"    {at(s['at_track_default_threshold'])}")
    for name, t in sorted(result["tracks"].items(), key=lambda kv: (kv[1]["frames"], kv[0])):
        op = t["at_single_threshold"]
        lines.append(f"{name:18} {cells(t['at_far'])}    {at(op['0.01'])}    {at(op['default'])}"
                     f"    {at(op['track_default'])}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
