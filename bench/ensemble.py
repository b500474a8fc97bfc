"""Score-level ensembles of protected models, measured: do two networks that read the same
protected views agree on their errors?

Each member embeds the same views (the same seed draws the same subset and permutations for
every member), whitened with its own file's whitening; the ensemble's embedding is the
members' unit embeddings concatenated, member i scaled by sqrt(w_i), so its cosine is the
w-weighted mean of the members' cosines. Every member's own accuracy is measured on the same
draws, so the gain is a difference within one run. LFW folds 6-10, views as sent.

    python bench/ensemble.py --models enrollment/weights/partialface-balanced.pt M2.pt \\
        --seeds 0,1,2 --json bench/results/ensemble.json
    # with --subsets: every fixed subset too, and the spread of their means

A model trained on another partition reads any subset of the same shape (the paper-profile
model embedded the balanced ranks at 93.93%): ``--relabel SRC DST PROFILE`` writes a copy of
SRC that declares PROFILE (whitening and thresholds dropped; ``privface whiten --model DST``
fits its whitening on that profile's inputs).
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import _lfw
import numpy as np
import torch

from enrollment import evaluation as ev
from enrollment.model_io import load_model


def ensemble(members: list[ev.Embedder], weights: list[float]) -> ev.Embedder:
    """Concatenated member embeddings, member i scaled by sqrt(w_i / sum w): the cosine of
    two such embeddings is the weighted mean of the members' cosines."""
    total = float(sum(weights))

    def run(indices: np.ndarray) -> np.ndarray:
        parts = [np.sqrt(w / total) * m(indices) for m, w in zip(members, weights, strict=True)]
        return np.concatenate(parts, axis=1)

    return run


def measure(models: list[str], weights: list[float], cache, pairs: str, seed: int,
            subset: int | None) -> dict:
    """Every member's accuracy, and every ensemble of two or more members' (named by the
    members' indices, e.g. ``ensemble_0+2``; all members: ``ensemble``), on one draw."""
    members = [ev.model_embedder(m, cache, seed, subset=subset) for m in models]
    out = {f"member_{i}": ev.verification(e, cache, pairs)["accuracy"]
           for i, e in enumerate(members)}
    n = len(members)
    for size in range(2, n + 1):
        for combo in itertools.combinations(range(n), size):
            v = ev.verification(ensemble([members[i] for i in combo],
                                         [weights[i] for i in combo]), cache, pairs)
            name = "ensemble" if size == n else "ensemble_" + "+".join(map(str, combo))
            out[name] = v["accuracy"]
            out[name + "_tar_at_far_1e-3"] = v["tar_at_far_1e-3"]
    return out


def relabel(src: str, dst: str, profile: str) -> None:
    """A copy of a model file that reads ``profile``'s protected input, without whitening."""
    from enrollment.model_io import relabel as relabel_file
    from enrollment.model_io import set_whitening

    relabel_file(src, dst, profile)
    set_whitening(dst, None)


def summary(rows: list[dict]) -> dict:
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(_lfw.DATA))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    ap.add_argument("--relabel", nargs=3, metavar=("SRC", "DST", "PROFILE"))
    ap.add_argument("--models", nargs="+",
                    help="model files (same protection profile; their own whitening each)")
    ap.add_argument("--weights", default=None, help="comma-separated, default all 1")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--subsets", action="store_true", help="also every fixed subset")
    args = ap.parse_args()
    if args.relabel:
        relabel(*args.relabel)
        raise SystemExit(0)
    if not args.models:
        ap.error("--models (or --relabel) is required")
    torch.set_num_threads(args.threads)
    weights = [float(w) for w in args.weights.split(",")] if args.weights else [1.0] * len(
        args.models)
    seeds = [int(s) for s in args.seeds.split(",")]
    cache = ev.lfw_cache(Path(args.data) / "lfw", _lfw.CACHE)
    pairs = str(Path(args.data) / "lfw" / "pairs.txt")
    profiles = {load_model(m)[1]["profile"] for m in args.models}
    if len(profiles) != 1:
        raise SystemExit(f"the members must read the same protected input, not {profiles}")

    result = {"models": args.models, "weights": weights, "seeds": seeds, "variants": {}}
    for name, subset in [("protected", None)] + (
            [(f"subset_{s}", s) for s in range(6)] if args.subsets else []):
        rows = [measure(args.models, weights, cache, pairs, s, subset) for s in seeds]
        result["variants"][name] = {"per_seed": rows, "mean": summary(rows)}
        m = result["variants"][name]["mean"]
        print(f"{name:10s} " + "  ".join(
            f"{k} {100 * v:.2f}" for k, v in m.items()), flush=True)
    if args.subsets:
        keys = [k for k in result["variants"]["subset_0"]["mean"] if "tar" not in k]
        for key in keys:
            means = [result["variants"][f"subset_{s}"]["mean"][key] for s in range(6)]
            result[f"spread_{key}"] = float(max(means) - min(means))
            print(f"spread {key}: {100 * result[f'spread_{key}']:.2f} points")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
