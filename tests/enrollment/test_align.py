"""Alignment on real faces (LFW colour, AT&T greyscale) and batch error accounting."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from enrollment.align import (
    ARCFACE_TEMPLATE,
    AlignmentError,
    _landmarker,
    align_file,
    detect,
    five_points,
    similarity_transform,
)
from enrollment.align_batch import align_batch, collect_inputs, summarise


def redetected_eyes(crop: np.ndarray) -> np.ndarray | None:
    """Eye centres found again, independently, on the aligned crop (2x, edge-padded)."""
    big = np.asarray(Image.fromarray(crop).resize((224, 224), Image.Resampling.BICUBIC))
    pad = np.pad(big, ((56, 56), (56, 56), (0, 0)), mode="edge")
    rects, _ = detect(pad)
    if not rects:
        return None
    rect = max(rects, key=lambda r: r.area())
    return (five_points(_landmarker()(pad, rect))[:2] - 56) / 2


@pytest.mark.parametrize("dataset", ["lfw", "att"])
def test_eyes_land_on_template(dataset, lfw_dir, att_dir):
    if dataset == "lfw":
        files = sorted(lfw_dir.glob("C*/*_0001.jpg"))[:8]
    else:
        files = [att_dir / f"s{i}" / "3.pgm" for i in range(1, 9)]
    errors = []
    for f in files:
        face = align_file(f)
        assert face.image.shape == (112, 112, 3) and face.image.dtype == np.uint8
        assert face.greyscale == (dataset == "att")
        eyes = redetected_eyes(face.image)
        if eyes is not None:
            errors.append(np.linalg.norm(eyes - ARCFACE_TEMPLATE[:2], axis=1))
    assert len(errors) >= 6, "most aligned crops must still hold a detectable face"
    errors = np.concatenate(errors)
    assert np.median(errors) < 4.0
    assert errors.max() < 8.0


def test_greyscale_crop_has_equal_planes(att_dir):
    face = align_file(att_dir / "s1" / "1.pgm")
    assert (face.image[..., 0] == face.image[..., 1]).all()


def test_similarity_transform_recovers_known_transform():
    rng = np.random.default_rng(0)
    src = rng.random((5, 2)) * 100
    angle, scale, shift = 0.3, 1.7, np.array([5.0, -3.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = scale * src @ rot.T + shift
    m = similarity_transform(src, dst)
    np.testing.assert_allclose(m[:, :2], scale * rot, atol=1e-9)
    np.testing.assert_allclose(m[:, 2], shift, atol=1e-9)


def test_several_faces_take_the_largest_with_a_warning(lfw_dir, tmp_path):
    a = np.asarray(Image.open(lfw_dir / "Aaron_Peirsol" / "Aaron_Peirsol_0001.jpg"))
    b = np.asarray(Image.open(lfw_dir / "Colin_Powell" / "Colin_Powell_0001.jpg"))
    small = np.asarray(Image.fromarray(b).resize((170, 170)))
    canvas = np.full((260, 440, 3), 128, np.uint8)
    canvas[5:255, 5:255] = a
    canvas[40:210, 265:435] = small
    path = tmp_path / "two.png"
    Image.fromarray(canvas).save(path)
    face = align_file(path)
    assert face.n_faces == 2 and face.warnings
    assert face.box[0] < 255  # the larger face, on the left


def test_errors_have_reasons(tmp_path, att_dir):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a picture")
    gradient = np.tile(np.linspace(0, 255, 200, dtype=np.uint8), (200, 1))
    Image.fromarray(gradient).save(tmp_path / "noface.png")
    for name, reason in [
        ("empty.jpg", "unreadable"),
        ("notes.txt", "unreadable"),
        ("noface.png", "no_face"),
    ]:
        with pytest.raises(AlignmentError) as err:
            align_file(tmp_path / name)
        assert err.value.reason == reason
    with pytest.raises(AlignmentError) as err:
        align_file(att_dir / "s1" / "1.pgm", min_face=500)
    assert err.value.reason == "face_too_small"


def test_batch_counts_failures_and_keeps_layout(tmp_path, lfw_dir):
    src = tmp_path / "in" / "people"
    for name in ["Aaron_Peirsol", "Colin_Powell"]:
        (src / name).mkdir(parents=True)
        for f in sorted((lfw_dir / name).glob("*.jpg"))[:2]:
            shutil.copy(f, src / name / f.name)
    (src / "Aaron_Peirsol" / "readme.txt").write_text("salt")
    (src / "Colin_Powell" / "empty.jpg").write_bytes(b"")
    Image.fromarray(np.zeros((150, 150), np.uint8)).save(src / "Colin_Powell" / "blank.png")
    items = collect_inputs([src])
    assert len(items) == 7
    out = tmp_path / "out"
    report = summarise(align_batch(items, out, workers=2))
    assert report["files"] == 7 and report["aligned"] == 4 and report["failed"] == 3
    assert report["failures_by_reason"] == {"unreadable": 2, "no_face": 1}
    assert (out / "people" / "Colin_Powell" / "Colin_Powell_0001.png").exists()
    again = summarise(align_batch(items, out, workers=1))
    assert again["skipped"] == 4 and again["aligned"] == 0 and again["failed"] == 3
