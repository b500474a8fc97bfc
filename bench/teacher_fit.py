"""How closely a protected model reproduces its teacher, on faces it trained on and on people
it never saw: the cosine of its raw embedding (one random rank per image, no flip, before the
whitening) to the lifted dlib target the training fitted (model card, "Where the remaining gap
to 95% is": a training fit far above the test-people fit says the student is data-limited).

    python bench/teacher_fit.py enrollment/weights/partialface-balanced.pt runs/blend/model.pt \\
        --mixtures runs/mixtures/mix30k.npz --json bench/results/teacher-fit.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from enrollment import mixtures  # noqa: E402
from enrollment.face_cache import build_cache  # noqa: E402
from enrollment.lfw_protocol import held_out_identities  # noqa: E402
from enrollment.model_io import embed, load_model, model_inputs, profile_for  # noqa: E402
from enrollment.partialface import draw_ranks  # noqa: E402
from enrollment.training import (  # noqa: E402
    TrainConfig,
    lift_matrix,
    load_training_data,
    split_validation,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--images", type=int, default=800, help="per set")
    parser.add_argument("--mixtures", help="also the fit on these teacher-labelled blends")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=str(Path("~/.cache/privface").expanduser()))
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(2)

    lfw = Path(args.data, "lfw", "lfw-deepfunneled")
    celeba = Path(args.data, "celeba", "celeba-crops")
    pairs = Path(args.data, "lfw", "pairs.txt")
    config = TrainConfig(data=[str(lfw), str(celeba)], out_dir="", cache_dir=args.cache_dir,
                         pairs=str(pairs))
    train, names = load_training_data(config)  # the training run's mean: its own images
    fitted = ~split_validation(train.labels, config.val_identities, config.seed)
    mean = train.teacher[fitted].mean(axis=0)
    test = build_cache(lfw, args.cache_dir)
    people = held_out_identities(pairs)
    is_test = np.array([test.identities[lab] in people for lab in test.labels])
    from_celeba = np.array([n.startswith("celeba-crops/") for n in names])[train.labels]
    rng = np.random.default_rng(args.seed)

    def sample(images: np.ndarray, teacher: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pick = rng.choice(len(images), min(args.images, len(images)), replace=False)
        return images[pick], teacher[pick]

    sets = {
        "lfw_training_split": sample(train.images[fitted & ~from_celeba],
                                     train.teacher[fitted & ~from_celeba]),
        "celeba": sample(train.images[fitted & from_celeba], train.teacher[fitted & from_celeba]),
        "test_people": sample(test.images[is_test], test.teacher[is_test]),
    }
    if args.mixtures:
        made = mixtures.load(args.mixtures)
        sets["mixtures"] = sample(made.images, made.teacher)

    results = {}
    for path in args.models:
        model, info = load_model(path)
        profile = profile_for(info)
        lift = lift_matrix(128, model.config.embedding_size)
        row = {}
        for name, (images, teacher) in sets.items():
            centred = teacher - mean
            centred /= np.linalg.norm(centred, axis=1, keepdims=True)
            target = torch.nn.functional.normalize(torch.from_numpy(centred).float() @ lift.T)
            faces = torch.from_numpy(images.astype(np.float32)).permute(0, 3, 1, 2)
            ranks = draw_ranks(len(faces), np.random.default_rng(args.seed + 1),
                               len(profile.subsets), len(profile.permutations))
            e = embed(model, model_inputs(faces, info["kind"], profile, ranks))
            row[name] = float(np.mean(np.sum(e * target.numpy(), axis=1)))
        results[path] = row
        print(path, "  ".join(f"{k} {v:.4f}" for k, v in row.items()), flush=True)

    print(f"\n{'model':50s} " + " ".join(f"{k:>18s}" for k in sets))
    for path, row in results.items():
        print(f"{path:50s} " + " ".join(f"{row[k]:18.4f}" for k in sets))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"settings": {"images_per_set": args.images, "seed": args.seed, "no_flip": True,
                          "raw_embeddings": True, "mixtures": args.mixtures},
             "cosine_to_target": results}, indent=2))


if __name__ == "__main__":
    main()
