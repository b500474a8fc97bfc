"""Verification and identification metrics, the way the field reports them.

Verification: accuracy with the threshold chosen by cross-validation over folds (LFW
protocol), TAR at a fixed FAR, ROC.  Identification (NIST FRTE): FNIR at fixed FPIR for the
open-set case, rank-k hit rates for mated probes.
"""

from __future__ import annotations

import numpy as np


def best_threshold(scores: np.ndarray, same: np.ndarray) -> float:
    """The threshold maximising accuracy on these pairs (midpoints between sorted scores)."""
    order = np.sort(np.unique(scores))
    candidates = np.concatenate(
        [[order[0] - 1e-6], (order[1:] + order[:-1]) / 2, [order[-1] + 1e-6]]
    )
    acc = [(np.mean((scores >= t) == same)) for t in candidates]
    return float(candidates[int(np.argmax(acc))])


def cross_validated_accuracy(
    scores: np.ndarray, same: np.ndarray, folds: np.ndarray
) -> tuple[float, float, list[float]]:
    """Mean and std of per-fold accuracy, each fold's threshold fitted on the other folds."""
    accs = []
    for f in np.unique(folds):
        train, test = folds != f, folds == f
        t = best_threshold(scores[train], same[train])
        accs.append(float(np.mean((scores[test] >= t) == same[test])))
    return float(np.mean(accs)), float(np.std(accs)), accs


def threshold_at_far(impostor_scores: np.ndarray, far: float) -> float:
    """Smallest threshold whose false-accept rate (scores >= t) is at most ``far``."""
    s = np.sort(np.asarray(impostor_scores))[::-1]
    allowed = int(np.floor(far * len(s)))
    if allowed >= len(s):
        return float(s[-1])
    return float(s[allowed] + 1e-9)


def tar_at_far(scores: np.ndarray, same: np.ndarray, far: float) -> tuple[float, float]:
    """(true-accept rate, threshold) at a false-accept rate of at most ``far``."""
    t = threshold_at_far(scores[~same], far)
    return float(np.mean(scores[same] >= t)), t


def roc(scores: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FAR, TAR) over every threshold."""
    order = np.argsort(-scores)
    s = same[order]
    tar = np.cumsum(s) / max(s.sum(), 1)
    far = np.cumsum(~s) / max((~s).sum(), 1)
    return far, tar


def identification(
    sims: np.ndarray,
    gallery_labels: np.ndarray,
    probe_labels: np.ndarray,
    mated: np.ndarray,
) -> dict:
    """Open-set 1:N metrics from a (probes, gallery) score matrix, higher is more similar.

    FNIR at FPIR: a threshold is set so that a fraction FPIR of the non-mated probes has a
    top score above it; FNIR is the fraction of mated probes whose mate is not the top
    candidate above that threshold.  Also rank-1 / rank-5 hit rates of the mated probes and
    the DET curve.
    """
    top = sims.max(axis=1)
    order = np.argsort(-sims, axis=1)
    ranked = gallery_labels[order]
    hits = ranked == probe_labels[:, None]
    mated_hits = hits[mated]
    rank_of_mate = np.where(mated_hits.any(1), mated_hits.argmax(1), np.inf)
    mate_score = np.where(
        mated_hits[:, 0], top[mated], -np.inf
    )  # a mated probe is identified only if its mate is ranked first
    non_mated_top = np.sort(top[~mated])[::-1]

    def fnir_at(fpir: float) -> tuple[float, float]:
        t = threshold_at_far(non_mated_top, fpir)
        return float(np.mean(mate_score < t)), t

    out = {
        "n_gallery": int(sims.shape[1]),
        "n_mated_probes": int(mated.sum()),
        "n_non_mated_probes": int((~mated).sum()),
        "rank1": float(np.mean(rank_of_mate < 1)),
        "rank5": float(np.mean(rank_of_mate < 5)),
    }
    for fpir in (0.01, 0.003):
        fnir, t = fnir_at(fpir)
        out[f"fnir_at_fpir_{fpir:g}"] = fnir
        out[f"threshold_at_fpir_{fpir:g}"] = t
    thresholds = np.unique(np.concatenate([non_mated_top, mate_score[np.isfinite(mate_score)]]))
    thresholds = thresholds[:: max(1, len(thresholds) // 400)]
    out["det"] = {
        "fpir": [float(np.mean(non_mated_top >= t)) for t in thresholds],
        "fnir": [float(np.mean(mate_score < t)) for t in thresholds],
    }
    return out
