"""Model commands: ``privface train``, ``mixtures``, ``eval lfw|identify``, ``quantize`` and
``whiten``."""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from enrollment.backbone import BackboneConfig
from privface.config import load_settings


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def cmd_train(args) -> int:
    from enrollment.training import TrainConfig, train

    settings = load_settings(args.config)
    backbone = BackboneConfig(
        widths=_ints(args.widths),
        blocks=_ints(args.blocks),
        stem_stride=args.stem_stride,
        strides=_ints(args.strides),
        embedding_size=args.embedding_size,
        subset_stems=args.subset_stems,
        stem_width=args.stem_width,
    )
    config = TrainConfig(
        data=args.data,
        out_dir=args.out,
        cache_dir=args.cache_dir or settings.cache_dir,
        pairs=args.pairs,
        kind=args.kind,
        profile=args.profile,
        fixed_rank=_ints(args.fixed_rank) if args.fixed_rank else None,
        backbone=backbone,
        epochs=args.epochs,
        uses_per_epoch=args.uses_per_epoch,
        batch_size=args.batch_size,
        lr=args.lr,
        distill_weight=args.distill_weight,
        arcface_weight=args.arcface_weight,
        greyscale_p=args.greyscale_p,
        affine_p=args.affine_p,
        affine_degrees=args.affine_degrees,
        affine_scale=args.affine_scale,
        subset_dro=args.subset_dro,
        subset_val_every=args.subset_val_every,
        feature_teacher=args.feature_teacher,
        feature_weight=args.feature_weight,
        mixup_teacher=args.mixup_teacher,
        mixup_p=args.mixup_p,
        mixtures=args.mixtures,
        mixtures_p=args.mixtures_p,
        seed=args.seed,
        limit_identities=args.limit_identities,
        threads=args.threads,
        warmup_steps=args.warmup_steps,
        val_identities=args.val_identities,
        init=args.init,
        precision=args.precision,
        compile=args.compile,
    )
    summary = train(config, progress=not args.quiet)
    print(json.dumps({k: v for k, v in summary.items() if k != "teacher_mean"}, indent=2))
    if args.ship:
        Path(args.ship).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(args.out) / "model.pt", args.ship)
        print(f"shipped {args.ship} ({Path(args.ship).stat().st_size / 1e6:.1f} MB)")
    return 0


def cmd_mixtures(args) -> int:
    from enrollment.training import TrainConfig, build_mixture_set

    settings = load_settings(args.config)
    config = TrainConfig(
        data=args.data,
        out_dir="",
        cache_dir=args.cache_dir or settings.cache_dir,
        pairs=args.pairs,
        seed=args.seed,
        val_identities=args.val_identities,
        limit_identities=args.limit_identities,
        workers=args.workers,
    )
    made = build_mixture_set(config, args.count, args.out, draw_seed=args.draw_seed,
                             progress=not args.quiet)
    print(json.dumps(made))
    return 0


def _models(args) -> dict[str, str]:
    from enrollment.model_io import DEFAULT_MODEL

    models = {"protected": args.model or str(DEFAULT_MODEL)}
    if args.rgb_model:
        models["rgb"] = args.rgb_model
    if args.vanilla_model:
        models["vanilla"] = args.vanilla_model
    return models


def _plot(
    path: str,
    curves: dict[str, tuple[list, list]],
    xlabel: str,
    ylabel: str,
    title: str,
    loglog: bool = False,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    for name, (x, y) in curves.items():
        x, y = np.asarray(x), np.asarray(y)
        ok = (x > 0) & (y > 0) if loglog else x > 0
        ax.plot(x[ok], y[ok], label=name)
    ax.set_xscale("log")
    if loglog:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_subsets(path: str | Path, results: dict, summary: dict) -> None:
    """Bar chart of the fixed subsets' accuracy (mean over draws, with each draw's points,
    when measured over several), the spread in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    draws = summary.get("subset_draws") or {
        n: {"accuracy": [r["accuracy"]], "mean": r["accuracy"]}
        for n, r in results.items() if n.startswith("subset_")}
    names = list(draws)
    means = np.array([draws[n]["mean"] for n in names]) * 100
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(range(len(names)), means, color="#7a9cc6")
    for i, n in enumerate(names):
        points = np.array(draws[n]["accuracy"]) * 100
        ax.plot([i] * len(points), points, "k.", markersize=5)
    ax.set_xticks(range(len(names)), [n.replace("subset_", "subset ") for n in names])
    low = min(min(d["accuracy"]) for d in draws.values()) * 100
    ax.set_ylim(np.floor(low - 1), np.ceil(means.max() + 1))
    ax.set_ylabel("LFW folds 6-10 accuracy (%)")
    n_draws = len(next(iter(draws.values()))["accuracy"])
    ax.set_title(f"fixed subsets, {n_draws} draw{'s' if n_draws > 1 else ''}: "
                 f"spread {means.max() - means.min():.2f} points")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_eval(args) -> int:
    from tqdm import tqdm

    from enrollment import evaluation as ev

    settings = load_settings(args.config)
    data = Path(args.data)
    pairs_txt = str(data / "lfw" / "pairs.txt")
    cache = ev.lfw_cache(data / "lfw", args.cache_dir or settings.cache_dir)
    averaged = (settings.average_permutations if args.average_permutations is None
                else args.average_permutations)
    centred = settings.score_centring if args.score_centring is None else args.score_centring
    # how every embedder of this run sees the faces (the variants and the extra draws)
    how = {"flip": not args.no_flip, "greyscale": args.greyscale, "precision": args.precision,
           "all_permutations": averaged, "whiten": not args.no_whiten, "centre": centred}
    embedders = ev.variants(_models(args), cache, args.seed, **how)
    if args.only:
        wanted = set(args.only.split(","))
        embedders = {k: v for k, v in embedders.items() if k in wanted}
    results: dict[str, dict] = {}
    for name, embedder in tqdm(embedders.items(), desc=f"eval {args.protocol}", unit="variant"):
        if args.protocol == "lfw":
            results[name] = ev.verification(embedder, cache, pairs_txt)
            if name == "protected":
                for mode in ("gallery", "subject", "stolen"):
                    results[f"protected_idmap_{mode}"] = ev.verification(
                        embedder, cache, pairs_txt, mapping=mode
                    )
        else:
            results[name] = ev.identify(embedder, cache, pairs_txt)
    if args.protocol == "lfw":
        spread = [results[f"subset_{s}"]["accuracy"] for s in range(6) if f"subset_{s}" in results]
        summary = {"subset_spread": max(spread) - min(spread)} if spread else {}
        print(f"{'variant':<12}{'accuracy':>10}{'std':>8}{'TAR@1e-3':>10}")
        for name, r in results.items():
            print(
                f"{name:<12}{r['accuracy']:>10.4f}{r['accuracy_std']:>8.4f}"
                f"{r['tar_at_far_1e-3']:>10.4f}"
            )
        if spread:
            print(f"spread across subsets: {summary['subset_spread'] * 100:.2f} points")
        if args.draws > 1 and "protected" in results:
            draws = ev.rank_draws(
                _models(args)["protected"], cache, pairs_txt,
                [args.seed + k for k in range(args.draws)],
                known={args.seed: results["protected"]["accuracy"]}, **how,
            )
            summary["protected_rank_draws"] = draws
            print(f"protected over {args.draws} rank draws: {draws['mean'] * 100:.2f}% "
                  f"(draw-to-draw std {draws['std'] * 100:.2f})")
        if args.draws > 1 and spread:
            subsets = [s for s in range(6) if f"subset_{s}" in results]
            balance = ev.subset_draws(
                _models(args)["protected"], cache, pairs_txt, subsets,
                [args.seed + k for k in range(args.draws)],
                known={s: {args.seed: results[f"subset_{s}"]["accuracy"]} for s in subsets},
                **how,
            )
            summary["subset_draws"] = balance["subsets"]
            summary["subset_spread_over_draws"] = balance["spread"]
            print(f"subsets over {args.draws} draws: "
                  + " / ".join(f"{d['mean'] * 100:.2f}" for d in balance["subsets"].values())
                  + f"; spread {balance['spread'] * 100:.2f} points")
        curves = {n: (r["roc"]["far"], r["roc"]["tar"]) for n, r in results.items()
                  if not n.startswith("subset_")}
        if args.plot and curves:
            _plot(args.plot, curves, "false accept rate", "true accept rate",
                  "LFW folds 6-10 ROC")
        if args.plot and spread:  # beside the ROC, or in its place for subsets only
            _plot_subsets(args.plot if not curves else
                          Path(args.plot).with_name(Path(args.plot).stem + "-subsets.png"),
                          results, summary)
    else:
        summary = {}
        print(f"{'variant':<12}{'rank1':>8}{'rank5':>8}{'FNIR@.01':>10}{'FNIR@.003':>11}")
        for name, r in results.items():
            print(
                f"{name:<12}{r['rank1']:>8.4f}{r['rank5']:>8.4f}{r['fnir_at_fpir_0.01']:>10.4f}"
                f"{r['fnir_at_fpir_0.003']:>11.4f}"
            )
        if args.plot:
            _plot(
                args.plot,
                {
                    n: (r["det"]["fpir"], r["det"]["fnir"])
                    for n, r in results.items()
                    if not n.startswith("subset_")
                },
                "FPIR",
                "FNIR",
                "LFW 1:N identification DET",
                loglog=True,
            )
    out = {
        **results,
        **({"summary": summary} if summary else {}),
        "settings": {"flip": not args.no_flip, "seed": args.seed, "models": _models(args),
                     "greyscale": args.greyscale, "precision": args.precision,
                     "average_permutations": averaged, "whiten": not args.no_whiten,
                     "score_centring": centred},
    }
    if args.json:
        ev.write_json(args.json, out)
    if args.write_threshold and args.protocol == "lfw":
        from enrollment.model_io import update_meta

        if centred and ev.cohort_of(embedders["protected"]) is None:
            raise ValueError("--score-centring: the model file has no score-centring cohort "
                             "(privface whiten fits one)")
        calib = ev.impostor_threshold(embedders["protected"], cache, pairs_txt, 1e-3)
        tag = "_centred" if centred else ""  # each scale its own threshold
        update_meta(
            _models(args)["protected"],
            **{
                f"threshold_far_1e-3{tag}": calib["threshold_template"],
                f"threshold_far_1e-3_embedding{tag}": calib["threshold_embedding"],
                f"threshold_calibration{tag}": f"{calib['impostor_pairs']} random "
                "different-identity pairs of LFW folds 6-10 images, random subset per image "
                "(shared by its mirror), flip TTA" + (
                    ", each view averaged over the permutations of its subset" if averaged
                    else "") + (", scores centred" if centred else ""),
                f"lfw_accuracy{tag}": results["protected"]["accuracy"],
            },
        )
        out["calibration"] = calib
        if args.json:
            ev.write_json(args.json, out)
        print(f"model thresholds at FAR 1e-3{' (centred scores)' if centred else ''}: "
              f"template {calib['threshold_template']:.4f}, "
              f"embedding {calib['threshold_embedding']:.4f}")
    return 0



def _client_views(cache, indices: np.ndarray, profile, rng: np.random.Generator) -> np.ndarray:
    """Exactly what the client sends for these faces (face + mirror: one random subset, a
    random permutation each; float16), as the arrays the server decodes."""
    from enrollment import wire
    from privface.client import protect_many

    blobs = protect_many(cache.images[indices], profile, rng=rng)
    return np.concatenate([wire.decode(b)[1] for b in blobs])


def cmd_quantize(args) -> int:
    """int8 graph of a model, calibrated on training-split LFW faces (never folds 6-10)."""
    import time

    import torch

    from enrollment import evaluation as ev
    from enrollment import onnx_runtime
    from enrollment.model_io import DEFAULT_MODEL, embed, load_model, profile_for, served_inputs

    settings = load_settings(args.config)
    model_path = Path(args.model or DEFAULT_MODEL)
    model, info = load_model(model_path)
    if info["kind"] != "partialface":
        raise SystemExit(f"{model_path}: a {info['kind']} model; only protected-input "
                         "models are served")
    profile = profile_for(info)
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    pairs_txt = str(data / "lfw" / "pairs.txt")
    cache = ev.lfw_cache(data / "lfw", args.cache_dir or settings.cache_dir)
    allowed = ev.training_split(cache, pairs_txt)
    rng = np.random.default_rng(args.seed)
    chosen = rng.choice(allowed, args.images + args.check, replace=False)
    calibration = _client_views(cache, chosen[: args.images], profile, rng)
    # what the server feeds the graph: with per-subset stems, rank read off each view
    calibration, subsets = served_inputs(model.config, calibration, profile)
    start = time.perf_counter()
    # ONNX Runtime's calibrator prints its progress: keep stdout for the JSON summary
    with contextlib.redirect_stdout(sys.stderr):
        graph = onnx_runtime.quantize_int8(model, calibration.astype(np.float32),
                                           subsets=subsets)
    out = onnx_runtime.save_int8(
        model_path, graph,
        privface_calibration=f"{len(calibration)} views (face + mirror, random subset, "
        f"permutation per view) of {args.images} LFW training-split images, seed {args.seed}",
    )
    took = time.perf_counter() - start
    check, subsets = served_inputs(
        model.config, _client_views(cache, chosen[args.images :], profile, rng), profile
    )
    ref = embed(model, torch.from_numpy(check), subsets=subsets)
    got = onnx_runtime.load_int8(model_path, args.threads).embed(check, subsets)
    cos = np.sum(ref * got, axis=1)
    summary = {
        "int8_model": str(out), "bytes": out.stat().st_size, "seconds": round(took, 1),
        "calibration_views": len(calibration), "check_views": len(check),
        "cosine_to_fp32_min": float(cos.min()), "cosine_to_fp32_mean": float(cos.mean()),
    }
    print(json.dumps(summary, indent=2))
    return 0


def cmd_whiten(args) -> int:
    """Fit the whitening and the score-centring cohort on training-split LFW faces (never
    folds 6-10) and store them."""
    import torch

    from enrollment import evaluation as ev
    from enrollment import score_centring, whitening
    from enrollment.model_io import DEFAULT_MODEL, set_whitening

    settings = load_settings(args.config)
    model_path = Path(args.model or DEFAULT_MODEL)
    if args.remove:
        meta = set_whitening(model_path, None)
        print(json.dumps({"model": str(model_path), "whitening": meta["whitening"]}))
        return 0
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    cache = ev.lfw_cache(data / "lfw", args.cache_dir or settings.cache_dir)
    allowed = ev.training_split(cache, data / "lfw" / "pairs.txt")
    if args.images:
        if args.images > len(allowed):
            raise ValueError(f"{args.images} images asked, {len(allowed)} training-split "
                             "images available")
        allowed = np.sort(np.random.default_rng(args.seed).choice(allowed, args.images,
                                                                  replace=False))
    # the cohort embedded as the client sends faces (face + mirror, one random subset),
    # without any whitening the file already carries
    raw = ev.model_embedder(model_path, cache, args.seed, whiten=False)(allowed)
    fitted = whitening.fit(raw, args.dims, args.power)
    cohort = None
    if args.centroids:
        cohort = score_centring.fit(whitening.apply(raw, fitted), args.centroids, args.top_k,
                                    seed=args.seed)
    meta = set_whitening(model_path, fitted, cohort)
    print(json.dumps({"model": str(model_path), "whitening": meta["whitening"],
                      "score_centring": meta["score_centring"],
                      "next": "privface eval lfw --write-threshold (the threshold was "
                      "dropped: scores changed) and privface quantize (the file changed)"},
                     indent=2))
    return 0
