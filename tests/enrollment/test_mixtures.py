"""Teacher-labelled mixtures: the blend of two photos in one frame, and its dlib target."""

from __future__ import annotations

import numpy as np
import pytest

from enrollment import mixtures as mx
from enrollment.align import five_of_68
from enrollment.face_cache import _process


@pytest.fixture(scope="module")
def photos(lfw_dir):
    """Four photos of three people, with their landmarks."""
    paths = [str(p) for p in sorted(lfw_dir.glob("Aaron_Peirsol/*.jpg"))[:2]]
    paths += [str(p) for p in sorted(lfw_dir.glob("Abdullah_Gul/*.jpg"))[:1]]
    paths += [str(p) for p in sorted(lfw_dir.glob("Adam_Sandler/*.jpg"))[:1]]
    return paths, mx.landmarks(paths, workers=1, progress=False)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_landmarks_lie_on_the_face(photos):
    from enrollment.align import load_image

    paths, points = photos
    assert points.shape == (4, 68, 2)
    for path, pts in zip(paths, points, strict=True):
        five = five_of_68(pts)
        assert five.shape == (5, 2) and five[0, 0] < five[1, 0]  # left eye left of right eye
        h, w = load_image(path)[0].shape[:2]
        assert (pts >= 0).all() and (pts[:, 0] < w).all() and (pts[:, 1] < h).all()


def test_blend_is_the_weighted_mean_in_the_first_photo_s_frame(photos):
    from enrollment.align import load_image

    paths, points = photos
    a, b = load_image(paths[0])[0], load_image(paths[2])[0]
    same, pts = mx.blend(a, points[0], b, points[2], 1.0)
    assert np.array_equal(same, a) and np.allclose(pts, points[0])
    other, pts_b = mx.blend(a, points[0], b, points[2], 0.0)
    half, pts_half = mx.blend(a, points[0], b, points[2], 0.5)
    want = (a.astype(np.float32) + other.astype(np.float32)) / 2
    assert np.abs(half.astype(np.float32) - want).max() <= 1.0  # rounding of both
    assert np.allclose(pts_half, (points[0] + pts_b) / 2)
    # b's landmarks land on a's (a least-squares similarity: close, not equal)
    assert np.sqrt(((pts_b - points[0]) ** 2).sum(1)).mean() < 10


def test_a_mixture_s_ends_are_its_photos(photos):
    """Weight 1: exactly the first photo's cached crop and teacher descriptor; weight 0: the
    second photo seen in the first's frame, which the teacher still takes for it."""
    paths, points = photos
    crop, desc = mx._mixture((paths[0], points[0], paths[2], points[2], 1.0))
    cached_crop, cached_desc, _ = _process((paths[0], None, True))
    assert np.array_equal(crop, cached_crop)
    np.testing.assert_allclose(desc, cached_desc, atol=1e-6)
    crop, desc = mx._mixture((paths[0], points[0], paths[2], points[2], 0.0))
    _, desc_b, _ = _process((paths[2], None, True))
    assert _cos(desc, desc_b) > 0.99
    # an even blend is neither person to the teacher (dlib calls < 0.6 apart the same)
    _, desc_half = mx._mixture((paths[0], points[0], paths[2], points[2], 0.5))
    assert np.linalg.norm(desc_half - cached_desc) > 0.15
    assert np.linalg.norm(desc_half - desc_b) > 0.15


def test_build_mixes_different_people_and_round_trips(photos, tmp_path):
    paths, _ = photos
    keys = [f"lfw/{p.split('/')[-2]}/{p.split('/')[-1]}" for p in paths]
    labels = np.array([0, 0, 1, 2])
    made = mx.build(paths, keys, labels, 5, seed=3, workers=1, progress=False)
    assert made.images.shape == (5, 112, 112, 3) and made.teacher.shape == (5, 128)
    person = {k: lab for k, lab in zip(keys, labels, strict=True)}
    assert all(person[a] != person[b] for a, b in zip(made.keys_a, made.keys_b, strict=True))
    assert ((made.weights >= 0) & (made.weights <= 1)).all()
    mx.save(made, tmp_path / "m.npz")
    back = mx.load(tmp_path / "m.npz")
    for field in mx.MixtureSet.__dataclass_fields__:
        assert np.array_equal(getattr(back, field), getattr(made, field))
    with pytest.raises(ValueError, match="two people"):
        mx.build(paths[:2], keys[:2], labels[:2], 1, workers=1, progress=False)
    np.savez(tmp_path / "old.npz", version=0, **made.__dict__)
    with pytest.raises(ValueError, match="mixtures version 0"):
        mx.load(tmp_path / "old.npz")
