"""Training a recognition model on protected inputs (method.md §1 item 8, §2, §7).

Signal: cosine distillation from the dlib RGB teacher (its descriptors centred on the
training mean, then lifted to the embedding size by a fixed orthonormal map so the whole
embedding is trained) plus, optionally, an ArcFace margin loss on identity labels.  Every
sample draws a fresh random rank each time it is used and is used ``uses_per_epoch`` times
per epoch.  Colour can be missing in the field (greyscale cameras), so a fraction of samples
is turned grey while keeping the colour teacher's target.  Optionally the student also
matches the last-stage feature map of an RGB network of its own architecture on the same
augmented face (feature distillation, ``feature_teacher``), or learns, on faces mixed pairwise
(mixup), what such a network embeds the mixed face as (``mixup_teacher``): new inputs with
exact targets, for a student that is short of distinct faces.  Checkpoints after every epoch make
a run resumable; a JSONL log records loss and held-out accuracy per epoch.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from enrollment import partialface
from enrollment.backbone import Backbone, BackboneConfig, count_parameters
from enrollment.face_cache import FaceCache, build_cache
from enrollment.lfw_protocol import held_out_identities
from enrollment.metrics import best_threshold
from enrollment.model_io import (
    autocast,
    embed,
    load_model,
    model_inputs,
    resolve_precision,
    save_model,
)
from enrollment.profiles import get_profile

GREY = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass
class TrainConfig:
    data: list[str]
    out_dir: str
    cache_dir: str
    pairs: str | None = None  # LFW pairs.txt: identities of folds 6-10 are excluded
    kind: str = "partialface"  # "partialface", "rgb" or "hfcf"
    profile: str = "partialface-paper"
    fixed_rank: tuple[int, int] | None = None  # the "vanilla" baseline: one rank only
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    epochs: int = 20
    uses_per_epoch: int = 3
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_steps: int = 200
    distill_weight: float = 1.0
    arcface_weight: float = 0.0
    arcface_scale: float = 32.0
    arcface_margin: float = 0.3
    greyscale_p: float = 0.2
    flip_p: float = 0.5
    shift_px: int = 3
    # random similarity jitter (p, max rotation in degrees, max relative scale change): the
    # alignment's own errors on real cameras, and views of each image the student has not seen
    affine_p: float = 0.0
    affine_degrees: float = 10.0
    affine_scale: float = 0.1
    # group DRO over the rank's subsets (Sagawa et al., ICLR 2020): step size of the
    # exponentiated-gradient update of the subsets' loss weights; 0 = plain mean (all equal)
    subset_dro: float = 0.0
    # feature distillation: an RGB model of the same architecture (trained by `--kind rgb`)
    # whose last-stage feature map on the same augmented face the student matches through a
    # learned 1x1 adapter (1 - cosine of the flattened maps), weighted by feature_weight; a
    # denser signal than the 128-d descriptor for a student that is short of data
    feature_teacher: str | None = None
    feature_weight: float = 0.0
    # mixup distillation: a share mixup_p of each batch is replaced by pixel mixtures of two
    # of its faces (weight uniform in [0, 1]), whose target is what an RGB model of the same
    # embedding space (trained by `--kind rgb` on the same teacher targets) embeds the mixed
    # face as, so that the student learns the teacher function off the training images too
    mixup_teacher: str | None = None
    mixup_p: float = 0.0
    # teacher-labelled mixtures (`privface mixtures`, enrollment.mixtures): a share mixtures_p
    # of each batch's samples is drawn from this file's blended photos, whose targets are the
    # dlib teacher's own descriptors of the blends (lifted like the real faces' targets)
    mixtures: str | None = None
    mixtures_p: float = 0.0
    # held-out accuracy per fixed subset every this many epochs (and at the last one); 0 =
    # never: six more validation passes, ~40 s of a 4-7 minute epoch on 2 cores
    subset_val_every: int = 1
    val_identities: int = 60
    seed: int = 0
    limit_identities: int | None = None
    threads: int | None = None
    workers: int = 2
    init: str | None = None  # model file to start from (warm restart), not a checkpoint
    # "fp32", "bf16" or "auto" (bf16 autocast where the CPU has AMX tiles or AVX512-BF16: the
    # shipped 32-256 network trains 1.8x faster on a Sapphire Rapids pair, 61 -> 108 img/s,
    # and 1.6x on a Zen 4 pair, 77 -> 122)
    precision: str = "auto"
    # torch.compile the student's training forward (inductor, fused CPU kernels): ~40-65 s
    # of compiling at the first step; 1.03x in fp32 on a 2-core AVX2 EPYC, 1.7x in bf16 on a
    # 2-core Zen 4 (bench/training_speed.py); validation and the frozen teachers stay eager
    compile: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        d["backbone"] = self.backbone.to_dict()
        return d


def excluded_identities(config: TrainConfig) -> set[str]:
    return held_out_identities(config.pairs) if config.pairs else set()


def load_training_data(config: TrainConfig) -> tuple[FaceCache, list[str]]:
    """All datasets merged, with test identities removed; identity names are prefixed per set."""
    excluded = excluded_identities(config)
    parts, names = [], []
    for root in config.data:
        cache = build_cache(
            root, config.cache_dir, workers=config.workers, limit_identities=config.limit_identities
        )
        keep = np.array([cache.identities[label] not in excluded for label in cache.labels])
        prefix = Path(root).name
        names_here = [f"{prefix}/{n}" for n in cache.identities]
        offset = len(names)
        names += names_here
        parts.append(
            FaceCache(
                images=cache.images[keep],
                labels=cache.labels[keep] + offset,
                identities=np.array(names_here),
                paths=cache.paths[keep],
                teacher=cache.teacher[keep],
                detected=cache.detected[keep],
            )
        )
    merged = FaceCache(
        images=np.concatenate([p.images for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        identities=np.array(names),
        paths=np.concatenate([p.paths for p in parts]),
        teacher=np.concatenate([p.teacher for p in parts]),
        detected=np.concatenate([p.detected for p in parts]),
    )
    return merged, names


def image_keys(data: FaceCache, names: list[str]) -> np.ndarray:
    """"dataset/Identity/file" of every image of ``load_training_data``'s merged cache."""
    prefixes = np.array([n.split("/", 1)[0] for n in names])
    return np.char.add(np.char.add(prefixes[data.labels], "/"), data.paths.astype(str))


def mixture_pool(config: TrainConfig) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(file paths, keys, labels) of the images a run of ``config`` trains on: test
    identities excluded, its held-out validation identities too (the same split)."""
    data, names = load_training_data(config)
    keys = image_keys(data, names)
    roots = {Path(r).name: Path(r) for r in config.data}
    paths = [str(roots[k.split("/", 1)[0]] / k.split("/", 1)[1]) for k in keys]
    keep = ~split_validation(data.labels, config.val_identities, config.seed)
    return [p for p, k in zip(paths, keep, strict=True) if k], keys[keep], data.labels[keep]


def build_mixture_set(
    config: TrainConfig, count: int, out: str, draw_seed: int | None = None,
    progress: bool = True,
) -> dict:
    """``count`` teacher-labelled mixtures of ``config``'s training images, written to
    ``out`` (``privface mixtures``); ``draw_seed`` (default: the run's seed, which sets the
    held-out split) draws the pairs, so another one makes a fresh set for the same run."""
    from enrollment import mixtures

    paths, keys, labels = mixture_pool(config)
    made = mixtures.build(paths, list(keys), labels, count,
                          seed=config.seed if draw_seed is None else draw_seed,
                          workers=config.workers, progress=progress)
    mixtures.save(made, out)
    return {"mixtures": count, "from_images": len(paths),
            "from_identities": int(len(np.unique(labels))), "out": out}


def load_mixture_targets(
    config: TrainConfig, keys: np.ndarray, allowed: np.ndarray, excluded: set[str]
):
    """(images, 128-d teacher descriptors) of the mixtures in ``config.mixtures`` whose two
    photos are both in ``keys[allowed]`` (this run's training images); refuses a file that
    mixes in an identity of the test folds."""
    from enrollment import mixtures

    made = mixtures.load(config.mixtures)
    ingredients = np.concatenate([made.keys_a, made.keys_b])
    people = {k.split("/")[1] for k in ingredients}
    if people & excluded:
        raise ValueError(f"--mixtures {config.mixtures}: mixes in test identities "
                         f"({sorted(people & excluded)[:3]}...)")
    ok = set(keys[allowed])
    use = np.array([a in ok and b in ok for a, b in zip(made.keys_a, made.keys_b, strict=True)])
    if not use.any():
        raise ValueError(f"--mixtures {config.mixtures}: no mixture of this run's training images")
    return made.images[use], made.teacher[use]


def split_validation(labels: np.ndarray, n_val: int, seed: int) -> np.ndarray:
    """Boolean mask of held-out images: all images of n_val identities with >= 2 images."""
    ids, counts = np.unique(labels, return_counts=True)
    multi = ids[counts >= 2]
    rng = np.random.default_rng(seed + 7)
    size = min(n_val, len(multi) // 5)
    if size < 2:  # impostor pairs need two identities
        return np.zeros(len(labels), dtype=bool)
    chosen = rng.choice(multi, size=size, replace=False)
    return np.isin(labels, chosen)


def validation_pairs(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """All genuine pairs of the held-out images and as many random impostor pairs."""
    genuine = [
        (i, j)
        for i in range(len(labels))
        for j in range(i + 1, len(labels))
        if labels[i] == labels[j]
    ]
    if len(np.unique(labels)) < 2:
        return np.zeros((0, 2), dtype=int), np.zeros(0, dtype=bool)
    rng = np.random.default_rng(seed + 11)
    impostor = []
    while len(impostor) < len(genuine):
        i, j = rng.integers(0, len(labels), 2)
        if labels[i] != labels[j]:
            impostor.append((i, j))
    pairs = np.array(genuine + impostor)
    same = np.array([True] * len(genuine) + [False] * len(impostor))
    return pairs, same


def lift_matrix(dim_in: int, dim_out: int, seed: int = 1234) -> torch.Tensor:
    """Fixed (dim_out, dim_in) map: orthonormal columns when lifting (cosines preserved
    exactly), orthonormal rows when projecting to a smaller embedding (tiny test models)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(max(dim_in, dim_out), min(dim_in, dim_out), generator=g))
    return q if dim_out >= dim_in else q.T


class ArcFace(nn.Module):
    """Additive angular margin softmax (Deng et al. 2019) over identity labels."""

    def __init__(self, dim: int, n_classes: int, scale: float, margin: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_classes, dim) * 0.01)
        self.scale, self.margin = scale, margin

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = nn.functional.linear(
            nn.functional.normalize(emb), nn.functional.normalize(self.weight)
        ).clamp(-1 + 1e-6, 1 - 1e-6)
        target = cos.gather(1, labels[:, None])
        theta = torch.acos(target)
        with_margin = torch.where(
            theta + self.margin < math.pi,
            torch.cos(theta + self.margin),
            target - self.margin * math.sin(self.margin),
        )
        logits = cos.scatter(1, labels[:, None], with_margin) * self.scale
        return nn.functional.cross_entropy(logits, labels)


def augment(images: np.ndarray, config: TrainConfig, rng: np.random.Generator) -> torch.Tensor:
    """Flip, small shift, and greyscale (colour missing) -> (N, 3, 112, 112) float [0, 255]."""
    x = images.astype(np.float32)
    flip = rng.random(len(x)) < config.flip_p
    x[flip] = x[flip, :, ::-1]
    if config.shift_px:
        out = np.empty_like(x)
        pad = np.pad(
            x, ((0, 0), (config.shift_px,) * 2, (config.shift_px,) * 2, (0, 0)), mode="edge"
        )
        offs = rng.integers(0, 2 * config.shift_px + 1, (len(x), 2))
        for i, (dy, dx) in enumerate(offs):
            out[i] = pad[i, dy : dy + 112, dx : dx + 112]
        x = out
    grey = rng.random(len(x)) < config.greyscale_p
    if grey.any():
        x[grey] = (x[grey] @ GREY)[..., None]
    out = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    # (no draw at all without jitter: earlier runs' random streams stay reproducible)
    jitter = np.flatnonzero(rng.random(len(x)) < config.affine_p) if config.affine_p else []
    if len(jitter):  # rotation and rescaling: the teacher's target stays the unperturbed one
        degrees = rng.uniform(-config.affine_degrees, config.affine_degrees, len(jitter))
        scales = rng.uniform(1 - config.affine_scale, 1 + config.affine_scale, len(jitter))
        out[jitter] = similarity_warp(out[jitter], degrees, scales)
    return out


def similarity_warp(faces: torch.Tensor, degrees: np.ndarray, scales: np.ndarray) -> torch.Tensor:
    """(N, C, H, W) faces rotated (counter-clockwise on screen) about the centre and scaled,
    bilinear, borders repeated."""
    angle = np.deg2rad(np.asarray(degrees, np.float64))
    scale = np.asarray(scales, np.float64)
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale  # output -> input coordinates
    theta = np.zeros((len(faces), 2, 3), np.float32)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    grid = nn.functional.affine_grid(torch.from_numpy(theta), list(faces.shape),
                                     align_corners=False)
    return nn.functional.grid_sample(faces, grid, mode="bilinear", padding_mode="border",
                                     align_corners=False)


def draw(n: int, config: TrainConfig, rng: np.random.Generator) -> np.ndarray | None:
    if config.kind != "partialface":
        return None
    if config.fixed_rank is not None:
        return np.tile(np.array(config.fixed_rank), (n, 1))
    p = get_profile(config.profile)
    return partialface.draw_ranks(n, rng, len(p.subsets), len(p.permutations))


def validate(
    model: Backbone, data: FaceCache, config: TrainConfig, pairs, same, subset: int | None = None
) -> float:
    """Accuracy at the best threshold on held-out identities, a random rank per image (or a
    random permutation of one fixed ``subset``)."""
    if len(pairs) == 0:
        return float("nan")
    rng = np.random.default_rng(config.seed + 99)
    faces = torch.from_numpy(data.images.astype(np.float32)).permute(0, 3, 1, 2)
    profile = get_profile(config.profile) if config.kind != "rgb" else None
    ranks = draw(len(faces), config, rng)
    if subset is not None and ranks is not None:
        ranks[:, 0] = subset
    aware = bool(model.config.subset_stems)
    x = model_inputs(faces, config.kind, profile, ranks, canonical=aware)
    e = embed(model, x, subsets=ranks[:, 0] if aware else None)
    scores = np.sum(e[pairs[:, 0]] * e[pairs[:, 1]], axis=1)
    return float(np.mean((scores >= best_threshold(scores, same)) == same))


def per_subset(config: TrainConfig) -> bool:
    """Whether a run's samples carry a random subset (partialface with random ranks)."""
    return config.kind == "partialface" and config.fixed_rank is None


def subset_losses(per_sample: torch.Tensor, subsets: np.ndarray, n_subsets: int):
    """(group mean losses (n_subsets,), presence mask): the mean loss of each subset's samples
    in a batch; absent subsets get 0 and False."""
    groups = torch.from_numpy(subsets).long()
    counts = torch.bincount(groups, minlength=n_subsets).to(per_sample.dtype)
    sums = torch.zeros(n_subsets, dtype=per_sample.dtype).index_add(0, groups, per_sample)
    present = counts > 0
    return sums / counts.clamp(min=1), present


def dro_step(
    weights: torch.Tensor, losses: torch.Tensor, present: torch.Tensor, eta: float
) -> torch.Tensor:
    """Group DRO's exponentiated-gradient step: subsets with a higher loss gain weight."""
    w = weights * torch.exp(eta * losses.detach() * present)
    return w / w.sum()


def robust_mean(losses: torch.Tensor, present: torch.Tensor, weights: torch.Tensor):
    """The weighted mean of the present subsets' losses (the plain mean for equal weights)."""
    w = weights * present
    return (w * losses).sum() / w.sum()


def frozen_rgb_model(path: str, flag: str) -> Backbone:
    """An RGB model (``--kind rgb``) to teach from, weights frozen, in eval mode."""
    teacher, info = load_model(path)
    if info["kind"] != "rgb":
        raise ValueError(f"{flag} {path}: a {info['kind']!r} model, not an RGB one")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def load_feature_teacher(path: str, student: BackboneConfig) -> Backbone:
    """The frozen RGB network whose last-stage features the student matches; its feature
    map must have the student's shape."""
    teacher = frozen_rgb_model(path, "--feature-teacher")
    shape = (teacher.config.widths[-1], teacher.config.output_side())
    if shape != (student.widths[-1], student.output_side()):
        raise ValueError(
            f"--feature-teacher {path}: feature map {shape} differs from the student's"
        )
    return teacher


def load_mixup_teacher(path: str, embedding_size: int) -> Backbone:
    """The frozen RGB network that labels mixed faces; it must embed into the student's space
    (same size: both were trained on the same lifted teacher targets)."""
    teacher = frozen_rgb_model(path, "--mixup-teacher")
    if teacher.config.embedding_size != embedding_size:
        raise ValueError(
            f"--mixup-teacher {path}: {teacher.config.embedding_size}-d embeddings, the "
            f"student's are {embedding_size}-d"
        )
    return teacher


def mix_faces(
    faces: torch.Tensor, p: float, rng: np.random.Generator
) -> tuple[torch.Tensor, np.ndarray]:
    """(faces with a share p replaced by lam * face + (1 - lam) * another face of the batch,
    indices of the mixed ones); lam uniform in [0, 1] per mixed face."""
    mixed = np.flatnonzero(rng.random(len(faces)) < p)
    if not len(mixed):
        return faces, mixed
    partners = rng.integers(0, len(faces), len(mixed))
    lam = torch.from_numpy(rng.uniform(0, 1, len(mixed)).astype(np.float32))[:, None, None, None]
    out = faces.clone()
    out[mixed] = lam * faces[mixed] + (1 - lam) * faces[partners]
    return out, mixed


def feature_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per sample, 1 - cosine between the flattened (adapted) student and teacher maps."""
    return 1 - nn.functional.cosine_similarity(
        student.float().flatten(1), teacher.float().flatten(1), dim=1
    )


def lr_at(step: int, total: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def split_stem(model: Backbone, n_subsets: int) -> Backbone:
    """A per-subset-stem copy of a shared-stem model that computes exactly what it does on
    the permutation 0 of every rank: every subset's stem starts as the shared one, and a
    warm restart then lets each specialise on its own frequencies."""
    cfg = BackboneConfig.from_dict({**model.config.to_dict(), "subset_stems": n_subsets})
    out = Backbone(cfg)
    state = dict(model.state_dict())
    shared = state.pop("stem.0.weight")
    state["stem.0.weight"] = shared.repeat(n_subsets, 1, 1, 1)
    out.load_state_dict(state)
    return out.eval()


def widen(model: Backbone, widths: tuple[int, ...], seed: int = 0) -> Backbone:
    """A wider copy of ``model`` (same depth, strides and head) that computes exactly what it
    computes (Net2WiderNet): each new channel copies a random old channel of its stage, and
    every layer reading a copied channel splits that channel's weight between the copies.

    The splits are random shares that sum to one, not equal halves, so the function is kept
    exactly (copies carry identical activations, in training mode too: identical batch
    statistics) but the copies' gradients differ from the first step on; equal halves would
    keep them identical forever.  A warm restart then trains the extra width from a trained
    start: a wide model from scratch (48-384: ~7.5 min per epoch on a 2-core Zen 4) does not
    fit the ~2-hour training budget.
    """
    old = model.config
    if old.subset_stems:
        raise ValueError("widening a model with per-subset stems is not supported")
    if len(widths) != len(old.widths) or any(
        n < o for n, o in zip(widths, old.widths, strict=True)
    ):
        raise ValueError(f"widths {tuple(widths)} do not widen {old.widths} stage by stage")
    cfg = BackboneConfig.from_dict({**old.to_dict(), "widths": tuple(widths)})
    new = Backbone(cfg)
    gen = torch.Generator().manual_seed(seed)

    def mapping(c_old: int, c_new: int) -> torch.Tensor:
        extra = torch.randint(0, c_old, (c_new - c_old,), generator=gen)
        return torch.cat([torch.arange(c_old), extra])

    def shares(g: torch.Tensor) -> torch.Tensor:
        """Per new channel, its share of its old channel (the shares of copies sum to 1)."""
        raw = 1 + 0.2 * (torch.rand(len(g), generator=gen) - 0.5)
        totals = torch.zeros(int(g.max()) + 1).index_add(0, g, raw)
        return raw / totals[g]

    def conv(dst: nn.Conv2d, src: nn.Conv2d, g_out: torch.Tensor, g_in: torch.Tensor | None):
        w = src.weight[g_out]
        if g_in is not None:
            w = w[:, g_in] * shares(g_in)[None, :, None, None]
        dst.weight.copy_(w)

    def per_channel(dst: nn.Module, src: nn.Module, g: torch.Tensor) -> None:
        for name, t in src.state_dict().items():
            dst.state_dict()[name].copy_(t[g] if t.ndim else t)

    c_stem = old.stem_width or old.widths[0]
    g_stem = mapping(c_stem, cfg.stem_width or cfg.widths[0])
    with torch.no_grad():
        conv(new.stem[0], model.stem[0], g_stem, None)
        per_channel(new.stem[1], model.stem[1], g_stem)
        per_channel(new.stem[2], model.stem[2], g_stem)
        g_in, blocks = g_stem, iter(zip(new.body, model.body, strict=True))
        for c_old, c_new, n in zip(old.widths, cfg.widths, old.blocks, strict=True):
            g = mapping(c_old, c_new)
            for _ in range(n):
                dst, src = next(blocks)
                per_channel(dst.body[0], src.body[0], g_in)
                conv(dst.body[1], src.body[1], g, g_in)
                for i in (2, 3, 5):
                    per_channel(dst.body[i], src.body[i], g)
                conv(dst.body[4], src.body[4], g, g)
                if isinstance(src.shortcut, nn.Sequential):
                    conv(dst.shortcut[0], src.shortcut[0], g, g_in)
                    per_channel(dst.shortcut[1], src.shortcut[1], g)
                g_in = g
        per_channel(new.head[0], model.head[0], g_in)
        lin, src_lin = new.head[3], model.head[3]
        side2 = cfg.output_side() ** 2
        w = src_lin.weight.reshape(len(src_lin.weight), -1, side2)[:, g_in]
        lin.weight.copy_((w * shares(g_in)[None, :, None]).reshape(len(w), -1))
        lin.bias.copy_(src_lin.bias)
        new.head[4].load_state_dict(model.head[4].state_dict())  # the embedding: unchanged
    return new.eval()


def model_forward(model: Backbone):
    """The training forward: the last-stage features (for feature distillation) and the
    embedding, in one call so that a compiled version fuses both."""

    def forward(x: torch.Tensor, subsets: torch.Tensor | None):
        feat = model.features(x, subsets)
        return feat, model.head(feat)

    return forward


def compiled_forward(model: Backbone):
    """``model_forward`` under torch.compile. Every training batch has the same shape (the
    last partial batch is dropped), so it compiles once; eval mode (validation) calls the
    module itself, uncompiled, so no recompilation happens there either."""
    return torch.compile(model_forward(model))


def channels_last_trainable(config: BackboneConfig) -> bool:
    """Whether to train in channels-last: only when every width is a multiple of 16.

    torch 2.13's CPU backward of a stride-2 residual unit with 8 or 12 channels at 56 x 56
    in channels-last corrupts the heap on an AVX-512 CPU (AMD EPYC with AVX-512, reproduced
    outside the project: ``free(): invalid next size``, then a segmentation fault); 16, 24
    and the shipped 32-256 widths train correctly there, and every width does on AVX2-only
    CPUs.  Narrow networks train in the default layout instead: slower, never wrong.
    """
    return all(w % 16 == 0 for w in config.widths)


def train(config: TrainConfig, progress: bool = True) -> dict:
    """Train (or resume) into ``out_dir``; returns the final summary."""
    if config.feature_teacher and config.feature_weight <= 0:
        raise ValueError("a feature teacher needs a positive feature weight (--feature-weight)")
    if config.backbone.subset_stems and (
        not per_subset(config)
        or config.backbone.subset_stems != len(get_profile(config.profile).subsets)
    ):
        raise ValueError(
            "per-subset stems need random ranks of a PartialFace profile, one stem per subset"
        )
    if (config.mixup_p > 0) != bool(config.mixup_teacher):
        raise ValueError("mixup needs both a teacher for the mixed faces (--mixup-teacher) and "
                         "a positive share (--mixup-p)")
    if (config.mixtures_p > 0) != bool(config.mixtures):
        raise ValueError("teacher-labelled mixtures need both a file (--mixtures) and a positive "
                         "share (--mixtures-p)")
    if config.compile and not channels_last_trainable(config.backbone):
        # checked before any data is loaded (the widths are config.backbone's: --init must
        # match them). inductor lays convolutions out channels-last by itself, and torch
        # 2.13's backward of such narrow ones crashes on AVX-512 CPUs (seen: a Zen 4 pair,
        # widths 8-16)
        raise ValueError("--compile needs every width a multiple of 16 (narrower convolutions "
                         "crash torch 2.13's compiled backward on AVX-512 CPUs)")
    if config.threads:
        torch.set_num_threads(config.threads)
    precision = resolve_precision(config.precision)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    data, names = load_training_data(config)
    val_mask = split_validation(data.labels, config.val_identities, config.seed)
    train_idx = np.flatnonzero(~val_mask)
    val = FaceCache(
        *(
            getattr(data, f)[val_mask] if f != "identities" else data.identities
            for f in FaceCache.__dataclass_fields__
        )
    )
    val_pairs, val_same = validation_pairs(val.labels, config.seed)

    teacher = data.teacher[train_idx]
    mean = teacher.mean(axis=0)
    lift = lift_matrix(teacher.shape[1], config.backbone.embedding_size)

    def lifted(descriptors: np.ndarray) -> torch.Tensor:
        """The student's targets: teacher descriptors centred, unit, lifted to its size."""
        centred = descriptors - mean
        centred /= np.linalg.norm(centred, axis=1, keepdims=True) + 1e-8
        return nn.functional.normalize(torch.from_numpy(centred).float() @ lift.T, dim=1)

    targets = lifted(data.teacher)
    mix_images = mix_targets = None
    if config.mixtures:
        mix_images, mix_desc = load_mixture_targets(
            config, image_keys(data, names), ~val_mask, excluded_identities(config)
        )
        mix_targets = lifted(mix_desc)

    # ArcFace classes: training identities with at least two training images.
    ids, counts = np.unique(data.labels[train_idx], return_counts=True)
    classes = {int(i): k for k, i in enumerate(ids[counts >= 2])}
    class_of = np.array([classes.get(int(lab), -1) for lab in data.labels])

    n_subsets = len(get_profile(config.profile).subsets) if per_subset(config) else 0
    dro_weights = (
        torch.full((n_subsets,), 1.0 / n_subsets, dtype=torch.float64) if n_subsets else None
    )

    in_ch = {"partialface": 27, "rgb": 3, "hfcf": 71}[config.kind]
    bcfg = BackboneConfig.from_dict({**config.backbone.to_dict(), "in_channels": in_ch})
    model = Backbone(bcfg)
    if channels_last_trainable(bcfg):
        # oneDNN's convolutions run ~1.3x faster in that layout on the CPUs measured
        model = model.to(memory_format=torch.channels_last)
    arcface = ArcFace(
        bcfg.embedding_size, max(len(classes), 1), config.arcface_scale, config.arcface_margin
    )
    feat_teacher = adapter = None
    if config.feature_teacher:
        feat_teacher = load_feature_teacher(config.feature_teacher, bcfg)  # channels-last
        adapter = nn.Conv2d(bcfg.widths[-1], bcfg.widths[-1], 1, bias=False)
        if channels_last_trainable(bcfg):
            adapter = adapter.to(memory_format=torch.channels_last)
    mix_teacher = (  # frozen, channels-last as load_model returns it (no backward through it)
        load_mixup_teacher(config.mixup_teacher, bcfg.embedding_size)
        if config.mixup_teacher else None
    )
    forward = compiled_forward(model) if config.compile else model_forward(model)
    decay, no_decay = [], []
    for module in [model, arcface] + ([adapter] if adapter is not None else []):
        for p in module.parameters():
            (no_decay if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.SGD(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.lr,
        momentum=config.momentum,
        nesterov=True,
    )
    steps_per_epoch = len(train_idx) * config.uses_per_epoch // config.batch_size
    total = steps_per_epoch * config.epochs
    start_epoch, step = 0, 0
    ckpt_path = out / "checkpoint.pt"
    log_path = out / "log.jsonl"
    if config.init and not ckpt_path.exists():
        start_from, info = load_model(config.init, check_profile=False)  # weights only
        if bcfg.subset_stems and not start_from.config.subset_stems:
            start_from = split_stem(start_from, bcfg.subset_stems)
        if start_from.config.widths != bcfg.widths and (
            start_from.config.to_dict() | {"widths": bcfg.widths} == bcfg.to_dict()
        ):  # a wider run from a narrower model: the same function, with room to grow
            start_from = widen(start_from, bcfg.widths, config.seed)
        if start_from.config.to_dict() != bcfg.to_dict() or info["kind"] != config.kind:
            raise ValueError(
                f"--init {config.init}: its architecture/kind ({info['kind']}, "
                f"{start_from.config.to_dict()}) differs from this run's ({config.kind}, "
                f"{bcfg.to_dict()})"
            )
        model.load_state_dict(start_from.state_dict())
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["model"])
        arcface.load_state_dict(ckpt["arcface"])
        if adapter is not None and ckpt.get("adapter") is not None:
            adapter.load_state_dict(ckpt["adapter"])
        opt.load_state_dict(ckpt["optimizer"])
        start_epoch, step = ckpt["epoch"], ckpt["step"]
        if ckpt.get("dro_weights") is not None:
            dro_weights = ckpt["dro_weights"]
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    summary = {
        "parameters": count_parameters(model),
        "train_images": int(len(train_idx)),
        "train_identities": int(len(np.unique(data.labels[train_idx]))),
        "arcface_classes": len(classes),
        "val_images": int(val_mask.sum()),
        "val_pairs": int(len(val_pairs)),
        "precision": precision,
    }
    if mix_images is not None:
        summary["mixtures"] = int(len(mix_images))
    for epoch in range(start_epoch, config.epochs):
        rng = np.random.default_rng([config.seed, epoch])
        order = rng.permutation(np.repeat(train_idx, config.uses_per_epoch))
        model.train()
        arcface.train()
        t0 = time.time()
        sums = {"loss": 0.0, "distill": 0.0, "arcface": 0.0}
        if feat_teacher is not None:
            sums["feature"] = 0.0
        subset_sums, subset_counts = np.zeros(n_subsets), np.zeros(n_subsets)
        mixed_loss, mixed_count = 0.0, 0
        blend_loss, blend_count = 0.0, 0
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {epoch + 1}/{config.epochs}",
            disable=not progress,
            unit="batch",
        )
        for b in bar:
            idx = order[b * config.batch_size : (b + 1) * config.batch_size]
            images, want = data.images[idx], targets[idx]
            blended = np.zeros(0, dtype=int)  # samples replaced by teacher-labelled mixtures
            if mix_images is not None:
                blended = np.flatnonzero(rng.random(len(idx)) < config.mixtures_p)
                pick = rng.integers(0, len(mix_images), len(blended))
                images, want = images.copy(), want.clone()
                images[blended], want[blended] = mix_images[pick], mix_targets[pick]
            faces = augment(images, config, rng)
            mixed = np.zeros(0, dtype=int)
            if mix_teacher is not None:
                faces, mixed = mix_faces(faces, config.mixup_p, rng)
                if len(mixed):
                    with torch.no_grad(), autocast(precision):
                        labelled_mix = mix_teacher(model_inputs(faces[mixed], "rgb", None))
                    want = want.clone()
                    want[mixed] = nn.functional.normalize(labelled_mix.float(), dim=1)
            ranks = draw(len(idx), config, rng)
            x = model_inputs(
                faces,
                config.kind,
                get_profile(config.profile) if config.kind != "rgb" else None,
                ranks,
                canonical=bool(bcfg.subset_stems),
            )
            subsets = torch.from_numpy(ranks[:, 0]) if bcfg.subset_stems else None
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, config)
            # NCHW in: standardised there (in fp32), channels-last from the stem on; weights,
            # optimiser and losses stay fp32, convolutions run in bf16 under autocast.
            with autocast(precision):
                feat, emb = forward(x, subsets)
            emb = emb.float()
            per_sample = 1 - nn.functional.cosine_similarity(emb, want)
            real = np.ones(len(idx), dtype=bool)  # not mixed
            real[mixed] = False
            real[blended] = False
            mixed_loss += per_sample[mixed].sum().item()
            mixed_count += len(mixed)
            unmixed = np.setdiff1d(blended, mixed)  # blends the batch mixup left alone
            blend_loss += per_sample[unmixed].sum().item()
            blend_count += len(unmixed)
            distill = per_sample.mean()
            # what the log reports either way: the real faces' loss, comparable across runs
            plain = per_sample[real].mean() if real.any() else distill
            if n_subsets:
                group, present = subset_losses(per_sample.double(), ranks[:, 0], n_subsets)
                subset_sums += (group * present).detach().numpy()
                subset_counts += present.numpy()
                if config.subset_dro > 0:
                    dro_weights = dro_step(dro_weights, group, present, config.subset_dro)
                    distill = robust_mean(group, present, dro_weights).float()
            loss = config.distill_weight * distill
            if feat_teacher is not None:
                with torch.no_grad(), autocast(precision):
                    wanted = feat_teacher.features(model_inputs(faces, "rgb", None))
                with autocast(precision):
                    matched = feature_loss(adapter(feat), wanted).mean()
                loss = loss + config.feature_weight * matched
                sums["feature"] += matched.item()
            arc = torch.zeros(())
            labelled = torch.from_numpy(class_of[idx])
            mask = (labelled >= 0) & torch.from_numpy(real)  # a mixed face has no identity
            if config.arcface_weight > 0 and mask.any():
                arc = arcface(emb[mask], labelled[mask])
                loss = loss + config.arcface_weight * arc
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            sums["loss"] += loss.item()
            sums["distill"] += plain.item()
            sums["arcface"] += arc.item()
            if b % 10 == 0:
                bar.set_postfix(
                    loss=f"{sums['loss'] / (b + 1):.4f}", lr=f"{lr_at(step, total, config):.4f}"
                )
        bar.close()
        val_acc = validate(model, val, config, val_pairs, val_same)
        record = {
            "epoch": epoch + 1,
            "step": step,
            **{k: v / max(steps_per_epoch, 1) for k, v in sums.items()},
            "val_accuracy": val_acc,
        }
        if mix_teacher is not None:  # per mixed face, and their share of the samples
            record["mixed_distill"] = mixed_loss / max(mixed_count, 1)
            record["mixed_share"] = mixed_count / max(steps_per_epoch * config.batch_size, 1)
        if mix_images is not None:  # per teacher-labelled mixture, and their share
            record["blend_distill"] = blend_loss / max(blend_count, 1)
            record["blend_share"] = blend_count / max(steps_per_epoch * config.batch_size, 1)
        if n_subsets:  # the subset balance: training loss and held-out accuracy per subset
            record["distill_by_subset"] = (subset_sums / np.maximum(subset_counts, 1)).tolist()
            every, last = config.subset_val_every, epoch + 1 == config.epochs
            if every > 0 and ((epoch + 1) % every == 0 or last):
                record["val_accuracy_by_subset"] = [
                    validate(model, val, config, val_pairs, val_same, subset=s)
                    for s in range(n_subsets)
                ]
            if config.subset_dro > 0:
                record["dro_weights"] = dro_weights.tolist()
        record |= {
            "seconds": time.time() - t0,
            "img_per_s": steps_per_epoch * config.batch_size / (time.time() - t0),
        }
        with log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if progress:
            print(json.dumps(record), flush=True)
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save(
            {
                "model": model.state_dict(),
                "arcface": arcface.state_dict(),
                "optimizer": opt.state_dict(),
                "epoch": epoch + 1,
                "step": step,
                "dro_weights": dro_weights,
                "adapter": adapter.state_dict() if adapter is not None else None,
            },
            tmp,
        )
        os.replace(tmp, ckpt_path)
        summary["last"] = record
    summary["teacher_mean"] = mean.tolist()
    profile = config.profile if config.kind != "rgb" else None
    save_model(
        out / "model.pt",
        model,
        config.kind,
        profile,
        {
            "train": config.to_dict(),
            "summary": {k: v for k, v in summary.items() if k != "teacher_mean"},
        },
    )
    return summary
