"""Template protection: inner products kept, deterministic across processes, unlinkable across seeds."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from crypto import TemplateKey, new_seed


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("dim", [128, 512])
def test_inner_products_are_preserved_for_ten_thousand_pairs(dim: int) -> None:
    key = TemplateKey.from_seed(new_seed(), "model", 1, dim)
    rng = np.random.default_rng(dim)
    a = rng.standard_normal((10_000, dim)).astype(np.float32)
    b = rng.standard_normal((10_000, dim)).astype(np.float32)
    expected = np.einsum("ij,ij->i", _unit(a), _unit(b))
    ta, tb = key.protect(a), key.protect(b)
    assert ta.dtype == np.float32 and ta.shape == (10_000, dim)
    got = np.einsum("ij,ij->i", ta.astype(np.float64), tb.astype(np.float64))
    assert np.abs(got - expected).max() < 1e-5
    assert np.abs(np.linalg.norm(ta.astype(np.float64), axis=1) - 1).max() < 1e-5


PROTECT_IN_CHILD = (
    "import sys, numpy as np; from crypto import TemplateKey; "
    "k = TemplateKey.from_seed(bytes.fromhex(sys.argv[1]), 'arcface-r100', 3, 512); "
    "v = np.random.default_rng(7).standard_normal((16, 512)); sys.stdout.write(k.protect(v).tobytes().hex())"
)


def test_same_seed_gives_the_same_matrix_in_another_process() -> None:
    seed = new_seed()
    key = TemplateKey.from_seed(seed, "arcface-r100", 3, 512)
    ours = key.protect(np.random.default_rng(7).standard_normal((16, 512)))
    theirs = subprocess.run(
        [sys.executable, "-c", PROTECT_IN_CHILD, seed.hex()], check=True, capture_output=True, text=True
    ).stdout
    assert ours.tobytes().hex() == theirs


def test_different_seeds_give_uncorrelated_templates() -> None:
    v = np.random.default_rng(1).standard_normal((5000, 128))
    ta = TemplateKey.from_seed(new_seed(), "dlib-resnet-v1", 1, 128).protect(v)
    tb = TemplateKey.from_seed(new_seed(), "dlib-resnet-v1", 1, 128).protect(v)
    cos = np.einsum("ij,ij->i", ta.astype(np.float64), tb.astype(np.float64))
    # cos(v) = v.Q.v for the fixed random rotation Q = Ra^T Rb: per vector ~ N(0, 1/d), so
    # E|cos| = sqrt(2/(pi d)) ~ 0.07 at d=128; the mean over v is trace(Q)/d, std 1/d ~ 0.008.
    assert abs(cos.mean()) < 0.05
    assert np.abs(cos).mean() < 0.1


def test_model_and_version_each_change_the_rotation() -> None:
    seed, v = new_seed(), np.ones(128)
    base = TemplateKey.from_seed(seed, "m", 1, 128).protect(v)
    assert not np.allclose(base, TemplateKey.from_seed(seed, "m", 2, 128).protect(v))
    assert not np.allclose(base, TemplateKey.from_seed(seed, "n", 1, 128).protect(v))


def test_single_vector_and_batch_agree_and_scale_does_not_matter() -> None:
    key = TemplateKey.from_seed(new_seed(), "m", 1, 128)
    v = np.random.default_rng(3).standard_normal((4, 128))
    batch = key.protect(v)
    assert np.allclose(batch[2], key.protect(v[2] * 17.5), atol=1e-6)


def test_with_the_key_the_transform_is_invertible() -> None:
    """The honest caveat, as a test: whoever holds the seed recovers the normalised raw vector."""
    seed = new_seed()
    v = np.random.default_rng(5).standard_normal(128)
    t = TemplateKey.from_seed(seed, "m", 1, 128).protect(v)
    rebuilt = TemplateKey.from_seed(seed, "m", 1, 128)._matrix.T @ t
    assert np.allclose(rebuilt, _unit(v), atol=1e-5)


@pytest.mark.parametrize(
    "bad", [np.zeros(128), np.full(128, np.nan), np.r_[np.ones(127), np.inf], np.ones(127), np.ones((2, 2, 128))]
)
def test_rejects_vectors_without_a_direction_or_the_wrong_shape(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        TemplateKey.from_seed(new_seed(), "m", 1, 128).protect(bad)


def test_seeds_are_32_random_bytes_and_never_printed() -> None:
    seed = new_seed()
    assert len(seed) == 32 and seed != new_seed()
    key = TemplateKey.from_seed(seed, "m", 1, 16)
    assert seed.hex() not in repr(key)
    with pytest.raises(ValueError):
        TemplateKey.from_seed(b"short", "m", 1, 16)
