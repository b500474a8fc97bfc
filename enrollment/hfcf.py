"""HFCF protected input (Han, Li, Denzler, VISAPP 2024) as reconstructed in method.md §4.

The 189 AC channels of the up-sampled YCbCr block DCT are fused to 63 by keeping, per
frequency and position, the coefficient with the largest magnitude across Y, Cb and Cr (with
its sign); learnable Laplace noise (DCTDP's mechanism) is added to the fused channels, and 8
sparse decoded-LBP colour maps are concatenated noise-free to win back accuracy.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from enrollment.frequency import as_chw_batch, coefficient_maps, rgb_to_ycbcr_shifted

#: AC frequencies: every DCT index but the DC (k = 0).
AC: tuple[int, ...] = tuple(range(1, 64))
N_FUSED = len(AC)
N_LBP = 8

#: Neighbours at radius 1, clockwise from the top-left: bit j of an LBP code.
_NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1))


def ac_channels(images, factor: int = 8) -> np.ndarray:
    """(N, 3, 63, s, s): the DC-dropped coefficient maps of Y, Cb and Cr (189 channels)."""
    x, _ = as_chw_batch(images)
    planes = rgb_to_ycbcr_shifted(x)
    ks = np.array(AC)
    pairs = np.concatenate([np.stack([np.full(63, c), ks // 8, ks % 8], 1) for c in range(3)])
    maps = coefficient_maps(planes, pairs, factor)
    return maps.reshape(maps.shape[0], 3, N_FUSED, *maps.shape[-2:])


def fuse(ac) -> np.ndarray:
    """Max-|.| fusion across the colour planes, sign kept: (N, 3, 63, s, s) -> (N, 63, s, s)."""
    a = np.asarray(ac)
    pick = np.abs(a).argmax(axis=1)[:, None]
    return np.take_along_axis(a, pick, axis=1)[:, 0]


def decoded_lbp(images) -> np.ndarray:
    """Multichannel decoded LBP (Dubey et al. 2016) of R, G, B at radius 1: (N, 8, H, W) in [0,1].

    For each neighbour j the three per-channel LBP bits form a 3-bit number d_j; output map t
    is the 8-bit LBP code whose bit j is set where d_j == t.  Borders use edge replication.
    """
    x, _ = as_chw_batch(images)
    n, _, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
    out = np.zeros((n, N_LBP, h, w))
    for j, (dy, dx) in enumerate(_NEIGHBOURS):
        neighbour = padded[:, :, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
        bits = (neighbour >= x).astype(np.int64)  # (N, 3, H, W)
        decoded = bits[:, 0] + 2 * bits[:, 1] + 4 * bits[:, 2]
        for t in range(N_LBP):
            out[:, t] += (decoded == t) * (1 << j)
    return (out / 255.0).astype(np.float32)


class LaplaceNoise(nn.Module):
    """DCTDP's learnable Laplace mechanism on the fused channels.

    Per-element budget eps_i = softmax(rho)_i * eps_mean * N, so the budgets average eps_mean
    whatever rho learns; scale b_i = 1 / eps_i; learnable location mu; fresh noise on every
    forward.  The client applies the trained parameters (``state_dict``) before sending.
    """

    def __init__(self, shape: tuple[int, ...], eps_mean: float = 0.5) -> None:
        super().__init__()
        self.eps_mean = float(eps_mean)
        self.rho = nn.Parameter(torch.zeros(shape))
        self.mu = nn.Parameter(torch.zeros(shape))

    def budgets(self) -> torch.Tensor:
        n = self.rho.numel()
        return torch.softmax(self.rho.flatten(), 0).reshape(self.rho.shape) * self.eps_mean * n

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        scale = 1.0 / self.budgets()
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        u = u.clamp(1e-7, 1 - 1e-7) - 0.5
        laplace = -torch.sign(u) * torch.log1p(-2 * u.abs())
        return x + self.mu + scale * laplace


def protect(
    images,
    noise: LaplaceNoise | None,
    factor: int = 8,
    seed: int | None = None,
) -> np.ndarray:
    """The 71-channel HFCF input: 63 noisy fused DCT maps then 8 decoded-LBP colour maps.

    The LBP maps are at the face's resolution; they are resized to the DCT maps' resolution
    (14f) by nearest neighbour when f != 8.
    """
    fused = torch.from_numpy(fuse(ac_channels(images, factor)))
    if noise is not None:
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            fused = noise(fused, generator=gen)
    lbp = decoded_lbp(images)
    side = fused.shape[-1]
    if lbp.shape[-1] != side:
        idx = np.arange(side) * lbp.shape[-1] // side
        lbp = lbp[:, :, idx][:, :, :, idx]
    return np.concatenate([fused.numpy(), lbp], axis=1).astype(np.float32)
