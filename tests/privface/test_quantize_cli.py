"""`privface quantize` end to end on real faces: calibrated on training-split people only,
the int8 graph written beside the model and tied to it."""

from __future__ import annotations

import json

import pytest

from enrollment import onnx_runtime
from enrollment.lfw_protocol import held_out_identities
from enrollment.model_io import save_model
from privface.cli import main

pytestmark = pytest.mark.skipif(not onnx_runtime.available(), reason="no onnxruntime")


@pytest.fixture(scope="module")
def small_lfw(data_dir, tmp_path_factory):
    """An LFW layout of 3 training-split people and 2 people of folds 6-10 (symlinks)."""
    pairs = data_dir / "lfw" / "pairs.txt"
    test_people = held_out_identities(pairs)
    people = sorted(p for p in (data_dir / "lfw" / "lfw-deepfunneled").iterdir() if p.is_dir())
    train = [p for p in people if p.name not in test_people and len(list(p.iterdir())) >= 2][:3]
    test = [p for p in people if p.name in test_people][:2]
    root = tmp_path_factory.mktemp("lfw")
    (root / "lfw" / "lfw-deepfunneled").mkdir(parents=True)
    (root / "lfw" / "pairs.txt").symlink_to(pairs)
    for p in train + test:
        (root / "lfw" / "lfw-deepfunneled" / p.name).symlink_to(p, target_is_directory=True)
    n_train = sum(len(list(p.iterdir())) for p in train)
    return root, n_train


def test_quantize_writes_an_int8_graph_of_the_model(small_lfw, small_backbone, tmp_path, capsys):
    root, n_train = small_lfw
    model = small_backbone
    path = tmp_path / "m.pt"
    save_model(path, model, "partialface", "partialface-paper", {})
    common = ["quantize", "--model", str(path), "--data", str(root), "--threads", "1",
              "--cache-dir", str(tmp_path / "cache")]
    # every training-split image is available; one more would need a test person's image
    with pytest.raises(ValueError):
        main([*common, "--images", str(n_train - 1), "--check", "2"])
    capsys.readouterr()
    assert main([*common, "--images", str(n_train - 2), "--check", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)  # stdout is the summary alone
    assert summary["calibration_views"] == 2 * (n_train - 2)  # face + mirror each
    assert summary["check_views"] == 4
    assert summary["cosine_to_fp32_min"] > 0.9
    int8 = onnx_runtime.load_int8(path)
    assert int8.embedding_size == 64
    assert summary["int8_model"] == str(onnx_runtime.int8_path(path))
    path.write_bytes(path.read_bytes() + b"\0")  # the model changed: the graph is refused
    with pytest.raises(ValueError, match="another version"):
        onnx_runtime.load_int8(path)
