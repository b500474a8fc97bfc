"""A uniform weight soup: the mean of the weights of model files of one architecture (e.g. a
model and its own warm restart), written as a model file for ``privface whiten`` and
``privface eval lfw``.

    python bench/weight_soup.py enrollment/weights/partialface-balanced.pt runs/restart/model.pt \\
        --out runs/soup.pt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from enrollment.model_io import load_model, save_model  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    loaded = [load_model(p) for p in args.models]
    first, info = loaded[0]
    if any(m.config != first.config or i["profile"] != info["profile"] for m, i in loaded):
        sys.exit("the models differ in architecture or profile")
    states = [m.state_dict() for m, _ in loaded]
    first.load_state_dict({
        k: sum(s[k] for s in states) / len(states) if v.is_floating_point() else v
        for k, v in states[0].items()
    })
    meta = {**loaded[-1][1]["meta"], "soup": [str(p) for p in args.models]}
    save_model(args.out, first, info["kind"], info["profile"], meta)
    print(f"{args.out}: mean of {len(args.models)} models")
