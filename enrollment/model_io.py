"""Model inputs, embeddings and the shipped model file.

One place decides how a batch of aligned faces becomes what a model variant eats (protected
input with a rank per face, fixed-rank, RGB), so training, evaluation and the service agree.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from enrollment import hfcf, partialface, rank_inference
from enrollment.backbone import Backbone, BackboneConfig
from enrollment.frequency import coefficient_maps, rgb_to_ycbcr_shifted
from enrollment.profiles import PROFILES, ProtectionProfile, get_profile, rank_table
from enrollment.score_centring import Cohort
from enrollment.whitening import Whitening

WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_MODEL = WEIGHTS_DIR / "partialface-balanced.pt"
#: The model for clients that protect with the paper's own partition (``partialface-paper``).
PAPER_MODEL = WEIGHTS_DIR / "partialface-paper.pt"


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a model file: what model versions and derived graphs are tied to."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_inputs(
    faces: torch.Tensor,
    kind: str,
    profile: ProtectionProfile | None,
    ranks: np.ndarray | None = None,
    canonical: bool = False,
) -> torch.Tensor:
    """(N, 3, 112, 112) float RGB in [0, 255] -> what a model of ``kind`` takes.

    ``partialface``: the rank's 27 channels per face (``ranks`` (N, 2)); with ``canonical``
    in the subset's published order, i.e. what the server has after undoing the rank's
    permutation (``rank_inference.canonicalise``; equal to it, tested); ``rgb``: the image
    itself; ``hfcf``: the 71-channel HFCF input without noise (noise is the client's).
    """
    if kind == "rgb":
        return (faces - 127.5) / 128.0
    if kind == "partialface":
        perms = np.zeros(len(ranks), dtype=int) if canonical else ranks[:, 1]
        channels = rank_table(profile)[ranks[:, 0], perms]
        pairs = partialface.channel_pairs(channels)
        planes = torch.as_tensor(rgb_to_ycbcr_shifted(faces.double().numpy())).float()
        return coefficient_maps(planes, pairs, profile.factor)
    if kind == "hfcf":
        arr = faces.permute(0, 2, 3, 1).numpy()
        return torch.from_numpy(hfcf.protect(arr, None, profile.factor))
    raise ValueError(f"unknown input kind {kind!r}")


def served_inputs(
    config: BackboneConfig, x: torch.Tensor | np.ndarray, profile: ProtectionProfile
) -> tuple[torch.Tensor | np.ndarray, np.ndarray | None]:
    """(what the model is fed, subsets or None) from protected views as the server receives
    them (rank unknown): a model with per-subset stems gets the views with their rank read
    off the input and its permutation undone (``rank_inference.canonicalise``); any other
    model the views as they are.  Keeps a numpy input numpy (and its dtype)."""
    if not config.subset_stems:
        return x, None
    canon, subsets, _ = rank_inference.canonicalise(torch.as_tensor(x), profile)
    return (canon.numpy() if isinstance(x, np.ndarray) else canon), subsets


PRECISIONS = ("fp32", "bf16", "auto")


def hardware_bf16() -> bool:
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def resolve_precision(precision: str) -> str:
    """``auto`` means bf16 only where the CPU multiplies bf16 in hardware (AMX tiles, e.g.
    Sapphire Rapids; AVX512-BF16, e.g. AMD Zen 4): there the convolutions run in bf16 under
    autocast (training 1.8x and 1.6x faster than fp32 as measured on those two), elsewhere
    bf16 is emulated and slower than fp32."""
    if precision == "auto":
        return "bf16" if hardware_bf16() else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    return precision


def autocast(precision: str):
    """The context the model runs in: bf16 autocast for ``bf16`` (convolutions and linear
    layers in bf16, everything else fp32), a no-op for ``fp32``."""
    bf16 = resolve_precision(precision) == "bf16"
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)


@torch.no_grad()
def embed(
    model: Backbone,
    inputs: torch.Tensor,
    batch_size: int = 256,
    precision: str = "fp32",
    subsets: np.ndarray | None = None,
) -> np.ndarray:
    """L2-normalised embeddings of model inputs (``precision`` fp32 or bf16 autocast;
    weights, standardisation and the normalisation stay fp32 either way); ``subsets`` (N,)
    for a model with per-subset stems."""
    model.eval()
    out = []
    for i in range(0, len(inputs), batch_size):
        sub = None if subsets is None else torch.as_tensor(subsets[i : i + batch_size])
        with autocast(precision):
            e = model(inputs[i : i + batch_size].float(), sub)
        out.append(torch.nn.functional.normalize(e.float(), dim=1))
    return torch.cat(out).numpy()


def save_model(
    path: str | os.PathLike, model: Backbone, kind: str, profile: str | None, meta: dict
) -> None:
    """Weights in float16 (half the bytes, no measurable loss) plus everything to rebuild,
    and the digest of the protection profile: a profile's name outlives its versions."""
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    blob = {
        "config": model.config.to_dict(),
        "kind": kind,
        "profile": profile,
        "profile_digest": get_profile(profile).digest() if profile else None,
        "meta": json.dumps(meta),
        "state_dict": state,
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)


def load_model(
    path: str | os.PathLike = DEFAULT_MODEL, check_profile: bool = True
) -> tuple[Backbone, dict]:
    """(model in eval mode, info: kind, profile, meta, whitening, cohort) from a saved model
    file; with ``check_profile`` (not when only its weights are wanted, e.g. to warm-start
    training on another partition) a file of another version of its profile is refused.

    ``whitening`` (a :class:`Whitening` or None) is applied to the model's final unit
    embeddings (after the views are combined) wherever templates are made; ``cohort`` (a
    :class:`Cohort` or None), fitted on the whitened embeddings, centres every score."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if check_profile:
        check_profile_digest(blob, path)
    model = Backbone(BackboneConfig.from_dict(blob["config"]))
    model.load_state_dict(
        {k: v.float() if v.is_floating_point() else v for k, v in blob["state_dict"].items()}
    )
    # channels-last: oneDNN's convolutions are ~1.3x faster in that layout on CPU (measured
    # 58 -> 77 views/s on one thread); the weights and the inputs' layout are unchanged.
    model = model.to(memory_format=torch.channels_last).eval()
    info = {"kind": blob["kind"], "profile": blob["profile"], "meta": json.loads(blob["meta"]),
            "whitening": _whitening_of(blob), "cohort": _cohort_of(blob)}
    return model, info


def check_profile_digest(blob: dict, path: str | os.PathLike) -> None:
    """Refuse a model file trained on another version of its profile (same name, other
    subsets): it would embed every input from the wrong channels and match nothing. A file
    written before the digest was recorded was trained on version 1 of its profile (the
    paper profile still is; ``partialface-balanced`` v1 files are refused)."""
    name, digest = blob.get("profile"), blob.get("profile_digest")
    if not name or name not in PROFILES:
        return
    profile = PROFILES[name]
    if digest is None and profile.version == 1 or digest == profile.digest():
        return
    trained_on = f"digest {digest}" if digest else "version 1 (no digest recorded)"
    raise ValueError(
        f"{path} was trained on protection profile {name} {trained_on}; this privface "
        f"defines {name} v{profile.version} (digest {profile.digest()}): use a model file "
        "made for this version (docs/model-card.md, 'Upgrading from an earlier model')")


def relabel(
    src: str | os.PathLike, dst: str | os.PathLike, profile: str, train_note: dict | None = None
) -> None:
    """A copy of a model file that declares ``profile`` (same input shape, other subsets):
    the same weights, whitening and cohort, the calibrated thresholds dropped (they belong to
    the old inputs' scores); ``train_note`` is added to its training meta."""
    blob = torch.load(src, map_location="cpu", weights_only=True)
    target = get_profile(profile)
    meta = {k: v for k, v in json.loads(blob["meta"]).items() if k not in SCORE_META_KEYS}
    if train_note:
        meta["train"] = {**meta.get("train", {}), **train_note}
    blob |= {"profile": target.name, "profile_digest": target.digest(), "meta": json.dumps(meta)}
    torch.save(blob, dst)


def _whitening_of(blob: dict) -> Whitening | None:
    w = blob.get("whitening")
    if w is None:
        return None
    return Whitening.from_dict({k: v.numpy() if torch.is_tensor(v) else v for k, v in w.items()})


def _cohort_of(blob: dict) -> Cohort | None:
    c = blob.get("cohort")
    if c is None:
        return None
    return Cohort.from_dict({k: v.numpy() if torch.is_tensor(v) else v for k, v in c.items()})


def _tensors(d: dict) -> dict:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
            for k, v in d.items()}


#: meta keys that describe the scores of a model file: stale once its embeddings change
SCORE_META_KEYS = ("threshold_far_1e-3", "threshold_far_1e-3_embedding",
                   "threshold_calibration", "lfw_accuracy", "threshold_far_1e-3_centred",
                   "threshold_far_1e-3_embedding_centred", "threshold_calibration_centred",
                   "lfw_accuracy_centred")


def set_whitening(
    path: str | os.PathLike, whitening: Whitening | None, cohort: Cohort | None = None
) -> dict:
    """Store (or with None remove) the whitening of a saved model and the score-centring
    cohort fitted on its whitened embeddings (None: no centring), and drop the calibrated
    threshold and accuracy from its meta: they were measured on the old scores, and a
    service must not run on a stale threshold (``privface eval lfw --write-threshold``
    calibrates it again). Returns the new meta."""

    def change(blob: dict) -> dict:
        blob.pop("whitening", None)
        blob.pop("cohort", None)
        if whitening is not None:
            blob["whitening"] = _tensors(whitening.to_dict())
        if cohort is not None:
            blob["cohort"] = _tensors(cohort.to_dict())
        meta = {k: v for k, v in json.loads(blob["meta"]).items() if k not in SCORE_META_KEYS}
        meta["whitening"] = None if whitening is None else {
            "dims": whitening.dims, "power": whitening.power, "cohort": whitening.cohort}
        meta["score_centring"] = None if cohort is None else {
            "centroids": len(cohort.centroids), "k": cohort.k, "images": cohort.images}
        return meta

    return _rewrite(path, change)


def update_meta(path: str | os.PathLike, **values) -> dict:
    """Add calibration figures (e.g. the FAR 1e-3 threshold) to a saved model's meta."""
    return _rewrite(path, lambda blob: {**json.loads(blob["meta"]), **values})


def _rewrite(path: str | os.PathLike, change) -> dict:
    """Load a model file, let ``change`` edit the blob and return its new meta, and replace
    the file atomically (a reader never sees half a file). Returns the new meta."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    meta = change(blob)
    blob["meta"] = json.dumps(meta)
    tmp = Path(str(path) + ".tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)
    return meta


def profile_for(info: dict) -> ProtectionProfile | None:
    return get_profile(info["profile"]) if info.get("profile") else None
