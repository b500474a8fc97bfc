"""A decision threshold calibrated on a deployment's own enrolled people.

The model file's threshold is LFW's false-match-rate 1e-3 point, and a threshold moves with
the population: on AT&T (one lab, greyscale) the LFW threshold lets 2.3e-3 of different-person
pairs match with the default scoring and 3.2e-2 with score centring (docs/model-card.md,
"Cohort score centring"). A gallery already holds what a threshold of its own needs: samples
of different subjects are impostor pairs from the deployment's own cameras and people, and
subjects with several samples give genuine pairs. The scores are the service's own (protected
templates under their template key, centred when the server centres), and pairs are only
formed within one template key: templates made with different keys do not compare.

A false-match rate of 1e-3 is only pinned by at least ``10 / far`` impostor pairs (ten of
them above the threshold); with fewer the threshold is not given. Pure numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from enrollment.metrics import threshold_at_far

#: impostor pairs per unit of 1 / far needed for a threshold: 10 pairs above it
MIN_PAIRS_PER_INVERSE_FAR = 10


@dataclass(frozen=True)
class Group:
    """Unit templates of one template key, with each one's subject and cohort mean (0 when
    scores are not centred)."""

    templates: np.ndarray  # (n, d)
    subjects: np.ndarray  # (n,)
    means: np.ndarray  # (n,)


@dataclass(frozen=True)
class Calibration:
    far: float
    #: the smallest threshold whose false-match rate on the impostor pairs is at most ``far``;
    #: None when there are fewer than ``min_impostor_pairs`` of them
    threshold: float | None
    samples: int
    subjects: int
    impostor_pairs: int
    #: True when the impostor pairs are a random sample of all of them (``max_pairs``)
    sampled: bool
    genuine_pairs: int
    min_impostor_pairs: int
    #: genuine pairs accepted at ``threshold`` (None without genuine pairs or threshold)
    true_match_rate: float | None
    #: the threshold in force, and the gallery's false- and true-match rates at it
    current_threshold: float
    false_match_rate_at_current: float | None
    true_match_rate_at_current: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def min_impostor_pairs(far: float) -> int:
    return int(np.ceil(MIN_PAIRS_PER_INVERSE_FAR / far))


def _scores(g: Group, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    t = np.asarray(g.templates, np.float64)
    out = np.empty(len(i))
    step = 1 << 16  # bounded memory for millions of pairs
    for k in range(0, len(i), step):
        a, b = i[k : k + step], j[k : k + step]
        out[k : k + len(a)] = np.einsum("nd,nd->n", t[a], t[b])
    return out - 0.5 * (g.means[i] + g.means[j])


def pair_scores(
    groups: Sequence[Group], max_pairs: int = 2_000_000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, bool]:
    """(impostor scores, genuine scores, sampled): every genuine pair; every impostor pair,
    or ``max_pairs`` of them drawn at random (uniformly over the groups' pairs) when there
    are more."""
    rng = np.random.default_rng(seed)
    total = sum(len(g.subjects) * (len(g.subjects) - 1) // 2 for g in groups)
    sampled = total > max_pairs
    impostor, genuine = [], []
    for g in groups:
        n = len(g.subjects)
        if n < 2:
            continue
        subjects = np.asarray(g.subjects)
        _, codes = np.unique(subjects, return_inverse=True)
        order = np.argsort(codes, kind="stable")
        bounds = np.flatnonzero(np.diff(codes[order])) + 1
        for members in np.split(order, bounds):  # genuine: every pair within a subject
            if len(members) > 1:
                a, b = np.triu_indices(len(members), 1)
                genuine.append(_scores(g, members[a], members[b]))
        if not sampled:
            i, j = np.triu_indices(n, 1)
        else:
            share = n * (n - 1) // 2 / total
            m = int(round(max_pairs * share))
            i, j = rng.integers(0, n, (2, m))
            keep = i != j
            i, j = i[keep], j[keep]
        keep = codes[i] != codes[j]
        impostor.append(_scores(g, i[keep], j[keep]))
    cat = lambda parts: np.concatenate(parts) if parts else np.empty(0)  # noqa: E731
    return cat(impostor), cat(genuine), sampled


def calibrate(
    groups: Sequence[Group],
    far: float,
    current_threshold: float,
    max_pairs: int = 2_000_000,
    seed: int = 0,
) -> Calibration:
    """The gallery's threshold at ``far``, and how the threshold in force does on it."""
    if not 0 < far < 1:
        raise ValueError(f"far must be in (0, 1), not {far}")
    impostor, genuine, sampled = pair_scores(groups, max_pairs, seed)
    need = min_impostor_pairs(far)
    threshold = threshold_at_far(impostor, far) if len(impostor) >= need else None

    def rate(scores: np.ndarray, t: float | None) -> float | None:
        return None if t is None or not len(scores) else float(np.mean(scores >= t))

    return Calibration(
        far=far, threshold=threshold,
        samples=int(sum(len(g.subjects) for g in groups)),
        subjects=len(set().union(*(set(np.asarray(g.subjects).tolist()) for g in groups))),
        impostor_pairs=int(len(impostor)), sampled=sampled, genuine_pairs=int(len(genuine)),
        min_impostor_pairs=need, true_match_rate=rate(genuine, threshold),
        current_threshold=float(current_threshold),
        false_match_rate_at_current=rate(impostor, current_threshold),
        true_match_rate_at_current=rate(genuine, current_threshold),
    )
