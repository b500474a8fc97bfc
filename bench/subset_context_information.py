"""What each PartialFace subset tells about a face when the model also sees the neighbours.

`partition_balance.py` measures a subset at one position (its 27 coefficients of one pixel)
and finds the balanced partition's six subsets equal to 0.1 bits; yet every model trained on
it recognises subset 5 worst, by ~0.8 points.  The network reads a neighbourhood, not a
pixel, and a subset whose channels are near-duplicate stencils *shifted* by a pixel carries
less in a neighbourhood than its one-pixel figure says.  This measures the Gaussian mutual
information between the face and a subset's coefficients over a k x k patch of positions
(27 k^2 dimensions; 1/2 log2 det(S + N) / det(N), per position of the patch), under the same
noise model (white RGB noise of ``--noise`` grey levels plus the float16 wire rounding), for
both partitions, beside their measured three-draw fixed-subset accuracies.
"""

from __future__ import annotations

import json
from pathlib import Path

import _lfw
import numpy as np
import torch
import torch.nn.functional as F
from partition_balance import gaussian_bits, subset_channels, with_wire_rounding
from tqdm import tqdm

from enrollment.partialface import BALANCED_SUBSETS_V1, SUBSETS, full_transform

PARTITIONS = {"paper": SUBSETS, "balanced": BALANCED_SUBSETS_V1}  # v1: what its JSON measured
ACCURACY = {  # three-draw fixed-subset means of the last model trained on each partition
    "paper": "bench/results/eval-lfw-subsets-whitened-draws.json",
    "balanced": "bench/results/eval-lfw-subsets-balanced-draws.json",
}


def patch_covariances(images: np.ndarray, k: int, stride: int, batch: int = 16) -> dict:
    """Second moments of every subset's k x k patches, {(partition, i): (27k^2, 27k^2)}."""
    keys = [(name, i) for name, part in PARTITIONS.items() for i in range(len(part))]
    acc = {key: torch.zeros(27 * k * k, 27 * k * k, dtype=torch.float64) for key in keys}
    count = 0
    for start in tqdm(range(0, len(images), batch), desc=f"{k}x{k} patches", leave=False):
        x = torch.from_numpy(full_transform(images[start : start + batch]))  # (n, 192, H, W)
        for name, i in keys:
            c = torch.from_numpy(subset_channels(PARTITIONS[name][i]))
            p = F.unfold(x[:, c], kernel_size=k, stride=stride)  # (n, 27 k^2, L)
            p = p.permute(0, 2, 1).reshape(-1, p.shape[1]).double()
            acc[(name, i)] += p.T @ p
        count += p.shape[0]
    return {key: (m / count).numpy() for key, m in acc.items()}


def bits_per_position(signal: np.ndarray, noise: np.ndarray, k: int) -> float:
    return gaussian_bits(signal, with_wire_rounding(signal, noise)) / (k * k)


def measured_accuracy(path: str) -> list[float] | None:
    if not Path(path).exists():
        return None
    draws = json.loads(Path(path).read_text()).get("summary", {}).get("subset_draws", {})
    means = [draws.get(f"subset_{i}", {}).get("mean") for i in range(6)]
    return means if all(m is not None for m in means) else None


def spearman(a, b) -> float:
    return float(np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1])


def main() -> None:
    ap = _lfw.parser(__doc__)
    ap.add_argument("--faces", type=int, default=200, help="training-split faces measured")
    ap.add_argument("--noise", type=float, default=1.0, help="white noise, grey levels (RGB)")
    ap.add_argument("--sizes", default="1,3", help="patch sizes k to measure")
    ap.add_argument("--stride", type=int, default=2, help="positions between patches sampled")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    faces = _lfw.training_split_faces(args.data, args.faces)
    noise_faces = np.random.default_rng(1).standard_normal((64, 112, 112, 3)) + 128.0
    out = {
        "faces": args.faces,
        "noise_grey_levels": args.noise,
        "stride": args.stride,
        "partitions": {},
    }
    for name in PARTITIONS:
        out["partitions"][name] = {"accuracy": measured_accuracy(ACCURACY[name]), "bits": {}}
    for k in (int(s) for s in args.sizes.split(",")):
        signal = patch_covariances(faces, k, args.stride)
        noise = patch_covariances(noise_faces, k, args.stride)
        for name, part in PARTITIONS.items():
            bits = [
                bits_per_position(signal[(name, i)], args.noise**2 * noise[(name, i)], k)
                for i in range(len(part))
            ]
            out["partitions"][name]["bits"][str(k)] = bits
    print(f"bits per position about the face (noise {args.noise} grey levels), by patch size")
    for name, row in out["partitions"].items():
        acc = row["accuracy"]
        print(f"\n{name} partition | " + " | ".join(f"subset {i}" for i in range(6)))
        if acc:
            print("accuracy, 3 draws | " + " | ".join(f"{100 * a:.2f}" for a in acc))
        for k, bits in row["bits"].items():
            rho = f"  (Spearman vs accuracy {spearman(bits, acc):.2f})" if acc else ""
            print(
                f"{k}x{k} | "
                + " | ".join(f"{b:.3f}" for b in bits)
                + f" | spread {np.ptp(bits):.3f}{rho}"
            )
            if acc:
                row.setdefault("spearman", {})[k] = spearman(bits, acc)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
