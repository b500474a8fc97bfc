"""`privface quantize` end to end on real faces: calibrated on training-split people only,
the int8 graph written beside the model and tied to it."""

from __future__ import annotations

import json

import pytest

from enrollment import onnx_runtime
from enrollment.model_io import save_model
from privface.cli import main

pytestmark = pytest.mark.skipif(not onnx_runtime.available(), reason="no onnxruntime")


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
