"""The norm window of ``vector.templates.check_matrix`` (pure): every vector it accepts normalises to a finite
unit vector through both float32 paths (enrolment's ``protect``, the match path's ``protect_query``), and the
probe's degenerate vectors are refused with a message that never echoes values."""

from __future__ import annotations

import numpy as np
import pytest

from crypto.template import TemplateKey, new_seed
from vector.errors import InvalidVector
from vector.templates import NORM_MAX, NORM_MIN, as_matrix, check_matrix, from_float32_bytes


def _edge_vectors(dim: int) -> np.ndarray:
    """Random, constant and one-hot directions scaled to just inside both ends of the window."""
    rng = np.random.default_rng(dim)
    directions = [rng.standard_normal(dim), np.ones(dim), -np.ones(dim), np.eye(dim)[0], np.eye(dim)[dim - 1]]
    rows = [d / np.linalg.norm(d) * scale for d in directions for scale in (NORM_MIN * 1.001, NORM_MAX * 0.999, 1.0)]
    return np.asarray(rows, np.float32)


@pytest.mark.parametrize("dim", [128, 512])
def test_every_accepted_vector_protects_to_a_finite_unit_vector(dim):
    key = TemplateKey.from_seed(new_seed(), "m", 1, dim)
    x = check_matrix(_edge_vectors(dim))
    for out in (key.protect(x), key.protect_query(x.copy())):
        assert np.isfinite(out).all()
        np.testing.assert_allclose(np.linalg.norm(out.astype(np.float64), axis=1), 1.0, atol=1e-5)
    sims = np.einsum("ij,ij->i", key.protect(x), key.protect_query(x.copy()))
    np.testing.assert_allclose(sims, 1.0, atol=1e-5)


@pytest.mark.parametrize(("value", "message"), [
    (0.0, "zero vector"), (1.2345e-30, "norm outside"), (1.2345e-20, "norm outside"), (1.2345e19, "norm outside"),
    (3.2345e38, "norm outside"), (np.nan, "NaN or infinite"), (np.inf, "NaN or infinite"),
])
def test_degenerate_vectors_are_refused_without_echoing_them(value, message):
    row = np.full(128, value, np.float32)
    with pytest.raises(InvalidVector, match=message) as caught:
        check_matrix(row[None, :])
    assert "2345" not in str(caught.value)
    with pytest.raises(InvalidVector, match=message):
        from_float32_bytes(row.astype("<f4").tobytes(), 128)


def test_a_batch_names_the_bad_row():
    good = [0.1] * 128
    with pytest.raises(InvalidVector, match="embedding 2 has an L2 norm outside"):
        as_matrix([good, good, [1e19] * 128], 128)


def test_just_outside_the_window_is_refused():
    unit = np.full(128, 1 / np.sqrt(128))
    for scale in (NORM_MIN * 0.99, NORM_MAX * 1.01):
        with pytest.raises(InvalidVector, match="norm outside"):
            check_matrix((unit * scale).astype(np.float32)[None, :])
