"""Verification and identification metrics on cases with known answers."""

from __future__ import annotations

import numpy as np

from enrollment.metrics import (
    cross_validated_accuracy,
    identification,
    tar_at_far,
    threshold_at_far,
)


def test_cross_validated_accuracy_separable_and_not():
    rng = np.random.default_rng(0)
    same = np.tile([True, False], 500)
    folds = np.repeat(np.arange(5), 200)
    scores = np.where(same, 0.8, 0.2) + rng.normal(0, 0.01, 1000)
    acc, std, per = cross_validated_accuracy(scores, same, folds)
    assert acc == 1.0 and std == 0.0 and len(per) == 5
    noise = rng.normal(0, 1, 1000)
    acc, _, _ = cross_validated_accuracy(noise, same, folds)
    assert 0.4 < acc < 0.6


def test_tar_at_far():
    impostor = np.linspace(0, 1, 1000)
    genuine = np.array([0.99925, 0.5, 1.5])
    scores = np.concatenate([genuine, impostor])
    same = np.concatenate([np.ones(3, bool), np.zeros(1000, bool)])
    t = threshold_at_far(impostor, 1e-3)
    assert np.mean(impostor >= t) <= 1e-3
    tar, _ = tar_at_far(scores, same, 1e-3)
    assert np.isclose(tar, 2 / 3)


def test_identification_metrics():
    gallery = np.eye(4)
    labels = np.arange(4)
    probes = np.array([[1, 0.1, 0, 0], [0.1, 0, 1, 0], [0, 0.9, 0, 0.8], [0.3, 0.3, 0.3, 0.3]])
    probes = probes / np.linalg.norm(probes, axis=1, keepdims=True)
    probe_labels = np.array([0, 2, 3, -1])
    mated = np.array([True, True, True, False])
    r = identification(probes @ gallery.T, labels, probe_labels, mated)
    assert np.isclose(r["rank1"], 2 / 3) and r["rank5"] == 1.0
    assert r["n_non_mated_probes"] == 1
    # the non-mated probe scores 0.5: at FPIR 0.01 only mates ranked first above it count
    assert np.isclose(r["fnir_at_fpir_0.01"], 1 / 3)
