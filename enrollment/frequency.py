"""Separable linear operators behind the block-DCT face inputs (method.md §1).

Up-sampling by f (bilinear, ``align_corners=True``) followed by an orthonormal 8x8 block DCT is
linear and separable, so DCT coefficient map (u, v) of a plane X is exactly ``M_u X M_v^T``
with ``M_u[i] = sum_r D[u, r] A[8 i + r]``.  Working with the 112x112 plane and these small
matrices avoids ever materialising the 112f x 112f up-sampled image, which made a naive
implementation the bottleneck of training.  Everything here is pure (numpy in, numpy out) and
cached per (size, f).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

BLOCK = 8
FACE_SIZE = 112


def dct_matrix(n: int = BLOCK) -> np.ndarray:
    """Orthonormal DCT-II matrix: ``D @ x`` is scipy's ``dct(x, norm="ortho")``."""
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    d = np.cos((2 * x + 1) * k * np.pi / (2 * n)) * np.sqrt(2.0 / n)
    d[0] /= np.sqrt(2.0)
    return d


def bilinear_matrix(size: int, factor: int) -> np.ndarray:
    """(size*factor, size) matrix of 1-D linear interpolation with ``align_corners=True``.

    Matches ``torch.nn.functional.interpolate(..., mode="bilinear", align_corners=True)``
    applied along one axis.
    """
    out = size * factor
    a = np.zeros((out, size))
    if factor == 1:
        return np.eye(size)
    pos = np.arange(out) * (size - 1) / (out - 1)
    lo = np.clip(np.floor(pos).astype(int), 0, size - 1)
    hi = np.minimum(lo + 1, size - 1)
    w = pos - lo
    rows = np.arange(out)
    np.add.at(a, (rows, lo), 1.0 - w)
    np.add.at(a, (rows, hi), w)
    return a


@lru_cache(maxsize=16)
def analysis_operators(factor: int, size: int = FACE_SIZE) -> np.ndarray:
    """M with shape (8, size*factor/8, size): ``M[u] X M[v].T`` is coefficient map (u, v)."""
    if (size * factor) % BLOCK:
        raise ValueError(f"size*factor must be a multiple of {BLOCK}, got {size}*{factor}")
    a = bilinear_matrix(size, factor)
    d = dct_matrix()
    blocks = a.reshape(size * factor // BLOCK, BLOCK, size)  # [i, r, :] = A[8i + r]
    m = np.einsum("ur,irs->uis", d, blocks)
    m.setflags(write=False)
    return m


@lru_cache(maxsize=16)
def synthesis_operators(factor: int, size: int = FACE_SIZE) -> np.ndarray:
    """P with shape (8, size, size*factor/8): ``sum_uv P[u] C_uv P[v].T`` inverts the transform.

    The block inverse DCT gives the up-sampled plane; the pseudo-inverse of the interpolation
    matrix brings it back to the original grid, exactly for a complete set of coefficients
    (A has full column rank) and as the least-squares estimate when some are missing.
    """
    a = bilinear_matrix(size, factor)
    d = dct_matrix()
    n_blocks = size * factor // BLOCK
    # E[u][8i + r, i] = D[u, r]: the block inverse DCT as a (size*factor, n_blocks) matrix.
    e = np.zeros((BLOCK, size * factor, n_blocks))
    for u in range(BLOCK):
        for i in range(n_blocks):
            e[u, BLOCK * i : BLOCK * (i + 1), i] = d[u]
    p = np.einsum("st,utj->usj", np.linalg.pinv(a), e)
    p.setflags(write=False)
    return p


@lru_cache(maxsize=16)
def _torch_operators(factor: int, size: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(analysis_operators(factor, size), dtype=dtype)


def rgb_to_ycbcr_shifted(rgb: np.ndarray) -> np.ndarray:
    """JPEG full-range YCbCr minus 128 on all planes; (..., 3, H, W) in [0, 255] -> same shape."""
    r, g, b = rgb[..., 0, :, :], rgb[..., 1, :, :], rgb[..., 2, :, :]
    y = 0.299 * r + 0.587 * g + 0.114 * b - 128.0
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b
    return np.stack([y, cb, cr], axis=-3)


def ycbcr_shifted_to_rgb(ycc: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_ycbcr_shifted` (no clipping)."""
    y, cb, cr = ycc[..., 0, :, :] + 128.0, ycc[..., 1, :, :], ycc[..., 2, :, :]
    r = y + 1.402 * cr
    g = y - 0.344136 * cb - 0.714136 * cr
    b = y + 1.772 * cb
    return np.stack([r, g, b], axis=-3)


def as_chw_batch(images: np.ndarray) -> tuple[np.ndarray, bool]:
    """Accept (H, W), (H, W, 3), (3, H, W) or batches (N, H, W, 3) / (N, 3, H, W) / (N, H, W).

    Greyscale is replicated to three planes (so Cb = Cr = 0 after the shift). Returns a float64
    (N, 3, H, W) array and whether the input was a single image.
    """
    x = np.asarray(images)
    single = x.ndim == 2 or (x.ndim == 3 and (x.shape[-1] == 3 or x.shape[0] == 3))
    if x.ndim == 2:
        x = x[None, None]
    elif x.ndim == 3 and single:
        x = x[None]
    elif x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise ValueError(f"expected an image or a batch of images, got shape {np.shape(images)}")
    if x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        x = np.moveaxis(x, -1, 1)
    if x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)
    if x.shape[1] != 3:
        raise ValueError(f"expected 1 or 3 colour planes, got shape {np.shape(images)}")
    return x.astype(np.float64, copy=False), single


def coefficient_maps(planes, pairs, factor: int, dtype: torch.dtype = torch.float32):
    """Coefficient maps for (plane, u, v) triples, for numpy arrays or torch tensors.

    planes: (N, P, S, S) (e.g. shifted YCbCr); pairs: (K, 3) shared by the batch or (N, K, 3)
    per sample, integer triples (plane index, u, v).  Returns (N, K, S*f/8, S*f/8) of the
    input's kind.  Dense batched matmuls measured fastest on CPU here (about 2 ms per face for
    27 channels at f = 8 on 2 threads; sparse gathers of the 3-tap stencil were 2-4x slower).
    """
    as_numpy = isinstance(planes, np.ndarray)
    x = torch.as_tensor(planes).to(dtype)
    n, _, size, _ = x.shape
    m = _torch_operators(factor, size, dtype)
    pairs = np.asarray(pairs)
    if pairs.ndim == 2:
        p = torch.as_tensor(pairs, dtype=torch.long)
        left = torch.matmul(m[p[:, 1]], x[:, p[:, 0]])  # (N, K, s, S)
        out = torch.matmul(left, m[p[:, 2]].transpose(-1, -2))
    else:
        # Per-sample channel sets: group the samples that share one (a rank), so each group
        # is the shared-pairs case instead of gathering an operator per sample and channel.
        side = m.shape[1]
        out = x.new_empty((n, pairs.shape[1], side, side))
        groups, inverse = np.unique(pairs.reshape(n, -1), axis=0, return_inverse=True)
        for g, row in enumerate(groups):
            members = torch.from_numpy(np.flatnonzero(inverse.ravel() == g))
            out[members] = coefficient_maps(x[members], row.reshape(-1, 3), factor, dtype)
    return out.numpy() if as_numpy else out


def synthesise_planes(coeffs, pairs, n_planes: int, factor: int, size: int = FACE_SIZE):
    """Least-squares planes from coefficient maps of (plane, u, v) triples; missing ones are 0.

    coeffs: (N, K, s, s); pairs: (K, 3). Returns (N, n_planes, size, size) float64 numpy.
    """
    c = np.asarray(coeffs, dtype=np.float64)
    pairs = np.asarray(pairs)
    p = synthesis_operators(factor, size)
    out = np.zeros((c.shape[0], n_planes, size, size))
    for k, (plane, u, v) in enumerate(pairs):
        out[:, plane] += p[u] @ c[:, k] @ p[v].T
    return out
