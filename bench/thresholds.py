"""The default threshold of ``dlib-resnet-v1``, reproduced from real data for a stated FAR target.

Calibrates exactly as ``appliance models calibrate`` does (``vector.calibration``: genuine pairs,
leave-one-subject-out impostors, 95 % upper bound of the FAR counted over people) on
``../shared/data/faces_more_dlib128.npz`` (LFW, 5,924 dlib embeddings of 1,570 people), and reports:

- the threshold for ``--target-far`` (default 1 %: the lowest target 1,570 people can support at 95 %
  confidence; 0.1 % would need 2,995 people), with TAR over genuine pairs;
- what a doorbell sees for an enrolled person: a probe against the best of 5 enrolment images
  (people with at least 6 images), TAR at that threshold;
- the baseline measured in the same run: the previous default 0.94 on the same data.

Checks that ``appliance.settings.DEFAULT_MODELS`` holds the number (exit 1 if not).
Writes bench/results/thresholds.json and thresholds.png. Usage: python bench/thresholds.py [--target-far 0.01]
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
    path = write_result("thresholds", result)
    cal.plot(report, RESULTS / "thresholds.png", f"{MODEL} on LFW: {report.subjects} people, {report.encodings} images")
    print(f"threshold {chosen.threshold:.4f}: FAR {chosen.far:.2e} seen, ≤ {chosen.far_upper_bound:.2e} (95 %, over "
          f"people); TAR {chosen.tar:.2%} (pairs), {result['doorbell_best_of_5']['tar']:.2%} (best of 5 enrolled)")
    print(f"baseline {PREVIOUS_DEFAULT}: FAR {baseline.far:.2e} seen, ≤ {baseline.far_upper_bound:.2e}; "
          f"TAR {baseline.tar:.2%} (pairs), {result['baseline_previous_default']['doorbell_best_of_5']['tar']:.2%}")
    print(f"wrote {path}")
    if DEFAULT_MODELS[MODEL].threshold != chosen.threshold:
        print(f"appliance.settings.DEFAULT_MODELS[{MODEL!r}] is {DEFAULT_MODELS[MODEL].threshold}, "
              f"not the calibrated {chosen.threshold}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
