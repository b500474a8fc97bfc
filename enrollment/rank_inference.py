"""Which rank a PartialFace input was protected with, read off the input itself.

PartialFace's client draws a rank (subset, permutation) per query and never sends it; the
paper's white-box attacker knows the candidate set but not the query's rank.  The rank is not
hidden, though: with f = 8 an 8x8 block of the bilinear up-sampled plane spans less than one
source pixel, so coefficient map (u, v) is ``M_u X M_v^T`` whose row gain ``M_u[i] K M_u[i]^T``
(K: the image's covariance) varies across the face in a pattern that differs from one u to
the next (the kinks of the interpolation drift through the blocks).  The log energy profile
of a channel over rows and columns therefore names its (u, v); the nine profiles of the Y
plane, matched against analytic templates and constrained to the candidate set, name the
rank.  Measured on all 13,233 LFW faces (aligned, a random rank each, float16 as on the
wire): 3 ranks wrong in colour, 2 in greyscale, 3 mirrored; on 400 raw crops also every
rank right when blurred (sigma 1.5), darkened (1/4) or noisy (sigma 8).
``bench/rank_inference.py`` measures it.

Two consequences: the server can (and privface's rank-aware models do) undo the
permutation and know the subset, so the stem applies weights made for the frequencies that
are really there; and a privacy evaluation must treat the query's rank as known to the
server (the paper's white-box attacker is in effect its "enhanced" one, an inverter per rank).
What protects the face is that only 9 of the 54 high frequencies per plane are sent, not
which 9.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from enrollment.frequency import analysis_operators
from enrollment.profiles import ProtectionProfile, rank_table

#: Correlation of neighbouring pixels in the image model of the templates (K_ab = rho^|a-b|);
#: 0.9 and 0.97 both identified every rank of the test faces, 0.9 with the wider margin.
PIXEL_CORRELATION = 0.9


@lru_cache(maxsize=8)
def _templates(factor: int) -> np.ndarray:
    """(64, 2 * side) unit-norm, mean-free log energy profiles (rows, then columns) of every
    DCT frequency k = 8u + v, under a stationary image model."""
    m = analysis_operators(factor)  # (8, side, 112)
    a = np.arange(m.shape[-1])
    k = PIXEL_CORRELATION ** np.abs(a[:, None] - a[None, :])
    gain = np.log(np.einsum("uis,st,uit->ui", m, k, m))  # (8, side)
    t = np.concatenate([np.repeat(gain, 8, axis=0), np.tile(gain, (8, 1))], axis=1)
    t -= t.mean(axis=1, keepdims=True)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    t.setflags(write=False)
    return t


def channel_profiles(x: torch.Tensor | np.ndarray, n: int = 9) -> np.ndarray:
    """(N, n, 2 * side) mean-free, unit-norm log energy profiles of the first ``n`` channels
    (the Y plane of a PartialFace input: colour may be missing)."""
    y = torch.as_tensor(x[:, :n]).float()
    e = y * y
    p = torch.cat([e.mean(-1), e.mean(-2)], dim=-1).double().clamp_min(1e-30).log()
    p = p - p.mean(-1, keepdim=True)
    p = p / p.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return p.numpy()


def rank_scores(x: torch.Tensor | np.ndarray, profile: ProtectionProfile) -> np.ndarray:
    """(N, subsets, permutations): the summed cosine between each slot's profile and the
    template of the frequency the rank would put there (9 for a perfect match)."""
    if profile.method != "partialface":
        raise ValueError(f"rank inference needs a PartialFace profile, not {profile.method!r}")
    n = len(profile.subsets[0])
    s = np.einsum("nkd,fd->nkf", channel_profiles(x, n), _templates(profile.factor))
    freq = rank_table(profile)[..., :n] % 64  # (S, P, 9): the Y plane's frequency per slot
    return s[:, np.arange(n), freq].sum(-1)  # s[n, slot, freq[S, P, slot]] -> (N, S, P)


def infer_ranks(
    x: torch.Tensor | np.ndarray, profile: ProtectionProfile
) -> tuple[np.ndarray, np.ndarray]:
    """((N, 2) most likely (subset, permutation) per input, (N,) margin of the best score over
    the second best: how sure the inference is; median ~2.8 on LFW faces)."""
    scores = rank_scores(x, profile).reshape(len(x), -1)
    best = scores.argmax(axis=1)
    top2 = np.sort(scores, axis=1)[:, -2:]
    n_perm = len(profile.permutations)
    return np.stack([best // n_perm, best % n_perm], axis=1), top2[:, 1] - top2[:, 0]


def canonical_order(ranks: np.ndarray, profile: ProtectionProfile) -> np.ndarray:
    """(N, 27) channel gather indices that undo each rank's permutation: input channel
    ``idx[n, j]`` goes to slot j, so every subset arrives in its published order (the
    order of permutation 0) and slot j always holds the same frequency of that subset."""
    s = len(profile.subsets[0])
    perms = np.asarray(profile.permutations)[ranks[:, 1]]  # (N, 9): slot j holds perm[j]
    inverse = np.argsort(perms, axis=1)  # element e sits in slot inverse[e]
    planes = np.arange(profile.channels // s) * s
    return (planes[None, :, None] + inverse[:, None, :]).reshape(len(ranks), -1)


def canonicalise(
    x: torch.Tensor, profile: ProtectionProfile
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """(inputs with the permutation undone, (N,) subsets, (N,) margins) of protected inputs
    whose rank is not known: what a rank-aware model is fed."""
    ranks, margin = infer_ranks(x, profile)
    idx = torch.from_numpy(canonical_order(ranks, profile))
    x = torch.as_tensor(x)
    canon = torch.gather(x, 1, idx[:, :, None, None].expand(-1, -1, *x.shape[-2:]))
    return canon, ranks[:, 0], margin


def permutation_orders(profile: ProtectionProfile) -> np.ndarray:
    """(P, C) gather indices: row q takes inputs in canonical order (permutation 0, see
    :func:`canonical_order`) to permutation q's order (slot j of each plane holds element
    ``permutations[q][j]``)."""
    s = len(profile.subsets[0])
    planes = np.arange(profile.channels // s) * s
    perms = np.asarray(profile.permutations)
    return (planes[None, :, None] + perms[:, None, :]).reshape(len(perms), -1)


def every_permutation(
    x: torch.Tensor | np.ndarray, profile: ProtectionProfile
) -> torch.Tensor | np.ndarray:
    """(N * P, C, H, W) of N protected views: each view under every permutation of the subset
    read off it (view-major, permutations in profile order), same type and dtype as ``x``.

    A model trained on random ranks embeds the permutations of one subset a little
    differently; averaging over all of them removes that part of the rank's noise, at P times
    the model's work (``Settings.average_permutations``)."""
    ranks, _ = infer_ranks(x, profile)
    canon = canonical_order(ranks, profile)  # (N, C): input channel of each canonical slot
    idx = np.take(canon, permutation_orders(profile), axis=1).reshape(-1, canon.shape[1])
    rows = np.repeat(np.arange(len(ranks)), len(profile.permutations))[:, None]
    if isinstance(x, torch.Tensor):
        return x[torch.from_numpy(rows), torch.from_numpy(idx)]
    return x[rows, idx]
