"""Client side: aligned faces -> protected inputs for a profile.  Imports nothing server-side."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from enrollment import hfcf, partialface
from enrollment.profiles import ProtectionProfile

WEIGHTS_DIR = Path(__file__).parent / "weights"


@lru_cache(maxsize=4)
def hfcf_noise(profile: ProtectionProfile) -> hfcf.LaplaceNoise:
    """The trained noise parameters shipped for an HFCF profile (uniform budget if none)."""
    layer = hfcf.LaplaceNoise((hfcf.N_FUSED, profile.side, profile.side), profile.eps_mean)
    path = WEIGHTS_DIR / f"{profile.name}-noise.pt"
    if path.exists():
        layer.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return layer.eval()


def protect_faces(
    faces: np.ndarray,
    profile: ProtectionProfile,
    ranks: np.ndarray | tuple[int, int] | None = None,
    rng: np.random.Generator | None = None,
    views_per_face: int = 1,
) -> np.ndarray:
    """(N, C, H, W) protected inputs, in the profile's wire dtype, of aligned 112x112 faces.

    PartialFace: ``ranks`` fixes the (subset, permutation) of the whole batch or of each face;
    otherwise each face gets its own uniformly random rank from ``rng``.  With
    ``views_per_face`` = V, consecutive groups of V images are views of one face (the face
    and its mirror) and share the drawn subset (:func:`partialface.draw_view_ranks`).
    """
    faces = np.asarray(faces)
    if faces.ndim in (2, 3) and faces.shape[:2] == (112, 112):
        faces = faces[None]
    if profile.method == "partialface":
        if ranks is None:
            if len(faces) % views_per_face:
                raise ValueError(f"{len(faces)} images are not groups of {views_per_face} views")
            ranks = partialface.draw_view_ranks(
                len(faces) // views_per_face, views_per_face, rng or np.random.default_rng(),
                len(profile.subsets), len(profile.permutations),
            )
        out = partialface.protect(
            faces, ranks, profile.factor, profile.subsets, profile.permutations
        )
    elif profile.method == "hfcf":
        seed = None if rng is None else int(rng.integers(2**31))
        out = hfcf.protect(faces, hfcf_noise(profile), profile.factor, seed)
    else:
        raise ValueError(f"unknown protection method {profile.method!r}")
    return out.astype(profile.dtype)
