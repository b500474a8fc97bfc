"""The whitening's cohort, measured: does a larger cohort of training faces fit a better
whitening?

``privface whiten`` fits on the 6,922 LFW training-split images, one random rank each. A
whitening estimates 128 directions and their spreads from those embeddings; more faces (the
CelebA training set, identity-cleaned of the test people) and more rank draws of the same
faces give it more to estimate from. Each candidate cohort is fitted with the model file's
dims and power and compared on the same rank draws (LFW folds 6-10, views as sent) with the
file's own whitening.

    python bench/whitening_cohort.py --seeds 0,1,2 --json bench/results/whitening-cohort.json
"""

from __future__ import annotations

import json
from pathlib import Path

import _lfw
import numpy as np

from enrollment import evaluation as ev
from enrollment import whitening
from enrollment.face_cache import build_cache

if __name__ == "__main__":
    ap = _lfw.parser(__doc__)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--cohort-draws", type=int, default=2,
                    help="rank draws of each cohort face for the multi-draw cohorts")
    args = ap.parse_args()
    pairs, cache, _, info, _ = _lfw.load(args)
    seeds = [int(s) for s in args.seeds.split(",")]
    celeba = build_cache(Path(args.data) / "celeba" / "celeba-crops", _lfw.CACHE)
    train = ev.training_split(cache, pairs)
    every = np.arange(len(celeba.labels))
    w_file = info["whitening"]
    dims, power = w_file.dims, w_file.power

    lfw_raw = [ev.model_embedder(args.model, cache, 100 + d, whiten=False)(train)
               for d in range(args.cohort_draws)]
    celeba_raw = [ev.model_embedder(args.model, celeba, 100 + d, whiten=False)(every)
                  for d in range(args.cohort_draws)]
    cohorts = {
        "lfw": lfw_raw[0],
        "lfw+celeba": np.concatenate([lfw_raw[0], celeba_raw[0]]),
        f"lfw x{args.cohort_draws}": np.concatenate(lfw_raw),
        f"lfw+celeba x{args.cohort_draws}": np.concatenate(lfw_raw + celeba_raw),
    }
    fitted = {"file": w_file} | {k: whitening.fit(v, dims, power) for k, v in cohorts.items()}
    sizes = {"file": w_file.cohort} | {k: len(v) for k, v in cohorts.items()}

    rows = []
    for seed in seeds:
        raw = ev.model_embedder(args.model, cache, seed, whiten=False)
        row = {"seed": seed}
        for name, w in fitted.items():
            v = ev.verification(lambda idx, w=w, raw=raw: whitening.apply(raw(idx), w),
                                cache, pairs)
            row[name] = {m: v[m] for m in ("accuracy", "accuracy_std", "tar_at_far_1e-3")}
        rows.append(row)
        print(seed, "  ".join(f"{k} {100 * row[k]['accuracy']:.2f}" for k in fitted),
              flush=True)
    mean = {k: float(np.mean([r[k]["accuracy"] for r in rows])) for k in fitted}
    tar = {k: float(np.mean([r[k]["tar_at_far_1e-3"] for r in rows])) for k in fitted}
    print(f"{'cohort':22s} {'images':>7s} {'accuracy %':>10s} {'TAR@1e-3 %':>10s}")
    for k in fitted:
        print(f"{k:22s} {sizes[k]:7d} {100 * mean[k]:10.2f} {100 * tar[k]:10.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"model": args.model, "dims": dims, "power": power, "cohort_sizes": sizes,
             "per_seed": rows, "mean_accuracy": mean, "mean_tar_at_far_1e-3": tar},
            indent=2))
