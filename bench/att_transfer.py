"""How the model file's LFW-calibrated thresholds transfer to another population (AT&T).

Every one of AT&T's 400 images (40 people, greyscale, one lab) is aligned with the project's
pipeline and embedded as the client sends it (face + mirror, one random subset, seed 0),
then mapped to protected templates under one gallery key, as the service scores them. For
plain (whitened) cosine scores and for cohort-centred scores (``score_centring``), over all
79,800 pairs: the false-match rate and the genuine-match rate at the threshold the model
file carries for that scale (calibrated at FAR 1e-3 on LFW folds 6-10), AT&T's own TAR at
FAR 1e-3 (separation, whatever the threshold), and the mean cohort mean of AT&T's faces
and of the LFW folds 6-10 people's (the population the thresholds were calibrated on).

    python bench/att_transfer.py --json bench/results/att-transfer.json
"""

from __future__ import annotations

import _threads  # first: sets the BLAS thread count before numpy is imported

THREADS = _threads.THREADS

import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _lfw

from enrollment import evaluation as ev
from enrollment import identity_mapping as im
from enrollment.align import align_file
from enrollment.face_cache import FaceCache
from enrollment.lfw_protocol import held_out_identities
from enrollment.metrics import tar_at_far


def att_cache(root: Path) -> FaceCache:
    """AT&T aligned as the service's clients align (CNN detector where HOG misses)."""
    paths = [f"s{s}/{i}" for s in range(1, 41) for i in range(1, 11)]
    images = np.stack([align_file(root / f"{p}.pgm", cnn_fallback=True).image
                       for p in tqdm(paths, desc="align AT&T", unit="img")])
    return FaceCache(images, np.repeat(np.arange(40), 10),
                     np.array([f"s{s}" for s in range(1, 41)]), np.array(paths),
                     np.zeros((len(paths), 128), np.float32), np.ones(len(paths), bool))


def main() -> int:
    ap = _lfw.parser(__doc__)
    args = ap.parse_args()
    pairs_txt, lfw, _, info, _ = _lfw.load(args)
    meta = info["meta"]
    cache = att_cache(Path(args.data) / "att_faces")
    key = im.derive_key(ev.MAPPING_SECRET, "gallery:eval:v1")
    iu = np.triu_indices(len(cache.labels), 1)
    genuine = cache.labels[iu[0]] == cache.labels[iu[1]]
    out = {"model": args.model, "images": len(cache.labels), "pairs": int(len(genuine)),
           "genuine_pairs": int(genuine.sum())}
    print(f"{'scores':<10}{'threshold':>10}{'FMR':>10}{'TMR':>8}{'own TAR@1e-3':>14}"
          f"{'cohort mean':>13}")
    for name, centre, threshold in (
        ("plain", False, meta.get("threshold_far_1e-3")),
        ("centred", True, meta.get("threshold_far_1e-3_centred")),
    ):
        if threshold is None:
            print(f"{name}: the model file has no threshold for it; skipped")
            continue
        embedder = ev.model_embedder(args.model, cache, 0, centre=centre)
        e = embedder(np.arange(len(cache.labels)))
        t = im.protect(e, key)
        t /= np.linalg.norm(t, axis=1, keepdims=True)
        m = ev.cohort_means(t, ev.cohort_of(embedder), key)
        s = (t @ t.T)[iu] - 0.5 * (m[iu[0]] + m[iu[1]])
        row = {"threshold": float(threshold),
               "fmr_at_threshold": float(np.mean(s[~genuine] >= threshold)),
               "tmr_at_threshold": float(np.mean(s[genuine] >= threshold)),
               "tar_at_far_1e-3": float(tar_at_far(s, genuine, 1e-3)[0]),
               "cohort_mean": float(m.mean())}
        if centre:  # the population the threshold was calibrated on, for contrast
            people = held_out_identities(pairs_txt)
            idx = np.flatnonzero([p.split("/")[0] in people for p in lfw.paths])
            lt = im.protect(ev.model_embedder(args.model, lfw, 0)(idx), key)
            lt /= np.linalg.norm(lt, axis=1, keepdims=True)
            row["cohort_mean_lfw_test_people"] = float(
                ev.cohort_means(lt, ev.cohort_of(embedder), key).mean())
        out[name] = row
        print(f"{name:<10}{row['threshold']:>10.4f}{row['fmr_at_threshold']:>10.2e}"
              f"{row['tmr_at_threshold'] * 100:>8.1f}{row['tar_at_far_1e-3'] * 100:>14.1f}"
              f"{row['cohort_mean']:>13.3f}")
    if args.json:
        ev.write_json(args.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
