"""Held-out validation accuracy and training loss per epoch of several training logs, side by
side: how the protected model and the same architecture on RGB learn under one recipe.

Each log is a `privface train` log.jsonl, or several stages of one recipe in one file with a
``"stage"`` key per line (as `docs/training-log-*.jsonl`); epochs are counted across stages.
The held-out figure is the trainer's own (60 identities, 547 faces, best threshold on the
pairs themselves, one view): a learning curve, not an LFW figure.

    python bench/training_curves.py \
        --log protected=docs/training-log-partialface-paper.jsonl \
        --log rgb=docs/training-log-rgb-same-recipe.jsonl \
        --json bench/results/training-curves.json --plot docs/training-curves.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_log(path: str | Path) -> list[dict]:
    """The log's epochs in order, each with ``cumulative_epoch`` counted across stages."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    out = []
    for n, r in enumerate(rows, start=1):
        out.append({"stage": r.get("stage", 1), "epoch": r["epoch"], "cumulative_epoch": n,
                    "val_accuracy": r["val_accuracy"], "distill": r.get("distill", r["loss"]),
                    "img_per_s": r.get("img_per_s")})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log", action="append", required=True, help="NAME=PATH, repeatable")
    ap.add_argument("--json")
    ap.add_argument("--plot")
    args = ap.parse_args()
    logs = {}
    for item in args.log:
        name, _, path = item.partition("=")
        logs[name] = read_log(path)
    names = list(logs)
    longest = max(len(v) for v in logs.values())
    print(f"{'epoch':>5}" + "".join(f"{n + ' val':>16}{n + ' loss':>16}" for n in names))
    for i in range(longest):
        cells = []
        for n in names:
            r = logs[n][i] if i < len(logs[n]) else None
            cells.append(f"{r['val_accuracy']:>16.4f}{r['distill']:>16.4f}" if r else " " * 32)
        print(f"{i + 1:>5}" + "".join(cells))
    finals = {n: v[-1]["val_accuracy"] for n, v in logs.items()}
    print("final held-out accuracy: " + ", ".join(f"{n} {a:.4f}" for n, a in finals.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"logs": logs, "final_val_accuracy": finals},
                                              indent=1) + "\n")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
        for n, v in logs.items():
            x = [r["cumulative_epoch"] for r in v]
            a1.plot(x, [r["val_accuracy"] for r in v], marker=".", label=n)
            a2.plot(x, [r["distill"] for r in v], marker=".", label=n)
            for r0, r1 in zip(v[:-1], v[1:], strict=True):  # mark where a warm restart began
                if r1["stage"] != r0["stage"]:
                    a1.axvline(r0["cumulative_epoch"] + 0.5, color="grey", lw=0.5, ls=":")
        a1.set_xlabel("epoch (all stages)")
        a1.set_ylabel("held-out verification accuracy")
        a1.set_title("held-out identities, one view")
        a2.set_xlabel("epoch (all stages)")
        a2.set_ylabel("training distillation loss (1 - cos)")
        a2.set_title("training loss")
        for a in (a1, a2):
            a.grid(True, alpha=0.3)
            a.legend(fontsize=8)
        fig.tight_layout()
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    main()
