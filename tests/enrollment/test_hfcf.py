"""HFCF: frequency fusion, decoded LBP and the Laplace noise layer."""

from __future__ import annotations

import numpy as np
import torch

from enrollment import hfcf
from enrollment import partialface as pf


def test_fusion_keeps_largest_magnitude_with_sign():
    ac = np.zeros((1, 3, 63, 2, 2))
    ac[0, :, 0, 0, 0] = [1.0, -5.0, 3.0]  # Cb wins, negative
    ac[0, :, 0, 0, 1] = [2.0, 0.5, -1.5]  # Y wins
    ac[0, :, 5, 1, 1] = [-0.1, 0.2, 0.7]  # Cr wins
    fused = hfcf.fuse(ac)
    assert fused.shape == (1, 63, 2, 2)
    assert fused[0, 0, 0, 0] == -5.0
    assert fused[0, 0, 0, 1] == 2.0
    assert fused[0, 5, 1, 1] == 0.7


def test_fusion_on_real_faces_matches_elementwise_rule(aligned_faces):
    ac = hfcf.ac_channels(aligned_faces[:1], factor=2)
    assert ac.shape == (1, 3, 63, 28, 28)
    full = pf.full_transform(aligned_faces[:1], 2).reshape(1, 3, 64, 28, 28)
    np.testing.assert_allclose(ac, full[:, :, 1:], atol=1e-4)  # DC dropped: 189 channels
    fused = hfcf.fuse(ac)
    mags = np.abs(ac)
    assert np.allclose(np.abs(fused), mags.max(axis=1))
    winner = mags.argmax(axis=1)
    assert np.allclose(fused, np.take_along_axis(ac, winner[:, None], 1)[:, 0])


def naive_decoded_lbp(rgb: np.ndarray) -> np.ndarray:
    h, w, _ = rgb.shape
    pad = np.pad(rgb.astype(int), ((1, 1), (1, 1), (0, 0)), mode="edge")
    nbrs = [(-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1)]
    out = np.zeros((8, h, w))
    for y in range(h):
        for x in range(w):
            centre = pad[y + 1, x + 1]
            for j, (dy, dx) in enumerate(nbrs):
                bits = (pad[y + 1 + dy, x + 1 + dx] >= centre).astype(int)
                t = bits[0] + 2 * bits[1] + 4 * bits[2]
                out[t, y, x] += 2**j
    return out / 255.0


def test_decoded_lbp_matches_naive_loop():
    rgb = np.random.default_rng(3).integers(0, 256, (9, 11, 3)).astype(np.uint8)
    ours = hfcf.decoded_lbp(rgb)[0]
    np.testing.assert_allclose(ours, naive_decoded_lbp(rgb), atol=1e-6)
    # each neighbour bit lands in exactly one of the 8 maps
    codes = np.rint(ours * 255).astype(int)
    assert (np.bitwise_or.reduce(codes, axis=0) == 255).all()
    assert (codes.sum(axis=0) == 255).all()


def test_noise_budget_mean_is_eps_mean():
    layer = hfcf.LaplaceNoise((4, 8, 8), eps_mean=0.5)
    with torch.no_grad():
        layer.rho.normal_(0, 2.0)
    eps = layer.budgets()
    assert abs(eps.mean().item() - 0.5) < 1e-5
    assert eps.std().item() > 0.1  # the budget is really redistributed


def test_noise_scale_is_inverse_budget():
    layer = hfcf.LaplaceNoise((1, 1, 1), eps_mean=2.0)
    x = torch.zeros(200_000, 1, 1, 1)
    noisy = layer(x, generator=torch.Generator().manual_seed(0))
    # Laplace(0, b): mean absolute deviation b = 1 / eps = 0.5
    assert abs(noisy.abs().mean().item() - 0.5) < 0.01
    again = layer(x, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(noisy, again)  # fresh noise every forward


def test_noise_is_learnable_end_to_end():
    layer = hfcf.LaplaceNoise((2, 3, 3), eps_mean=1.0)
    layer(torch.ones(5, 2, 3, 3)).sum().backward()
    assert layer.rho.grad is not None and layer.mu.grad is not None


def test_hfcf_protect_shape(aligned_faces):
    out = hfcf.protect(aligned_faces[:2], None, factor=2)
    assert out.shape == (2, 71, 28, 28)
    assert set(np.unique(out[:, 63:] * 255).round()) <= set(range(256))
