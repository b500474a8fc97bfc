"""How much each PartialFace subset tells about a face, and a partition that evens it out.

At f = 8 a DCT block spans less than one source pixel, so every channel is a 3x3 stencil of the
112 x 112 face (method.md §1) and the 9 channels of one subset can duplicate each other: the
paper's subsets are not equally informative, and the shipped model's fixed-subset accuracies
say so (subset 4 lowest in every model trained so far).  The measure here is the Gaussian
mutual information per pixel between the face and one subset's 27 coefficients under white
noise of ``--noise`` grey levels on the RGB face (plus the float16 wire rounding):
1/2 log2 det(Sigma_face + Sigma_noise) - 1/2 log2 det(Sigma_noise) over the subset's channels,
covariances measured on aligned training-split faces.  It is invariant to each channel's
scale, as the model is (it standardises every channel).  A local search then finds the
partition whose *least* informative subset carries the most (the worst subset decides the
spread), and the table compares it with the paper's.
"""

from __future__ import annotations

import json
from pathlib import Path

import _lfw
import numpy as np
import torch
from tqdm import tqdm

from enrollment.partialface import KEPT, SUBSETS, full_transform


def channel_covariance(images: np.ndarray, batch: int = 16) -> np.ndarray:
    """(192, 192) second-moment matrix of the full transform's channels over faces and pixels
    (channels are zero-mean: every kept coefficient is a high-pass stencil)."""
    acc = torch.zeros(192, 192, dtype=torch.float64)
    count = 0
    for i in tqdm(range(0, len(images), batch), desc="covariance", leave=False):
        x = torch.from_numpy(full_transform(images[i : i + batch]))  # (n, 192, 112, 112)
        x = x.permute(0, 2, 3, 1).reshape(-1, 192).double()
        acc += x.T @ x
        count += x.shape[0]
    return (acc / count).numpy()


def subset_channels(subset: tuple[int, ...]) -> np.ndarray:
    ks = np.array([KEPT[p] for p in subset])
    return np.concatenate([ks, 64 + ks, 128 + ks])


def with_wire_rounding(signal: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """``noise`` plus the float16 rounding of the wire: relative 2^-11, uniform, so variance
    x^2 2^-22 / 3 on each coefficient."""
    return noise + np.diag(np.diag(signal + noise) * 2.0**-22 / 3)


def gaussian_bits(signal: np.ndarray, noise: np.ndarray) -> float:
    """Mutual information in bits between a Gaussian signal and it plus independent noise."""
    return 0.5 * (np.linalg.slogdet(signal + noise)[1] - np.linalg.slogdet(noise)[1]) / np.log(2)


def information(subset, signal: np.ndarray, noise: np.ndarray) -> float:
    """Bits per pixel one subset's 27 channels carry about the face (Gaussian channel)."""
    c = subset_channels(subset)
    return gaussian_bits(signal[np.ix_(c, c)], noise[np.ix_(c, c)])


def signal_and_noise(data: str, faces: int, grey_levels: float) -> tuple[np.ndarray, ...]:
    """(signal, noise) covariances of the 192 channels: ``faces`` training-split faces, and
    white noise of ``grey_levels`` on the RGB face plus the wire's float16 rounding."""
    signal = channel_covariance(_lfw.training_split_faces(data, faces))
    rng = np.random.default_rng(1)
    noise = grey_levels**2 * channel_covariance(rng.standard_normal((64, 112, 112, 3)) + 128.0)
    return signal, with_wire_rounding(signal, noise)


def balanced_partition(score, n_subsets: int = 6, size: int = 9, restarts: int = 8,
                       seed: int = 0, start=None) -> tuple[tuple[int, ...], ...]:
    """Swap positions between subsets while the least informative subset gains (ties: the
    spread shrinks); the best of ``restarts`` random starts (and ``start``).  Each subset is
    returned sorted."""
    rng = np.random.default_rng(seed)
    best, best_key = None, None
    starts = [np.array(start)] if start is not None else []
    starts += [rng.permutation(n_subsets * size).reshape(n_subsets, size) for _ in range(restarts)]
    for part in tqdm(starts, desc="search", leave=False):
        part = part.copy()
        values = np.array([score(tuple(s)) for s in part])
        improved = True
        while improved:
            improved = False
            for a in np.argsort(values):  # the weakest subsets first
                for b in range(n_subsets):
                    if b == a:
                        continue
                    for i in range(size):
                        for j in range(size):
                            pa, pb = part[a].copy(), part[b].copy()
                            pa[i], pb[j] = part[b][j], part[a][i]
                            va, vb = score(tuple(pa)), score(tuple(pb))
                            new = values.copy()
                            new[a], new[b] = va, vb
                            if (new.min(), -np.ptp(new)) > (values.min() + 1e-9, -np.ptp(values)):
                                part[a], part[b], values = pa, pb, new
                                improved = True
        key = (values.min(), -np.ptp(values))
        if best_key is None or key > best_key:
            best, best_key = part.copy(), key
    order = np.argsort([-score(tuple(s)) for s in best])
    return tuple(tuple(sorted(int(p) for p in best[i])) for i in order)


def describe(subset) -> dict:
    uv = [divmod(KEPT[p], 8) for p in subset]
    return {
        "positions": list(subset),
        "uv": [list(t) for t in uv],
        "low_horizontal": sum(v <= 1 for _, v in uv),  # v <= 1: keeps horizontal edges
        "low_vertical": sum(u <= 1 for u, _ in uv),
    }


def main() -> None:
    ap = _lfw.parser(__doc__)
    ap.add_argument("--faces", type=int, default=400, help="training-split faces measured")
    ap.add_argument("--noise", type=float, default=1.0, help="white noise, grey levels (RGB)")
    ap.add_argument("--accuracy-json", default="bench/results/eval-lfw-subsets-whitened-draws.json",
                    help="measured fixed-subset accuracies of the paper's partition to compare")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    signal, noise = signal_and_noise(args.data, args.faces, args.noise)

    def score(s):
        return information(s, signal, noise)

    balanced = balanced_partition(score, start=SUBSETS)
    measured = None
    if Path(args.accuracy_json).exists():
        blob = json.loads(Path(args.accuracy_json).read_text())
        measured = [blob.get(f"subset_{i}", {}).get("accuracy") for i in range(6)]
    rows = {"paper": SUBSETS, "balanced": balanced}
    out = {"faces": args.faces, "noise_grey_levels": args.noise, "partitions": {}}
    for name, part in rows.items():
        bits = [score(s) for s in part]
        out["partitions"][name] = {
            "subsets": [
                describe(s) | {"bits_per_pixel": b} for s, b in zip(part, bits, strict=True)
            ],
            "min_bits": min(bits), "max_bits": max(bits), "spread_bits": max(bits) - min(bits),
        }
        print(f"\n{name} partition: bits per pixel about the face (noise {args.noise} grey levels)")
        print("subset | bits | v<=1 | u<=1 | accuracy (measured, paper only) | (u,v)")
        for i, (s, b) in enumerate(zip(part, bits, strict=True)):
            d = describe(s)
            acc = f"{100 * measured[i]:.2f}" if name == "paper" and measured and measured[i] else ""
            print(f"{i} | {b:.3f} | {d['low_horizontal']} | {d['low_vertical']} | {acc} | "
                  f"{' '.join(f'{u}{v}' for u, v in d['uv'])}")
        print(f"min {min(bits):.3f}  max {max(bits):.3f}  spread {max(bits) - min(bits):.3f}")
    if measured and all(m is not None for m in measured):
        bits = [score(s) for s in SUBSETS]
        rho = np.corrcoef(np.argsort(np.argsort(bits)), np.argsort(np.argsort(measured)))[0, 1]
        out["paper_rank_correlation_bits_vs_accuracy"] = float(rho)
        print(f"\nSpearman rank correlation, paper subsets' bits vs measured accuracy: {rho:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
