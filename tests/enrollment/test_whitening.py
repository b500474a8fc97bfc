"""Power whitening: checked against an independent eigen-decomposition of the cohort."""

from __future__ import annotations

import numpy as np
import pytest

from enrollment import whitening


@pytest.fixture(scope="module")
def cohort() -> np.ndarray:
    """Unit vectors in 64-d spanning 24 directions with very different spreads (as the
    distilled embeddings span 128 of 512)."""
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.normal(size=(64, 24)))
    x = rng.normal(size=(3000, 24)) * np.geomspace(3.0, 0.1, 24) + 0.5
    e = x @ basis.T
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def _eig(e: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    vals, vecs = np.linalg.eigh(np.cov(e, rowvar=False))
    order = np.argsort(vals)[::-1][:dims]
    return np.sqrt(vals[order]), vecs[:, order].T


@pytest.mark.parametrize("power", [0.0, 0.5, 1.0])
def test_whitened_cosines_follow_the_eigen_decomposition(cohort, power):
    w = whitening.fit(cohort, dims=16, power=power)
    std, directions = _eig(cohort, 16)
    np.testing.assert_allclose(w.mean, cohort.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(np.abs(np.sum(w.directions * directions, axis=1)), 1, atol=1e-4)
    np.testing.assert_allclose(w.scales, (std[0] / std) ** power, rtol=1e-4)
    probes = cohort[:50]
    expected = ((probes - cohort.mean(axis=0)) @ directions.T) * std ** -power
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    out = whitening.apply(probes, w)
    assert out.shape == probes.shape and out.dtype == probes.dtype
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(out @ out.T, expected @ expected.T, atol=1e-5)


def test_full_whitening_makes_the_kept_directions_isotropic(cohort):
    w = whitening.fit(cohort, dims=16, power=1.0)
    reduced = (cohort - w.mean) @ w.directions.T * w.scales
    cov = np.cov(reduced, rowvar=False)
    np.testing.assert_allclose(cov / cov[0, 0], np.eye(16), atol=1e-3)


def test_no_whitening_and_round_trip(cohort):
    assert whitening.apply(cohort, None) is cohort
    w = whitening.fit(cohort, dims=8, power=0.5)
    back = whitening.Whitening.from_dict(w.to_dict())
    assert (back.dims, back.power, back.cohort) == (8, 0.5, len(cohort))
    np.testing.assert_array_equal(whitening.apply(cohort[:5], back),
                                  whitening.apply(cohort[:5], w))
    assert whitening.apply(cohort[:5].astype(np.float32), w).dtype == np.float32


def test_bad_fits_are_refused(cohort):
    with pytest.raises(ValueError, match="dims"):
        whitening.fit(cohort, dims=65)
    with pytest.raises(ValueError, match="cannot fit"):
        whitening.fit(cohort[:10], dims=16)
    with pytest.raises(ValueError, match="power"):
        whitening.fit(cohort, dims=8, power=1.5)
    with pytest.raises(ValueError, match="spans fewer"):
        whitening.fit(cohort, dims=30)  # the cohort spans 24 directions
