"""What post-hoc normalisation of the embeddings and scores buys the protected model.

Fitted on LFW training-split people only (identities outside folds 6-10), measured on LFW
folds 6-10 for several draws of the random ranks (the face and its mirror share one subset,
as the client sends them; views as sent, no permutation averaging):

* power whitening (``enrollment.whitening``, ``privface whiten``): the cohort's mean removed,
  its top ``dims`` principal directions each divided by (std) ** ``power``;
* adaptive symmetric score normalisation (AS-norm, top-K): each score standardised by the
  mean and std of the K highest scores of either side against the training-split cohort;
  not in the service (its standard-deviation half is not an inner product);
* cohort score centring (``enrollment.score_centring``, what the service does): each score
  less half of either side's mean top-k cosine against k-means centroids of the whitened
  cohort — the service's 1,000 centroids / top 20, and the 6,922 faces themselves / top 100.

Reported per variant: verification accuracy (threshold cross-validated over the folds), TAR
at FAR 1e-3, and for a few variants 1:N rank-1 (method.md §7) and the accuracy after the
gallery identity mapping averaged over six gallery keys (the service scores mapped
templates). Every image of LFW is embedded once per draw (~6.5 minutes per draw on 2 cores;
``--embeddings DIR`` keeps the raw embeddings of each draw there and reuses them: they
depend on the weights and the seed only).

    python bench/score_normalisation.py --seeds 0,1,2 --embeddings /tmp/lfw-raw \
        --json bench/results/score-normalisation.json --plot docs/score-normalisation.png
"""

from __future__ import annotations

import _threads  # first: sets the BLAS thread count before numpy is imported

THREADS = _threads.THREADS

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _lfw

from enrollment import evaluation as ev
from enrollment import identity_mapping as im
from enrollment import score_centring, whitening
from enrollment.lfw_protocol import held_out_identities
from enrollment.metrics import cross_validated_accuracy, identification, tar_at_far

GRID_DIMS = (64, 96, 128)
GRID_POWERS = (0.25, 0.5, 0.75, 1.0)
AS_NORM_K = (50, 100, 200)
CHOSEN = (128, 0.5)  # privface whiten's defaults
CENTRING = (1000, 20)  # privface whiten's defaults: centroids, top k
MAPPING_KEYS = 6


def as_norm(scores: np.ndarray, probe_cohort: np.ndarray, ref_cohort: np.ndarray,
            k: int) -> np.ndarray:
    """AS-norm of a score array (..., ) given each side's scores against the cohort."""
    def stats(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        top = np.partition(c, -k, axis=1)[:, -k:]
        return top.mean(axis=1), top.std(axis=1)

    mp, sp = stats(probe_cohort)
    mr, sr = stats(ref_cohort)
    if scores.ndim == 1:
        return 0.5 * ((scores - mp) / sp + (scores - mr) / sr)
    return 0.5 * ((scores - mp[:, None]) / sp[:, None] + (scores - mr[None]) / sr[None])


def main() -> int:
    ap = _lfw.parser(__doc__)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--plot")
    ap.add_argument("--embeddings", help="folder to keep and reuse each draw's raw embeddings")
    args = ap.parse_args()
    pairs_txt, cache, _, _, _ = _lfw.load(args)
    a, b, same, folds = _lfw.pair_arrays(pairs_txt, cache)
    test_people = held_out_identities(pairs_txt)
    ident = np.array([p.split("/")[0] for p in cache.paths])
    cohort = np.flatnonzero(~np.isin(ident, list(test_people)))
    split = ev.identification_split(cache, pairs_txt)
    g, p, mated = split["gallery"], split["probes"], split["mated"]
    keys = [im.derive_key(ev.MAPPING_SECRET, f"gallery:eval:v{k}") for k in range(MAPPING_KEYS)]

    def verify(s: np.ndarray) -> dict:
        return {"accuracy": cross_validated_accuracy(s, same, folds)[0],
                "tar_at_far_1e-3": tar_at_far(s, same, 1e-3)[0]}

    def mapped(e: np.ndarray, cohort: score_centring.Cohort | None = None) -> float:
        accs = []
        for key in keys:
            t = score_centring.unit(im.protect(e.astype(np.float32), key).astype(np.float64))
            s = np.sum(t[a] * t[b], 1)
            if cohort is not None:  # the cohort under the same key, as the service does
                m = score_centring.cohort_means(t, score_centring.centroids_under(cohort, key),
                                                cohort.k)
                s = score_centring.centre(s, m[a], m[b])
            accs.append(cross_validated_accuracy(s, same, folds)[0])
        return float(np.mean(accs))

    def rank1(sims: np.ndarray) -> float:
        return identification(sims, cache.labels[g], cache.labels[p], mated)["rank1"]

    per_seed: dict[str, dict] = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        kept = Path(args.embeddings or ".") / f"raw-seed{seed}.npy"
        if args.embeddings and kept.exists():
            e = np.load(kept)
        else:
            e = ev.model_embedder(args.model, cache, seed, whiten=False)(np.arange(len(ident)))
            if args.embeddings:
                kept.parent.mkdir(parents=True, exist_ok=True)
                np.save(kept, e.astype(np.float32))
        e = e.astype(np.float64)
        rows: dict[str, dict] = {}
        chosen = None
        for name, x in [("raw", e)] + [
            (f"whiten {d} / {pw:g}", whitening.apply(e, whitening.fit(e[cohort], d, pw)))
            for d in GRID_DIMS for pw in GRID_POWERS
        ]:
            rows[name] = verify(np.sum(x[a] * x[b], 1))
            if name == "raw" or name == f"whiten {CHOSEN[0]} / {CHOSEN[1]:g}":
                rows[name]["gallery_key_accuracy"] = mapped(x)
                rows[name]["rank1"] = rank1(x[p] @ x[g].T)
            if name == f"whiten {CHOSEN[0]} / {CHOSEN[1]:g}":
                chosen = x
        s = np.sum(chosen[a] * chosen[b], 1)
        for name, centring in (
            ("whiten + centring", score_centring.fit(chosen[cohort], *CENTRING, seed=0)),
            ("whiten + centring, faces / 100", score_centring.Cohort(
                chosen[cohort].astype(np.float32), 100, len(cohort))),
        ):
            m = score_centring.cohort_means(chosen, centring.centroids, centring.k)
            rows[name] = verify(score_centring.centre(s, m[a], m[b]))
            rows[name]["gallery_key_accuracy"] = mapped(chosen, centring)
            rows[name]["rank1"] = rank1(score_centring.centre(
                chosen[p] @ chosen[g].T, m[p][:, None], m[g][None]))
        for base, x in (("raw", e), ("whitened", chosen)):
            cs = x @ x[cohort].T  # every image against the cohort
            s = np.sum(x[a] * x[b], 1)
            for k in AS_NORM_K:
                row = verify(as_norm(s, cs[a], cs[b], k))
                if k == 100:
                    row["rank1"] = rank1(as_norm(x[p] @ x[g].T, cs[p], cs[g], k))
                rows[f"AS-norm {k}" + ("" if base == "raw" else " (whitened)")] = row
        per_seed[str(seed)] = rows
        print(f"seed {seed}: raw {rows['raw']['accuracy']:.4f}, whitened "
              f"{rows[f'whiten {CHOSEN[0]} / {CHOSEN[1]:g}']['accuracy']:.4f}", flush=True)

    names = list(next(iter(per_seed.values())))
    mean = {n: {m: float(np.mean([r[n][m] for r in per_seed.values()]))
                for m in per_seed[next(iter(per_seed))][n]} for n in names}
    print(f"\nmean over {len(per_seed)} draws of the ranks (LFW folds 6-10, views as sent)")
    print(f"{'variant':<28}{'accuracy':>10}{'TAR@1e-3':>10}{'gallery key':>13}{'rank-1':>8}")
    for n in names:
        r = mean[n]
        gk = f"{r['gallery_key_accuracy'] * 100:.2f}" if "gallery_key_accuracy" in r else ""
        r1 = f"{r['rank1'] * 100:.1f}" if "rank1" in r else ""
        print(f"{n:<28}{r['accuracy'] * 100:>10.2f}{r['tar_at_far_1e-3'] * 100:>10.1f}"
              f"{gk:>13}{r1:>8}")
    out = {"model": args.model, "seeds": list(per_seed), "cohort_images": int(len(cohort)),
           "mapping_keys": MAPPING_KEYS, "mean": mean, "per_seed": per_seed}
    if args.json:
        ev.write_json(args.json, out)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4.5))
        for d in GRID_DIMS:
            ax.plot(GRID_POWERS, [mean[f"whiten {d} / {pw:g}"]["accuracy"] * 100
                                  for pw in GRID_POWERS], marker="o", label=f"whiten, {d} dims")
        ax.axhline(mean["raw"]["accuracy"] * 100, color="k", ls="--", label="raw embeddings")
        ax.axhline(mean["AS-norm 100"]["accuracy"] * 100, color="grey", ls=":",
                   label="AS-norm, top 100 (raw)")
        ax.axhline(mean["whiten + centring"]["accuracy"] * 100, color="tab:red", ls="-.",
                   label="whiten 128 / 0.5 + score centring (served)")
        ax.set_xlabel("whitening power (each direction / std ** power)")
        ax.set_ylabel("LFW folds 6-10 accuracy, %")
        ax.set_title(f"Protected model, mean of {len(per_seed)} rank draws")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
