"""What the server gains by averaging each view over every permutation of its subset.

The server reads a view's rank off the view (``enrollment.rank_inference``), so it can embed
the view under all six permutations of its subset and average (``Settings.
average_permutations``, on by default) instead of embedding the one permutation the client
drew. Both ways are measured on the same draw of subsets and permutations per image (the
face and its mirror share one subset, as the client sends them), for every image of the
people of LFW folds 6-10:

* LFW verification, folds 6-10: accuracy (threshold cross-validated over the folds), TAR at
  FAR 1e-3;
* 1:N identification (method.md §7: first image enrolled, others mated probes, single-image
  people non-mated): rank-1, rank-5, FNIR at FPIR 0.01;
* the decision threshold: FAR 1e-3 from ~300k random different-person pairs of protected
  templates (one gallery key), and the false-match rate at the threshold the model file
  carries.

The model runs under ONNX Runtime fp32 (BatchNorm folded; the service's default runtime);
scores are cosines, or with ``--score-centring`` centred with the model file's cohort
against the file's threshold for centred scores, as the service's ``score_centring`` does.

    python bench/permutation_averaging.py --seeds 0,1 \
        --json bench/results/permutation-averaging.json
"""

from __future__ import annotations

import _threads  # first: sets the BLAS thread count before numpy is imported

THREADS = _threads.THREADS

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _lfw

from enrollment import evaluation as ev
from enrollment import identity_mapping as im
from enrollment import onnx_runtime, partialface, rank_inference, whitening
from enrollment.lfw_protocol import held_out_pairs
from enrollment.metrics import (
    cross_validated_accuracy,
    identification,
    tar_at_far,
    threshold_at_far,
)
from enrollment.model_io import model_inputs

MODES = ("as sent", "averaged over the permutations")


def embeddings(
    graph, profile, cache, idx: np.ndarray, seed: int, subset: int | None = None,
    whiten: whitening.Whitening | None = None,
) -> dict[str, np.ndarray]:
    """Per image: the sum of its two views as sent, and of its two views under every
    permutation of their subset (both unit-normalised, then whitened as the service does
    when the model file carries a whitening); ``subset``: every image's."""
    rng = np.random.default_rng(seed)
    n_perm = len(profile.permutations)
    order = torch.from_numpy(rank_inference.permutation_orders(profile))
    drawn = partialface.draw_view_ranks(len(idx), 2, rng, len(profile.subsets), n_perm)
    drawn = drawn.reshape(len(idx), 2, 2)
    if subset is not None:
        drawn[:, :, 0] = subset
    sent, averaged = [], []
    what = f"seed {seed}" + ("" if subset is None else f", subset {subset}")
    for i in tqdm(range(0, len(idx), 64), desc=f"embed {what}", unit="batch"):
        chunk = slice(i, i + 64)
        faces = torch.from_numpy(cache.images[idx[chunk]].astype(np.float32)).permute(0, 3, 1, 2)
        e_sent = e_avg = 0
        for v, view in enumerate((faces, faces.flip(-1))):
            ranks = drawn[chunk, v]
            canon = model_inputs(view, "partialface", profile, ranks, canonical=True)
            x = canon[:, order].reshape(-1, *canon.shape[1:])
            e = graph.embed(x.numpy(), None, batch_size=64).reshape(len(view), n_perm, -1)
            e_sent = e_sent + e[np.arange(len(view)), ranks[:, 1]]
            e_avg = e_avg + e.sum(axis=1)
        sent.append(e_sent)
        averaged.append(e_avg)
    out = {}
    for mode, parts in zip(MODES, (sent, averaged), strict=True):
        e = np.concatenate(parts).astype(np.float64)
        out[mode] = whitening.apply(e / np.linalg.norm(e, axis=1, keepdims=True), whiten)
    return out


def verification(e: np.ndarray, idx: np.ndarray, cache, pairs, cohort=None) -> dict:
    """LFW folds 6-10 accuracy and TAR at FAR 1e-3 of embeddings ``e`` of images ``idx``,
    scored as the service scores (centred with the model file's cohort, if any)."""
    pos = {int(j): k for k, j in enumerate(idx)}
    where = cache.index()
    a = np.array([pos[where[p.path_a]] for p in pairs])
    b = np.array([pos[where[p.path_b]] for p in pairs])
    scores = ev.pair_scores(e[a], e[b], cohort)
    same = np.array([p.same for p in pairs])
    acc, std, _ = cross_validated_accuracy(scores, same, np.array([p.fold for p in pairs]))
    tar, _ = tar_at_far(scores, same, 1e-3)
    return {"accuracy": acc, "accuracy_std": std, "tar_at_far_1e-3": tar}


def measure(e: np.ndarray, cache, idx, pairs, split, shipped: float, seed: int,
            cohort=None) -> dict:
    pos = {int(j): k for k, j in enumerate(idx)}
    g = np.array([pos[int(j)] for j in split["gallery"]])
    p = np.array([pos[int(j)] for j in split["probes"]])
    m = ev.cohort_means(e, cohort)
    sims = e[p] @ e[g].T - 0.5 * (m[p][:, None] + m[g][None])
    ident = identification(sims, cache.labels[split["gallery"]],
                           cache.labels[split["probes"]], split["mated"])
    # the threshold, on protected templates under one gallery key (what the service scores)
    key = im.derive_key(ev.MAPPING_SECRET, "gallery:eval:v1")
    t = im.protect(e, key)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    mt = ev.cohort_means(t, cohort, key)
    names = cache.labels[idx]
    rng = np.random.default_rng(seed)
    i, j = rng.integers(0, len(idx), (2, 300_000))
    keep = names[i] != names[j]
    i, j = i[keep], j[keep]
    impostor = np.sum(t[i] * t[j], axis=1) - 0.5 * (mt[i] + mt[j])
    return {
        **verification(e, idx, cache, pairs, cohort),
        "rank1": ident["rank1"],
        "rank5": ident["rank5"],
        "fnir_at_fpir_0.01": ident["fnir_at_fpir_0.01"],
        "impostor_pairs": int(keep.sum()),
        "threshold_far_1e-3": threshold_at_far(impostor, 1e-3),
        "far_at_shipped_threshold": float(np.mean(impostor >= shipped)),
    }


def main() -> None:
    ap = _lfw.parser(__doc__)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--score-centring", action="store_true",
                    help="centre the scores with the model file's cohort (the service's "
                         "score_centring; default off, as there)")
    ap.add_argument("--fixed-subsets", action="store_true",
                    help="instead: LFW verification with every image under one subset, per "
                         "subset (the spread), seed = the first of --seeds")
    args = ap.parse_args()
    pairs_txt, cache, model, info, profile = _lfw.load(args)
    cohort = info["cohort"] if args.score_centring else None
    meta = info.get("meta") or {}
    shipped = float(meta["threshold_far_1e-3_centred" if cohort else "threshold_far_1e-3"])
    graph = onnx_runtime.OnnxModel.of(model, args.threads)
    split = ev.identification_split(cache, pairs_txt)
    idx = np.unique(np.concatenate([split["gallery"], split["probes"]]))
    pairs = held_out_pairs(pairs_txt)
    out = {"model": args.model, "images": int(len(idx)), "shipped_threshold": shipped,
           "threads": args.threads, "date": time.strftime("%Y-%m-%d %H:%M"), "seeds": {}}
    if args.fixed_subsets:
        fixed_subsets(args, graph, profile, cache, pairs, out, info["whitening"], cohort)
        return
    for seed in (int(s) for s in args.seeds.split(",")):
        start = time.perf_counter()
        e = embeddings(graph, profile, cache, idx, seed, whiten=info["whitening"])
        out["seeds"][str(seed)] = {
            mode: measure(e[mode], cache, idx, pairs, split, shipped, seed, cohort)
            for mode in MODES
        }
        out["seeds"][str(seed)]["seconds"] = time.perf_counter() - start
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))
    keys = ("accuracy", "tar_at_far_1e-3", "rank1", "rank5", "fnir_at_fpir_0.01",
            "threshold_far_1e-3", "far_at_shipped_threshold")
    out["mean"] = {mode: {k: float(np.mean([r[mode][k] for r in out["seeds"].values()]))
                          for k in keys} for mode in MODES}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"{'mean over seeds ' + args.seeds:<34}" + "".join(f"{k:>20}" for k in keys))
    for mode in MODES:
        print(f"{mode:<34}" + "".join(f"{out['mean'][mode][k]:>20.4f}" for k in keys))


def fixed_subsets(
    args, graph, profile, cache, pairs, out: dict, whiten: whitening.Whitening | None = None,
    cohort=None,
) -> None:
    """Accuracy per fixed subset both ways, and the spread (max - min) across subsets."""
    where = cache.index()
    idx = np.unique([where[p.path_a] for p in pairs] + [where[p.path_b] for p in pairs])
    seed = int(args.seeds.split(",")[0])
    out.update(images=int(len(idx)), seed=seed, subsets={})
    for s in range(len(profile.subsets)):
        e = embeddings(graph, profile, cache, idx, seed, subset=s, whiten=whiten)
        out["subsets"][str(s)] = {m: verification(e[m], idx, cache, pairs, cohort)
                                  for m in MODES}
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))
    out["spread"] = {}
    for m in MODES:
        acc = [r[m]["accuracy"] for r in out["subsets"].values()]
        out["spread"][m] = max(acc) - min(acc)
        print(f"{m:<34}" + "".join(f"{a * 100:>8.2f}" for a in acc)
              + f"   spread {out['spread'][m] * 100:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
