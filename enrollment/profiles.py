"""Protection profiles: everything a server must know to accept a protected input.

A profile names the method and every parameter of the transform (up-sampling factor, pruned
frequencies, subsets, permutations), the wire dtype and the tensor shape, and carries a
version: a server checks name, version, shape and dtype before it runs a model on an input.
The built-in ``partialface-paper`` profile is exactly the paper's; ``partialface-balanced``
differs only in its partition of the 54 kept frequencies (``partialface.BALANCED_SUBSETS``;
version 2 since its subset 5 was given high vertical frequencies, version 1's partition is
``partialface.BALANCED_SUBSETS_V1``). A model file records the digest of the profile it
was trained on, so a file of another version is refused, not run on the wrong channels.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np

from enrollment import hfcf, partialface


@dataclass(frozen=True)
class ProtectionProfile:
    name: str
    version: int
    method: str  # "partialface" or "hfcf"
    factor: int
    dtype: str  # wire dtype: "float16" or "float32"
    channels: int
    pruned: tuple[int, ...] = ()
    subsets: tuple[tuple[int, ...], ...] = ()
    permutations: tuple[tuple[int, ...], ...] = ()
    eps_mean: float | None = None
    description: str = ""  # in the digest too: edit it with a version bump, or files are refused

    @property
    def side(self) -> int:
        return 14 * self.factor

    @property
    def shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one protected face."""
        return (self.channels, self.side, self.side)

    @property
    def n_ranks(self) -> int:
        return len(self.subsets) * len(self.permutations)

    @property
    def bytes_per_face(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize

    def to_dict(self) -> dict:
        return asdict(self)

    def digest(self) -> str:
        """Fingerprint of every parameter: two profiles with one name must agree on it."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def rank_channels(self, subset: int, permutation: int) -> tuple[int, ...]:
        return partialface.rank_channels(subset, permutation, self.subsets, self.permutations)


def _partialface(
    name: str,
    factor: int,
    description: str,
    subsets: tuple[tuple[int, ...], ...] = partialface.SUBSETS,
    version: int = 1,
) -> ProtectionProfile:
    return ProtectionProfile(
        name=name,
        version=version,
        method="partialface",
        factor=factor,
        dtype="float16",
        channels=27,
        pruned=partialface.PRUNED,
        subsets=subsets,
        permutations=partialface.PAPER_PERMUTATIONS,
        description=description,
    )


def rank_table(profile: ProtectionProfile) -> np.ndarray:
    """(subsets, permutations, 27) channel indices of every rank of a profile."""
    return np.array(
        [
            [profile.rank_channels(s, p) for p in range(len(profile.permutations))]
            for s in range(len(profile.subsets))
        ]
    )


PROFILES: dict[str, ProtectionProfile] = {
    p.name: p
    for p in (
        _partialface(
            "partialface-paper",
            8,
            "PartialFace as published: f = 8, 6 subsets x 6 permutations (3 official, 3 seeded)",
        ),
        _partialface(
            "partialface-balanced",
            8,
            "PartialFace with subsets of equal information about the face (the paper's differ "
            "by 7 bits per pixel), each with high vertical frequencies: f = 8, 6 balanced "
            "subsets x the paper's 6 permutations",
            partialface.BALANCED_SUBSETS,
            version=2,  # v1: partialface.BALANCED_SUBSETS_V1
        ),
        ProtectionProfile(
            name="hfcf",
            version=1,
            method="hfcf",
            factor=8,
            dtype="float16",
            channels=hfcf.N_FUSED + hfcf.N_LBP,
            eps_mean=0.5,
            description="HFCF: 63 fused AC channels + Laplace noise (eps_mean 0.5) + 8 LBP maps",
        ),
    )
}


#: Earlier versions of built-in profiles, exactly as they were served (their digests are what
#: their clients send and their model files record): what a refusal names, never served.
RETIRED: dict[tuple[str, int], ProtectionProfile] = {
    ("partialface-balanced", 1): _partialface(
        "partialface-balanced",
        8,
        "PartialFace with subsets of equal information about the face (the paper's differ "
        "by 7 bits per pixel): f = 8, 6 balanced subsets x the paper's 6 permutations",
        partialface.BALANCED_SUBSETS_V1,
    ),
}


#: The profile of the shipped model (``enrollment/weights``): what a client protects with
#: unless it asks the server (ServerInfo.profile) or is told otherwise.
DEFAULT_PROFILE = "partialface-balanced"


def get_profile(name: str) -> ProtectionProfile:
    """The built-in profile called ``name``; KeyError lists the known ones."""
    try:
        return PROFILES[name]
    except KeyError:
        raise KeyError(f"unknown protection profile {name!r}; known: {sorted(PROFILES)}") from None
