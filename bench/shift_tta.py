"""Server-side shift test-time augmentation, measured: is a protected view worth embedding
at several positions?

At f = 8 one DCT block of the wire input is one pixel of the 112 x 112 face, so shifting the
(27, 112, 112) input by whole blocks (edges replicated) is the face shifted by whole pixels:
the server can do it without the client, on any rank. This runs ``privface eval lfw`` with
every embedding replaced by the mean of the input's embeddings at the shifts
{(0, 0), (0, +-k), (+-k, 0)} (``--diagonal``: the four diagonal ones too), so the figures are
comparable with a plain ``privface eval lfw`` run on the same seed (the same rank draws).

    python bench/shift_tta.py --shift 1 -- --only protected --no-average-permutations \\
        --json bench/results/eval-lfw-balanced-shift-tta.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import enrollment.evaluation as ev  # noqa: E402
from enrollment import model_io  # noqa: E402
from privface.cli import main  # noqa: E402


def shifted(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """The input moved by (dy, dx) blocks, the uncovered border replicated."""
    if dy == 0 and dx == 0:
        return x
    p = max(abs(dy), abs(dx))
    padded = torch.nn.functional.pad(x.float(), (p, p, p, p), mode="replicate")
    h, w = x.shape[-2:]
    return padded[..., p + dy : p + dy + h, p + dx : p + dx + w]


def shift_embedder(shifts: list[tuple[int, int]]):
    plain = model_io.embed

    def embed(model, inputs, batch_size=256, precision="fp32", subsets=None) -> np.ndarray:
        total = sum(plain(model, shifted(inputs, dy, dx), batch_size, precision, subsets)
                    for dy, dx in shifts)
        return total / np.linalg.norm(total, axis=1, keepdims=True)

    return embed


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shift", type=int, default=1, help="k: shift in blocks (pixels)")
    parser.add_argument("--diagonal", action="store_true")
    parser.add_argument("eval_args", nargs=argparse.REMAINDER,
                        help="after --: arguments of privface eval lfw")
    args = parser.parse_args()
    k = args.shift
    shifts = [(0, 0), (0, k), (0, -k), (k, 0), (-k, 0)]
    if args.diagonal:
        shifts += [(k, k), (k, -k), (-k, k), (-k, -k)]
    ev.embed = shift_embedder(shifts)
    rest = [a for a in args.eval_args if a != "--"]
    sys.exit(main(["eval", "lfw", *rest]))
