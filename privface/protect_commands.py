"""Client-side commands: align faces, protect them, and show what a protected input reveals.

Only protected inputs ever leave the client; these commands are what a client runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from enrollment import hfcf, partialface, rank_inference, wire
from enrollment.align import AlignmentError, align_file, load_aligned
from enrollment.align_batch import align_batch, collect_inputs, summarise
from enrollment.profiles import DEFAULT_PROFILE, ProtectionProfile, get_profile
from enrollment.protect import protect_faces


def cmd_align(args) -> int:
    items = collect_inputs(args.inputs)
    results = []
    bar = tqdm(total=len(items), unit="img", desc="align", disable=args.quiet)
    for r in align_batch(
        items,
        args.output,
        workers=args.workers,
        min_face=args.min_face,
        cnn_fallback=args.cnn_fallback,
        skip_existing=not args.force,
    ):
        results.append(r)
        bar.update()
        if r.status == "error":
            bar.write(f"error ({r.reason}): {r.message}", file=sys.stderr)
        for w in r.warnings:
            bar.write(f"warning: {r.source}: {w}", file=sys.stderr)
    bar.close()
    report = summarise(results)
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2))
    print(
        f"{report['files']} files: {report['aligned']} aligned, {report['skipped']} already "
        f"aligned, {report['failed']} failed {report['failures_by_reason'] or ''}, "
        f"{report['warnings']} with warnings"
    )
    return 1 if report["failed"] else 0


def face_of(path: str, aligned: bool) -> tuple[np.ndarray, list[str]]:
    """The aligned crop of one file (detected unless ``aligned``) and any warnings."""
    if aligned:
        return load_aligned(path), []
    face = align_file(path)
    return face.image, face.warnings


def parse_rank(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        s, p = (int(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"--rank takes SUBSET,PERMUTATION, got {text!r}") from None
    return s, p


def cmd_protect(args) -> int:
    profile = get_profile(args.profile or DEFAULT_PROFILE)
    rank = parse_rank(args.rank)
    if (
        rank is not None
        and profile.method == "partialface"
        and not (0 <= rank[0] < len(profile.subsets) and 0 <= rank[1] < len(profile.permutations))
    ):
        raise SystemExit(
            f"rank {rank} outside {len(profile.subsets)} subsets x "
            f"{len(profile.permutations)} permutations of {profile.name}"
        )
    rng = np.random.default_rng(args.seed)
    out = Path(args.output)
    if out.suffix == ".npy" and len(args.images) != 1:
        raise SystemExit("-o x.npy takes exactly one image; use a .pfpi file or a folder")
    faces, names, failed = [], [], 0
    for path in tqdm(args.images, unit="img", desc="protect", disable=len(args.images) < 2):
        try:
            face, warnings = face_of(path, args.aligned)
        except AlignmentError as exc:
            print(f"error ({exc.reason}): {exc}", file=sys.stderr)
            failed += 1
            continue
        for w in warnings:
            print(f"warning: {path}: {w}", file=sys.stderr)
        faces.append(face)
        names.append(Path(path).stem)
    if not faces:
        print("no face protected", file=sys.stderr)
        return 1
    protected = protect_faces(np.stack(faces), profile, ranks=rank, rng=rng)
    if out.suffix == ".npy":
        np.save(out, protected[0].astype(np.float32))
        written = [out]
    elif out.suffix == ".pfpi":
        out.write_bytes(wire.encode(protected, profile))
        written = [out]
    else:
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for name, x in zip(names, protected, strict=True):
            target = out / f"{name}.pfpi"
            target.write_bytes(wire.encode(x, profile))
            written.append(target)
    size = sum(p.stat().st_size for p in written)
    print(f"{len(faces)} protected ({profile.name}), {failed} failed; {size} bytes written")
    return 1 if failed else 0


def read_protected(path: str, profile_name: str | None) -> tuple[ProtectionProfile, np.ndarray]:
    """A .npy (bare array, profile from the option) or wire file, as (N, C, H, W) float32."""
    if path.endswith(".npy"):
        profile = get_profile(profile_name or DEFAULT_PROFILE)
        array = np.load(path).astype(np.float32)
        return profile, array[None] if array.ndim == 3 else array
    return wire.load(Path(path).read_bytes())


def reconstruct(x: np.ndarray, profile: ProtectionProfile, rank: tuple[int, int] | None):
    """The no-learning inverse of one protected face (3, 112, 112) and the rank it assumed.

    Without a known rank this is the white-box attacker who knows the published candidate
    set: the rank is read off the input's channel energy profiles (``rank_inference``:
    every rank right on the faces measured), not guessed.
    """
    if profile.method == "hfcf":
        fused = x[: hfcf.N_FUSED]
        channels = np.array(hfcf.AC)  # fused maps read as luminance: the plane is unknown
        rgb = partialface.inverse(fused[None], channels, profile.factor)[0]
        return rgb, None
    if rank is None:
        found, _ = rank_inference.infer_ranks(x[None], profile)
        rank = (int(found[0, 0]), int(found[0, 1]))
    return partialface.inverse(x[None], profile.rank_channels(*rank), profile.factor)[0], rank


def stretch(rgb: np.ndarray) -> np.ndarray:
    """Contrast-stretch a faint reconstruction to the full range (robust percentiles)."""
    lo, hi = np.percentile(rgb, [1, 99])
    return (rgb - lo) / max(hi - lo, 1e-6) * 255.0


def cmd_show_protected(args) -> int:
    profile, array = read_protected(args.input, args.profile)
    x = array[args.index]
    rgb, used = reconstruct(x, profile, parse_rank(args.rank))
    panels = []
    if args.original:
        face, _ = face_of(args.original, args.aligned)
        panels.append(face)
    panels += [partialface.to_uint8_image(rgb), partialface.to_uint8_image(stretch(rgb))]
    gap = np.full((112, 4, 3), 255, np.uint8)
    row = np.concatenate([p for panel in panels for p in (panel, gap)][:-1], axis=1)
    Image.fromarray(row).resize((row.shape[1] * 2, 224), Image.Resampling.NEAREST).save(args.output)
    what = "original | " if args.original else ""
    print(
        f"wrote {args.output}: {what}inverse transform | contrast-stretched inverse"
        + (f" (rank {used[0]},{used[1]})" if used else "")
    )
    return 0
