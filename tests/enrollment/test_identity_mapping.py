"""PolyProtect identity mapping: exact formula, key properties, and its effects."""

from __future__ import annotations

import numpy as np
import pytest

from enrollment.identity_mapping import (
    MappingKey,
    cosine,
    derive_key,
    protect,
    protected_dim,
    random_key,
)


def naive(v: np.ndarray, key: MappingKey) -> np.ndarray:
    v = v / np.linalg.norm(v)
    out = []
    j = 0
    while True:
        start = j * key.step
        window = [v[start + k] if start + k < len(v) else 0.0 for k in range(key.m)]
        out.append(
            sum(c * w**e for c, w, e in zip(key.coefficients, window, key.exponents, strict=True))
        )
        if start + key.m >= len(v):
            break
        j += 1
    return np.array(out)


@pytest.mark.parametrize("overlap", [0, 2, 3, 4])
@pytest.mark.parametrize("d", [512, 128, 7])
def test_matches_the_polyprotect_formula(overlap, d):
    rng = np.random.default_rng(overlap * 100 + d)
    key = random_key(rng, overlap=overlap)
    v = rng.normal(size=d)
    expected = naive(v, key)
    got = protect(v, key)[0]
    assert got.shape == (protected_dim(d, key),) == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-9)


def test_keys_are_valid_and_derivation_is_deterministic():
    a = derive_key(b"secret", "gallery:doors:v1")
    assert a == derive_key(b"secret", "gallery:doors:v1")
    assert a != derive_key(b"secret", "gallery:doors:v2")
    assert a != derive_key(b"other", "gallery:doors:v1")
    assert sorted(a.exponents) == [1, 2, 3, 4, 5]
    assert 0 not in a.coefficients and all(abs(c) <= 50 for c in a.coefficients)
    with pytest.raises(ValueError):
        MappingKey((1, 1, 2), (1, 2, 3))
    with pytest.raises(ValueError):
        MappingKey((1, 2, 3), (1, 2, 2))


def clustered(rng, n_ids=50, per=4, d=128, spread=0.35):
    centres = rng.normal(size=(n_ids, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.repeat(centres, per, 0) + rng.normal(0, spread / np.sqrt(d), (n_ids * per, d))
    return x, np.repeat(np.arange(n_ids), per)


def test_same_key_preserves_who_is_who():
    rng = np.random.default_rng(0)
    x, labels = clustered(rng)
    key = random_key(rng)
    t = protect(x, key)
    sims = t @ t.T / np.outer(np.linalg.norm(t, axis=1), np.linalg.norm(t, axis=1))
    np.fill_diagonal(sims, -np.inf)
    assert np.mean(labels[sims.argmax(1)] == labels) > 0.95


def test_renewed_key_gives_unlinkable_templates_and_per_subject_keys_split_impostors():
    rng = np.random.default_rng(1)
    x, labels = clustered(rng)
    k1, k2 = derive_key(b"s", "g:v1"), derive_key(b"s", "g:v2")
    same_person_same_key = cosine(protect(x[0::4], k1), protect(x[1::4], k1)).mean()
    same_person_new_key = cosine(protect(x[0::4], k1), protect(x[1::4], k2)).mean()
    assert same_person_same_key > 0.8
    assert abs(same_person_new_key) < 0.3  # a renewed template does not link to the old one
    # per-subject keys: an impostor's template under its own key scores near zero
    impostor = cosine(
        protect(x[4:5], derive_key(b"s", "subj:1")), protect(x[0:1], derive_key(b"s", "subj:0"))
    )
    assert abs(impostor[0]) < 0.3
