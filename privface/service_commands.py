"""Service commands: run the server, manage galleries and subjects, search, keys and tokens.

Client commands detect, align and protect faces here, on the client; only protected inputs
cross the wire. Each takes ``--server HOST:PORT``, ``--gallery NAME`` and ``--token`` (or
``PRIVFACE_SERVER`` / ``PRIVFACE_GALLERY`` / ``PRIVFACE_TOKEN``, or the config file), TLS
options, and ``--json`` for machine-readable output. Exit status: 0 on success (a search
that finds no match is a success), 1 when the server refused or something failed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from privface.config import Settings, load_settings

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".pgm", ".bmp", ".ppm", ".tif", ".tiff", ".webp"}
SUBJECT_FILE = "subject.json"


# ------------------------------------------------------------------------------- helpers


def _settings(args: Any) -> Settings:
    return load_settings(getattr(args, "config", None))


def _client(args: Any, settings: Settings):
    from privface.client import PrivfaceClient

    target = args.server or settings.server or settings.listen
    token = args.token if args.token is not None else settings.token
    return PrivfaceClient(
        target,
        token=token or None,
        server_ca=args.server_ca or settings.server_ca or None,
        client_cert=args.client_cert or settings.client_cert or None,
        client_key=args.client_key or settings.client_key or None,
        max_message_bytes=settings.max_message_bytes,
    )


def _gallery(args: Any, settings: Settings) -> str:
    gallery = args.gallery or settings.gallery
    if not gallery:
        raise SystemExit("no gallery: pass --gallery NAME or set PRIVFACE_GALLERY")
    return gallery


def _emit(args: Any, data: Any, text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        print(text)


def _to_dict(message: Any) -> dict:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(message, preserving_proto_field_name=True,
                         always_print_fields_with_no_presence=True)


def _fail(args: Any, exc: Exception) -> int:
    from privface.client import ClientError

    if isinstance(exc, ClientError):
        error = {"code": exc.code.name, "message": exc.details, "reason": exc.reason}
    else:
        error = {"code": type(exc).__name__, "message": str(exc), "reason": getattr(
            exc, "reason", "")}
    if getattr(args, "json", False):
        print(json.dumps({"error": error}, indent=2))
    else:
        reason = f" [{error['reason']}]" if error["reason"] else ""
        print(f"error: {error['code']}: {error['message']}{reason}", file=sys.stderr)
    return 1


def _protect(args: Any, profile, path: str, deterministic: bool = False) -> bytes:
    from privface.client import protect_image

    blob, warnings = protect_image(
        path, profile, flip=not args.no_flip, aligned=args.aligned,
        cnn_fallback=args.cnn_fallback, deterministic=deterministic,
    )
    for w in warnings:
        print(f"warning: {path}: {w}", file=sys.stderr)
    return blob


def _protect_files(args: Any, profile, paths: list[str], deterministic: bool = False):
    """Align each file, then protect all faces in one batch: (blobs, failures by file).

    ``failures`` holds (path, reason, message) of files without a usable face.
    """
    import numpy as np

    from enrollment.align import AlignmentError, align_file, load_aligned
    from privface.client import content_rng, protect_many

    faces, rngs, failures = [], [], []
    for path in paths:
        try:
            if args.aligned:
                face = load_aligned(path)
            else:
                aligned = align_file(path, cnn_fallback=args.cnn_fallback)
                face = aligned.image
                for w in aligned.warnings:
                    print(f"warning: {path}: {w}", file=sys.stderr)
        except AlignmentError as exc:
            failures.append((path, exc.reason, str(exc)))
            continue
        except Exception as exc:  # noqa: BLE001 - one bad file never stops a batch
            failures.append((path, "internal", repr(exc)))
            continue
        faces.append(face)
        rngs.append(content_rng(Path(path).read_bytes(), profile.name) if deterministic
                    else np.random.default_rng())
    if not faces:
        return [], failures
    return protect_many(np.stack(faces), profile, flip=not args.no_flip, rngs=rngs), failures


def _metadata(pairs: list[str] | None) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--meta takes KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


def _client_command(func):
    """Run a client command: connection errors and refusals become one error line."""

    def run(args: Any) -> int:
        from enrollment.align import AlignmentError
        from privface.client import ClientError

        settings = _settings(args)
        try:
            with _client(args, settings) as client:
                return int(func(args, settings, client) or 0)
        except (ClientError, AlignmentError) as exc:
            return _fail(args, exc)

    run.__name__ = func.__name__
    return run


# ------------------------------------------------------------------------------- serve


def cmd_serve(args: Any) -> int:
    from privface.server import serve

    settings = _settings(args)
    if args.listen:
        settings.listen = args.listen
    if args.data_dir:
        settings.data_dir = args.data_dir
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.log_level != "debug":  # pgserver narrates every pg_ctl call at INFO
        logging.getLogger("pgserver").setLevel(logging.WARNING)
    from privface.errors import ServiceError
    from storage.errors import StorageError

    try:
        return serve(settings)
    except (OSError, ValueError, StorageError, ServiceError) as exc:
        # Configuration problems (no model, no threshold, bad key file, ...): one clear line.
        logging.getLogger("privface.server").error("cannot start: %s", exc)
        return 2


# ------------------------------------------------------------------------------- galleries


def _gallery_line(g) -> str:
    desc = f"  {g.description}" if g.description else ""
    return f"{g.name}: {g.subject_count} subjects, {g.sample_count} samples{desc}"


@_client_command
def cmd_gallery(args: Any, settings: Settings, client) -> int:
    if args.action == "list":
        galleries = client.list_galleries()
        _emit(args, [_to_dict(g) for g in galleries],
              "\n".join(_gallery_line(g) for g in galleries) or "no galleries")
        return 0
    name = args.name or args.gallery or settings.gallery
    if not name:
        raise SystemExit(f"gallery {args.action} needs a NAME")
    if args.action == "create":
        g = client.create_gallery(name, args.description or "")
        _emit(args, _to_dict(g), f"created gallery {g.name}")
    elif args.action == "delete":
        g = client.delete_gallery(name)
        _emit(args, _to_dict(g), f"deleted gallery {g.name} ({g.subject_count} subjects, "
                                 f"{g.sample_count} samples)")
    else:  # stats
        st = client.gallery_stats(name)
        lines = [_gallery_line(st.gallery),
                 f"index: {st.index_type} ({'GPU' if st.on_gpu else 'CPU'}), "
                 f"{st.indexed_samples} templates searchable; default threshold "
                 f"{st.default_threshold:.4f}"]
        lines += [f"  {v.sample_count} samples: model {v.model_version}, profile "
                  f"{v.profile_name} v{v.profile_version}, template key {v.template_key_id}"
                  f"{'' if v.searchable else ' (NOT searchable)'}"
                  for v in st.template_versions]
        _emit(args, _to_dict(st), "\n".join(lines))
    return 0


# ------------------------------------------------------------------------------- subjects


@_client_command
def cmd_enroll(args: Any, settings: Settings, client) -> int:
    gallery = _gallery(args, settings)
    profile = client.profile()
    samples, failures = _protect_files(args, profile, args.images,
                                       deterministic=bool(args.idempotency_key))
    for _path, reason, message in failures:
        print(f"error ({reason}): {message}", file=sys.stderr)
    if failures:
        raise SystemExit(f"{len(failures)} of {len(args.images)} images have no usable face; "
                         "nothing was enrolled")
    r = client.enroll(gallery, args.subject, samples, display_name=args.name or "",
                      metadata=_metadata(args.meta), idempotency_key=args.idempotency_key or "")
    _emit(args, _to_dict(r), f"{'already enrolled' if r.replayed else 'enrolled'} "
                             f"{r.subject_id} with {len(r.sample_ids)} samples")
    return 0


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def _subject_plan(folder: Path) -> tuple[list[Path], str, dict[str, str], str]:
    """(images, display name, metadata, digest of everything that defines the request)."""
    files = _image_files(folder)
    display_name, metadata = "", {}
    meta_file = folder / SUBJECT_FILE
    if meta_file.exists():
        doc = json.loads(meta_file.read_text(encoding="utf-8"))
        display_name = str(doc.get("display_name", ""))
        metadata = {str(k): str(v) for k, v in (doc.get("metadata") or {}).items()}
    h = hashlib.sha256()
    h.update(json.dumps([folder.name, display_name, sorted(metadata.items())]).encode())
    for f in files:
        h.update(f.name.encode() + b"\x00" + hashlib.sha256(f.read_bytes()).digest())
    return files, display_name, metadata, h.hexdigest()


def _default_state(settings: Settings, root: Path, gallery: str) -> Path:
    """Resume file in the cache dir (never inside the input folder, which may be read-only
    or shared): one per (folder, gallery)."""
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    target = Path(settings.cache_dir).expanduser() / "enroll-batch"
    target.mkdir(parents=True, exist_ok=True)
    return target / f"{gallery}-{root.name}-{key}.json"


class _State:
    """The resume file of a batch: subjects done, by the digest of what was sent."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: dict[str, dict] = {}
        if path.exists():
            self.done = json.loads(path.read_text(encoding="utf-8")).get("done", {})

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"done": self.done}, indent=1))
        os.replace(tmp, self.path)


@_client_command
def cmd_enroll_batch(args: Any, settings: Settings, client) -> int:
    """Folder per subject: resumable (state file), idempotent (keys), with a failure report."""
    from tqdm import tqdm

    gallery = _gallery(args, settings)
    root = Path(args.dir)
    if not root.is_dir():
        raise SystemExit(f"{root} is not a folder")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    state = _State(Path(args.state) if args.state else _default_state(settings, root, gallery))
    profile = client.profile()
    limit = min(client.server_info().max_message_bytes or settings.max_message_bytes,
                settings.max_message_bytes) - 4096
    report: dict[str, Any] = {"gallery": gallery, "subjects": len(folders), "enrolled": 0,
                              "replayed": 0, "skipped": 0, "failed": 0, "failures": [],
                              "image_failures": []}
    pending = []
    for folder in folders:
        files, name, meta, digest = _subject_plan(folder)
        if state.done.get(folder.name, {}).get("digest") == digest:
            report["skipped"] += 1
        else:
            pending.append((folder, files, name, meta, digest))
    quiet = args.quiet or args.json
    bar = tqdm(total=len(pending), unit="subject", desc="enrol", disable=quiet)
    sent: list[tuple[str, str]] = []

    def fail(subject: str, reason: str, message: str, status: str = "") -> None:
        report["failed"] += 1
        report["failures"].append({"subject_id": subject, "status": status, "reason": reason,
                                   "message": message})
        if not quiet:
            bar.write(f"failed {subject}: {status + ' ' if status else ''}{reason}: {message}",
                      file=sys.stderr)

    def requests() -> Iterator:
        for folder, files, name, meta, digest in pending:
            samples, failures = _protect_files(args, profile, [str(f) for f in files],
                                               deterministic=True)
            report["image_failures"] += [
                {"subject_id": folder.name, "file": path, "reason": reason, "message": message}
                for path, reason, message in failures]
            if not samples:
                fail(folder.name, "no_face", f"no usable image among {len(files)} files")
                bar.update()
                continue
            request = client.enroll_request(gallery, folder.name, samples, display_name=name,
                                            metadata=meta, idempotency_key=f"batch-{digest[:48]}")
            if request.ByteSize() > limit:  # would end the whole stream with RESOURCE_EXHAUSTED
                fail(folder.name, "too_large",
                     f"{len(samples)} images make a {request.ByteSize() / 2**20:.1f} MiB request; "
                     f"the server accepts {limit / 2**20:.1f} MiB: enrol fewer images, add the "
                     "rest with more requests", "RESOURCE_EXHAUSTED")
                bar.update()
                continue
            sent.append((folder.name, digest))
            yield request

    try:
        for result in client.enroll_batch(requests()):
            subject, digest = sent[result.index]
            if result.ok:
                report["replayed" if result.replayed else "enrolled"] += 1
                state.done[subject] = {"digest": digest, "sample_ids": list(result.sample_ids)}
                state.save()
            else:
                fail(subject, result.reason, result.message, result.status)
            bar.update()
    except Exception as exc:
        from privface.client import ClientError

        if not (isinstance(exc, ClientError) and exc.reason == "empty" and not sent):
            bar.close()
            raise
    bar.close()
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2))
    text = (f"{report['subjects']} subjects: {report['enrolled']} enrolled, "
            f"{report['replayed']} already enrolled, {report['skipped']} skipped (done before), "
            f"{report['failed']} failed; {len(report['image_failures'])} images without a "
            f"usable face")
    report["state_file"] = str(state.path)
    _emit(args, report, text + f"\nresume file: {state.path}")
    return 1 if report["failed"] else 0


@_client_command
def cmd_delete(args: Any, settings: Settings, client) -> int:
    gallery = _gallery(args, settings)
    removed = client.delete_subject(gallery, args.subject)
    _emit(args, {"subject_id": args.subject, "removed_sample_ids": removed},
          f"deleted {args.subject} ({len(removed)} samples)")
    return 0


def _subject_text(s) -> str:
    meta = ", ".join(f"{k}={v}" for k, v in sorted(s.metadata.items()))
    name = f" ({s.display_name})" if s.display_name else ""
    return f"{s.subject_id}{name}: {s.sample_count} samples{'; ' + meta if meta else ''}"


@_client_command
def cmd_subjects(args: Any, settings: Settings, client) -> int:
    gallery = _gallery(args, settings)
    if args.subject:
        s = client.get_subject(gallery, args.subject)
        lines = [_subject_text(s)] + [
            f"  sample {x.sample_id}: model {x.model_version}, template key {x.template_key_id}"
            for x in s.samples]
        _emit(args, _to_dict(s), "\n".join(lines))
        return 0
    subjects = list(client.list_subjects(gallery))
    _emit(args, [_to_dict(s) for s in subjects],
          "\n".join(_subject_text(s) for s in subjects) or "no subjects")
    return 0


# ------------------------------------------------------------------------------- matching


@_client_command
def cmd_identify(args: Any, settings: Settings, client) -> int:
    from privface.v1 import gallery_pb2 as pb

    gallery = _gallery(args, settings)
    probe = _protect(args, client.profile(), args.image)
    r = client.identify(gallery, probe, top_k=args.top_k, threshold=args.threshold)
    head = (f"MATCH {r.subject_id} (score {r.score:.4f} >= threshold {r.threshold:.4f})"
            if r.decision == pb.MATCH else
            f"NO MATCH (best score {r.score:.4f} < threshold {r.threshold:.4f})")
    lines = [head] + [f"  {i + 1}. {c.subject_id}  {c.score:.4f}{'  match' if c.match else ''}"
                      for i, c in enumerate(r.candidates)]
    _emit(args, _to_dict(r), "\n".join(lines))
    return 0


@_client_command
def cmd_verify(args: Any, settings: Settings, client) -> int:
    from privface.v1 import gallery_pb2 as pb

    gallery = _gallery(args, settings)
    probe = _protect(args, client.profile(), args.image)
    r = client.verify(gallery, args.subject, probe, threshold=args.threshold)
    verdict = "MATCH" if r.decision == pb.MATCH else "NO MATCH"
    _emit(args, _to_dict(r), f"{verdict}: {args.subject} score {r.score:.4f} "
                             f"(threshold {r.threshold:.4f})")
    return 0


# ------------------------------------------------------------------------------- keys, tokens


def _key_file(args: Any, settings: Settings) -> Path:
    value = (args.key_file or settings.key_file or os.environ.get("PRIVFACE_KEYRING_FILE", ""))
    path = Path(value).expanduser() if value else Path(settings.data_dir).expanduser() / (
        "keyring.json")
    if args.action != "init" and not path.exists():
        raise SystemExit(f"key file {path} does not exist (pass --key-file)")
    return path


def _database(settings: Settings):
    """A session factory on the configured database (or the data dir's embedded one)."""
    from storage.database import make_engine, make_session_factory

    embedded = None
    url = settings.database_url
    if not url:
        from storage.embedded import start_embedded

        embedded = start_embedded(Path(settings.data_dir).expanduser() / "postgres")
        url = embedded.url
    engine = make_engine(url)
    return make_session_factory(engine), engine, embedded


def cmd_calibrate(args: Any) -> int:
    """A gallery's threshold at --far from its own samples, scored as the configured server
    scores them (model, score_centring, key ring); prints the line for the config file."""
    from privface.gallery_service import GalleryEngine
    from privface.keys import resolve_keyring
    from privface.server import make_embedder
    from storage.errors import GalleryNotFound

    if not 0 < args.far < 1:
        raise SystemExit(f"--far must be in (0, 1), not {args.far}")
    settings = _settings(args)
    embedder = make_embedder(settings)
    keys = resolve_keyring(settings.key_file, settings.data_dir, create_quickstart=False)
    sessions, db, embedded = _database(settings)
    try:
        engine = GalleryEngine(sessions, keys, embedder)
        result = engine.calibrate_threshold(args.gallery, args.far, args.max_pairs)
    except GalleryNotFound:
        print(f"gallery {args.gallery!r} does not exist", file=sys.stderr)
        return 1
    finally:
        db.dispose()
        if embedded is not None:
            embedded.stop()
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2))
    scoring = "centred" if settings.score_centring else "plain"

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x * 100:.1f}%"

    print(f"gallery {args.gallery}: {result.samples} samples of {result.subjects} subjects "
          f"({embedder.card.model_version}, {scoring} scores); {result.impostor_pairs} "
          f"impostor pairs{' (sampled)' if result.sampled else ''}, {result.genuine_pairs} "
          "genuine pairs")
    fmr = result.false_match_rate_at_current
    print(f"threshold in force {result.current_threshold:.4f}: false-match rate "
          f"{'-' if fmr is None else f'{fmr:.2e}'}, genuine pairs accepted "
          f"{pct(result.true_match_rate_at_current)}")
    if result.threshold is None:
        print(f"too few impostor pairs for FAR {args.far:g}: {result.impostor_pairs} of the "
              f"{result.min_impostor_pairs} needed (enrol more people, or calibrate a "
              "larger gallery of the same cameras)", file=sys.stderr)
        return 1
    print(f"threshold at FAR {args.far:g}: {result.threshold:.4f} (genuine pairs accepted "
          f"{pct(result.true_match_rate)})")
    print(f"to use it: threshold = {result.threshold:.4f}   (config file, or "
          f"PRIVFACE_THRESHOLD; a request's own threshold still overrides it)")
    return 0


def cmd_keys(args: Any) -> int:
    """Key ring: init, status, rotate (online re-encryption), new-template-key."""
    from privface import keys
    from storage.crypto import load_keyring, save_keyring

    settings = _settings(args)
    path = _key_file(args, settings)
    if args.action == "init":
        save_keyring(keys.new_service_keyring(), path)
        print(f"wrote {path} (mode 0600): encryption key k1, template key tmap-1")
        return 0
    ring = load_keyring(path)
    if args.action == "new-template-key":
        new = keys.add_template_key(ring)
        save_keyring(new, path, overwrite=True)
        print(f"added template key {keys.template_key_ids(new)[-1]}: new enrolments use it; "
              "samples of older versions stay searchable until removed (re-enrol, then remove)")
        return 0
    if args.action == "rotate":
        new = keys.rotate_encryption_key(ring)
        save_keyring(new, path, overwrite=True)
        print(f"{path}: new primary encryption key {new.primary}; waiting {args.wait:g} s for "
              "running servers to load it", flush=True)
        time.sleep(args.wait)
    from storage.repository import key_usage, rotate_keys

    factory, engine, embedded = _database(settings)
    try:
        with factory() as s:
            if args.action == "rotate":
                report = rotate_keys(s, new)
                usage = report.key_usage
                data = {"primary": report.primary_key_id, "reencrypted": report.reencrypted,
                        "key_usage": usage,
                        "failures": [f.__dict__ if hasattr(f, "__dict__") else str(f)
                                     for f in report.failures]}
                if args.remove_old and not report.failures:
                    unused = [k for k in keys.encryption_key_ids(new)
                              if k != new.primary and k not in usage]
                    for k in unused:
                        new = new.remove_key(k)
                    save_keyring(new, path, overwrite=True)
                    data["removed"] = unused
            else:
                usage = key_usage(s)
                data = {"primary": ring.primary, "encryption_keys": keys.encryption_key_ids(ring),
                        "template_keys": keys.template_key_ids(ring), "key_usage": usage}
    finally:
        engine.dispose()
        if embedded is not None:
            embedded.stop()
    text = "\n".join(f"{k}: {v}" for k, v in data.items())
    _emit(args, data, text)
    return 1 if data.get("failures") else 0


def cmd_tokens(args: Any) -> int:
    from privface.auth import add_token

    settings = _settings(args)
    path = args.file or settings.tokens_file
    if not path:
        raise SystemExit("no tokens file: pass --file or set tokens_file (PRIVFACE_TOKENS_FILE)")
    roles = [r.strip() for r in args.roles.split(",") if r.strip()]
    galleries = [g.strip() for g in args.galleries.split(",") if g.strip()]
    try:
        token = add_token(path, args.name, roles, galleries)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    print(token)
    print(f"token {args.name!r} ({', '.join(roles)}; galleries {', '.join(galleries)}) added "
          f"to {path}; it is shown only now", file=sys.stderr)
    return 0
