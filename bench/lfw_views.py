"""How a face's views should be protected: LFW folds 6-10 accuracy of the protected model for
one view, face + mirror with independent subsets (what the client sent before), face + mirror
sharing one subset (what it sends now), and more permutations of the one subset.

A mirror image carries the face's own frequencies (map (u, v) mirrored, times (-1)^v), so two
subsets on the two views hand the server 18 of the 54 kept coefficients per plane of a face;
this measures what sharing the subset costs.  Baseline: one view, same draw.  Every scheme
uses the same draw of subsets and permutations per image.

    PRIVFACE_BENCH_CACHE=~/.cache/privface python bench/lfw_views.py \
        --json bench/results/lfw-views.json
"""

from __future__ import annotations

import json
from pathlib import Path

import _lfw
import numpy as np
import torch
from tqdm import tqdm

from enrollment import evaluation as ev
from enrollment.lfw_protocol import held_out_pairs
from enrollment.model_io import embed, model_inputs

#: scheme -> views, each (mirrored?, which subset draw, which permutation draw)
SCHEMES = {
    "one view": [(False, 0, 0)],
    "face + mirror, independent subsets": [(False, 0, 0), (True, 1, 1)],
    "face + mirror, one subset": [(False, 0, 0), (True, 0, 1)],
    "face, two permutations of one subset": [(False, 0, 0), (False, 0, 2)],
    "face + mirror x two permutations, one subset": [
        (False, 0, 0), (True, 0, 1), (False, 0, 2), (True, 0, 3)
    ],
}


def main() -> None:
    ap = _lfw.parser(__doc__)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    pairs_txt, cache, model, info, profile = _lfw.load(args)
    where = cache.index()
    pairs = held_out_pairs(pairs_txt)
    idx = np.unique([where[p.path_a] for p in pairs] + [where[p.path_b] for p in pairs])
    faces = torch.from_numpy(cache.images[idx].astype(np.float32)).permute(0, 3, 1, 2)
    rng = np.random.default_rng(args.seed)
    subsets = rng.integers(0, len(profile.subsets), (2, len(idx)))
    perms = rng.integers(0, len(profile.permutations), (4, len(idx)))
    views = sorted({v for vs in SCHEMES.values() for v in vs})
    emb = {}
    for mirrored, s, p in tqdm(views, desc="views", unit="view"):
        x = faces.flip(-1) if mirrored else faces
        ranks = np.stack([subsets[s], perms[p]], 1)
        emb[mirrored, s, p] = np.concatenate([
            embed(model, model_inputs(x[i : i + 256], "partialface", profile, ranks[i : i + 256]))
            for i in range(0, len(idx), 256)
        ])
    row_of = {int(j): i for i, j in enumerate(idx)}
    results = {}
    for name, vs in SCHEMES.items():
        total = sum(emb[v] for v in vs)
        total = total / np.linalg.norm(total, axis=1, keepdims=True)
        r = ev.verification(lambda ind, t=total: t[[row_of[int(j)] for j in ind]], cache,
                            pairs_txt)
        results[name] = {"views": len(vs), "accuracy": r["accuracy"],
                         "accuracy_std": r["accuracy_std"], "tar_at_far_1e-3": r["tar_at_far_1e-3"]}
    base = results["one view"]["accuracy"]

    def cos(a, b):
        return float(np.mean(np.sum(a * b, axis=1)))

    similarity = {
        "same view, other permutation": cos(emb[False, 0, 0], emb[False, 0, 2]),
        "mirror, same subset": cos(emb[False, 0, 0], emb[True, 0, 1]),
        "mirror, other subset": cos(emb[False, 0, 0], emb[True, 1, 1]),
    }
    print(f"{'scheme':<46}{'views':>6}{'accuracy %':>12}{'std':>7}{'TAR@1e-3 %':>12}"
          f"{'vs 1 view':>11}")
    for name, r in results.items():
        print(f"{name:<46}{r['views']:>6}{100 * r['accuracy']:>12.2f}"
              f"{100 * r['accuracy_std']:>7.2f}{100 * r['tar_at_far_1e-3']:>12.1f}"
              f"{100 * (r['accuracy'] - base):>+11.2f}")
    for name, c in similarity.items():
        print(f"mean cosine to the face view: {name}: {c:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"model": args.model, "seed": args.seed, "images": int(len(idx)),
             "schemes": results, "cosine_to_face_view": similarity}, indent=2))


if __name__ == "__main__":
    main()
