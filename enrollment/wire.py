"""The protected-input wire format: compact, self-describing, checked before any model runs.

Layout: ``b"PFPI"``, a format byte, a little-endian u32 header length, a UTF-8 JSON header
(profile name, version and digest, dtype, shape) and the raw little-endian array.  The rank
a client drew is deliberately *not* in the header: the server must not learn it.
"""

from __future__ import annotations

import json
import struct

import numpy as np

from enrollment.profiles import ProtectionProfile, get_profile

MAGIC = b"PFPI"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<4sBI")
ALLOWED_DTYPES = ("float16", "float32")


class ProtectedInputError(ValueError):
    """A protected input that must be refused; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def encode(array: np.ndarray, profile: ProtectionProfile) -> bytes:
    """Serialise (N, C, H, W) or (C, H, W) protected inputs in the profile's wire dtype."""
    a = np.asarray(array)
    if a.ndim == 3:
        a = a[None]
    check(a, profile, check_dtype=False)
    a = a.astype(np.dtype(profile.dtype).newbyteorder("<"), copy=False)
    header = json.dumps(
        {
            "profile": profile.name,
            "profile_version": profile.version,
            "profile_digest": profile.digest(),
            "dtype": profile.dtype,
            "shape": list(a.shape),
        },
        separators=(",", ":"),
    ).encode()
    return _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)) + header + a.tobytes()


def decode(blob: bytes) -> tuple[dict, np.ndarray]:
    """(header, array) from wire bytes; ProtectedInputError on anything malformed.

    The array is a read-only view of ``blob``'s payload (no copy).
    """
    if len(blob) < _PREFIX.size:
        raise ProtectedInputError("malformed", "too short to be a protected input")
    magic, version, n = _PREFIX.unpack_from(blob)
    if magic != MAGIC:
        raise ProtectedInputError("malformed", "not a privface protected input (bad magic)")
    if version != FORMAT_VERSION:
        raise ProtectedInputError("malformed", f"unsupported wire format version {version}")
    try:
        header = json.loads(blob[_PREFIX.size : _PREFIX.size + n])
        dtype = header["dtype"]
        shape = tuple(int(s) for s in header["shape"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ProtectedInputError("malformed", f"unreadable header: {exc}") from None
    if dtype not in ALLOWED_DTYPES:
        raise ProtectedInputError("dtype", f"dtype {dtype!r} not allowed: {ALLOWED_DTYPES}")
    payload = memoryview(blob)[_PREFIX.size + n :]  # a view: slicing bytes copied 0.8 ms/face
    expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if len(payload) != expected:
        raise ProtectedInputError(
            "shape", f"payload has {len(payload)} bytes, shape {shape} needs {expected}"
        )
    array = np.frombuffer(payload, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
    return header, array


def profile_of(header: dict) -> ProtectionProfile:
    """The built-in profile a header names, at the version it names."""
    try:
        profile = get_profile(str(header.get("profile")))
    except KeyError as exc:
        raise ProtectedInputError("profile", str(exc.args[0])) from None
    if header.get("profile_version") != profile.version:
        raise ProtectedInputError(
            "profile_version",
            f"profile {profile.name} version {header.get('profile_version')} is not served "
            f"(this server has version {profile.version})",
        )
    return profile


def all_finite(array: np.ndarray) -> bool:
    """No NaN or infinity.  float16 is tested on its bits (exponent all ones = not finite):
    exact, and 10x faster than ``np.isfinite``, which converts each half to float first."""
    if array.dtype == np.float16:
        bits = np.ascontiguousarray(array).view(array.dtype.str[0] + "u2")  # same byte order
        return not ((bits & 0x7C00) == 0x7C00).any()
    return bool(np.isfinite(array).all())


def check(array: np.ndarray, profile: ProtectionProfile, check_dtype: bool = True) -> None:
    """Refuse wrong shape, dtype or non-finite values for ``profile`` (N, C, H, W)."""
    if array.ndim != 4 or tuple(array.shape[1:]) != profile.shape:
        raise ProtectedInputError(
            "shape",
            f"expected (N, {', '.join(map(str, profile.shape))}) for {profile.name}, "
            f"got {tuple(array.shape)}",
        )
    if array.shape[0] == 0:
        raise ProtectedInputError("empty", "no face in the protected input")
    if check_dtype and array.dtype.name not in ALLOWED_DTYPES:
        raise ProtectedInputError("dtype", f"dtype {array.dtype} not allowed: {ALLOWED_DTYPES}")
    if not all_finite(array):
        raise ProtectedInputError("non_finite", "protected input holds NaN or infinite values")


def load(blob: bytes) -> tuple[ProtectionProfile, np.ndarray]:
    """Decode and fully validate wire bytes: the profile and a float32 (N, C, H, W) array."""
    header, array = decode(blob)
    profile = profile_of(header)
    check(array, profile)
    return profile, array.astype(np.float32)
