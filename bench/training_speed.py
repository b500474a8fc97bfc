"""Training throughput, eager against ``torch.compile``: what `privface train --compile`
buys on this CPU.  One step = forward, backward and an SGD step of the student (the shipped
model's architecture, or ``--model``'s, with random weights) on a batch of protected inputs,
as the trainer runs it (channels-last, the training forward of `enrollment.training`);
baseline in the same run: eager, same precision.

    python bench/training_speed.py --threads 2 --json bench/results/training-speed.json
"""

from __future__ import annotations

import _threads  # first: sets the BLAS thread count before numpy is imported

THREADS = _threads.THREADS

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from enrollment.backbone import Backbone, BackboneConfig  # noqa: E402
from enrollment.model_io import DEFAULT_MODEL, autocast, load_model, resolve_precision  # noqa: E402
from enrollment.training import compiled_forward, model_forward  # noqa: E402


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def cpu_features() -> dict:
    """The facts that decide the speed of bf16 and of fused kernels ("AMD EPYC" alone does
    not tell a Zen 3 from a Zen 4)."""
    info: dict = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key in ("cpu family", "model") and key not in info:
            info[key] = int(value)
        if key == "flags":
            flags = set(value.split())
            info["isa"] = sorted(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16",
                                             "amx_tile") if f in flags)
            break
    return info


def measure(config: BackboneConfig, compiled: bool, precision: str, batch: int, warmup: int,
            steps: int) -> dict:
    torch.manual_seed(0)
    model = Backbone(config).to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    forward = compiled_forward(model) if compiled else model_forward(model)
    x = torch.randn(batch, config.in_channels, 112, 112)
    target = torch.nn.functional.normalize(torch.randn(batch, config.embedding_size), dim=1)

    def step() -> None:
        with autocast(precision):
            _, emb = forward(x, None)
        loss = (1 - torch.nn.functional.cosine_similarity(emb.float(), target)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t = time.perf_counter()
    step()
    first = time.perf_counter() - t
    for _ in range(warmup - 1):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - t
    return {"compiled": compiled, "precision": precision, "first_step_s": first,
            "img_per_s": steps * batch / seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=THREADS,
                    help="torch/BLAS threads (read before numpy loads; default 1, the recipe's 2)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=3, help="steps before timing (>= 1)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per mode")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="whose architecture to train")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    precision = resolve_precision(args.precision)
    config = load_model(args.model)[0].config  # random weights in it: speed only
    rows = [measure(config, compiled, precision, args.batch_size, args.warmup, args.steps)
            for compiled in (False, True)]
    base = rows[0]["img_per_s"]
    print(f"{cpu_name()}, {THREADS} threads, batch {args.batch_size}, {precision}")
    print(f"{'mode':<10} {'img/s':>8} {'ratio':>7} {'first step s':>13}")
    for r in rows:
        r["ratio_to_eager"] = r["img_per_s"] / base
        name = "compiled" if r["compiled"] else "eager"
        print(f"{name:<10} {r['img_per_s']:>8.1f} {r['ratio_to_eager']:>6.2f}x "
              f"{r['first_step_s']:>13.1f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(
            {"cpu": cpu_name(), "cpu_features": cpu_features(), "model": args.model,
             "architecture": config.to_dict(),
             "threads": THREADS, "batch_size": args.batch_size,
             "precision": precision, "torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
