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
    p.add_argument("--profile", default="partialface-paper")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module, _, name = args.func.partition(":")
    import importlib

    return int(getattr(importlib.import_module(module), name)(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
