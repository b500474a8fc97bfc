"""Cohort score centring: each score less half of either side's typical impostor score.

A cosine score mixes two things: how alike two faces are, and how "central" each face is —
some faces (and some draws of the protected input's rank) sit close to many other people,
so every score they take part in runs high. The mean of a face's ``k`` highest cosines
against a fixed cohort of other people's faces measures that; subtracting half of it for
each side, ``s - (m_a + m_b) / 2``, puts every pair's impostor scores on one scale, so one
threshold serves them all (the mean half of adaptive symmetric score normalisation, AS-norm;
the standard-deviation half measured no better and cannot be written as an inner product).

The cohort is not a set of faces: it is ``n`` spherical k-means centroids of training-split
embeddings (each the mean direction of ~7 faces of different people), so the model file
carries no one person's embedding; measured as good as the 6,922 faces themselves
(docs/model-card.md, "Cohort score centring").

Centred scores stay inner products: the index stores ``[t, -m_t / 2, sqrt(1 - m_t**2) / 2]``
(norm sqrt(5) / 2 whatever m_t) and is queried with ``[q, 1, 0]`` (norm sqrt(2)), so a
cosine index returns ``(q . t - m_t / 2) / sqrt(5 / 2)`` exactly, and the query's own half
is a constant per search (:func:`index_vectors`, :func:`query_vectors`,
:func:`from_index_score`). Pure numpy except the k-means (FAISS).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from enrollment.identity_mapping import MappingKey, protect

#: extra coordinates of a centred index vector
EXTRA_DIMS = 2
#: a centred index score times this, less the query's half, is the centred score
INDEX_SCALE = float(np.sqrt(2.5))


@dataclass(frozen=True)
class Cohort:
    """``centroids`` (n, d): unit vectors in the (whitened) embedding space; ``k`` of them,
    the nearest, make a face's cohort mean; ``images``: faces the centroids were fitted on."""

    centroids: np.ndarray
    k: int
    images: int

    def __post_init__(self) -> None:
        if not 1 <= self.k <= len(self.centroids):
            raise ValueError(f"k must be in 1..{len(self.centroids)}, not {self.k}")

    def to_dict(self) -> dict:
        return {"centroids": self.centroids.astype(np.float16), "k": self.k,
                "images": self.images}

    @classmethod
    def from_dict(cls, d: dict) -> Cohort:
        return cls(unit(np.asarray(d["centroids"], np.float32)), int(d["k"]), int(d["images"]))


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def centroids_under(cohort: Cohort, key: MappingKey) -> np.ndarray:
    """The cohort's centroids as unit protected templates under ``key``: what the means of
    templates made with that key are taken against (callers cache it per key)."""
    return unit(protect(cohort.centroids, key))


def fit(embeddings: np.ndarray, n_centroids: int = 1000, k: int = 20, seed: int = 0,
        iterations: int = 20) -> Cohort:
    """Spherical k-means centroids of a cohort's unit embeddings (n, d), n >= 2 x centroids."""
    import faiss

    e = np.ascontiguousarray(unit(np.asarray(embeddings, np.float32)))
    if len(e) < 2 * n_centroids:
        raise ValueError(f"{len(e)} embeddings are too few for {n_centroids} centroids "
                         "(at least two faces per centroid)")
    km = faiss.Kmeans(e.shape[1], n_centroids, niter=iterations, seed=seed, spherical=True,
                      verbose=False, min_points_per_centroid=1)
    km.train(e)
    return Cohort(unit(km.centroids.astype(np.float32)), k, len(e))


def cohort_means(x: np.ndarray, centroids: np.ndarray, k: int) -> np.ndarray:
    """Mean of each row's ``k`` highest cosines against ``centroids`` (both unit rows):
    the impostor score level of each face, (n,) float64."""
    x = np.atleast_2d(np.asarray(x, np.float64))
    sims = x @ np.asarray(centroids, np.float64).T
    return np.partition(sims, -k, axis=1)[:, -k:].mean(axis=1)


def centre(scores: np.ndarray, mean_a: np.ndarray, mean_b: np.ndarray) -> np.ndarray:
    """Centred scores: ``s - (m_a + m_b) / 2`` (broadcasting: pairs, or a probe x gallery
    matrix with ``mean_a[:, None]`` and ``mean_b[None]``)."""
    return np.asarray(scores, np.float64) - 0.5 * (mean_a + mean_b)


def index_vectors(templates: np.ndarray, means: np.ndarray) -> np.ndarray:
    """What a cosine index stores for unit templates with cohort means ``means``."""
    t = np.atleast_2d(np.asarray(templates, np.float32))
    m = np.clip(np.asarray(means, np.float64), -1.0, 1.0)
    extra = np.stack([-m / 2, np.sqrt(1.0 - m * m) / 2], axis=1).astype(np.float32)
    return np.concatenate([t, extra], axis=1)


def query_vectors(templates: np.ndarray) -> np.ndarray:
    """What a cosine index is queried with for unit templates."""
    t = np.atleast_2d(np.asarray(templates, np.float32))
    extra = np.tile(np.array([1.0, 0.0], np.float32), (len(t), 1))
    return np.concatenate([t, extra], axis=1)


def from_index_score(score: np.ndarray | float, query_mean: float) -> np.ndarray | float:
    """The centred score from a cosine index's score of :func:`query_vectors` against
    :func:`index_vectors`."""
    return score * INDEX_SCALE - 0.5 * query_mean
