"""Is a PartialFace query's rank hidden from the server?  How often the rank (subset and
permutation) of a protected input is read off the input itself: the channel energy profiles
against analytic templates (``enrollment.rank_inference``), against the white-box guess the
project used before (the rank whose no-learning inverse has the least total variation) as
the baseline, in the same run, on the same inputs.

Every LFW image (13,233; aligned by the project's pipeline, cached), a random rank each,
float16 as on the wire; colour, greyscale (Cb = Cr = 0) and mirrored faces.  The
least-total-variation baseline costs 36 inverses per face, so it runs on the first
``--tv-faces`` faces of the colour condition only.

    PRIVFACE_BENCH_CACHE=~/.cache/privface python bench/rank_inference.py \
        --json bench/results/rank-inference.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from enrollment import evaluation as ev
from enrollment import partialface as pf
from enrollment import rank_inference as ri
from enrollment.profiles import get_profile
from enrollment.training import GREY

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CACHE = Path(os.environ.get("PRIVFACE_BENCH_CACHE", "~/.cache/privface")).expanduser()


def least_tv(x: np.ndarray, profile) -> tuple[int, int]:
    """The earlier white-box guess: the rank whose inverse is smoothest."""
    best = None
    for s in range(len(profile.subsets)):
        for p in range(len(profile.permutations)):
            rgb = pf.inverse(x[None], profile.rank_channels(s, p), profile.factor)[0]
            tv = np.abs(np.diff(rgb, axis=1)).mean() + np.abs(np.diff(rgb, axis=2)).mean()
            if best is None or tv < best[0]:
                best = (tv, (s, p))
    return best[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--profile", default="partialface-paper")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=0, help="first N images only (0: all)")
    ap.add_argument("--tv-faces", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    profile = get_profile(args.profile)
    cache = ev.lfw_cache(Path(args.data) / "lfw", CACHE)
    images = cache.images[: args.limit or None]
    rng = np.random.default_rng(args.seed)
    results: dict = {}
    for condition in ("colour", "greyscale", "mirror"):
        ok, margins, took = 0, [], 0.0
        first = None
        for start in tqdm(range(0, len(images), 500), desc=condition, unit="chunk"):
            faces = images[start : start + 500].astype(np.float32)
            if condition == "greyscale":
                faces = np.repeat((faces @ GREY)[..., None], 3, axis=-1)
            elif condition == "mirror":
                faces = faces[:, :, ::-1]
            ranks = pf.draw_ranks(len(faces), rng)
            x = pf.protect(faces, ranks).astype(np.float16)
            t0 = time.perf_counter()
            found, margin = ri.infer_ranks(x, profile)
            took += time.perf_counter() - t0
            ok += int((found == ranks).all(axis=1).sum())
            margins.append(margin)
            if first is None:
                first = (x, ranks)
        m = np.concatenate(margins)
        row = {
            "faces": len(images),
            "rank_accuracy": ok / len(images),
            "wrong": len(images) - ok,
            "margin_min": float(m.min()),
            "margin_1st_percentile": float(np.percentile(m, 1)),
            "margin_median": float(np.median(m)),
            "ms_per_face": 1000 * took / len(images),
        }
        if condition == "colour" and args.tv_faces:
            x, ranks = first
            n = min(args.tv_faces, len(x))
            guesses = np.array([least_tv(x[i].astype(np.float32), profile)
                                for i in tqdm(range(n), desc="least-TV baseline")])
            row["least_tv_baseline"] = {
                "faces": n,
                "rank_accuracy": float((guesses == ranks[:n]).all(axis=1).mean()),
                "subset_accuracy": float((guesses[:, 0] == ranks[:n, 0]).mean()),
                "chance_rank": 1 / profile.n_ranks,
                "chance_subset": 1 / len(profile.subsets),
            }
        results[condition] = row
    print(f"{'condition':10s} {'faces':>6s} {'rank right':>11s} {'wrong':>6s} "
          f"{'margin min':>10s} {'p1':>6s} {'median':>7s} {'ms/face':>8s}")
    for name, r in results.items():
        print(f"{name:10s} {r['faces']:6d} {100 * r['rank_accuracy']:10.2f}% {r['wrong']:6d} "
              f"{r['margin_min']:10.3f} {r['margin_1st_percentile']:6.3f} "
              f"{r['margin_median']:7.3f} {r['ms_per_face']:8.3f}")
    tv = results["colour"].get("least_tv_baseline")
    if tv:
        print(f"baseline, least total variation ({tv['faces']} colour faces): rank "
              f"{100 * tv['rank_accuracy']:.1f}% (chance {100 * tv['chance_rank']:.1f}%), "
              f"subset {100 * tv['subset_accuracy']:.1f}% (chance "
              f"{100 * tv['chance_subset']:.1f}%)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(
            {"note": __doc__.splitlines()[0], "profile": args.profile, "seed": args.seed,
             "results": results}, indent=1))


if __name__ == "__main__":
    main()
