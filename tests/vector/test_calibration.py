"""vector.calibration, pure: scores, FAR bounds, the refusal, and the promise on people it never saw."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from tests.conftest import FACES
from vector import calibration as cal

LFW = FACES.parent / "faces_more_dlib128.npz"


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _lfw() -> tuple[np.ndarray, np.ndarray]:
    data = np.load(LFW)
    return _unit(data["vectors"].astype(np.float32)), data["labels"]


def test_scores_are_same_subject_pairs_and_best_other_subject_by_brute_force() -> None:
    rng = np.random.default_rng(1)
    x = _unit(rng.normal(size=(23, 8)))
    who = rng.integers(0, 6, size=23)
    s = cal.score_sets(x, who, block_rows=5)  # blocks that cut subjects apart
    genuine = sorted(float(x[i] @ x[j]) for i, j in itertools.combinations(range(23), 2) if who[i] == who[j])
    impostor = sorted(max(float(x[i] @ x[j]) for j in range(23) if who[j] != who[i]) for i in range(23))
    assert np.allclose(s.genuine, genuine, atol=1e-6) and np.allclose(s.impostor, impostor, atol=1e-6)
    assert (s.subjects, s.encodings) == (len(set(who.tolist())), 23)


def test_subjects_given_as_uuid_bytes_group_like_ids() -> None:
    rng = np.random.default_rng(2)
    x = _unit(rng.normal(size=(12, 4)))
    ids = np.repeat(np.arange(4), 3)
    as_bytes = np.zeros((12, 16), np.uint8)
    as_bytes[:, 0] = ids * 7 + 1
    a, b = cal.score_sets(x, ids), cal.score_sets(x, as_bytes)
    assert np.array_equal(a.genuine, b.genuine) and np.array_equal(a.impostor, b.impostor)


def test_clopper_pearson_upper_bounds_match_known_values() -> None:
    assert cal.far_upper_bound(0, 3000) == pytest.approx(1 - 0.05 ** (1 / 3000))
    assert cal.far_upper_bound(0, 3000) == pytest.approx(3 / 3000, rel=0.01)  # the rule of three
    assert cal.far_upper_bound(1, 100) == pytest.approx(0.04656, abs=1e-4)
    assert cal.far_upper_bound(5, 1000) == pytest.approx(0.01048, abs=1e-4)
    bounds = [cal.far_upper_bound(k, 500) for k in range(20)]
    assert bounds == sorted(bounds) and all(k / 500 < b for k, b in enumerate(bounds))


def test_trials_needed_is_where_zero_errors_first_meet_the_target() -> None:
    for target in (1e-2, 1e-3, 1e-4):
        n = cal.trials_needed(target)
        assert cal.far_upper_bound(0, n) <= target < cal.far_upper_bound(0, n - 1)
    assert cal.trials_needed(1e-3) == 2995


def test_too_few_subjects_are_refused_with_the_count_needed() -> None:
    rng = np.random.default_rng(3)
    x = _unit(rng.normal(size=(200, 16)))
    scores = cal.score_sets(x, np.repeat(np.arange(100), 2))
    with pytest.raises(cal.InsufficientData) as err:
        cal.threshold_for(scores, 1e-2)
    assert (err.value.needed, err.value.have) == (299, 100) and "299" in str(err.value)
    report = cal.calibrate(scores, 1e-2)
    assert report.chosen is None and report.subjects_needed == 299 and "299" in (report.refused or "")
    assert "needs ≥ 299 enrolled subjects (have 100)" in cal.table(report)


def test_threshold_keeps_the_people_bound_under_the_target_and_is_the_lowest_that_does() -> None:
    x, people = _lfw()
    scores = cal.score_sets(x, people)
    p = cal.threshold_for(scores, 1e-2)
    assert p.far_upper_bound <= 1e-2 and p.far <= p.far_upper_bound
    below = cal.operating_point(scores, round(p.threshold - 1e-4, 4))
    assert below.far_upper_bound > 1e-2  # one step lower breaks the promise
    assert round(p.threshold, 4) == p.threshold


def test_far_on_people_never_seen_stays_within_the_calibrated_bound() -> None:
    """Calibrate on half the LFW people, search the other half's images against them as strangers."""
    x, people = _lfw()
    names = np.unique(people)
    exceeded = []
    for seed in range(10):
        chosen = set(np.random.default_rng(seed).permutation(names)[: len(names) // 2].tolist())
        enrolled = np.array([p in chosen for p in people])
        point = cal.threshold_for(cal.score_sets(x[enrolled], people[enrolled]), 1e-2)
        strangers_best = (x[~enrolled] @ x[enrolled].T).max(axis=1)
        far = float((strangers_best >= point.threshold).mean())
        if far > point.far_upper_bound:
            exceeded.append((seed, far, point.far_upper_bound))
    assert exceeded == []


def test_a_bound_counting_images_would_break_the_promise_on_unseen_people() -> None:
    """Why the bound counts people: the same splits with the binomial bound over images (independent
    trials assumed) give thresholds whose FAR on unseen people exceeds that bound on 7 of 20 splits."""
    x, people = _lfw()
    names = np.unique(people)
    exceeded = 0
    for seed in range(20):
        chosen = set(np.random.default_rng(seed).permutation(names)[: len(names) // 2].tolist())
        enrolled = np.array([p in chosen for p in people])
        impostor = cal.score_sets(x[enrolled], people[enrolled]).impostor
        k = cal.allowed_errors(1e-2, len(impostor))
        threshold = float(impostor[::-1][k]) + 1e-6  # the lowest with k errors
        bound = cal.far_upper_bound(k, len(impostor))
        far = float(((x[~enrolled] @ x[enrolled].T).max(axis=1) >= threshold).mean())
        exceeded += far > bound
    assert exceeded == 7


def test_the_dlib_default_is_the_calibrated_threshold_of_the_lfw_data() -> None:
    from appliance.settings import DEFAULT_MODELS

    x, people = _lfw()
    point = cal.threshold_for(cal.score_sets(x, people), 1e-2)
    assert DEFAULT_MODELS["dlib-resnet-v1"].threshold == point.threshold == 0.9656
    assert (point.false_accepts, point.false_accepted_subjects, point.impostor_subjects) == (12, 8, 1570)
    assert round(point.far_upper_bound, 4) == 0.0092 and round(point.tar, 3) == 0.221
    # a doorbell's view: an enrolled person's later images against the best of their first 5 (people with 6+)
    best = np.concatenate([(rows[5:] @ rows[:5].T).max(axis=1) for rows in (x[people == p] for p in np.unique(people))
                           if len(rows) > 5])
    assert round(float((best >= point.threshold).mean()), 3) == 0.492


def test_a_smaller_gallery_never_raises_the_far_at_a_threshold() -> None:
    """A household's gallery is a few people: a stranger's best match among them is never higher."""
    x, people = _lfw()
    names = np.unique(people)
    rng = np.random.default_rng(5)
    gallery = set(rng.permutation(names)[:800].tolist())
    small = set(list(gallery)[:30])
    enrolled = np.array([p in gallery for p in people])
    household = np.array([p in small for p in people])
    strangers = x[~enrolled]
    full = (strangers @ x[enrolled].T).max(axis=1)
    few = (strangers @ x[household].T).max(axis=1)
    assert np.all(few <= full)
    assert (few >= 0.9656).mean() <= (full >= 0.9656).mean()


def test_report_is_plain_json_and_plot_is_a_png(tmp_path) -> None:  # type: ignore[no-untyped-def]
    x, people = _lfw()
    report = cal.calibrate(cal.score_sets(x[:1500], people[:1500]), 1e-2)
    text = json.dumps(report.to_json(), allow_nan=False)
    assert json.loads(text)["points"]["0.01"]["threshold"] == report.chosen.threshold  # type: ignore[union-attr]
    assert 0 < report.eer < 0.5 and math.isfinite(report.eer_threshold)
    png = cal.plot(report, tmp_path / "det.png", "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
