"""Wire format round trip, and every malformed input refused with its reason."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from enrollment import wire
from enrollment.profiles import PROFILES, get_profile

PAPER = get_profile("partialface-paper")


def sample(n: int = 2) -> np.ndarray:
    return np.random.default_rng(0).normal(0, 3, (n, *PAPER.shape)).astype(np.float32)


def test_round_trip_is_float16_and_self_describing():
    x = sample()
    blob = wire.encode(x, PAPER)
    profile, y = wire.load(blob)
    assert profile is PAPER
    assert y.shape == x.shape
    np.testing.assert_allclose(y, x, rtol=1e-3, atol=1e-3)
    assert len(blob) < x.nbytes / 2 + 200  # float16 on the wire
    header, _ = wire.decode(blob)
    assert header["profile"] == "partialface-paper" and header["profile_version"] == 1
    assert "rank" not in json.dumps(header)


def test_bytes_per_face_per_profile():
    assert PROFILES["partialface-paper"].bytes_per_face == 27 * 112 * 112 * 2
    assert PROFILES["hfcf"].bytes_per_face == 71 * 112 * 112 * 2


def _reason(blob: bytes) -> str:
    with pytest.raises(wire.ProtectedInputError) as err:
        wire.load(blob)
    return err.value.reason


def _with_header(header: dict, payload: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<4sBI", b"PFPI", 1, len(h)) + h + payload


def test_malformed_inputs_are_refused_with_reasons():
    good = wire.encode(sample(1), PAPER)
    assert _reason(b"") == "malformed"
    assert _reason(b"JUNK" + good[4:]) == "malformed"
    assert _reason(good[:-10]) == "shape"
    x = sample(1).astype(np.float16)
    base = {
        "profile": PAPER.name,
        "profile_version": 1,
        "dtype": "float16",
        "shape": [1, 27, 112, 112],
    }
    assert _reason(_with_header({**base, "profile": "nope"}, x.tobytes())) == "profile"
    assert _reason(_with_header({**base, "profile_version": 9}, x.tobytes())) == "profile_version"
    assert _reason(_with_header({**base, "dtype": "int64"}, x.tobytes())) == "dtype"
    wrong = np.zeros((1, 26, 112, 112), np.float16)
    assert _reason(_with_header({**base, "shape": [1, 26, 112, 112]}, wrong.tobytes())) == "shape"
    bad = x.copy()
    bad[0, 3, 5, 5] = np.nan
    assert _reason(_with_header(base, bad.tobytes())) == "non_finite"
    bad[0, 3, 5, 5] = np.inf
    assert _reason(_with_header(base, bad.tobytes())) == "non_finite"
    empty = {**base, "shape": [0, 27, 112, 112]}
    assert _reason(_with_header(empty, b"")) == "empty"


def test_profile_digest_changes_with_any_parameter():
    from dataclasses import replace

    assert PAPER.digest() != replace(PAPER, factor=4).digest()
    assert PAPER.digest() == get_profile("partialface-paper").digest()


def test_all_finite_agrees_with_numpy_on_every_float16():
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    for value, finite in zip(every, np.isfinite(every), strict=True):
        assert wire.all_finite(np.array([value])) == bool(finite)
    strided = np.zeros((4, 6), np.float16)[:, ::2]
    strided[1, 1] = -np.inf
    assert not wire.all_finite(strided) and wire.all_finite(np.zeros(3, np.float16))
    assert not wire.all_finite(np.array([1.0, np.nan], np.float32))
    swapped = np.array([1.0, 65504.0, -np.inf], ">f2")  # the other byte order
    assert not wire.all_finite(swapped) and wire.all_finite(swapped[:2])


def test_version_1_balanced_input_is_refused():
    """A client still on the balanced partition's version 1 sends the same name and shape
    with other subsets: refused by its version, not embedded from the wrong channels."""
    from enrollment import profiles

    v1 = profiles.RETIRED[("partialface-balanced", 1)]
    assert v1.digest() == "13dc1c9e56570419"  # what version-1 clients sent (release 49708bb)
    v2 = get_profile("partialface-balanced")
    assert v2.version == 2 and v1.shape == v2.shape
    assert _reason(wire.encode(sample(1), v1)) == "profile_version"
    assert wire.load(wire.encode(sample(1), v2))[0] is v2
