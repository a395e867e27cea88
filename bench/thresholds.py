"""The default threshold of ``dlib-resnet-v1``, reproduced from real data for a stated FAR target.

Calibrates exactly as ``appliance models calibrate`` does (``vector.calibration``: genuine pairs,
leave-one-subject-out impostors, 95 % upper bound of the FAR counted over people) on
``../shared/data/faces_more_dlib128.npz`` (LFW, 5,924 dlib embeddings of 1,570 people), and reports:

- the threshold for ``--target-far`` (default 1 %: the lowest target 1,570 people can support at 95 %
  confidence; 0.1 % would need 2,995 people), with TAR over genuine pairs;
- what a doorbell sees for an enrolled person: a probe against the best of 5 enrolment images
  (people with at least 6 images), TAR at that threshold;
- the baseline measured in the same run: the previous default 0.94 on the same data;
- the **track threshold** (the fused decision's, ``vector.calibration.track_scores``) for the same target
  per stranger *track* (every subject left out in turn walks past with its images, up to the fusion
  window, in random orders; a false accept is any fused answer along the track naming someone), with
  TAR of 3- and 5-frame genuine tracks, and, as baselines in the same run, those tracks held to the
  single-frame threshold (the appliance before) and single frames at the single-frame threshold.

Checks that ``appliance.settings.DEFAULT_MODELS`` holds both numbers (exit 1 if not).
Writes bench/results/thresholds.json, thresholds.png and thresholds-track.png.
Usage: python bench/thresholds.py [--target-far 0.01]
No ArcFace embeddings exist on this machine: arcface-r100's default stays uncalibrated.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance.settings import DEFAULT_MODELS
from bench.common import RESULTS, write_result
from vector import calibration as cal

SHARED = Path(os.environ.get("APPLIANCE_SHARED_DIR", Path(__file__).resolve().parent.parent.parent / "shared"))
DATA = SHARED / "data" / "faces_more_dlib128.npz"
MODEL = "dlib-resnet-v1"
PREVIOUS_DEFAULT = 0.94  # the midpoint of issue 19's "why"
ENROL_IMAGES = 5


def best_of_enrolled_tar(x: np.ndarray, people: np.ndarray, threshold: float) -> dict[str, Any]:
    """People with > ENROL_IMAGES images: the rest of their images against the best of their first five."""
    sims = []
    for person in np.unique(people):
        rows = x[people == person]
        if len(rows) <= ENROL_IMAGES:
            continue
        sims.extend((rows[ENROL_IMAGES:] @ rows[:ENROL_IMAGES].T).max(axis=1).tolist())
    arr = np.asarray(sims)
    return {"probes": len(arr), "people": int(sum((people == p).sum() > ENROL_IMAGES for p in np.unique(people))),
            "tar": float((arr >= threshold).mean())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target-far", type=float, default=1e-2)
    args = ap.parse_args()
    data = np.load(DATA)
    x = data["vectors"].astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    people = data["labels"]
    scores = cal.score_sets(x, people)
    report = cal.calibrate(scores, args.target_far)
    print(cal.table(report))
    if report.chosen is None:
        print(f"refused: {report.refused}")
        return 1
    chosen, baseline = report.chosen, cal.operating_point(scores, PREVIOUS_DEFAULT)
    result = {
        "data": str(DATA.name), "model": MODEL, "target_far": args.target_far, "confidence": cal.CONFIDENCE,
        "report": {k: v for k, v in report.to_json().items() if k != "curve"},
        "doorbell_best_of_5": best_of_enrolled_tar(x, people, chosen.threshold),
        "baseline_previous_default": {**baseline.__dict__,
                                      "doorbell_best_of_5": best_of_enrolled_tar(x, people, PREVIOUS_DEFAULT)},
        "configured_default": DEFAULT_MODELS[MODEL].threshold,
    }
    result["far_bound_ratio_vs_baseline"] = chosen.far_upper_bound / baseline.far_upper_bound
    tracks = cal.track_scores(x, people)
    track_report = cal.calibrate(tracks.scores(cal.TRACK_GENUINE_FRAMES[0]), args.target_far)
    fused = track_report.chosen
    if fused is None:
        print(f"track threshold refused: {track_report.refused}")
        return 1
    print(cal.track_table(track_report, cal.track_tar(tracks, fused.threshold), 2, 10))
    result["track"] = {
        "report": {k: v for k, v in track_report.to_json().items() if k != "curve"},
        "tar_at_track_threshold": cal.track_tar(tracks, fused.threshold),
        "baseline_tracks_at_single_threshold": {**cal.track_tar(tracks, chosen.threshold),
                                                **_far(cal.operating_point(tracks.scores(3), chosen.threshold))},
        "single_frame_far_at_track_threshold": _far(cal.operating_point(scores, fused.threshold)),
        "other_seeds": {str(seed): cal.threshold_for(cal.track_scores(x, people, seed=seed).scores(3),
                                                     args.target_far).threshold for seed in (1, 2)},
        "configured_default": DEFAULT_MODELS[MODEL].track_threshold,
    }
    tar, before = result["track"]["tar_at_track_threshold"], result["track"]["baseline_tracks_at_single_threshold"]
    result["track"]["tar_ratio_vs_baseline"] = {n: tar[f"tar_{n}_frames"] / before[f"tar_{n}_frames"]
                                                for n in cal.TRACK_GENUINE_FRAMES}
    path = write_result("thresholds", result)
    cal.plot(report, RESULTS / "thresholds.png", f"{MODEL} on LFW: {report.subjects} people, {report.encodings} images")
    cal.plot(track_report, RESULTS / "thresholds-track.png",
             f"{MODEL} on LFW, fused tracks: {track_report.impostor_trials} stranger, "
             f"{track_report.genuine_pairs} genuine 3-frame")
    print(f"threshold {chosen.threshold:.4f}: FAR {chosen.far:.2e} seen, ≤ {chosen.far_upper_bound:.2e} (95 %, over "
          f"people); TAR {chosen.tar:.2%} (pairs), {result['doorbell_best_of_5']['tar']:.2%} (best of 5 enrolled)")
    print(f"baseline {PREVIOUS_DEFAULT}: FAR {baseline.far:.2e} seen, ≤ {baseline.far_upper_bound:.2e}; "
          f"TAR {baseline.tar:.2%} (pairs), {result['baseline_previous_default']['doorbell_best_of_5']['tar']:.2%}")
    print(f"track threshold {fused.threshold:.4f}: FAR {fused.far:.2e} per stranger track seen, ≤ "
          f"{fused.far_upper_bound:.2e} (95 %, over people); TAR {tar['tar_3_frames']:.2%} (3 frames), "
          f"{tar['tar_5_frames']:.2%} (5 frames); seeds 1, 2: {result['track']['other_seeds']}")
    print(f"baseline, tracks at the single-frame {chosen.threshold}: TAR {before['tar_3_frames']:.2%} (3 frames), "
          f"{before['tar_5_frames']:.2%} (5 frames); one frame alone {before['tar_1_frames']:.2%}")
    print(f"wrote {path}")
    status = 0
    if DEFAULT_MODELS[MODEL].threshold != chosen.threshold:
        print(f"appliance.settings.DEFAULT_MODELS[{MODEL!r}] is {DEFAULT_MODELS[MODEL].threshold}, "
              f"not the calibrated {chosen.threshold}")
        status = 1
    if DEFAULT_MODELS[MODEL].track_threshold != fused.threshold:
        print(f"appliance.settings.DEFAULT_MODELS[{MODEL!r}].track_threshold is "
              f"{DEFAULT_MODELS[MODEL].track_threshold}, not the calibrated {fused.threshold}")
        status = 1
    return status


def _far(p: cal.OperatingPoint) -> dict[str, Any]:
    return {"threshold": p.threshold, "far": p.far, "false_accepts": p.false_accepts, "trials": p.impostor_trials,
            "false_accepted_subjects": p.false_accepted_subjects, "far_upper_bound": p.far_upper_bound}


if __name__ == "__main__":
    raise SystemExit(main())
