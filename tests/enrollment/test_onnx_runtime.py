"""The ONNX Runtime serving path computes the torch model's function."""

import numpy as np
import pytest
import torch

from enrollment import onnx_runtime
from enrollment.model_io import embed

pytestmark = pytest.mark.skipif(not onnx_runtime.available(), reason="no onnxruntime")


@pytest.fixture(scope="module")
def model(small_backbone):
    return small_backbone


def frequency_like(n: int, seed: int = 1) -> torch.Tensor:
    """Channels whose scales differ by ~1000x, as a rank's 27 DCT channels do."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-3, 0, 27).view(1, 27, 1, 1)
    return torch.randn(n, 27, 112, 112, generator=g) * scale + 0.01


def test_onnx_embeddings_equal_torch(model):
    x = frequency_like(5)
    ref = embed(model, x)  # the unfolded torch model
    ort_model = onnx_runtime.OnnxModel.of(model, threads=1)
    got = ort_model.embed(x, batch_size=2)  # several batches, one short
    assert got.shape == (5, 64) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    half = x.half()
    np.testing.assert_allclose(ort_model.embed(half.numpy()), embed(model, half.float()),
                               rtol=0, atol=2e-5)
    assert ort_model.embed(x[:0]).shape == (0, 64)
    assert ort_model.provider == "CPUExecutionProvider"  # no GPU on the test machines
    assert [s.get_inputs()[0].type for s in ort_model.sessions.values()] == [
        "tensor(float)", "tensor(float16)"]


def test_export_leaves_the_model_alone(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graph = onnx_runtime.export_onnx(model)
    assert len(graph) > 2 * sum(p.numel() for p in model.parameters())  # float32 weights
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training


def test_int8_graph_tracks_the_float_model(model, tmp_path):
    from enrollment.model_io import save_model

    path = tmp_path / "m.pt"
    save_model(path, model, "partialface", "partialface-paper", {})
    with pytest.raises(FileNotFoundError, match="privface quantize"):
        onnx_runtime.load_int8(path)
    graph = onnx_runtime.quantize_int8(model, frequency_like(32, seed=2).numpy())
    onnx_runtime.save_int8(path, graph)
    int8 = onnx_runtime.load_int8(path)
    x = frequency_like(8, seed=3)
    ref = embed(model, x)
    got = int8.embed(x)
    cos = np.sum(ref * got, axis=1)
    assert cos.min() > 0.98, cos  # close to the float model ...
    assert not np.allclose(got, ref, atol=1e-4)  # ... without being it
    assert len(graph) < len(onnx_runtime.export_onnx(model)) / 2  # int8 weights
    path.write_bytes(path.read_bytes() + b"\0")  # the model file changed
    with pytest.raises(ValueError, match="another version"):
        onnx_runtime.load_int8(path)


def test_per_subset_stems_export_as_one_graph_with_a_subset_input(subset_backbone):
    x = frequency_like(7)
    subsets = np.array([3, 0, 3, 5, 1, 3, 0])
    ref = embed(subset_backbone, x, subsets=subsets)
    ort_model = onnx_runtime.OnnxModel.of(subset_backbone, threads=1)
    assert ort_model.per_subset
    got = ort_model.embed(x, subsets, batch_size=2)  # grouped by subset, then in batches
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5)
    np.testing.assert_allclose(ort_model.embed(x.half().numpy(), subsets),
                               embed(subset_backbone, x.half().float(), subsets=subsets),
                               rtol=0, atol=2e-5)
    with pytest.raises(ValueError, match="subset"):
        ort_model.embed(x)
    graph = onnx_runtime.quantize_int8(subset_backbone, frequency_like(24, seed=2).numpy(),
                                       subsets=np.arange(24) % 6)
    cos = np.sum(onnx_runtime.OnnxModel(graph).embed(x, subsets) * ref, axis=1)
    assert cos.min() > 0.98, cos


@pytest.mark.parametrize("which", ["DEFAULT_MODEL", "PAPER_MODEL"])
def test_shipped_int8_graph_is_of_the_shipped_model(which):
    from enrollment import model_io

    path = getattr(model_io, which)
    if not path.exists():
        pytest.skip("no shipped model")
    assert onnx_runtime.load_int8(path).embedding_size == 512
