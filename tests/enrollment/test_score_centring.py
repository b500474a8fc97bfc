"""Cohort score centring: the cohort means against a brute-force sort, the index-vector
identity through a real FAISS inner-product index, and the k-means cohort."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from enrollment import score_centring as sc


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def faces() -> np.ndarray:
    # anisotropic, like real embeddings: a few directions carry most of the spread
    rng = np.random.default_rng(0)
    return _unit(rng.normal(size=(2000, 32)) * np.geomspace(3, 0.3, 32) + 0.5)


def test_cohort_means_are_the_mean_of_the_k_highest_cosines(faces):
    cohort, x = faces[:300], faces[300:340]
    got = sc.cohort_means(x, cohort, 7)
    want = [np.mean(sorted(cohort @ v)[-7:]) for v in x]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert sc.cohort_means(x[0], cohort, 300)[0] == pytest.approx(np.mean(cohort @ x[0]))


def test_centred_scores_are_what_a_cosine_index_returns(faces):
    """The index stores index_vectors, is queried with query_vectors, both normalised as a
    cosine index does: from_index_score gives s - (m_q + m_t) / 2, and the ranking of one
    query is the ranking of the centred scores."""
    c = sc.fit(faces[:1000], n_centroids=50, k=5)
    t, q = faces[1000:1500], faces[1500:1510]
    mt, mq = sc.cohort_means(t, c.centroids, c.k), sc.cohort_means(q, c.centroids, c.k)
    index = faiss.IndexFlatIP(t.shape[1] + sc.EXTRA_DIMS)
    stored = sc.index_vectors(t, mt)
    faiss.normalize_L2(stored)
    index.add(stored)
    queries = sc.query_vectors(q)
    faiss.normalize_L2(queries)
    scores, ids = index.search(queries, 20)
    want = sc.centre(q @ t.T, mq[:, None], mt[None])
    got = sc.from_index_score(scores, mq[:, None])
    np.testing.assert_allclose(got, np.take_along_axis(want, ids, axis=1), atol=1e-5)
    np.testing.assert_array_equal(ids[:, 0], want.argmax(axis=1))
    # the raw cosine ranks differently: centring changes who comes first for some query
    assert (ids[:, :5] != np.argsort(-(q @ t.T), axis=1)[:, :5]).any()


def test_index_vectors_have_one_norm_whatever_the_mean(faces):
    means = np.array([-1.0, -0.3, 0.0, 0.4, 0.99, 1.0])
    v = sc.index_vectors(faces[: len(means)], means)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1) ** 2, 1.25, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(sc.query_vectors(faces[:3]), axis=1) ** 2, 2,
                               rtol=1e-6)


def test_fit_gives_unit_centroids_of_the_cohort(faces):
    c = sc.fit(faces, n_centroids=40, k=4, seed=1)
    assert c.centroids.shape == (40, 32) and c.k == 4 and c.images == len(faces)
    np.testing.assert_allclose(np.linalg.norm(c.centroids, axis=1), 1, rtol=1e-5)
    # k-means: the faces sit closer to their nearest centroid than to the nearest of 40
    # faces picked at random as centres
    picked = faces[np.random.default_rng(2).choice(len(faces), 40, replace=False)]
    assert (faces @ c.centroids.T).max(axis=1).mean() > (faces @ picked.T).max(axis=1).mean()
    again = sc.Cohort.from_dict(c.to_dict())  # float16 in the model file
    np.testing.assert_allclose(again.centroids, c.centroids, atol=2e-3)
    assert (again.k, again.images) == (4, len(faces))


def test_fit_refuses_what_it_cannot_fit(faces):
    with pytest.raises(ValueError, match="too few"):
        sc.fit(faces[:50], n_centroids=40)
    with pytest.raises(ValueError, match="k must be"):
        sc.Cohort(faces[:10], 11, 10)
