"""Subset-conditional centring, measured: does removing each subset's mean embedding before
the whitening help?

The server reads a view's subset off the view (``rank_inference``), so it can subtract a mean
per subset, fitted once on training-split faces, from every view's embedding: whatever the
subset itself adds to an embedding (a direction shared by all faces seen through it) is then
gone before two faces seen through *different* subsets are compared, which is what a random
rank does to most genuine pairs. The whitening is refitted on the centred cohort. Compared on
the same rank draws with the model file's own whitening and with a whitening refitted on the
same cohort without the centring (so the cohort's size is not what differs).

    python bench/subset_centring.py --cohort 3000 --seeds 0,1,2 \\
        --json bench/results/subset-centring.json
"""

from __future__ import annotations

import json
from pathlib import Path

import _lfw
import numpy as np

from enrollment import evaluation as ev
from enrollment import model_io, rank_inference, whitening


class SubsetMeans:
    """The view embedder ``evaluation.embed`` is swapped for: each view's embedding minus its
    subset's mean (read off the view, as the server does) when ``means`` is set; with
    ``collect`` on, it sums the raw view embeddings per subset instead."""

    def __init__(self, profile) -> None:
        self.profile = profile
        self.means: np.ndarray | None = None
        self.collect = False
        self.sums = np.zeros((len(profile.subsets), 0))
        self.counts = np.zeros(len(profile.subsets))

    def __call__(self, model, inputs, batch_size=256, precision="fp32", subsets=None):
        e = model_io.embed(model, inputs, batch_size, precision, subsets)
        if self.collect or self.means is not None:
            ranks, _ = rank_inference.infer_ranks(inputs, self.profile)
            s = ranks[:, 0]
        if self.collect:
            if self.sums.shape[1] != e.shape[1]:
                self.sums = np.zeros((len(self.counts), e.shape[1]))
            np.add.at(self.sums, s, e)
            np.add.at(self.counts, s, 1)
        if self.means is not None:
            e = (e - self.means[s]).astype(e.dtype)
        return e

    def fitted(self) -> np.ndarray:
        return self.sums / self.counts[:, None]


def whitened(embedder: ev.Embedder, w: whitening.Whitening) -> ev.Embedder:
    return lambda idx: whitening.apply(embedder(idx), w)


if __name__ == "__main__":
    ap = _lfw.parser(__doc__)
    ap.add_argument("--cohort", type=int, default=3000, help="training-split images")
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args()
    pairs, cache, _, info, profile = _lfw.load(args)
    seeds = [int(s) for s in args.seeds.split(",")]
    train = ev.training_split(cache, pairs)
    cohort = np.sort(np.random.default_rng(0).choice(train, args.cohort, replace=False))
    hook = SubsetMeans(profile)
    ev.embed = hook
    w_file = info["whitening"]
    dims, power = w_file.dims, w_file.power

    # the cohort as the client sends it (one random subset per face, seed 0), raw
    hook.collect = True
    raw = ev.model_embedder(args.model, cache, 0, whiten=False)(cohort)
    hook.collect = False
    hook.means = hook.fitted()
    centred = ev.model_embedder(args.model, cache, 0, whiten=False)(cohort)
    w_global = whitening.fit(raw, dims, power)
    w_centred = whitening.fit(centred, dims, power)
    norms = np.linalg.norm(hook.means, axis=1)
    print("subset mean norms", np.round(norms, 3), "views per subset", hook.counts)

    rows = []
    for seed in seeds:
        hook.means = None
        plain = ev.model_embedder(args.model, cache, seed, whiten=False)
        row = {"seed": seed,
               "file_whitening": ev.verification(whitened(plain, w_file), cache, pairs),
               "refitted_whitening": ev.verification(whitened(plain, w_global), cache, pairs)}
        hook.means = hook.fitted()
        cen = ev.model_embedder(args.model, cache, seed, whiten=False)
        row["subset_centred"] = ev.verification(whitened(cen, w_centred), cache, pairs)
        for k in ("file_whitening", "refitted_whitening", "subset_centred"):
            row[k] = {m: row[k][m] for m in ("accuracy", "accuracy_std", "tar_at_far_1e-3")}
        rows.append(row)
        print(seed, "  ".join(f"{k} {100 * row[k]['accuracy']:.2f} "
                              f"(TAR {100 * row[k]['tar_at_far_1e-3']:.1f})"
                              for k in ("file_whitening", "refitted_whitening",
                                        "subset_centred")), flush=True)
    mean = {k: float(np.mean([r[k]["accuracy"] for r in rows]))
            for k in ("file_whitening", "refitted_whitening", "subset_centred")}
    print("mean", {k: round(100 * v, 2) for k, v in mean.items()})
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"model": args.model, "cohort": args.cohort, "dims": dims, "power": power,
             "subset_mean_norms": norms.tolist(), "per_seed": rows, "mean": mean}, indent=2))
