"""Aligning many files: folders walked in LFW layout, one bad file never stops a batch.

Work is spread over processes (dlib's detector holds the GIL), results come back in input
order, and a report counts what failed and why.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from PIL import Image

from enrollment.align import AlignmentError, align_file


@dataclass
class FileResult:
    """What happened to one input file."""

    source: str
    output: str | None
    status: str  # "ok", "skipped" (already aligned) or "error"
    reason: str | None = None
    message: str | None = None
    warnings: list[str] = field(default_factory=list)


def collect_inputs(inputs: Iterable[str | os.PathLike]) -> list[tuple[Path, Path]]:
    """(source, relative output path) pairs; a folder keeps its layout below its own name.

    Every regular non-hidden file in a folder is taken, so non-images are reported, not hidden.
    """
    items: list[tuple[Path, Path]] = []
    for given in inputs:
        p = Path(given)
        if p.is_dir():
            for path in sorted(p.rglob("*")):
                rel = path.relative_to(p)
                if path.is_file() and not any(part.startswith(".") for part in rel.parts):
                    items.append((path, Path(p.name) / rel))
        else:
            items.append((p, Path(p.name)))
    return items


def _align_one(job: tuple[str, str | None, int, bool]) -> FileResult:
    source, output, min_face, cnn_fallback = job
    try:
        face = align_file(source, min_face=min_face, cnn_fallback=cnn_fallback)
    except AlignmentError as exc:
        return FileResult(source, None, "error", exc.reason, str(exc))
    except Exception as exc:  # a batch never stops on one file
        return FileResult(source, None, "error", "internal", f"{source}: {exc!r}")
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(output).with_suffix(".tmp.png")
        Image.fromarray(face.image).save(tmp)
        os.replace(tmp, output)
    return FileResult(source, output, "ok", warnings=face.warnings)


def align_batch(
    items: list[tuple[Path, Path]],
    out_dir: str | os.PathLike,
    workers: int = 2,
    skip_existing: bool = True,
    min_face: int = 40,
    cnn_fallback: bool = False,
) -> Iterator[FileResult]:
    """Align each (source, relative path) into ``out_dir`` as PNG, yielding results in order."""
    out = Path(out_dir)
    jobs = []
    for source, rel in items:
        target = out / rel.with_suffix(".png")
        if skip_existing and target.exists():
            yield FileResult(str(source), str(target), "skipped")
            continue
        jobs.append((str(source), str(target), min_face, cnn_fallback))
    if workers <= 1 or len(jobs) < 4:
        yield from map(_align_one, jobs)
        return
    with get_context("fork").Pool(workers) as pool:
        yield from pool.imap(_align_one, jobs, chunksize=8)


def summarise(results: Iterable[FileResult]) -> dict:
    """Counts by status and by failure reason, plus the failures themselves."""
    results = list(results)
    status = Counter(r.status for r in results)
    reasons = Counter(r.reason for r in results if r.status == "error")
    return {
        "files": len(results),
        "aligned": status["ok"],
        "skipped": status["skipped"],
        "failed": status["error"],
        "warnings": sum(1 for r in results if r.warnings),
        "failures_by_reason": dict(reasons),
        "failures": [
            {"file": r.source, "reason": r.reason, "message": r.message}
            for r in results
            if r.status == "error"
        ],
    }
