"""What the LFW benchmark scripts share: where the data and the alignment cache are, their
common arguments, and loading the cache and the model to measure."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch

from enrollment import evaluation as ev
from enrollment.lfw_protocol import held_out_pairs
from enrollment.model_io import DEFAULT_MODEL, load_model, profile_for

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CACHE = Path(os.environ.get("PRIVFACE_BENCH_CACHE", "~/.cache/privface")).expanduser()


def parser(doc: str) -> argparse.ArgumentParser:
    """--model, --data, --threads, --json; the description is the docstring's first line."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    return ap


def pair_arrays(pairs_txt: str, cache) -> tuple[np.ndarray, ...]:
    """The protocol's pairs of folds 6-10 as arrays: (cache index a, cache index b, same
    person, fold)."""
    pairs = held_out_pairs(pairs_txt)
    where = cache.index()
    return (np.array([where[p.path_a] for p in pairs]), np.array([where[p.path_b] for p in pairs]),
            np.array([p.same for p in pairs]), np.array([p.fold for p in pairs]))


def training_split_faces(data: str | Path, n: int, seed: int = 0) -> np.ndarray:
    """``n`` aligned faces of LFW people outside folds 6-10 (the training split), drawn with
    ``seed``, in cache order."""
    cache = ev.lfw_cache(Path(data) / "lfw", CACHE)
    train = ev.training_split(cache, Path(data) / "lfw" / "pairs.txt")
    return cache.images[np.sort(np.random.default_rng(seed).choice(train, n, replace=False))]


def load(args: argparse.Namespace):
    """(pairs.txt path, LFW cache, model, its load info, its protection profile), with
    torch's thread count set."""
    torch.set_num_threads(args.threads)
    pairs_txt = str(Path(args.data) / "lfw" / "pairs.txt")
    cache = ev.lfw_cache(Path(args.data) / "lfw", CACHE)
    model, info = load_model(args.model)
    return pairs_txt, cache, model, info, profile_for(info)
