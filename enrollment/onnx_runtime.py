"""The serving model under ONNX Runtime: the same function as the torch model, faster on a CPU.

Measured on a 2-core AMD EPYC (AVX-512, VNNI) development machine, shipped 32-256 model, batch 32,
2 threads: torch eager (BatchNorms folded, channels-last) 130 views/s, ONNX Runtime on the
same folded graph 198 views/s (1.52x) with embeddings equal to 4e-6; at batch 1, 160 against
torch's batch-32 figure.  ORT fuses conv + bias + residual add and picks AVX-512 kernels in its
blocked NCHWc layout; torch eager runs each op on its own.  The graph is exported from the
folded model at load (about a second) and never written to disk: the ``.pt`` file stays the
one artefact, so ``model_version`` keeps naming exactly what embeds.

With ``onnxruntime-gpu`` installed and a CUDA device, the CUDA execution provider is used
(not measured here: this machine has no GPU).
"""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from enrollment.backbone import Backbone, fold_batchnorm
from enrollment.model_io import file_sha256


def available() -> bool:
    try:
        import onnx  # noqa: F401  (torch's exporter writes through it)
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def subset_groups(n: int, subsets: np.ndarray | None) -> list[tuple[int | None, np.ndarray]]:
    """(subset, member indices) per subset present, or one group of all ``n`` inputs when
    the graph has one stem (``subsets`` None): how a batch is cut for per-subset graphs."""
    if subsets is None:
        return [(None, np.arange(n))]
    subsets = np.asarray(subsets)
    return [(int(s), np.flatnonzero(subsets == s)) for s in np.unique(subsets)]


def export_onnx(model: Backbone) -> bytes:
    """The eval-mode model, BatchNorms folded, as an ONNX graph with a dynamic batch axis:
    input ``x`` (N, C, H, W) float32, output ``e`` (N, embedding_size), not normalised.
    A model with per-subset stems takes a second input, ``subset`` (1,) int64: the subset
    of the whole batch (``OnnxModel.embed`` groups the views by subset)."""
    folded = fold_batchnorm(model).to(memory_format=torch.contiguous_format)
    cfg = model.config
    example: tuple = (torch.zeros(1, cfg.in_channels, cfg.input_size, cfg.input_size),)
    names = ["x"]
    if cfg.subset_stems:  # one subset for the whole batch (OnnxModel.embed groups by it)
        example, names = (*example, torch.zeros(1, dtype=torch.long)), ["x", "subset"]
    buf = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter announces its deprecation
        warnings.simplefilter("ignore")
        torch.onnx.export(
            folded, example, buf, input_names=names, output_names=["e"],
            dynamic_axes={"x": {0: "n"}, "e": {0: "n"}}, opset_version=17, dynamo=False,
        )
    return buf.getvalue()


def providers() -> list[str]:
    """CUDA when onnxruntime-gpu sees a device, else the CPU."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    chosen = [p for p in ("CUDAExecutionProvider",) if p in have]
    return [*chosen, "CPUExecutionProvider"]


def with_float16_input(graph: bytes) -> bytes:
    """The graph taking its input ``x`` as float16 (a Cast to float32 in front).

    Protected inputs travel as float16; ONNX Runtime widens a batch of 32 views 3.6x faster
    than torch does (4.4 against 15.8 ms, 2 threads), and the request is never copied to
    float32 outside the graph.
    """
    import onnx
    from onnx import TensorProto, helper

    proto = onnx.load_from_string(graph)
    inp = next(i for i in proto.graph.input if i.name == "x")
    inp.name, wide = "x16", inp.name
    inp.type.tensor_type.elem_type = TensorProto.FLOAT16
    cast = helper.make_node("Cast", ["x16"], [wide], to=TensorProto.FLOAT, name="widen_x16")
    proto.graph.node.insert(0, cast)
    return proto.SerializeToString()


class OnnxModel:
    """ONNX Runtime sessions of a backbone graph (``export_onnx`` or ``quantize_int8``), one
    per input dtype; ``embed`` has model_io.embed's contract."""

    def __init__(self, graph: bytes, threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.sessions = {
            np.dtype(np.float32): ort.InferenceSession(graph, options, providers=providers()),
            np.dtype(np.float16): ort.InferenceSession(
                with_float16_input(graph), options, providers=providers()
            ),
        }
        session = self.sessions[np.dtype(np.float32)]
        self.per_subset = any(i.name == "subset" for i in session.get_inputs())
        self.provider = session.get_providers()[0]
        self.embedding_size = int(session.get_outputs()[0].shape[1])
        self.metadata = dict(session.get_modelmeta().custom_metadata_map)

    @classmethod
    def of(cls, model: Backbone, threads: int = 1) -> OnnxModel:
        return cls(export_onnx(model), threads)

    def embed(
        self,
        inputs: torch.Tensor | np.ndarray,
        subsets: np.ndarray | None = None,
        batch_size: int = 32,
    ) -> np.ndarray:
        """L2-normalised float32 embeddings.  float16 inputs go to the graph as they are
        (widened inside it); anything else as float32.  A graph with per-subset stems needs
        each input's ``subset`` and runs the inputs of one subset at a time."""
        x = inputs.numpy() if isinstance(inputs, torch.Tensor) else np.asarray(inputs)
        if x.dtype != np.float16:
            x = x.astype(np.float32, copy=False)
        if len(x) == 0:
            return np.empty((0, self.embedding_size), np.float32)
        if self.per_subset and subsets is None:
            raise ValueError("this graph has per-subset stems: give each input's subset")
        session = self.sessions[x.dtype]
        name = session.get_inputs()[0].name
        e = np.empty((len(x), self.embedding_size), np.float32)
        for subset, members in subset_groups(len(x), subsets if self.per_subset else None):
            feed = {} if subset is None else {"subset": np.array([subset], np.int64)}
            for i in range(0, len(members), batch_size):
                rows = members[i : i + batch_size]
                part = x[rows] if self.per_subset else x[i : i + batch_size]
                feed[name] = np.ascontiguousarray(part)
                e[rows] = session.run(None, feed)[0]
        e /= np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        return e


def quantize_int8(
    model: Backbone,
    calibration: np.ndarray,
    batch_size: int = 16,
    subsets: np.ndarray | None = None,
) -> bytes:
    """Post-training static int8 quantisation: QDQ, per-channel int8 weights, uint8
    activations with ranges at the 99.99th percentile of ``calibration`` (real protected
    inputs, N x C x H x W).

    What stays float, and why (measured on 64 LFW training-split faces, two views each,
    against the fp32 embeddings; cosine mean / min): quantising everything from the first
    convolution on with min/max ranges gave 0.988 / 0.953; with percentile ranges 0.997 /
    0.989; also keeping the stem convolution float 0.998 / 0.994 at the 99.99th percentile
    (the stem's input, the standardised frequency channels, has the widest tails).  Keeping
    the final linear layer float as well changed nothing (0.998 / 0.994) but was slower and
    doubled the file (its 2.1 M weights in float32).  The per-sample standardisation at the
    start stays float: its input spans ~1000x between channels.  A model with per-subset
    stems calibrates on batches of one subset each (``subsets``: the calibration inputs').

    Weights use 7 of their 8 bits (``reduce_range``): on a CPU without VNNI (AVX2 only, e.g.
    AMD Zen 3) ONNX Runtime's uint8 x int8 products saturate otherwise.  Measured on such a
    CPU, the shipped model's graph on 64 training-split faces (two views each): cosine to fp32
    mean / min 0.9976 / 0.9928 with 8-bit weights, 0.9983 / 0.9959 with 7; a small test
    network with per-subset stems went from a minimum of 0.976 to above 0.98.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            x = np.asarray(calibration, np.float32)
            self.batches = iter(
                {"x": x[m[i : i + batch_size]]}
                | ({} if s is None else {"subset": np.array([s], np.int64)})
                for s, m in subset_groups(len(x), subsets)
                for i in range(0, len(m), batch_size)
            )

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        fp32, pre, out = (Path(tmp) / n for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        fp32.write_bytes(export_onnx(model))
        quant_pre_process(str(fp32), str(pre))
        nodes = onnx.load(str(pre)).graph.node
        first_conv = next(i for i, n in enumerate(nodes) if n.op_type == "Conv")
        keep_float = [n.name for n in nodes[: first_conv + 1]]  # standardise + stem conv
        quantize_static(
            str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
            reduce_range=True,
            calibrate_method=CalibrationMethod.Percentile,
            extra_options={"CalibPercentile": 99.99}, nodes_to_exclude=keep_float,
        )
        return out.read_bytes()


#: ONNX metadata key naming the .pt file (its SHA-256) an int8 graph was quantised from
SOURCE_KEY = "privface_source_sha256"


def int8_path(model_path: str | os.PathLike) -> Path:
    """Where the int8 graph of a model file lives: beside it, ``<stem>.int8.onnx``."""
    p = Path(model_path)
    return p.with_name(p.stem + ".int8.onnx")


def with_metadata(graph: bytes, **values: str) -> bytes:
    """The graph with ``values`` added to its metadata (read back as OnnxModel.metadata)."""
    import onnx

    proto = onnx.load_from_string(graph)
    for key, value in values.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    return proto.SerializeToString()


def save_int8(model_path: str | os.PathLike, graph: bytes, **meta: str) -> Path:
    """Write ``graph`` as the int8 graph of ``model_path``, stamped with that file's hash."""
    out = int8_path(model_path)
    out.write_bytes(with_metadata(graph, **{SOURCE_KEY: file_sha256(model_path)}, **meta))
    return out


def load_int8(
    model_path: str | os.PathLike, threads: int = 1, source_sha256: str | None = None
) -> OnnxModel:
    """The int8 graph of ``model_path``, refused if it was quantised from another file
    (``source_sha256``: the model file's hash, when the caller already has it)."""
    path = int8_path(model_path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: quantise the model first (privface quantize --model "
            f"{model_path})"
        )
    model = OnnxModel(path.read_bytes(), threads)
    if model.metadata.get(SOURCE_KEY) != (source_sha256 or file_sha256(model_path)):
        raise ValueError(
            f"{path} was quantised from another version of {Path(model_path).name}; re-run "
            f"privface quantize --model {model_path}"
        )
    return model
