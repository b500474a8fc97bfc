"""The ``privface`` command line: one sub-command per job, each a thin call into a module."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="privface", description="Privacy-preserving face gallery: client tools and service"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("align", help="detect and align faces to 112x112 crops")
    p.add_argument("inputs", nargs="+", help="image files or folders (layout preserved)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--min-face", type=int, default=40, help="smallest face box side, pixels")
    p.add_argument("--cnn-fallback", action="store_true", help="retry with dlib's CNN detector")
    p.add_argument("--force", action="store_true", help="re-align files already aligned")
    p.add_argument("--report", help="write the batch report as JSON")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func="privface.protect_commands:cmd_align")

    p = sub.add_parser("protect", help="turn face images into protected inputs")
    p.add_argument("images", nargs="+")
    p.add_argument("--profile", help="protection profile (default: the shipped model's, "
                   "partialface-balanced; ask the server: ServerInfo.profile)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--rank", help="fixed SUBSET,PERMUTATION (default: random per face)")
    g.add_argument("--seed", type=int, help="seed of the random ranks / noise")
    p.add_argument("--aligned", action="store_true", help="inputs are aligned 112x112 crops")
    p.add_argument(
        "-o",
        "--output",
        required=True,
        help="x.npy (one image, bare float32 array), x.pfpi (all faces) or a folder",
    )
    p.set_defaults(func="privface.protect_commands:cmd_protect")

    p = sub.add_parser("show-protected", help="picture of what a protected input reveals")
    p.add_argument("input", help=".pfpi or .npy protected input")
    p.add_argument("-o", "--output", required=True, help="PNG to write")
    p.add_argument("--original", help="the source image, shown beside")
    p.add_argument("--aligned", action="store_true", help="--original is an aligned crop")
    p.add_argument("--rank", help="SUBSET,PERMUTATION if known (default: attacker's guess)")
    p.add_argument("--profile", help="profile of a bare .npy input")
    p.add_argument("--index", type=int, default=0, help="which face of a batch")
    p.set_defaults(func="privface.protect_commands:cmd_show_protected")

    p = sub.add_parser("train", help="train a recognition model on protected inputs")
    p.add_argument(
        "--data", action="append", required=True, help="dataset folder in LFW layout (repeatable)"
    )
    p.add_argument("--pairs", help="LFW pairs.txt: identities of folds 6-10 are excluded")
    p.add_argument("--out", required=True, help="run folder (checkpoints, log, model.pt)")
    p.add_argument("--kind", choices=["partialface", "rgb", "hfcf"], default="partialface")
    p.add_argument("--profile", default="partialface-paper",
                   help="protection profile trained on (the shipped model: partialface-balanced)")
    p.add_argument("--fixed-rank", help="SUBSET,PERMUTATION: the vanilla fixed-rank baseline")
    p.add_argument("--widths", default="32,64,128,256")
    p.add_argument("--blocks", default="2,2,2,2")
    p.add_argument("--stem-stride", type=int, default=2)
    p.add_argument("--strides", default="1,2,2,2")
    p.add_argument("--embedding-size", type=int, default=512)
    p.add_argument("--stem-width", type=int, default=0,
                   help="output channels of the stem (0: the first width)")
    p.add_argument("--subset-stems", type=int, default=0,
                   help="N > 0: one stem per subset (N = the profile's subsets) for inputs "
                        "whose rank the server infers and whose permutation it undoes")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--uses-per-epoch", type=int, default=3, help="r: uses of each image/epoch")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--distill-weight", type=float, default=1.0)
    p.add_argument("--arcface-weight", type=float, default=0.0)
    p.add_argument("--greyscale-p", type=float, default=0.2)
    p.add_argument("--affine-p", type=float, default=0.0,
                   help="share of samples rotated and rescaled at random (similarity jitter)")
    p.add_argument("--affine-degrees", type=float, default=10.0)
    p.add_argument("--affine-scale", type=float, default=0.1, help="max relative scale change")
    p.add_argument("--subset-dro", type=float, default=0.0,
                   help="group DRO step size over the rank's subsets (0: plain mean loss)")
    p.add_argument("--feature-teacher", help="RGB model of the same architecture (--kind rgb)"
                   " whose last-stage features the student matches (feature distillation)")
    p.add_argument("--feature-weight", type=float, default=0.0,
                   help="weight of the feature-distillation loss (> 0 with --feature-teacher)")
    p.add_argument("--mixup-teacher", help="RGB model of the same embedding space (--kind rgb) "
                   "that labels faces mixed pairwise (mixup distillation)")
    p.add_argument("--mixup-p", type=float, default=0.0,
                   help="share of each batch replaced by mixed faces (> 0 with --mixup-teacher)")
    p.add_argument("--mixtures", help="teacher-labelled mixtures of the training photos "
                   "(privface mixtures)")
    p.add_argument("--mixtures-p", type=float, default=0.0,
                   help="share of each batch's samples drawn from --mixtures")
    p.add_argument("--subset-val-every", type=int, default=1,
                   help="held-out accuracy per fixed subset every N epochs and at the last "
                   "(0: never)")
    p.add_argument("--val-identities", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit-identities", type=int, help="first N identities of each set")
    p.add_argument("--threads", type=int)
    p.add_argument("--cache-dir")
    p.add_argument("--ship", help="copy the final model here (e.g. the shipped weights)")
    p.add_argument("--init", help="start from this model file's weights (a warm restart: a new "
                   "LR schedule over --epochs; architecture and kind must match, "
                   "except wider --widths: the model is widened, same function)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="bf16 autocast (auto: where the CPU has AMX or AVX512-BF16; "
                        "1.6-1.8x faster there)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training forward (~40-65 s to compile; 1.03x in fp32 on "
                   "an AVX2 CPU, 1.7x in bf16 on a Zen 4: measure with bench/training_speed.py)")
    p.add_argument("--config")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func="privface.model_commands:cmd_train")

    p = sub.add_parser("mixtures", help="blend pairs of training photos and label each blend "
                       "with the dlib teacher (for privface train --mixtures)")
    p.add_argument(
        "--data", action="append", required=True, help="dataset folder in LFW layout (repeatable)"
    )
    p.add_argument("--pairs", help="LFW pairs.txt: identities of folds 6-10 are excluded")
    p.add_argument("--count", type=int, required=True, help="how many mixtures")
    p.add_argument("--out", required=True, help=".npz to write")
    p.add_argument("--seed", type=int, default=0,
                   help="the training run's seed (its held-out identities are left out)")
    p.add_argument("--draw-seed", type=int,
                   help="seed of the pairs and shares (default: --seed): another draw, a fresh set")
    p.add_argument("--val-identities", type=int, default=60)
    p.add_argument("--limit-identities", type=int, help="first N identities of each set")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cache-dir")
    p.add_argument("--config")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func="privface.model_commands:cmd_mixtures")

    p = sub.add_parser("eval", help="evaluate models: LFW verification or 1:N identification")
    p.add_argument("protocol", choices=["lfw", "identify"])
    p.add_argument("--data", default="../shared/data", help="folder holding lfw/")
    p.add_argument("--model", default=None, help="protected model (default: shipped)")
    p.add_argument("--rgb-model")
    p.add_argument("--vanilla-model")
    p.add_argument("--json", help="write every figure here")
    p.add_argument("--plot", help="ROC (lfw) or DET (identify) curve PNG")
    p.add_argument("--no-flip", action="store_true", help="no flip test-time augmentation")
    p.add_argument("--greyscale", action="store_true", help="models see greyscale faces")
    p.add_argument("--average-permutations", action=argparse.BooleanOptionalAction,
                   default=None, help="embed each view under every permutation of its subset "
                   "and average, as the service does (default: the average_permutations "
                   "setting, on)")
    p.add_argument("--no-whiten", action="store_true",
                   help="the models' raw embeddings, not whitened (privface whiten)")
    p.add_argument("--score-centring", action=argparse.BooleanOptionalAction, default=None,
                   help="centre the scores with the model file's cohort, as the service does "
                   "with score_centring (default: that setting, off); with --write-threshold "
                   "the threshold for centred scores is written")
    p.add_argument("--only", help="comma-separated variants to run (e.g. protected,teacher)")
    p.add_argument("--draws", type=int, default=1,
                   help="lfw: also the protected model's mean accuracy over N draws of the "
                   "random ranks (seeds SEED..SEED+N-1), and each fixed subset's, with the "
                   "spread of those means")
    p.add_argument("--write-threshold", action="store_true",
                   help="store the FAR 1e-3 thresholds in the protected model's file")
    p.add_argument("--precision", choices=["fp32", "bf16", "auto", "int8"], default="fp32",
                   help="arithmetic of the models' convolutions (the service's model_precision;"
                   " int8: the graph of privface quantize)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir")
    p.add_argument("--config")
    p.set_defaults(func="privface.model_commands:cmd_eval")

    p = sub.add_parser("quantize", help="int8 graph of a model for model_precision = 'int8'")
    p.add_argument("--model", default=None, help="model file (default: shipped); the int8 "
                   "graph is written beside it as <stem>.int8.onnx")
    p.add_argument("--data", default="../shared/data", help="folder holding lfw/")
    p.add_argument("--images", type=int, default=256,
                   help="training-split images to calibrate on (two views each)")
    p.add_argument("--check", type=int, default=128,
                   help="other training-split images to compare int8 with fp32 on")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir")
    p.add_argument("--config")
    p.set_defaults(func="privface.model_commands:cmd_quantize")

    p = sub.add_parser("whiten", help="fit the embedding whitening and the score-centring "
                       "cohort of a model on training-split LFW faces and store them in the "
                       "model file")
    p.add_argument("--model", default=None, help="model file (default: shipped); rewritten")
    p.add_argument("--data", default="../shared/data", help="folder holding lfw/")
    p.add_argument("--dims", type=int, default=128,
                   help="principal directions kept (the distilled embeddings span 128)")
    p.add_argument("--power", type=float, default=0.5,
                   help="each direction divided by its std ** POWER (0: centring only, 1: full "
                   "whitening)")
    p.add_argument("--images", type=int, default=0,
                   help="training-split images in the cohort (default 0: all of them)")
    p.add_argument("--centroids", type=int, default=1000,
                   help="k-means centroids of the whitened cohort that score centring compares "
                   "each face with (0: no score centring)")
    p.add_argument("--top-k", type=int, default=20,
                   help="nearest centroids whose mean cosine is a face's cohort mean")
    p.add_argument("--remove", action="store_true",
                   help="remove the model's whitening and score centring")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir")
    p.add_argument("--config")
    p.set_defaults(func="privface.model_commands:cmd_whiten")

    # -- the service ----------------------------------------------------------------------
    p = sub.add_parser("serve", help="run the gRPC service (embedded PostgreSQL by default)")
    p.add_argument("--listen", help="HOST:PORT (default 127.0.0.1:50051)")
    p.add_argument("--data-dir", help="embedded PostgreSQL, quick-start key file")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--config")
    p.set_defaults(func="privface.service_commands:cmd_serve")

    p = sub.add_parser("gallery", help="create, delete, list galleries or show statistics")
    p.add_argument("action", choices=["create", "delete", "list", "stats"])
    p.add_argument("name", nargs="?", help="gallery name (default: --gallery)")
    p.add_argument("--description")
    _client_options(p)
    p.set_defaults(func="privface.service_commands:cmd_gallery")

    p = sub.add_parser("enroll", help="enrol a subject from face images (one sample each)")
    p.add_argument("images", nargs="+")
    p.add_argument("--subject", required=True, help="subject id, unique in the gallery")
    p.add_argument("--name", help="display name (stored encrypted)")
    p.add_argument("--meta", action="append", help="KEY=VALUE metadata (repeatable)")
    p.add_argument("--idempotency-key", help="retry-safe key (same key + same images = no-op)")
    _client_options(p, faces=True)
    p.set_defaults(func="privface.service_commands:cmd_enroll")

    p = sub.add_parser("enroll-batch", help="enrol a folder of subject folders (resumable)")
    p.add_argument("dir", help="one sub-folder per subject (its name is the subject id; "
                   "optional subject.json with display_name and metadata)")
    p.add_argument("--state", help="resume file (default: one per folder and gallery in "
                   "the cache dir)")
    p.add_argument("--report", help="write the report (failures with reasons) as JSON")
    p.add_argument("-q", "--quiet", action="store_true")
    _client_options(p, faces=True)
    p.set_defaults(func="privface.service_commands:cmd_enroll_batch")

    p = sub.add_parser("identify", help="1:N search of a face in a gallery")
    p.add_argument("image")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--threshold", type=float, help="decision threshold (default: server's)")
    _client_options(p, faces=True)
    p.set_defaults(func="privface.service_commands:cmd_identify")

    p = sub.add_parser("verify", help="1:1 comparison of a face with an enrolled subject")
    p.add_argument("image")
    p.add_argument("--subject", required=True)
    p.add_argument("--threshold", type=float, help="decision threshold (default: server's)")
    _client_options(p, faces=True)
    p.set_defaults(func="privface.service_commands:cmd_verify")

    p = sub.add_parser("delete", help="delete a subject with all its samples")
    p.add_argument("subject")
    _client_options(p)
    p.set_defaults(func="privface.service_commands:cmd_delete")

    p = sub.add_parser("subjects", help="list a gallery's subjects, or show one")
    p.add_argument("--subject", help="show this subject with its samples")
    _client_options(p)
    p.set_defaults(func="privface.service_commands:cmd_subjects")

    p = sub.add_parser("keys", help="key ring: init, status, rotate, new-template-key")
    p.add_argument("action", choices=["init", "status", "rotate", "new-template-key"])
    p.add_argument("--key-file", help="default: key_file, PRIVFACE_KEYRING_FILE or "
                   "DATA_DIR/keyring.json")
    p.add_argument("--wait", type=float, default=3.0,
                   help="rotate: seconds for running servers to reload the key file")
    p.add_argument("--remove-old", action="store_true",
                   help="rotate: drop encryption keys no value uses any more")
    p.add_argument("--json", action="store_true")
    p.add_argument("--config")
    p.set_defaults(func="privface.service_commands:cmd_keys")

    p = sub.add_parser("calibrate", help="a gallery's own decision threshold from its "
                       "enrolled samples (operator command: reads the database directly)")
    p.add_argument("gallery")
    p.add_argument("--far", type=float, default=1e-3,
                   help="false-match rate to calibrate for (default 1e-3; needs 10 / FAR "
                   "impostor pairs, i.e. samples of different subjects)")
    p.add_argument("--max-pairs", type=int, default=2_000_000,
                   help="impostor pairs scored at most (a random sample beyond)")
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--config")
    p.set_defaults(func="privface.service_commands:cmd_calibrate")

    p = sub.add_parser("tokens", help="add a client token (printed once, stored hashed)")
    p.add_argument("action", choices=["add"])
    p.add_argument("--file", help="tokens file (default: tokens_file)")
    p.add_argument("--name", required=True, help="who holds it (shown in the audit trail)")
    p.add_argument("--roles", required=True, help="comma-separated: identify, enroll, admin")
    p.add_argument("--galleries", required=True, help="comma-separated names/patterns, * = all")
    p.add_argument("--config")
    p.set_defaults(func="privface.service_commands:cmd_tokens")
    return parser


def _client_options(p: argparse.ArgumentParser, faces: bool = False) -> None:
    """Options every client command shares (defaults from the config file/environment)."""
    p.add_argument("--server", help="HOST:PORT (PRIVFACE_SERVER)")
    p.add_argument("--gallery", help="gallery name (PRIVFACE_GALLERY)")
    p.add_argument("--token", help="bearer token (PRIVFACE_TOKEN)")
    p.add_argument("--server-ca", help="CA certificate of the server: turns TLS on")
    p.add_argument("--client-cert", help="client certificate for mutual TLS")
    p.add_argument("--client-key", help="client key for mutual TLS")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--config")
    if faces:
        p.add_argument("--aligned", action="store_true", help="images are aligned 112x112 crops")
        p.add_argument("--cnn-fallback", action="store_true",
                       help="retry face detection with dlib's CNN detector")
        p.add_argument("--no-flip", action="store_true",
                       help="send only the face, not also its mirror image")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module, _, name = args.func.partition(":")
    import importlib

    return int(getattr(importlib.import_module(module), name)(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
