"""Face mixtures labelled by the dlib teacher itself: new training inputs with exact targets.

The protected student is short of distinct faces (model card, "Where the remaining gap to 95%
is"), and the teacher needs no labels.  The batch mixup of ``privface train --mixup-teacher``
labels its mixtures with an RGB student of the teacher (96% on LFW where the teacher has
98.6%); here two training photos are blended in one raw frame (the second warped onto the
first's landmarks) and the dlib network embeds the blend as it embeds any photo, from the
blend's own landmarks, so the target is the teacher's.  A dlib forward per mixture is too
slow for the training loop (~80 ms per mixture on one core, loading and warping included), so
a set is computed once and cached.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from enrollment.align import (
    ARCFACE_TEMPLATE,
    five_of_68,
    load_image,
    similarity_transform,
    warp,
)
from enrollment.face_cache import photo_shape, run_jobs, teacher_descriptor

MIXTURES_VERSION = 1


@dataclass
class MixtureSet:
    """Cached mixtures: ``weight * a + (1 - weight) * b`` of two training photos."""

    images: np.ndarray  # (M, 112, 112, 3) uint8, aligned like every training face
    teacher: np.ndarray  # (M, 128) float32: the dlib descriptor of the blended photo
    keys_a: np.ndarray  # (M,) str "dataset/Identity/file" of each ingredient
    keys_b: np.ndarray
    weights: np.ndarray  # (M,) float32 share of a


def _landmarks(job: tuple[str, tuple[int, int, int, int] | None]):
    found = photo_shape(*job)
    if not isinstance(found, tuple):
        return found
    _, shape, box = found
    return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64), box


def landmarks(paths: list[str], workers: int = 2, progress: bool = True) -> np.ndarray:
    """(N, 68, 2) landmarks of each photo, found as ``face_cache.build_cache`` finds them
    (the largest HOG face; the median box of the detected ones where none is found), so a
    mixture with weight 1 is its first photo's cached crop and teacher target."""
    results = run_jobs(_landmarks, [(p, None) for p in paths], workers, progress, "landmarks")
    boxes = np.array([r[1] for r in results if isinstance(r, tuple)])
    if not len(boxes):
        raise ValueError("no face found in any of the photos")
    median = tuple(int(v) for v in np.median(boxes, axis=0))
    retry = [i for i, r in enumerate(results) if not isinstance(r, tuple)]
    redo = run_jobs(_landmarks, [(paths[i], median) for i in retry], workers, False, "")
    for i, r in zip(retry, redo, strict=True):
        if not isinstance(r, tuple):
            raise ValueError(f"{paths[i]}: unreadable")
        results[i] = r
    return np.stack([r[0] for r in results])


def blend(
    image_a: np.ndarray, points_a: np.ndarray, image_b: np.ndarray, points_b: np.ndarray,
    weight: float,
) -> tuple[np.ndarray, np.ndarray]:
    """(blended photo in a's frame, its 68 landmarks): b warped by the least-squares
    similarity of its landmarks onto a's, both mixed pixel by pixel and point by point."""
    m = similarity_transform(points_b, points_a)
    full = np.vstack([m, [0, 0, 1]])
    inv = np.linalg.inv(full)[:2].ravel()
    h, w = image_a.shape[:2]
    b_in_a = np.asarray(
        Image.fromarray(image_b).transform(
            (w, h), Image.Transform.AFFINE, tuple(inv), resample=Image.Resampling.BILINEAR
        ),
        dtype=np.float32,
    )
    mixed = weight * image_a.astype(np.float32) + (1 - weight) * b_in_a
    points = weight * points_a + (1 - weight) * (points_b @ m[:, :2].T + m[:, 2])
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8), points


def _mixture(job):
    import dlib

    path_a, points_a, path_b, points_b, weight = job
    image_a, _ = load_image(path_a)
    image_b, _ = load_image(path_b)
    mixed, points = blend(image_a, points_a, image_b, points_b, weight)
    crop = warp(mixed, similarity_transform(five_of_68(points), ARCFACE_TEMPLATE))
    ints = np.rint(points).astype(int)
    x0, y0 = ints.min(0)
    x1, y1 = ints.max(0)
    shape = dlib.full_object_detection(
        dlib.rectangle(int(x0), int(y0), int(x1), int(y1)),
        dlib.points([dlib.point(int(x), int(y)) for x, y in ints]),
    )
    return crop, teacher_descriptor(mixed, shape)


def build(
    paths: list[str],
    keys: list[str],
    labels: np.ndarray,
    count: int,
    seed: int = 0,
    workers: int = 2,
    progress: bool = True,
) -> MixtureSet:
    """``count`` mixtures of random pairs of photos of different people (``labels``), the
    share of the first uniform in [0, 1]."""
    if len(np.unique(labels)) < 2:
        raise ValueError("mixtures need photos of at least two people")
    points = landmarks(paths, workers, progress)
    rng = np.random.default_rng(seed)
    a = rng.integers(0, len(paths), count)
    b = rng.integers(0, len(paths), count)
    while (same := labels[a] == labels[b]).any():
        b[same] = rng.integers(0, len(paths), int(same.sum()))
    weights = rng.uniform(0, 1, count).astype(np.float32)
    jobs = [(paths[i], points[i], paths[j], points[j], float(w))
            for i, j, w in zip(a, b, weights, strict=True)]
    results = run_jobs(_mixture, jobs, workers, progress, "mixtures")
    return MixtureSet(
        images=np.stack([r[0] for r in results]).astype(np.uint8),
        teacher=np.stack([r[1] for r in results]).astype(np.float32),
        keys_a=np.array(keys)[a],
        keys_b=np.array(keys)[b],
        weights=weights,
    )


def save(mixtures: MixtureSet, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, version=MIXTURES_VERSION, **mixtures.__dict__)
    os.replace(tmp, path)


def load(path: str | os.PathLike) -> MixtureSet:
    with np.load(path, allow_pickle=False) as z:
        if int(z["version"]) != MIXTURES_VERSION:
            raise ValueError(f"{path}: mixtures version {int(z['version'])}, this privface "
                             f"reads {MIXTURES_VERSION}")
        return MixtureSet(**{k: z[k] for k in MixtureSet.__dataclass_fields__})
