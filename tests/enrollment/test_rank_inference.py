"""The rank of a PartialFace input, read off the input; and the per-subset stems that use it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from enrollment import partialface as pf
from enrollment import rank_inference as ri
from enrollment.backbone import Backbone, BackboneConfig, fold_batchnorm
from enrollment.model_io import embed, model_inputs
from enrollment.profiles import get_profile
from enrollment.training import split_stem

PROFILE = get_profile("partialface-paper")
ALL_RANKS = np.array([(s, p) for s in range(6) for p in range(6)])


def _faces(aligned_faces: np.ndarray) -> np.ndarray:
    """Six real faces, each under every one of the 36 ranks: (216, 112, 112, 3)."""
    return np.repeat(aligned_faces, len(ALL_RANKS), axis=0)


@pytest.mark.parametrize(
    "change",
    ["colour", "greyscale", "mirror", "dark", "noise"],
)
def test_every_rank_of_real_faces_is_identified(aligned_faces, change):
    faces = _faces(aligned_faces).astype(np.float64)
    if change == "greyscale":
        faces = np.repeat(faces @ np.array([0.299, 0.587, 0.114])[:, None], 3, axis=-1)
    elif change == "mirror":
        faces = faces[:, :, ::-1]
    elif change == "dark":
        faces = faces / 4
    elif change == "noise":
        faces = np.clip(faces + np.random.default_rng(0).normal(0, 8, faces.shape), 0, 255)
    ranks = np.tile(ALL_RANKS, (len(aligned_faces), 1))
    x = pf.protect(faces, ranks).astype(np.float16)  # as on the wire
    found, margin = ri.infer_ranks(x, PROFILE)
    np.testing.assert_array_equal(found, ranks)
    assert margin.min() > 0.3


def test_every_rank_of_the_balanced_profile_is_identified(aligned_faces):
    balanced = get_profile("partialface-balanced")
    ranks = np.tile(ALL_RANKS, (len(aligned_faces), 1))
    x = pf.protect(_faces(aligned_faces), ranks, subsets=balanced.subsets).astype(np.float16)
    found, margin = ri.infer_ranks(x, balanced)
    np.testing.assert_array_equal(found, ranks)
    assert margin.min() > 0.3


def test_a_wrong_rank_scores_lower_than_the_right_one(aligned_faces):
    x = pf.protect(aligned_faces[:1], [[2, 4]])
    scores = ri.rank_scores(x, PROFILE)[0]
    assert scores[2, 4] > 3.0  # nine slots, each cosine ~0.55 with its analytic template
    assert np.delete(scores.ravel(), 2 * 6 + 4).max() < scores[2, 4] - 0.3


def test_canonicalise_undoes_the_permutation_exactly(aligned_faces):
    ranks = np.tile(ALL_RANKS, (len(aligned_faces), 1))
    faces = torch.from_numpy(_faces(aligned_faces).astype(np.float32)).permute(0, 3, 1, 2)
    sent = model_inputs(faces, "partialface", PROFILE, ranks)
    canon, subsets, _ = ri.canonicalise(sent, PROFILE)
    np.testing.assert_array_equal(subsets, ranks[:, 0])
    expected = model_inputs(faces, "partialface", PROFILE, ranks, canonical=True)
    assert torch.equal(canon, expected)
    # and canonical means: the subset in its published order, permutation 0
    first = pf.protect(_faces(aligned_faces)[:1], [[ranks[0, 0], 0]])
    np.testing.assert_allclose(canon[:1].numpy(), first, rtol=1e-5, atol=1e-4)


def test_every_permutation_is_the_subset_under_each_permutation(aligned_faces):
    """What the server re-creates from one view equals what the client would have sent under
    each permutation of the view's subset, exactly, for tensors and float16 arrays alike."""
    rng = np.random.default_rng(7)
    ranks = pf.draw_ranks(len(aligned_faces), rng)
    faces = torch.from_numpy(aligned_faces.astype(np.float32)).permute(0, 3, 1, 2)
    sent = model_inputs(faces, "partialface", PROFILE, ranks)
    every = ri.every_permutation(sent, PROFILE).reshape(len(faces), 6, *sent.shape[1:])
    as_wire = ri.every_permutation(sent.numpy().astype(np.float16), PROFILE)
    assert as_wire.dtype == np.float16 and as_wire.shape == (len(faces) * 6, *sent.shape[1:])
    for p in range(6):
        expected = model_inputs(faces, "partialface", PROFILE, np.c_[ranks[:, 0], np.full(
            len(faces), p)])
        assert torch.equal(every[:, p], expected)
        np.testing.assert_array_equal(as_wire.reshape(every.shape)[:, p],
                                      expected.numpy().astype(np.float16))


def test_rank_inference_refuses_other_methods():
    with pytest.raises(ValueError, match="PartialFace"):
        ri.rank_scores(np.zeros((1, 71, 112, 112)), get_profile("hfcf"))


def test_subset_stems_apply_each_subsets_own_weights(subset_backbone):
    m = subset_backbone
    x = torch.randn(6, 27, 112, 112)
    subsets = torch.tensor([0, 5, 0, 3, 5, 1])
    with torch.no_grad():
        together = m(x, subsets)
        alone = torch.cat([m(x[i : i + 1], subsets[i : i + 1]) for i in range(6)])
        other = m(x, (subsets + 1) % 6)
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)
    assert (together - other).abs().max() > 1e-2  # the subset matters
    with pytest.raises(ValueError, match="subset"):
        m(x)


def test_fold_batchnorm_keeps_per_subset_stems(subset_backbone):
    m = subset_backbone
    x = torch.randn(4, 27, 112, 112)
    subsets = torch.tensor([2, 4, 4, 0])
    with torch.no_grad():
        torch.testing.assert_close(fold_batchnorm(m)(x, subsets), m(x, subsets),
                                   rtol=1e-4, atol=1e-4)


def test_split_stem_computes_what_the_shared_stem_did_on_permutation_0(aligned_faces):
    torch.manual_seed(1)
    shared = Backbone(BackboneConfig(widths=(8, 16, 16, 32), strides=(2, 2, 2, 2),
                                     embedding_size=32)).eval()
    split = split_stem(shared, 6)
    faces = torch.from_numpy(aligned_faces.astype(np.float32)).permute(0, 3, 1, 2)
    ranks = np.array([[0, 3], [1, 1], [2, 5], [3, 0], [4, 2], [5, 4]])[: len(faces)]
    on_perm_0 = model_inputs(faces, "partialface", PROFILE, np.c_[ranks[:, 0], 0 * ranks[:, 0]])
    canon, subsets, _ = ri.canonicalise(model_inputs(faces, "partialface", PROFILE, ranks),
                                        PROFILE)
    np.testing.assert_allclose(embed(split, canon, subsets=subsets), embed(shared, on_perm_0),
                               atol=1e-5)
