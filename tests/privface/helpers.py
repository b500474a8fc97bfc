"""Helpers shared by the service tests (fixtures live in conftest.py)."""

from __future__ import annotations

import json
import struct

import numpy as np

#: max_message_bytes of the test servers (smaller than the default, to test the limit cheaply).
MAX_MESSAGE = 16 * 1024 * 1024


def raw_wire(
    array: np.ndarray,
    *,
    profile: str = "partialface-paper",
    version: int | None = None,
    digest: str | None = None,
    dtype: str | None = None,
    shape: tuple[int, ...] | None = None,
) -> bytes:
    """Wire bytes with any header, bypassing the checks of ``wire.encode`` (bad input)."""
    from enrollment.profiles import PROFILES

    if digest is None:
        digest = PROFILES[profile].digest() if profile in PROFILES else "0" * 16
    if version is None:  # the profile's own, so a test breaks only what it means to
        version = PROFILES[profile].version if profile in PROFILES else 1
    dtype = dtype or np.asarray(array).dtype.name
    header = json.dumps({
        "profile": profile, "profile_version": version, "profile_digest": digest,
        "dtype": dtype, "shape": list(shape or np.shape(array)),
    }).encode()
    data = np.asarray(array).astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    return struct.pack("<4sBI", b"PFPI", 1, len(header)) + header + data
