"""Encrypted snapshots of a gallery's search indexes, so a restart does not rebuild from SQL.

Building a 1M-template index from PostgreSQL takes minutes (decrypting every template, then
HNSW construction); reading a snapshot and replaying the change feed since it takes seconds.
A FAISS file holds every protected template in clear, so the snapshot is sealed with the key
ring's primary data key (AES-256-GCM) before it touches the disk: whoever can read the data
directory learns nothing more than from the database itself.

File layout: a plain header line (JSON: gallery, gallery id, change-feed cursor, model
version, the data key id, one entry per template key with its payload size), then the
payload, in chunks of at most ``CHUNK`` bytes, each sealed separately with the header's
SHA-256, the chunk number and a last-chunk flag as associated data, so a header edited, a
chunk swapped, reordered or cut off all fail authentication. The file is written beside the
old one and swapped in atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from storage.crypto import KeyRing

MAGIC = b"PFSNAP1\n"
CHUNK = 64 * 1024 * 1024
SUFFIX = ".pfsnap"


class SnapshotError(Exception):
    """The snapshot cannot be used (foreign, damaged, tampered with, or its key is gone)."""


@dataclass(frozen=True)
class Snapshot:
    gallery: str
    gallery_id: int
    cursor: int
    model_version: str
    payloads: dict[str, bytes]  # template key id -> GalleryIndex.dumps()


def snapshot_path(directory: str | os.PathLike, gallery: str) -> Path:
    """One file per gallery; the name is a digest so any gallery name is a safe file name."""
    digest = hashlib.sha256(gallery.encode()).hexdigest()[:32]
    return Path(directory) / f"{digest}{SUFFIX}"


def _aad(header_digest: bytes, index: int, last: bool) -> bytes:
    return b"privface-snapshot|" + header_digest + struct.pack(">I?", index, last)


def write_snapshot(
    directory: str | os.PathLike,
    ring: KeyRing,
    *,
    gallery: str,
    gallery_id: int,
    cursor: int,
    model_version: str,
    payloads: Mapping[str, bytes | memoryview],
) -> Path:
    """Seal and write atomically; returns the file's path."""
    path = snapshot_path(directory, gallery)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = sorted(payloads)
    header = json.dumps(
        {
            "gallery": gallery,
            "gallery_id": int(gallery_id),
            "cursor": int(cursor),
            "model_version": model_version,
            "data_key": ring.primary,
            "parts": [[k, len(payloads[k])] for k in keys],
        },
        sort_keys=True,
    ).encode()
    digest = hashlib.sha256(header).digest()
    # Chunks are views into the payloads (no copy of a GB-sized index before sealing).
    views = [memoryview(payloads[k]).cast("B") for k in keys]
    chunks = [v[i : i + CHUNK] for v in views for i in range(0, len(v), CHUNK)] or [b""]
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(MAGIC + struct.pack(">I", len(header)) + header)
            for i, chunk in enumerate(chunks):
                _, sealed = ring.encrypt(chunk, _aad(digest, i, i == len(chunks) - 1))
                f.write(struct.pack(">Q", len(sealed)) + sealed)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_snapshot(directory: str | os.PathLike, ring: KeyRing, gallery: str) -> Snapshot | None:
    """The gallery's snapshot, or None when there is none; SnapshotError when unusable."""
    path = snapshot_path(directory, gallery)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        if not data.startswith(MAGIC):
            raise SnapshotError("not a privface index snapshot")
        pos = len(MAGIC)
        (n,) = struct.unpack_from(">I", data, pos)
        header_bytes = data[pos + 4 : pos + 4 + n]
        header = json.loads(header_bytes)
        pos += 4 + n
        digest = hashlib.sha256(header_bytes).digest()
        if header["gallery"] != gallery:
            raise SnapshotError(f"snapshot is of gallery {header['gallery']!r}")
        if header["data_key"] not in ring.keys:
            raise SnapshotError(f"its data key {header['data_key']!r} is not in the key ring")
        body, i = [], 0
        while pos < len(data):
            (size,) = struct.unpack_from(">Q", data, pos)
            sealed = data[pos + 8 : pos + 8 + size]
            pos += 8 + size
            last = pos >= len(data)
            body.append(ring.decrypt(header["data_key"], sealed, _aad(digest, i, last)))
            i += 1
        if not body:
            raise SnapshotError("snapshot holds no data")
        blob = b"".join(body)
        payloads, offset = {}, 0
        for key_id, size in header["parts"]:
            payloads[key_id] = blob[offset : offset + size]
            offset += size
        if offset != len(blob):
            raise SnapshotError("payload sizes do not add up")
    except SnapshotError:
        raise
    except Exception as exc:  # noqa: BLE001 - every damage is the same verdict: rebuild
        raise SnapshotError(f"{path.name}: {exc}") from None
    return Snapshot(
        gallery=gallery,
        gallery_id=int(header["gallery_id"]),
        cursor=int(header["cursor"]),
        model_version=str(header["model_version"]),
        payloads=payloads,
    )


def remove_snapshot(directory: str | os.PathLike, gallery: str) -> None:
    snapshot_path(directory, gallery).unlink(missing_ok=True)
