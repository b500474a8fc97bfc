"""Client-side cost: transform time per face (per f, batched and single), alignment time per
face, bytes on the wire per profile.  Baseline in the same run: the naive transform
(materialise the f-times up-sampled image, then a block DCT), as a ratio.

    python bench/transforms.py --json bench/results/transforms.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from enrollment import hfcf
from enrollment import partialface as pf
from enrollment.align import align_file
from enrollment.frequency import dct_matrix
from enrollment.profiles import PROFILES

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def naive_protect(faces: np.ndarray, rank, factor: int) -> torch.Tensor:
    """Up-sample then block DCT of the whole image, then pick the rank's channels."""
    x = torch.from_numpy(faces).permute(0, 3, 1, 2).float() / 255.0
    if factor > 1:
        x = torch.nn.functional.interpolate(
            x, scale_factor=factor, mode="bilinear", align_corners=True
        )
    x = x * 255.0
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    planes = torch.stack(
        [
            0.299 * r + 0.587 * g + 0.114 * b - 128,
            -0.168736 * r - 0.331264 * g + 0.5 * b,
            0.5 * r - 0.418688 * g - 0.081312 * b,
        ],
        1,
    )
    n, _, h, w = planes.shape
    d = torch.from_numpy(dct_matrix()).float()
    blocks = planes.reshape(n, 3, h // 8, 8, w // 8, 8)
    coeffs = torch.einsum("ur,ncirjs,vs->ncijuv", d, blocks, d).reshape(n, 3, h // 8, w // 8, 64)
    coeffs = coeffs.permute(0, 1, 4, 2, 3).reshape(n, 192, h // 8, w // 8)
    return coeffs[:, list(pf.rank_channels(*rank))]


def per_face_ms(fn, n_faces: int, repeat: int) -> float:
    fn()  # warm caches
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat / n_faces * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", default="bench/results/transforms.json")
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    files = sorted((DATA / "lfw" / "lfw-deepfunneled").glob("*/*_0001.jpg"))[: args.batch]
    t = time.perf_counter()
    faces = np.stack([align_file(f).image for f in files])
    align_ms = (time.perf_counter() - t) / len(files) * 1000
    rows = []
    rank = (1, 2)
    for factor in (8, 4, 2, 1):
        ranks = pf.draw_ranks(len(faces), np.random.default_rng(0))
        batched = per_face_ms(lambda f=factor, r=ranks: pf.protect(faces, r, f), len(faces), 2)
        single = per_face_ms(lambda f=factor: pf.protect(faces[0], rank, f), 1, 10)
        naive = per_face_ms(lambda f=factor: naive_protect(faces, rank, f), len(faces), 1)
        rows.append(
            {
                "transform": f"partialface f={factor}",
                "batched_ms": batched,
                "single_ms": single,
                "naive_batched_ms": naive,
                "speedup_vs_naive": naive / batched,
            }
        )
    noise = hfcf.LaplaceNoise((63, 112, 112), 0.5)
    rows.append(
        {
            "transform": "hfcf f=8",
            "batched_ms": per_face_ms(lambda: hfcf.protect(faces[:16], noise), 16, 1),
            "single_ms": per_face_ms(lambda: hfcf.protect(faces[0], noise), 1, 3),
            "naive_batched_ms": None,
            "speedup_vs_naive": None,
        }
    )
    wire_bytes = {name: p.bytes_per_face for name, p in PROFILES.items()}
    print(f"alignment (HOG + 68 landmarks + warp), one process: {align_ms:.1f} ms/face")
    print(f"{'transform':<20}{'batched ms':>12}{'single ms':>12}{'naive ms':>12}{'speedup':>9}")
    for r in rows:
        naive = f"{r['naive_batched_ms']:.2f}" if r["naive_batched_ms"] else "-"
        sp = f"{r['speedup_vs_naive']:.1f}x" if r["speedup_vs_naive"] else "-"
        print(
            f"{r['transform']:<20}{r['batched_ms']:>12.2f}{r['single_ms']:>12.2f}{naive:>12}{sp:>9}"
        )
    for name, b in wire_bytes.items():
        print(f"wire bytes per face, {name}: {b} ({b / 1024:.0f} KiB; RGB crop is 37632)")
    out = {
        "threads": torch.get_num_threads(),
        "batch": len(faces),
        "align_ms_per_face": align_ms,
        "transforms": rows,
        "wire_bytes_per_face": wire_bytes,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
