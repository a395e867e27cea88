"""The rule of ``--apply``, pure (no server): both thresholds are applied together or neither, and a
refusal names the count of subjects the refused one needs. The refusal is raised before any SQL."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.calibration import Applied, Measurement, record
from tests.conftest import FACES
from vector import calibration as cal

LFW = FACES.parent / "faces_more_dlib128.npz"


def _lfw() -> tuple[np.ndarray, np.ndarray]:
    data = np.load(LFW)
    x = data["vectors"].astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), data["labels"]


def test_a_refused_track_threshold_refuses_the_apply_with_the_count_it_needs() -> None:
    x, people = _lfw()
    single = cal.calibrate(cal.score_sets(x, people), 1e-2)
    few = np.isin(people, np.unique(people)[:200])  # too few people for tracks at 1 %
    track = cal.calibrate(cal.track_scores(x[few], people[few]).scores(3), 1e-2)
    assert single.chosen is not None and track.chosen is None
    m = Measurement("dlib-resnet-v1", single, 1, 1, track, None)
    assert m.refused is not None and m.refused.startswith("track threshold: 200 enrolled subjects")
    with pytest.raises(cal.InsufficientData) as err:
        record(None, m, "test", apply=True)  # type: ignore[arg-type]  # refused before any SQL
    assert (err.value.needed, err.value.have) == (299, 200)
    both = Measurement("dlib-resnet-v1", single, 1, 1, cal.calibrate(cal.track_scores(x, people).scores(3), 1e-2))
    assert both.refused is None


def test_an_applied_row_gives_the_track_its_threshold_or_its_frame_threshold() -> None:
    from datetime import UTC, datetime

    now = datetime.now(UTC)
    assert Applied(1, 0.96, 0.01, "cli:x", now, 0.95).fused(0.9578) == 0.95
    assert Applied(1, 0.96, 0.01, "cli:x", now, None).fused(0.9578) == 0.96  # applied before 0012
    assert Applied(2, None, None, "cli:x", now, None).fused(0.9578) == 0.9578  # a reset: the configured default
