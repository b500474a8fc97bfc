"""Server side of a protected input: validate it, embed it with the shipped model.

Validation comes first and is complete (wire format, profile name, version and digest, the
profile this model accepts, dtype, shape, finite values, number of views) so that nothing
malformed reaches the model, and each refusal names the sample and the reason.

Model calls are serialised by a lock and batched: one request's views run as one batch (in
chunks), under ``torch.no_grad``, with a bounded number of torch threads — concurrent gRPC
threads would otherwise each spawn a full thread pool and oversubscribe the CPU.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from enrollment import onnx_runtime, rank_inference, whitening, wire
from enrollment.backbone import fold_batchnorm
from enrollment.model_io import (
    DEFAULT_MODEL,
    PRECISIONS,
    embed,
    file_sha256,
    load_model,
    resolve_precision,
    served_inputs,
)
from enrollment.profiles import ProtectionProfile, get_profile
from privface.errors import ServiceError

log = logging.getLogger("privface.embedding")

#: Most views (e.g. a face and its mirror) one ProtectedInput may hold.
MAX_VIEWS = 8
#: Views per model call.
BATCH = 32
#: values of ``Settings.model_precision``: training's, plus the int8 graph for serving
SERVING_PRECISIONS = (*PRECISIONS, "int8")
#: values of ``Settings.model_runtime``
RUNTIMES = ("auto", "onnx", "torch")
#: Meta key of the model card's threshold at FAR = 1e-3, on the protected-template scale.
THRESHOLD_META_KEY = "threshold_far_1e-3"
#: The same with score centring (a scale of its own).
CENTRED_THRESHOLD_META_KEY = "threshold_far_1e-3_centred"


def model_version_of(path: str | os.PathLike[str], sha256: str | None = None) -> str:
    """``<file stem>@<first 12 hex of the file's SHA-256>``: recorded with every template,
    so templates of a retrained model are never compared with those of another."""
    return f"{Path(path).stem}@{(sha256 or file_sha256(path))[:12]}"


@dataclass(frozen=True)
class ModelCard:
    """What the service needs to know about its model."""

    path: str
    model_version: str
    kind: str
    profile: ProtectionProfile
    embedding_dim: int
    threshold: float
    threshold_source: str
    mapping: dict = field(default_factory=dict)  # identity-mapping m, c_max, overlap


def resolve_runtime(runtime: str, precision: str) -> str:
    """``auto`` is torch for bf16 (ONNX Runtime has no counterpart of its autocast), ONNX
    Runtime otherwise: fp32 at 1.5x torch's views/s on this CPU with the same embeddings,
    int8 through its quantised graph; fp32 falls back to torch without onnxruntime."""
    if runtime not in RUNTIMES:
        raise ValueError(f"model_runtime must be one of {RUNTIMES}, not {runtime!r}")
    if runtime == "auto":
        fallback = precision == "bf16" or (precision == "fp32" and not onnx_runtime.available())
        runtime = "torch" if fallback else "onnx"
    if runtime == "onnx" and precision == "bf16":
        raise ValueError("model_runtime 'onnx' runs fp32 or int8; set model_runtime = "
                         "'torch' for bf16")
    if runtime == "torch" and precision == "int8":
        raise ValueError("model_precision 'int8' runs under ONNX Runtime: set model_runtime "
                         "= 'onnx' or 'auto'")
    if runtime == "onnx" and not onnx_runtime.available():
        raise ValueError("model_runtime 'onnx' needs the onnxruntime and onnx packages")
    return runtime


def resolve_threshold(
    meta: dict, override: float, centred: bool = False
) -> tuple[float, str]:
    """The decision threshold: ``Settings.threshold`` if set, else the model card's (the
    one for centred scores with ``centred``)."""
    if override:
        return float(override), "settings"
    name = CENTRED_THRESHOLD_META_KEY if centred else THRESHOLD_META_KEY
    value = meta.get(name)
    if value is None:
        raise ValueError(
            f"the model carries no calibrated threshold (meta[{name!r}]; privface eval lfw "
            f"--write-threshold{' --score-centring' if centred else ''}); set threshold in "
            "the configuration (PRIVFACE_THRESHOLD) to the protected-template score at the "
            "false-match rate you accept"
        )
    return float(value), "model"


def _averaged_over_permutations(
    run: Callable[[np.ndarray], np.ndarray], profile: ProtectionProfile
) -> Callable[[np.ndarray], np.ndarray]:
    """``run`` on every permutation of each view's subset (read off the view), summed per view.

    The model embeds the permutations of one subset a little differently; the server can
    read the rank off a view (``rank_inference``), so it removes that noise itself, at P
    times the model's work (docs/model-card.md, "Averaging each view over the permutations of
    its subset")."""
    n_perm = len(profile.permutations)
    step = max(1, BATCH // n_perm)  # views per model call: ~BATCH inputs, bounded memory

    def averaged(x: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(x), step):
            e = run(rank_inference.every_permutation(x[i : i + step], profile))
            out.append(e.reshape(-1, n_perm, e.shape[1]).sum(axis=1))
        return np.concatenate(out)

    return averaged


class Embedder:
    """The shipped model behind a lock, with input validation."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        threads: int = 0,
        threshold: float = 0.0,
        precision: str = "fp32",
        runtime: str = "auto",
        average_permutations: bool = True,
        score_centring: bool = False,
    ) -> None:
        # bad settings fail before the load
        if precision not in SERVING_PRECISIONS:
            raise ValueError(f"model_precision must be one of {SERVING_PRECISIONS}, not "
                             f"{precision!r}")
        self.precision = "int8" if precision == "int8" else resolve_precision(precision)
        self.runtime = resolve_runtime(runtime, self.precision)
        model_path = Path(path or DEFAULT_MODEL)
        if not model_path.exists():
            raise FileNotFoundError(
                f"model file {model_path} not found: train and ship one (privface train ... "
                "--ship) or set model_path (PRIVFACE_MODEL_PATH)"
            )
        model, info = load_model(model_path)
        if info["kind"] == "rgb" or not info.get("profile"):
            raise ValueError(
                f"{model_path} is an RGB model; the service only embeds protected inputs"
            )
        if score_centring and info["cohort"] is None:
            raise ValueError(f"score_centring needs a model file with a score-centring cohort "
                             f"({model_path} has none: privface whiten fits one)")
        meta = info.get("meta") or {}
        value, source = resolve_threshold(meta, threshold, score_centring)
        sha256 = file_sha256(model_path)  # once: the model version and the int8 graph's check
        self.card = ModelCard(
            path=str(model_path),
            model_version=model_version_of(model_path, sha256),
            kind=info["kind"],
            profile=get_profile(info["profile"]),
            embedding_dim=int(model.config.embedding_size),
            threshold=value,
            threshold_source=source,
            mapping=dict(meta.get("identity_mapping") or {}),
        )
        threads = threads or max(1, min(4, os.cpu_count() or 1))
        torch.set_num_threads(threads)
        config, profile = model.config, self.card.profile
        if self.runtime == "onnx":
            graph = (onnx_runtime.load_int8(model_path, threads, sha256)
                     if self.precision == "int8" else onnx_runtime.OnnxModel.of(model, threads))

            def run(x: np.ndarray) -> np.ndarray:
                x, subsets = served_inputs(config, x, profile)
                return graph.embed(x, subsets, batch_size=BATCH)

            where = f"onnxruntime {graph.provider} {self.precision}"
        else:
            # conv->BN pairs folded for serving: exact, ~6% more views/s on 2 threads
            # (measured); the folded weights keep load_model's channels-last layout
            folded = fold_batchnorm(model)

            def run(x: np.ndarray) -> np.ndarray:
                x, subsets = served_inputs(config, torch.from_numpy(x), profile)
                return embed(folded, x, batch_size=BATCH, precision=self.precision,
                             subsets=subsets)

            where = f"torch {self.precision}"
        if config.subset_stems:
            where += ", per-subset stems (rank read off each view)"
        # a per-subset-stem model undoes the permutation itself: nothing left to average
        self.average_permutations = bool(
            average_permutations and self.card.kind == "partialface" and not config.subset_stems
        )
        if self.average_permutations:
            run = _averaged_over_permutations(run, profile)
            where += f", each view under all {len(profile.permutations)} permutations"
        self._embed_views: Callable[[np.ndarray], np.ndarray] = run
        self._whitening = info["whitening"]
        if self._whitening is not None:
            where += (f", whitened ({self._whitening.dims} directions, power "
                      f"{self._whitening.power:g})")
        #: the score-centring cohort (enrollment.score_centring), in the whitened space;
        #: None unless score_centring is on
        self.cohort = info["cohort"] if score_centring else None
        if self.cohort is not None:
            where += (f", scores centred on {len(self.cohort.centroids)} cohort centroids "
                      f"(top {self.cohort.k})")
        self._digest = self.card.profile.digest()  # asdict + JSON + SHA-256: once, not per view
        self._lock = threading.Lock()
        log.info(
            "model %s (%s, profile %s, %d-d embeddings, %s); threshold %.4f from the %s",
            self.card.model_version, self.card.kind, self.card.profile.name,
            self.card.embedding_dim, where, value, source,
        )

    @property
    def whitened(self) -> bool:
        return self._whitening is not None

    def decode(self, blob: bytes, what: str) -> np.ndarray:
        """Fully validated views of one protected input (views, C, H, W), in the dtype it was
        sent in: float16 stays float16 until the model widens each batch (inside the ONNX
        graph, or through torch), which halves the bytes copied per request."""
        profile = self.card.profile
        if not blob:
            raise ServiceError("INVALID_ARGUMENT", f"{what}: the protected input is empty",
                               "empty")
        try:
            header, array = wire.decode(bytes(blob))
            sent = wire.profile_of(header)
        except wire.ProtectedInputError as exc:
            raise ServiceError("INVALID_ARGUMENT", f"{what}: {exc}", exc.reason) from None
        if sent.name != profile.name:
            raise ServiceError(
                "INVALID_ARGUMENT",
                f"{what}: protected with profile {sent.name!r}; this server's model accepts "
                f"only {profile.name!r} (see GetServerInfo)",
                "profile",
            )
        if header.get("profile_digest") != self._digest:
            raise ServiceError(
                "INVALID_ARGUMENT",
                f"{what}: profile {profile.name!r} parameters differ from the server's (digest "
                f"{header.get('profile_digest')!r}, expected {self._digest!r}); update the "
                "client",
                "profile_digest",
            )
        try:
            wire.check(array, profile)
        except wire.ProtectedInputError as exc:
            raise ServiceError("INVALID_ARGUMENT", f"{what}: {exc}", exc.reason) from None
        if array.shape[0] > MAX_VIEWS:
            raise ServiceError(
                "INVALID_ARGUMENT",
                f"{what}: {array.shape[0]} views in one protected input; the limit is "
                f"{MAX_VIEWS} (send several samples instead)",
                "views",
            )
        return np.ascontiguousarray(array)

    def embed(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
        """One unit embedding per input: the views' embeddings averaged, renormalised."""
        if not inputs:
            return np.empty((0, self.card.embedding_dim), np.float32)
        counts = [len(a) for a in inputs]
        dtype = np.float16 if all(a.dtype == np.float16 for a in inputs) else np.float32
        x = np.concatenate(inputs, dtype=dtype)
        with self._lock:
            views = self._embed_views(x)
        out = np.add.reduceat(views.astype(np.float64), np.cumsum([0, *counts[:-1]]), axis=0)
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return whitening.apply(out, self._whitening).astype(np.float32)
