"""PartialFace transform against an independent reference: torch up-sampling + scipy DCT."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
import torch

from enrollment import partialface as pf
from enrollment.frequency import bilinear_matrix


def reference_channels(faces: np.ndarray, factor: int) -> np.ndarray:
    """Straight from method.md §1: up-sample, YCbCr - 128, 8x8 block dctn, regroup 64c + k."""
    x = torch.from_numpy(faces.astype(np.float64)).permute(0, 3, 1, 2) / 255.0
    if factor > 1:
        x = torch.nn.functional.interpolate(
            x, scale_factor=factor, mode="bilinear", align_corners=True
        )
    rgb = x.numpy() * 255.0
    r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    planes = np.stack(
        [
            0.299 * r + 0.587 * g + 0.114 * b - 128,
            -0.168736 * r - 0.331264 * g + 0.5 * b,
            0.5 * r - 0.418688 * g - 0.081312 * b,
        ],
        axis=1,
    )
    n, _, h, w = planes.shape
    blocks = planes.reshape(n, 3, h // 8, 8, w // 8, 8).transpose(0, 1, 2, 4, 3, 5)
    coeffs = scipy.fft.dctn(blocks, axes=(-2, -1), norm="ortho")  # (n, 3, bi, bj, 8, 8)
    coeffs = coeffs.reshape(n, 3, h // 8, w // 8, 64).transpose(0, 1, 4, 2, 3)
    return coeffs.reshape(n, 192, h // 8, w // 8)


@pytest.mark.parametrize("factor", [8, 2, 1])
def test_full_transform_matches_scipy_reference(aligned_faces, factor):
    faces = aligned_faces[:2] if factor == 8 else aligned_faces
    ours = pf.full_transform(faces, factor)
    ref = reference_channels(faces, factor)
    assert ours.shape == (len(faces), 192, 14 * factor, 14 * factor)
    assert np.abs(ours - ref).max() < 1e-3


@pytest.mark.parametrize("factor", [8, 4])
def test_protect_selects_rank_channels_of_reference(aligned_faces, factor):
    faces = aligned_faces[:3]
    ranks = np.array([[0, 0], [3, 1], [5, 5]])
    ours = pf.protect(faces, ranks, factor)
    ref = reference_channels(faces, factor)
    for i, (s, p) in enumerate(ranks):
        expected = ref[i, list(pf.rank_channels(s, p))]
        assert np.abs(ours[i] - expected).max() < 1e-3


def test_bilinear_matrix_is_torch_interpolation():
    x = np.random.default_rng(0).random((112, 112))
    a = bilinear_matrix(112, 8)
    t = torch.nn.functional.interpolate(
        torch.from_numpy(x)[None, None], scale_factor=8, mode="bilinear", align_corners=True
    )[0, 0].numpy()
    np.testing.assert_allclose(a @ x @ a.T, t, atol=1e-9)


def test_pruned_set_is_exactly_low_frequencies():
    assert set(pf.PRUNED) == {0, 1, 2, 3, 8, 9, 10, 16, 17, 24}
    assert all((k // 8) + (k % 8) <= 3 for k in pf.PRUNED)
    assert len(pf.KEPT) == 54 and list(pf.KEPT) == sorted(pf.KEPT)
    assert not set(pf.KEPT) & set(pf.PRUNED)
    assert pf.KEPT[:5] == (4, 5, 6, 7, 11)


@pytest.mark.parametrize("subsets", [pf.SUBSETS, pf.BALANCED_SUBSETS, pf.BALANCED_SUBSETS_V1],
                         ids=["paper", "balanced", "balanced-v1"])
def test_subsets_partition_the_kept_positions(subsets):
    flat = [p for s in subsets for p in s]
    assert len(subsets) == 6 and all(len(s) == 9 for s in subsets)
    assert sorted(flat) == list(range(54))


def test_balanced_profile_protects_its_own_subsets(aligned_faces):
    """The balanced profile differs from the paper's in its partition only, and its ranks are
    the reference's channels of its own subsets."""
    from enrollment.profiles import get_profile, rank_table

    paper, balanced = get_profile("partialface-paper"), get_profile("partialface-balanced")
    assert balanced.subsets == pf.BALANCED_SUBSETS != paper.subsets
    mask = {"name": 0, "subsets": 0, "description": 0, "version": 0}
    assert {**paper.to_dict(), **mask} == {**balanced.to_dict(), **mask}
    assert balanced.version == 2  # v1: pf.BALANCED_SUBSETS_V1
    faces = aligned_faces[:2]
    ranks = np.array([[4, 2], [1, 5]])
    table = rank_table(balanced)
    ours = pf.protect(faces, ranks, 8, subsets=balanced.subsets)
    ref = reference_channels(faces, 8)
    for i, (s, p) in enumerate(ranks):
        positions = [pf.KEPT.index(k) for k in table[s, p, :9]]
        assert positions == [pf.BALANCED_SUBSETS[s][j] for j in pf.PAPER_PERMUTATIONS[p]]
        assert np.abs(ours[i] - ref[i, table[s, p]]).max() < 1e-3


def test_permutations_are_official_then_seeded_and_distinct():
    perms = pf.PAPER_PERMUTATIONS
    assert perms[:3] == pf.OFFICIAL_PERMUTATIONS
    assert len(set(perms)) == 6
    assert all(sorted(p) == list(range(9)) for p in perms)
    assert pf.derived_permutations(6) == perms  # reproducible from the documented seed


@pytest.mark.parametrize("subset", range(6))
@pytest.mark.parametrize("perm", range(6))
def test_each_rank_is_27_channels_in_y_cb_cr_order(subset, perm):
    ch = np.array(pf.rank_channels(subset, perm))
    assert ch.shape == (27,)
    assert list(ch // 64) == [0] * 9 + [1] * 9 + [2] * 9
    ks = ch % 64
    assert list(ks[:9]) == list(ks[9:18]) == list(ks[18:])
    positions = [pf.KEPT.index(k) for k in ks[:9]]
    order = pf.PAPER_PERMUTATIONS[perm]
    assert positions == [pf.SUBSETS[subset][order[j]] for j in range(9)]
    assert not set(ks) & set(pf.PRUNED)


def test_second_official_permutation_reorders_as_published():
    base = pf.rank_frequencies(2, 0)
    permuted = pf.rank_frequencies(2, 1)
    assert permuted == tuple(base[j] for j in (7, 3, 0, 6, 5, 4, 1, 2, 8))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * np.log10(255.0**2 / np.mean((a - b) ** 2))


@pytest.mark.parametrize("factor", [8, 1])
def test_full_transform_inverts_to_the_image(aligned_faces, factor):
    faces = aligned_faces[:2]
    coeffs = pf.full_transform(faces, factor)
    rgb = pf.inverse(coeffs, np.arange(192), factor)
    original = faces.transpose(0, 3, 1, 2).astype(np.float64)
    assert psnr(rgb, original) > 40


def test_protected_input_alone_loses_the_picture(aligned_faces):
    faces = aligned_faces[:2]
    ch = pf.rank_channels(1, 2)
    rgb = pf.inverse(pf.protect(faces, (1, 2)), ch)
    assert psnr(rgb, faces.transpose(0, 3, 1, 2)) < 15


def test_random_ranks_are_seedable_and_batch_equals_single(aligned_faces):
    r1 = pf.draw_ranks(50, np.random.default_rng(7))
    r2 = pf.draw_ranks(50, np.random.default_rng(7))
    assert (r1 == r2).all() and len({tuple(r) for r in r1}) > 10
    faces = aligned_faces[:3]
    batch = pf.protect(faces, r1[:3])
    for i in range(3):
        np.testing.assert_allclose(batch[i], pf.protect(faces[i], r1[i])[0], atol=1e-4)


def test_greyscale_input_has_no_colour():
    grey = np.random.default_rng(1).integers(0, 256, (112, 112)).astype(np.uint8)
    out = pf.protect(grey, (0, 0))
    assert out.shape == (1, 27, 112, 112)
    assert np.abs(out[0, 9:]).max() < 1e-3  # Cb = Cr = 0 after the shift


def test_mirror_carries_the_same_frequencies(aligned_faces):
    """Why the views of a face share a subset: the mirror's map (u, v) is the face's,
    mirrored, times (-1)^v, so a second subset would reveal other coefficients of the face."""
    face = aligned_faces[0]
    full, mirror = pf.full_transform(face)[0], pf.full_transform(face[:, ::-1].copy())[0]
    v = np.arange(192) % 8
    want = full[:, :, ::-1] * np.where(v % 2, -1.0, 1.0)[:, None, None]
    np.testing.assert_allclose(mirror, want, atol=1e-3 * np.abs(full).max())


def test_views_of_a_face_share_its_subset():
    ranks = pf.draw_view_ranks(200, 2, np.random.default_rng(3))
    pairs = ranks.reshape(200, 2, 2)
    assert (pairs[:, 0, 0] == pairs[:, 1, 0]).all()  # one subset per face
    assert len(set(pairs[:, 0, 0])) == 6  # all subsets drawn
    assert (pairs[:, 0, 1] != pairs[:, 1, 1]).mean() > 0.7  # permutations drawn per view
