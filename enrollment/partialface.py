"""PartialFace protected input (Mi et al., ICCV 2023), exactly as method.md §1 defines it.

A protected input is 27 high-frequency DCT channels of the up-sampled YCbCr face: one fixed
subset of 9 of the 54 non-pruned frequencies (the same 9 for Y, Cb and Cr), reordered by one
fixed permutation.  Which (subset, permutation) pair -- the *rank* -- is drawn at random by the
client for every query and never sent, so the server must embed every rank consistently.
"""

from __future__ import annotations

import numpy as np

from enrollment.frequency import (
    as_chw_batch,
    coefficient_maps,
    rgb_to_ycbcr_shifted,
    synthesise_planes,
    ycbcr_shifted_to_rgb,
)

#: DCT indices k = 8u + v with u + v <= 3: >= 95% of the energy, what a human sees.
PRUNED: tuple[int, ...] = tuple(8 * u + v for u in range(8) for v in range(8) if u + v <= 3)
#: The 54 remaining indices, ascending; "kept position" p means KEPT[p].
KEPT: tuple[int, ...] = tuple(k for k in range(64) if k not in PRUNED)

#: The official partition of the 54 kept positions into 6 subsets of 9 (TFace code).
SUBSETS: tuple[tuple[int, ...], ...] = (
    (1, 24, 28, 12, 32, 45, 47, 40, 52),
    (35, 39, 44, 42, 10, 4, 37, 31, 53),
    (0, 50, 19, 6, 22, 51, 49, 23, 21),
    (38, 8, 25, 13, 17, 30, 7, 33, 9),
    (26, 29, 16, 2, 43, 14, 5, 11, 48),
    (36, 41, 46, 34, 15, 27, 18, 20, 3),
)

#: A partition whose every subset carries as much about the face as the others: the paper's
#: subsets differ by 7 bits per pixel in what they tell (subset 4 least, and it is the fixed
#: subset every model measured so far recognises worst), these by 0.09.  Found by
#: ``bench/partition_balance.py`` (maximin of the Gaussian information per pixel at 1 grey
#: level of noise, 400 training-split LFW faces; ``bench/results/partition-balance.json``).
#: It was version 1 of the ``partialface-balanced`` profile.
BALANCED_SUBSETS_V1: tuple[tuple[int, ...], ...] = (
    (19, 37, 38, 42, 44, 46, 48, 49, 50),
    (0, 11, 17, 22, 26, 34, 36, 43, 47),
    (4, 9, 21, 24, 30, 32, 41, 45, 52),
    (1, 5, 12, 13, 27, 28, 35, 40, 53),
    (3, 6, 7, 14, 23, 29, 31, 39, 51),
    (2, 8, 10, 15, 16, 18, 20, 25, 33),
)

#: Version 2 of the ``partialface-balanced`` partition: version 1 with subset 5 (the only
#: subset without a coefficient of vertical frequency u >= 6, and the one a model trained on
#: version 1 recognised worst) given subset 0's (6,0) and (7,3) for its (0,6) and (3,2)
#: (``bench/partition_swap.py``; ``bench/results/partition-swap.json``). A model trained on
#: it recognises all six subsets within 0.43 points of each other (version 1: 1.09).
#: Changing it changes the ``partialface-balanced`` profile.
BALANCED_SUBSETS: tuple[tuple[int, ...], ...] = (
    (2, 16, 19, 37, 42, 44, 46, 48, 50),
    (0, 11, 17, 22, 26, 34, 36, 43, 47),
    (4, 9, 21, 24, 30, 32, 41, 45, 52),
    (1, 5, 12, 13, 27, 28, 35, 40, 53),
    (3, 6, 7, 14, 23, 29, 31, 39, 51),
    (8, 10, 15, 18, 20, 25, 33, 38, 49),
)

#: The three permutations published with the official code: new position j takes old perm[j].
OFFICIAL_PERMUTATIONS: tuple[tuple[int, ...], ...] = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8),
    (7, 3, 0, 6, 5, 4, 1, 2, 8),
    (4, 8, 6, 0, 2, 5, 3, 7, 1),
)

#: Seed of the permutations privface adds to reach the paper's n = 6 (the paper's own three
#: extra permutations are unpublished).  Changing it changes the ``partialface-paper`` profile.
PERMUTATION_SEED = 20230923


def derived_permutations(count: int, seed: int = PERMUTATION_SEED) -> tuple[tuple[int, ...], ...]:
    """The official permutations followed by distinct ones drawn from ``seed``, ``count`` in all."""
    perms = list(OFFICIAL_PERMUTATIONS[:count])
    rng = np.random.default_rng(seed)
    while len(perms) < count:
        p = tuple(int(i) for i in rng.permutation(9))
        if p not in perms:
            perms.append(p)
    return tuple(perms)


#: The paper's m x n = 6 x 6 candidate set.
PAPER_PERMUTATIONS = derived_permutations(6)


def rank_frequencies(
    subset: int,
    permutation: int,
    subsets: tuple[tuple[int, ...], ...] = SUBSETS,
    permutations: tuple[tuple[int, ...], ...] = PAPER_PERMUTATIONS,
) -> tuple[int, ...]:
    """The 9 DCT indices k of one rank, in the order they are sent."""
    positions = subsets[subset]
    return tuple(KEPT[positions[j]] for j in permutations[permutation])


def rank_channels(
    subset: int,
    permutation: int,
    subsets: tuple[tuple[int, ...], ...] = SUBSETS,
    permutations: tuple[tuple[int, ...], ...] = PAPER_PERMUTATIONS,
) -> tuple[int, ...]:
    """Channel indices 64c + k of one rank's 27 channels, ordered [Y 9 | Cb 9 | Cr 9]."""
    ks = rank_frequencies(subset, permutation, subsets, permutations)
    return tuple(64 * c + k for c in range(3) for k in ks)


def channel_pairs(channels) -> np.ndarray:
    """(plane, u, v) triples of channel indices 64c + 8u + v; works elementwise on arrays."""
    ch = np.asarray(channels)
    return np.stack([ch // 64, (ch % 64) // 8, ch % 8], axis=-1)


def draw_ranks(
    n: int, rng: np.random.Generator, n_subsets: int = 6, n_permutations: int = 6
) -> np.ndarray:
    """(n, 2) uniformly random (subset, permutation) pairs."""
    return np.stack([rng.integers(0, n_subsets, n), rng.integers(0, n_permutations, n)], axis=1)


def draw_view_ranks(
    n_faces: int,
    n_views: int,
    rng: np.random.Generator,
    n_subsets: int = 6,
    n_permutations: int = 6,
) -> np.ndarray:
    """(n_faces * n_views, 2) ranks, face-major, where the views of one face share a subset.

    The views of a face (the face and its mirror image) carry the same frequencies: a
    mirror's coefficient map (u, v) is the face's, mirrored, times (-1)^v. Protected with
    two different subsets they would hand the server 18 of the 54 kept coefficients per
    plane of one face instead of 9, so only the permutation is drawn per view.
    """
    subsets = np.repeat(rng.integers(0, n_subsets, n_faces), n_views)
    return np.stack([subsets, rng.integers(0, n_permutations, n_faces * n_views)], axis=1)


def full_transform(images, factor: int = 8, dtype=None) -> np.ndarray:
    """All 192 channels (64c + k) of the up-sampled YCbCr block DCT, before pruning.

    images: uint8/float in [0, 255], (H, W), (H, W, 3), (3, H, W) or batches thereof (greyscale
    is replicated).  Returns (N, 192, 14f, 14f) float32 (a leading N even for one image).
    """
    import torch

    x, _ = as_chw_batch(images)
    planes = rgb_to_ycbcr_shifted(x)
    return coefficient_maps(planes, channel_pairs(np.arange(192)), factor, dtype or torch.float32)


def protect(
    images,
    ranks,
    factor: int = 8,
    subsets: tuple[tuple[int, ...], ...] = SUBSETS,
    permutations: tuple[tuple[int, ...], ...] = PAPER_PERMUTATIONS,
) -> np.ndarray:
    """The 27-channel protected inputs of aligned faces.

    ranks: one (subset, permutation) pair for the whole batch, or an (N, 2) array (one per
    face).  Only the requested channels are computed.  Returns (N, 27, 14f, 14f) float32.
    """
    x, _ = as_chw_batch(images)
    r = np.asarray(ranks, dtype=int)
    table = np.array(
        [
            [rank_channels(s, p, subsets, permutations) for p in range(len(permutations))]
            for s in range(len(subsets))
        ]
    )
    channels = table[r[..., 0], r[..., 1]]  # (27,) or (N, 27)
    if channels.ndim == 2 and channels.shape[0] != x.shape[0]:
        raise ValueError(f"{channels.shape[0]} ranks for {x.shape[0]} images")
    return coefficient_maps(rgb_to_ycbcr_shifted(x), channel_pairs(channels), factor)


def inverse(coeffs, channels, factor: int = 8) -> np.ndarray:
    """What the channels show without any learning: zero-fill the rest, invert, back to RGB.

    coeffs: (N, K, 14f, 14f) maps of channel indices ``channels`` (K,) (64c + k).  Returns
    (N, 3, 112, 112) float64 RGB, unclipped.  With all 192 channels this is the exact inverse.
    """
    planes = synthesise_planes(coeffs, channel_pairs(channels), 3, factor)
    return ycbcr_shifted_to_rgb(planes)


def to_uint8_image(rgb: np.ndarray) -> np.ndarray:
    """(3, H, W) float RGB -> (H, W, 3) uint8 for saving."""
    return np.clip(np.rint(np.moveaxis(rgb, 0, -1)), 0, 255).astype(np.uint8)
