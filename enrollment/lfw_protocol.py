"""LFW's official View 2 pairs and the identity split privface trains and tests on (method.md §7).

Training may only use identities that appear nowhere in folds 6-10 of ``pairs.txt``;
verification is reported on those 5 folds (3,000 pairs) and 1:N identification on their
identities.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

TEST_FOLDS = (5, 6, 7, 8, 9)  # 0-based: folds 6-10


@dataclass(frozen=True)
class Pair:
    fold: int  # 0-based
    path_a: str  # "Name/Name_0001.jpg", relative to lfw-deepfunneled
    path_b: str
    same: bool


def image_path(name: str, number: int) -> str:
    return f"{name}/{name}_{number:04d}.jpg"


def read_pairs(pairs_txt: str | os.PathLike) -> list[Pair]:
    """All 6,000 pairs of View 2 with their fold."""
    lines = Path(pairs_txt).read_text().split("\n")
    n_folds, per = (int(v) for v in lines[0].split())
    pairs = []
    i = 1
    for fold in range(n_folds):
        for k in range(2 * per):
            parts = lines[i].split()
            i += 1
            if k < per:
                name, a, b = parts
                pairs.append(Pair(fold, image_path(name, int(a)), image_path(name, int(b)), True))
            else:
                n1, a, n2, b = parts
                pairs.append(Pair(fold, image_path(n1, int(a)), image_path(n2, int(b)), False))
    return pairs


def held_out_pairs(pairs_txt: str | os.PathLike) -> list[Pair]:
    return [p for p in read_pairs(pairs_txt) if p.fold in TEST_FOLDS]


def held_out_identities(pairs_txt: str | os.PathLike) -> set[str]:
    """Every identity named in folds 6-10: none of them may be trained on."""
    names = set()
    for p in held_out_pairs(pairs_txt):
        names.add(p.path_a.split("/")[0])
        names.add(p.path_b.split("/")[0])
    return names
