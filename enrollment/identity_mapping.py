"""The identity mapping: a keyed, renewable template transform (PolyProtect, method.md §5).

A template is never the model's embedding itself but p_j = sum_k C[k] * v[(j-1)(m-o)+k]^E[k]
over overlapping windows of the L2-normalised embedding v, with the key K = (C, E): m distinct
non-zero integer coefficients in [-c_max, c_max] and a permutation of the exponents 1..m.
Protected templates are compared by cosine.  A stolen database of mapped templates does not
give back embeddings (the map is many-to-one and non-linear), a new key version gives a new,
unlinkable template (renewability), and with per-subject keys impostor scores collapse.

Keys are derived from a secret of the key ring and a context string (gallery, or gallery and
subject, and a version), so they never need to be stored next to the templates.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MappingKey:
    coefficients: tuple[int, ...]
    exponents: tuple[int, ...]
    overlap: int = 2

    def __post_init__(self) -> None:
        m = len(self.coefficients)
        if m < 2 or len(self.exponents) != m:
            raise ValueError("a key needs m >= 2 coefficients and m exponents")
        if sorted(self.exponents) != list(range(1, m + 1)):
            raise ValueError(f"exponents must be a permutation of 1..{m}")
        if 0 in self.coefficients or len(set(self.coefficients)) != m:
            raise ValueError("coefficients must be distinct and non-zero")
        if not 0 <= self.overlap < m:
            raise ValueError(f"overlap must be in [0, {m - 1}]")

    @property
    def m(self) -> int:
        return len(self.coefficients)

    @property
    def step(self) -> int:
        return self.m - self.overlap


def random_key(
    rng: np.random.Generator, m: int = 5, c_max: int = 50, overlap: int = 2
) -> MappingKey:
    """A key drawn from ``rng``: distinct non-zero coefficients, a permutation of exponents."""
    pool = np.concatenate([np.arange(-c_max, 0), np.arange(1, c_max + 1)])
    coefficients = tuple(int(c) for c in rng.choice(pool, size=m, replace=False))
    exponents = tuple(int(e) for e in rng.permutation(np.arange(1, m + 1)))
    return MappingKey(coefficients, exponents, overlap)


def derive_key(
    secret: bytes, context: str, m: int = 5, c_max: int = 50, overlap: int = 2
) -> MappingKey:
    """The key for ``context`` (e.g. "gallery:doors:v1"): HMAC-SHA256 of the secret seeds it."""
    digest = hmac.new(secret, b"privface-identity-mapping\x00" + context.encode(), hashlib.sha256)
    seed = int.from_bytes(digest.digest(), "big")
    return random_key(np.random.default_rng(seed), m, c_max, overlap)


def protected_dim(d: int, key: MappingKey) -> int:
    """Number of windows over a d-dimensional embedding (the tail is zero-padded)."""
    if d <= key.m:
        return 1
    return int(np.ceil((d - key.m) / key.step)) + 1


def protect(embeddings: np.ndarray, key: MappingKey) -> np.ndarray:
    """(N, d) embeddings -> (N, protected_dim) float32 protected templates (not normalised)."""
    v = np.asarray(embeddings, dtype=np.float64)
    if v.ndim == 1:
        v = v[None]
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    n, d = v.shape
    windows = protected_dim(d, key)
    padded = np.zeros((n, (windows - 1) * key.step + key.m))
    padded[:, :d] = v
    starts = np.arange(windows) * key.step
    idx = starts[:, None] + np.arange(key.m)[None]  # (windows, m)
    terms = padded[:, idx] ** np.array(key.exponents)  # (N, windows, m)
    return (terms @ np.array(key.coefficients, dtype=np.float64)).astype(np.float32)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two (N, D) arrays."""
    a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    return np.sum(a * b, axis=-1)
