"""Aligned crops and teacher descriptors of a folder dataset, computed once and cached.

Training and evaluation read the same cache: one ``.npz`` per dataset folder with the
aligned 112x112 crops, identity labels, relative paths, the dlib teacher's 128-d descriptor
of every image (computed from the raw image, on the model owner's side) and whether the face
was detected or placed with the dataset's median face box (so evaluation pairs never go
missing: LFW's deep-funneled crops are centred, and a few defeat the HOG detector).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm import tqdm

from enrollment.align import (
    ARCFACE_TEMPLATE,
    AlignmentError,
    _landmarker,
    _models_dir,
    detect,
    five_points,
    load_image,
    similarity_transform,
    warp,
)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".pgm", ".bmp", ".ppm", ".tif", ".tiff"}
CACHE_VERSION = 1


@dataclass
class FaceCache:
    """A dataset folder, aligned: arrays indexed by image number."""

    images: np.ndarray  # (N, 112, 112, 3) uint8
    labels: np.ndarray  # (N,) int identity index into ``identities``
    identities: np.ndarray  # (I,) str folder names
    paths: np.ndarray  # (N,) str "Identity/file"
    teacher: np.ndarray  # (N, 128) float32 dlib descriptors
    detected: np.ndarray  # (N,) bool: False where the median box was used

    def index(self) -> dict[str, int]:
        return {p: i for i, p in enumerate(self.paths)}


@lru_cache(maxsize=1)
def _recogniser():
    import dlib

    return dlib.face_recognition_model_v1(
        str(_models_dir() / "dlib_face_recognition_resnet_model_v1.dat")
    )


def teacher_descriptor(image: np.ndarray, shape) -> np.ndarray:
    """The dlib ResNet's 128-d descriptor of a face given its 68-point shape."""
    return np.asarray(_recogniser().compute_face_descriptor(image, shape), dtype=np.float32)


def face_shape(image: np.ndarray, box: tuple[int, int, int, int] | None):
    """(68-point shape, rectangle) of the largest HOG face, or of ``box`` when given; None
    where no face is found."""
    import dlib

    if box is None:
        rects, _ = detect(image)
        if not rects:
            return None
        r = max(rects, key=lambda r: r.width() * r.height())
        rect = dlib.rectangle(r.left(), r.top(), r.right(), r.bottom())
    else:
        rect = dlib.rectangle(*box)
    return _landmarker()(image, rect), rect


def photo_shape(path: str, box: tuple[int, int, int, int] | None):
    """(image, 68-point shape, box as a tuple) of a photo file, ``face_shape``'s face; None
    where the file is unreadable, "no_face" where no face is found (retry with a box)."""
    try:
        image, _ = load_image(path)
    except AlignmentError:
        return None
    found = face_shape(image, box)
    if found is None:
        return "no_face"
    shape, rect = found
    return image, shape, (rect.left(), rect.top(), rect.right(), rect.bottom())


def _process(job: tuple[str, tuple[int, int, int, int] | None, bool]):
    path, box, with_teacher = job
    found = photo_shape(path, box)
    if not isinstance(found, tuple):
        return found
    image, shape, rect = found
    crop = warp(image, similarity_transform(five_points(shape), ARCFACE_TEMPLATE))
    desc = teacher_descriptor(image, shape) if with_teacher else np.zeros(128, np.float32)
    return crop, desc, rect


def list_dataset(root: str | os.PathLike) -> list[tuple[str, str]]:
    """(identity, relative path) of every image in an identity-per-folder dataset."""
    root = Path(root)
    out = []
    for ident in sorted(d for d in root.iterdir() if d.is_dir()):
        for f in sorted(ident.iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                out.append((ident.name, f"{ident.name}/{f.name}"))
    return out


def cache_path(root: str | os.PathLike, cache_dir: str | os.PathLike) -> Path:
    """Cache file name: the folder's name plus a digest of its absolute path."""
    root = Path(root).resolve()
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:10]
    return Path(cache_dir) / f"{root.name}-{digest}-v{CACHE_VERSION}.npz"


def build_cache(
    root: str | os.PathLike,
    cache_dir: str | os.PathLike,
    workers: int = 2,
    with_teacher: bool = True,
    limit_identities: int | None = None,
    progress: bool = True,
) -> FaceCache:
    """Load the cache for ``root`` or build it (align every image, run the teacher)."""
    target = cache_path(root, cache_dir)
    if limit_identities is not None:
        target = target.with_name(target.stem + f"-first{limit_identities}.npz")
    if target.exists():
        return load_cache(target)
    entries = list_dataset(root)
    if limit_identities is not None:
        keep = sorted({i for i, _ in entries})[:limit_identities]
        entries = [e for e in entries if e[0] in set(keep)]
    root = Path(root)
    jobs = [(str(root / rel), None, with_teacher) for _, rel in entries]
    results = run_jobs(_process, jobs, workers, progress, "align+teacher")
    boxes = np.array([r[2] for r in results if isinstance(r, tuple)])
    median = tuple(int(v) for v in np.median(boxes, axis=0)) if len(boxes) else None
    retry = [i for i, r in enumerate(results) if r == "no_face"]
    if retry and median is not None:
        redo = run_jobs(_process, [(jobs[i][0], median, with_teacher) for i in retry], workers,
                        False, "")
        for i, r in zip(retry, redo, strict=True):
            results[i] = (*r, False) if isinstance(r, tuple) else r
    keep_idx = [i for i, r in enumerate(results) if isinstance(r, tuple)]
    identities = np.array(sorted({entries[i][0] for i in keep_idx}))
    ident_index = {n: k for k, n in enumerate(identities)}
    cache = FaceCache(
        images=np.stack([results[i][0] for i in keep_idx]).astype(np.uint8),
        labels=np.array([ident_index[entries[i][0]] for i in keep_idx], dtype=np.int64),
        identities=identities,
        paths=np.array([entries[i][1] for i in keep_idx]),
        teacher=np.stack([results[i][1] for i in keep_idx]).astype(np.float32),
        detected=np.array([len(results[i]) == 3 for i in keep_idx]),
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp.npz")
    np.savez(tmp, **cache.__dict__)
    os.replace(tmp, target)
    return cache


def run_jobs(fn, jobs: list, workers: int, progress: bool, desc: str) -> list:
    """``fn`` over ``jobs`` in order, in ``workers`` forked processes (dlib is not thread-
    parallel per call), with a progress bar."""
    bar = tqdm(total=len(jobs), desc=desc, disable=not progress or not jobs, unit="img")
    out = []
    if workers <= 1:
        for j in jobs:
            out.append(fn(j))
            bar.update()
    else:
        with get_context("fork").Pool(workers) as pool:
            for r in pool.imap(fn, jobs, chunksize=16):
                out.append(r)
                bar.update()
    bar.close()
    return out


def load_cache(path: str | os.PathLike) -> FaceCache:
    with np.load(path, allow_pickle=False) as z:
        return FaceCache(**{k: z[k] for k in FaceCache.__dataclass_fields__})
