"""Power whitening of embeddings: a fixed linear map fitted once on training-split faces.

The student's unit embeddings are anisotropic: a few directions carry most of their spread,
and much of that spread is what changes between images of one person (the drawn rank, pose,
light), not between people. Cosine scores are dominated by those directions. Centring on the
mean of a cohort of faces and dividing each principal direction by a power of its standard
deviation (``power`` 0.5: half-way to full whitening) evens them out; full whitening
(``power`` 1) over-weights the weakest, noisiest directions. The map is linear and the
output stays 512-d (rotated back into the embedding space), so templates, the identity
mapping and the index keep their shape. Pure numpy; fitted by ``privface whiten``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Whitening:
    """``e -> (e - mean) @ directions.T * scales @ directions``, renormalised: the kept
    principal directions (rows, orthonormal) of a cohort, each scaled by its standard
    deviation ** -power relative to the first; ``cohort`` embeddings were fitted on."""

    mean: np.ndarray  # (d,)
    directions: np.ndarray  # (dims, d)
    scales: np.ndarray  # (dims,)
    power: float
    cohort: int

    @property
    def dims(self) -> int:
        return len(self.scales)

    def to_dict(self) -> dict:
        return {"mean": self.mean, "directions": self.directions, "scales": self.scales,
                "power": self.power, "cohort": self.cohort}

    @classmethod
    def from_dict(cls, d: dict) -> Whitening:
        return cls(np.asarray(d["mean"], np.float32), np.asarray(d["directions"], np.float32),
                   np.asarray(d["scales"], np.float32), float(d["power"]), int(d["cohort"]))


def fit(embeddings: np.ndarray, dims: int = 128, power: float = 0.5) -> Whitening:
    """The whitening of a cohort's unit embeddings (n, d), n > dims: its mean, and its top
    ``dims`` principal directions scaled by (standard deviation) ** -power."""
    e = np.asarray(embeddings, np.float64)
    n, d = e.shape
    if not 0 < dims <= d:
        raise ValueError(f"dims must be in 1..{d}, not {dims}")
    if n <= dims:
        raise ValueError(f"a cohort of {n} embeddings cannot fit {dims} directions")
    if not 0 <= power <= 1:
        raise ValueError(f"power must be in [0, 1], not {power}")
    mean = e.mean(axis=0)
    _, s, vt = np.linalg.svd(e - mean, full_matrices=False)
    std = s[:dims] / np.sqrt(n - 1)
    if std[-1] <= 1e-6 * std[0]:
        raise ValueError(f"the cohort spans fewer than {dims} directions")
    # relative to the strongest direction (its gain 1): scores are cosines, scale is free
    scales = (std[0] / std) ** power
    return Whitening(mean.astype(np.float32), vt[:dims].astype(np.float32),
                     scales.astype(np.float32), float(power), n)


def apply(embeddings: np.ndarray, whitening: Whitening | None) -> np.ndarray:
    """Unit embeddings (n, d) -> whitened unit embeddings (n, d), same dtype; ``None``
    leaves them as they are. Rotated back into the d-dim space: cosines are those of the
    ``dims``-dim whitened vectors."""
    if whitening is None:
        return embeddings
    w = (np.asarray(embeddings, np.float64) - whitening.mean) @ whitening.directions.T
    w = (w * whitening.scales) @ whitening.directions
    w /= np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
    return w.astype(embeddings.dtype)
