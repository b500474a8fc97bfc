"""The storage operations the gRPC service calls: galleries, subjects, samples, change feed,
audit trail and key rotation.

Transactions: every function takes a :class:`~sqlalchemy.orm.Session` and does **not**
commit — the caller decides what one transaction is (``with factory.begin() as session``).
The exception is :func:`rotate_keys`, which commits after each batch so rotation never holds
long locks. Run under PostgreSQL's default READ COMMITTED isolation.

Write ordering: every write that changes which templates a gallery holds first locks the
gallery row (``SELECT ... FOR NO KEY UPDATE``). Writes to one gallery are thereby serialised,
so change-sequence numbers of one gallery commit in increasing order and a reader's snapshot
always sees a gap-free prefix; that is what makes :func:`templates_changed_since` exact.
Writes to different galleries, and all reads, run in parallel. The same lock makes
idempotency-key and duplicate-subject checks race-free.

Inputs are validated here too (not only in the service): nothing malformed reaches the
database, and each problem is a :mod:`storage.errors` exception with an actionable message.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import Row, delete, func, insert, select, text, union_all, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from storage.crypto import KeyRing, row_aad
from storage.errors import (
    AlreadyExists,
    DecryptionFailed,
    GalleryNotFound,
    IdempotencyConflict,
    InvalidArgument,
    SampleNotFound,
    StaleCursor,
    StorageError,
    SubjectNotFound,
    TemplateDimensionMismatch,
)
from storage.models import (
    GALLERY_NAME_MAX,
    IDEMPOTENCY_KEY_MAX,
    OPERATION_MAX,
    PRINCIPAL_MAX,
    STATUS_MAX,
    SUBJECT_ID_MAX,
    VERSION_MAX,
    AuditEntry,
    Gallery,
    IdempotencyKey,
    Sample,
    SampleTombstone,
    Subject,
    change_seq,
)
from storage.records import (
    AuditRecord,
    ChangeSet,
    EnrollResult,
    GalleryInfo,
    RotationFailure,
    RotationReport,
    SampleInfo,
    SampleInput,
    SubjectPage,
    SubjectRecord,
    TemplateRecord,
)

__all__ = [
    "add_samples",
    "append_audit",
    "change_watermark",
    "compute_request_digest",
    "create_gallery",
    "delete_gallery",
    "delete_subject",
    "enroll_subject",
    "get_gallery",
    "get_subject",
    "iter_gallery_templates",
    "key_usage",
    "list_audit",
    "list_galleries",
    "list_subjects",
    "purge_idempotency_keys",
    "purge_tombstones",
    "remove_samples",
    "rename_subject",
    "rotate_keys",
    "template_versions",
    "templates_changed_since",
    "update_subject_metadata",
]

# ---------------------------------------------------------------------------------------------
# Limits (documented for the API layer; each violation is an InvalidArgument)
# ---------------------------------------------------------------------------------------------

MAX_DISPLAY_NAME = 1024
MAX_METADATA_ENTRIES = 64
MAX_METADATA_KEY = 128
MAX_METADATA_VALUE = 4096
MAX_SAMPLES_PER_CALL = 1024
MAX_TEMPLATE_DIM = 65536
MAX_PAGE_SIZE = 1000
MAX_CHANGES_PER_CALL = 100_000

_GALLERY_NAME_RE = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9._-]{{0,{GALLERY_NAME_MAX - 1}}}$")
_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")

OP_ENROLL = "enroll"
OP_ADD_SAMPLES = "add_samples"


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _check_gallery_name(name: str) -> str:
    if not isinstance(name, str) or not _GALLERY_NAME_RE.match(name):
        raise InvalidArgument(
            f"gallery name {name!r} is invalid: use 1-{GALLERY_NAME_MAX} characters from "
            "A-Z a-z 0-9 . _ - starting with a letter or digit"
        )
    return name


def _check_text(value: object, what: str, max_len: int, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a string, got {type(value).__name__}")
    if not value and not allow_empty:
        raise InvalidArgument(f"{what} must not be empty")
    if len(value) > max_len:
        raise InvalidArgument(f"{what} is {len(value)} characters long; the limit is {max_len}")
    if not value.isprintable():
        raise InvalidArgument(f"{what} contains control characters")
    return value


def _check_subject_id(subject_id: str) -> str:
    _check_text(subject_id, "subject_id", SUBJECT_ID_MAX)
    if subject_id != subject_id.strip():
        raise InvalidArgument(f"subject_id {subject_id!r} has leading or trailing whitespace")
    return subject_id


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise InvalidArgument("metadata must be a map of string to string")
    if len(metadata) > MAX_METADATA_ENTRIES:
        raise InvalidArgument(
            f"metadata has {len(metadata)} entries; the limit is {MAX_METADATA_ENTRIES}"
        )
    out: dict[str, str] = {}
    for key, value in metadata.items():
        _check_text(key, "metadata key", MAX_METADATA_KEY)
        if not isinstance(value, str):
            raise InvalidArgument(f"metadata value for {key!r} must be a string")
        if len(value) > MAX_METADATA_VALUE:
            raise InvalidArgument(
                f"metadata value for {key!r} is {len(value)} characters; "
                f"the limit is {MAX_METADATA_VALUE}"
            )
        out[key] = value
    return out


def _check_template(template: object, index: int) -> np.ndarray:
    """A finite, non-zero 1-D float vector, returned as little-endian float32."""
    arr = np.asarray(template)
    where = f"sample {index}"
    if arr.dtype.kind != "f":
        raise InvalidArgument(f"{where}: template dtype must be floating point, got {arr.dtype}")
    if arr.ndim != 1:
        raise InvalidArgument(f"{where}: template must be a 1-D vector, got shape {arr.shape}")
    if not 1 <= arr.shape[0] <= MAX_TEMPLATE_DIM:
        raise InvalidArgument(
            f"{where}: template has {arr.shape[0]} values; allowed 1-{MAX_TEMPLATE_DIM}"
        )
    with np.errstate(over="ignore", invalid="ignore"):  # overflow shows up as inf below
        out = arr.astype("<f4")
    if not np.isfinite(out).all():
        raise InvalidArgument(f"{where}: template contains NaN or infinity (after float32 cast)")
    if not np.any(out):
        raise InvalidArgument(f"{where}: template is all zeros and cannot be compared")
    return out


def _check_samples(samples: Sequence[SampleInput]) -> list[tuple[SampleInput, np.ndarray]]:
    if isinstance(samples, SampleInput) or not isinstance(samples, Sequence):
        raise InvalidArgument("samples must be a list of SampleInput")
    if not samples:
        raise InvalidArgument("at least one sample is required")
    if len(samples) > MAX_SAMPLES_PER_CALL:
        raise InvalidArgument(
            f"{len(samples)} samples in one call; the limit is {MAX_SAMPLES_PER_CALL}"
        )
    checked = []
    for i, sample in enumerate(samples):
        if not isinstance(sample, SampleInput):
            raise InvalidArgument(f"sample {i} must be a SampleInput")
        _check_text(sample.model_version, f"sample {i}: model_version", VERSION_MAX)
        _check_text(sample.profile_name, f"sample {i}: profile_name", VERSION_MAX)
        _check_text(sample.profile_version, f"sample {i}: profile_version", VERSION_MAX)
        _check_text(sample.template_key_id, f"sample {i}: template_key_id", VERSION_MAX)
        checked.append((sample, _check_template(sample.template, i)))
    return checked


def _check_aware(value: datetime, what: str) -> datetime:
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise InvalidArgument(f"{what} must be a timezone-aware datetime")
    return value


def _check_idempotency(key: str | None, digest: str | None) -> None:
    if key is not None:
        _check_text(key, "idempotency_key", IDEMPOTENCY_KEY_MAX)
    if digest is not None and not _DIGEST_RE.match(digest):
        raise InvalidArgument("request_digest must be a lowercase hex SHA-256 (64 characters)")


# ---------------------------------------------------------------------------------------------
# Encryption helpers
# ---------------------------------------------------------------------------------------------


def _encrypt_str(keyring: KeyRing, table: str, row_id: int, column: str, value: str):
    return keyring.encrypt(value.encode("utf-8"), row_aad(table, row_id, column))


def _decrypt_str(
    keyring: KeyRing, table: str, row_id: int, column: str, key_id: str, blob: bytes
) -> str:
    return keyring.decrypt(key_id, blob, row_aad(table, row_id, column)).decode("utf-8")


def _metadata_bytes(metadata: Mapping[str, str]) -> bytes:
    return json.dumps(metadata, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _decrypt_metadata(keyring: KeyRing, row_id: int, key_id: str, blob: bytes) -> dict[str, str]:
    plain = keyring.decrypt(key_id, blob, row_aad("subjects", row_id, "metadata"))
    return json.loads(plain)


def _decrypt_template(
    keyring: KeyRing, sample_id: int, key_id: str, blob: bytes, dim: int
) -> np.ndarray:
    plain = keyring.decrypt(key_id, blob, row_aad("samples", sample_id, "template"))
    if len(plain) != 4 * dim:
        raise DecryptionFailed(
            f"template of sample {sample_id} has {len(plain)} bytes, expected {4 * dim}"
        )
    return np.frombuffer(plain, dtype="<f4").astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Small SQL helpers
# ---------------------------------------------------------------------------------------------


def _reserve_ids(session: Session, table: str, n: int) -> list[int]:
    """Draw ``n`` ids from a table's identity sequence before inserting.

    Needed because the row id is part of the associated data of its ciphertexts, and the
    ciphertext must exist before the row does (columns are NOT NULL).
    """
    rows = session.execute(
        text("SELECT nextval(pg_get_serial_sequence(:table, 'id')) FROM generate_series(1, :n)"),
        {"table": table, "n": n},
    ).scalars()
    return sorted(rows)


def _reserve_sample_ids_and_seqs(session: Session, n: int) -> tuple[list[int], list[int]]:
    """Sample ids (see :func:`_reserve_ids`) and change sequence numbers in one round trip."""
    rows = session.execute(
        text(
            "SELECT nextval(pg_get_serial_sequence('samples', 'id')), nextval('change_seq') "
            "FROM generate_series(1, :n)"
        ),
        {"n": n},
    ).all()
    return sorted(r[0] for r in rows), sorted(r[1] for r in rows)


def _gallery_id(session: Session, gallery: str) -> int:
    _check_gallery_name(gallery)
    gid = session.execute(select(Gallery.id).where(Gallery.name == gallery)).scalar_one_or_none()
    if gid is None:
        raise GalleryNotFound(gallery)
    return gid


def _lock_gallery(session: Session, gallery: str) -> int:
    """Lock the gallery row for a template-changing write (see module docstring)."""
    _check_gallery_name(gallery)
    gid = session.execute(
        select(Gallery.id).where(Gallery.name == gallery).with_for_update(key_share=True)
    ).scalar_one_or_none()
    if gid is None:
        raise GalleryNotFound(gallery)
    return gid


def _subject_row_id(session: Session, gallery: str, gallery_id: int, subject_id: str) -> int:
    _check_subject_id(subject_id)
    row_id = session.execute(
        select(Subject.id).where(Subject.gallery_id == gallery_id, Subject.subject_id == subject_id)
    ).scalar_one_or_none()
    if row_id is None:
        raise SubjectNotFound(gallery, subject_id)
    return row_id


def _check_dimensions(
    session: Session, gallery: str, gallery_id: int, checked: list[tuple[SampleInput, np.ndarray]]
) -> None:
    """Refuse templates whose length differs from others of the same model and profile.

    One index holds one template space; a mismatched vector would make the next rebuild fail
    long after the request that caused it was accepted.
    """
    dims: dict[tuple[str, str, str], int] = {}
    for sample, vec in checked:
        space = (sample.model_version, sample.profile_name, sample.profile_version)
        if dims.setdefault(space, vec.shape[0]) != vec.shape[0]:
            raise TemplateDimensionMismatch(
                f"templates for model {space[0]!r} / profile {space[1]!r} {space[2]!r} in one "
                f"request have different lengths ({dims[space]} and {vec.shape[0]})"
            )
    for (model, profile, version), dim in dims.items():
        stored = session.execute(
            select(Sample.dim)
            .where(
                Sample.gallery_id == gallery_id,
                Sample.model_version == model,
                Sample.profile_name == profile,
                Sample.profile_version == version,
            )
            .limit(1)
        ).scalar_one_or_none()
        if stored is not None and stored != dim:
            raise TemplateDimensionMismatch(
                f"gallery {gallery!r} holds {stored}-value templates for model {model!r} / "
                f"profile {profile!r} {version!r}; this template has {dim} values"
            )


def _insert_samples(
    session: Session,
    keyring: KeyRing,
    gallery_id: int,
    subject_row_id: int,
    checked: list[tuple[SampleInput, np.ndarray]],
) -> list[int]:
    ids, seqs = _reserve_sample_ids_and_seqs(session, len(checked))
    rows = [
        _sample_row(keyring, gallery_id, subject_row_id, sample_id, seq, sample, vec)
        for sample_id, seq, (sample, vec) in zip(ids, seqs, checked, strict=True)
    ]
    session.execute(insert(Sample), rows)
    return ids


def _subject_row(
    keyring: KeyRing,
    gallery_id: int,
    row_id: int,
    subject_id: str,
    display_name: str,
    metadata: Mapping[str, str],
) -> dict[str, Any]:
    """A subjects row with its name and metadata encrypted under the row's own associated data."""
    name_kid, name_ct = _encrypt_str(keyring, "subjects", row_id, "display_name", display_name)
    meta_kid, meta_ct = keyring.encrypt(
        _metadata_bytes(metadata), row_aad("subjects", row_id, "metadata")
    )
    return {
        "id": row_id,
        "gallery_id": gallery_id,
        "subject_id": subject_id,
        "display_name_ct": name_ct,
        "display_name_enc_key_id": name_kid,
        "metadata_ct": meta_ct,
        "metadata_enc_key_id": meta_kid,
    }


def _sample_row(
    keyring: KeyRing,
    gallery_id: int,
    subject_row_id: int,
    sample_id: int,
    seq: int,
    sample: SampleInput,
    vec: np.ndarray,
) -> dict[str, Any]:
    """A samples row with its template encrypted under the row's own associated data."""
    key_id, blob = keyring.encrypt(vec.tobytes(), row_aad("samples", sample_id, "template"))
    return {
        "id": sample_id,
        "subject_row_id": subject_row_id,
        "gallery_id": gallery_id,
        "template_ct": blob,
        "template_enc_key_id": key_id,
        "dim": int(vec.shape[0]),
        "model_version": sample.model_version,
        "profile_name": sample.profile_name,
        "profile_version": sample.profile_version,
        "template_key_id": sample.template_key_id,
        "change_seq": seq,
    }


def _touch_subject(session: Session, subject_row_id: int) -> None:
    session.execute(
        update(Subject).where(Subject.id == subject_row_id).values(updated_at=func.now())
    )


def _tombstone_and_delete_samples(
    session: Session, gallery_id: int, where_sql: str, params: dict[str, Any]
) -> list[int]:
    """Record tombstones for the samples matching ``where_sql``, then delete them."""
    ids = session.execute(
        text(
            "INSERT INTO sample_tombstones (sample_id, gallery_id, subject_row_id, change_seq) "
            "SELECT s.id, s.gallery_id, s.subject_row_id, nextval('change_seq') "
            f"FROM (SELECT id, gallery_id, subject_row_id FROM samples WHERE {where_sql} "
            "AND gallery_id = :gallery_id ORDER BY id) AS s "
            "RETURNING sample_id"
        ),
        {**params, "gallery_id": gallery_id},
    ).scalars()
    deleted = sorted(ids)
    if deleted:
        session.execute(delete(Sample).where(Sample.id.in_(deleted)))
    return deleted


# ---------------------------------------------------------------------------------------------
# Galleries
# ---------------------------------------------------------------------------------------------


def _gallery_stats_select():
    subjects = select(func.count()).where(Subject.gallery_id == Gallery.id).scalar_subquery()
    samples = select(func.count()).where(Sample.gallery_id == Gallery.id).scalar_subquery()
    return select(
        Gallery.id, Gallery.name, Gallery.description, Gallery.created_at, subjects, samples
    )


def _gallery_info(row: Row) -> GalleryInfo:
    return GalleryInfo(
        id=row[0],
        name=row[1],
        description=row[2],
        created_at=row[3],
        subject_count=row[4],
        sample_count=row[5],
    )


def create_gallery(session: Session, name: str, description: str = "") -> GalleryInfo:
    """Create an empty gallery; :class:`AlreadyExists` if the name is taken."""
    _check_gallery_name(name)
    _check_text(description, "description", 4096, allow_empty=True)
    row = session.execute(
        pg_insert(Gallery)
        .values(name=name, description=description, created_seq=change_seq.next_value())
        .on_conflict_do_nothing(index_elements=[Gallery.name])
        .returning(Gallery.id, Gallery.created_at)
    ).one_or_none()
    if row is None:
        raise AlreadyExists(f"gallery {name!r} already exists")
    # Draw created_seq again now that the insert went through: if an old gallery of the same
    # name was being deleted concurrently, its last changes are guaranteed to be below it.
    session.execute(
        update(Gallery).where(Gallery.id == row.id).values(created_seq=change_seq.next_value())
    )
    return GalleryInfo(
        id=row.id,
        name=name,
        description=description,
        created_at=row.created_at,
        subject_count=0,
        sample_count=0,
    )


def get_gallery(session: Session, name: str) -> GalleryInfo:
    """A gallery with its subject and sample counts."""
    _check_gallery_name(name)
    row = session.execute(_gallery_stats_select().where(Gallery.name == name)).one_or_none()
    if row is None:
        raise GalleryNotFound(name)
    return _gallery_info(row)


def list_galleries(session: Session) -> list[GalleryInfo]:
    """All galleries by name, with counts (counting is linear in size: an admin call)."""
    rows = session.execute(_gallery_stats_select().order_by(Gallery.name)).all()
    return [_gallery_info(r) for r in rows]


def delete_gallery(session: Session, name: str) -> GalleryInfo:
    """Delete a gallery and, by cascade, all its subjects, samples, tombstones and keys.

    Returns the gallery as it was. Audit rows keep the name: the trail outlives the gallery.
    """
    info = get_gallery(session, name)
    deleted = session.execute(
        delete(Gallery).where(Gallery.id == info.id).returning(Gallery.id)
    ).scalar_one_or_none()
    if deleted is None:  # deleted concurrently between the two statements
        raise GalleryNotFound(name)
    return info


# ---------------------------------------------------------------------------------------------
# Idempotency
# ---------------------------------------------------------------------------------------------


def compute_request_digest(
    operation: str,
    subject_id: str,
    samples: Sequence[SampleInput],
    display_name: str = "",
    metadata: Mapping[str, str] | None = None,
) -> str:
    """SHA-256 (hex) of a canonical encoding of an enroll / add-samples request.

    Used when the caller gives no digest of its own. Services whose templates are not
    bit-for-bit reproducible across retries (GPU non-determinism) should digest the original
    request bytes instead and pass ``request_digest``.
    """
    h = hashlib.sha256()

    def part(data: bytes) -> None:
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)

    header = {
        "op": operation,
        "subject_id": subject_id,
        "display_name": display_name,
        "metadata": dict(sorted((metadata or {}).items())),
        "n": len(samples),
    }
    part(json.dumps(header, sort_keys=True, ensure_ascii=False).encode())
    for i, sample in enumerate(samples):
        vec = _check_template(sample.template, i)
        meta = [
            sample.model_version,
            sample.profile_name,
            sample.profile_version,
            sample.template_key_id,
            int(vec.shape[0]),
        ]
        part(json.dumps(meta, ensure_ascii=False).encode())
        part(vec.tobytes())
    return h.hexdigest()


def _replay_or_conflict(
    session: Session, gallery: str, gallery_id: int, key: str, operation: str, digest: str
) -> EnrollResult | None:
    row = session.execute(
        select(IdempotencyKey).where(
            IdempotencyKey.gallery_id == gallery_id, IdempotencyKey.key == key
        )
    ).scalar_one_or_none()
    if row is None:
        return None
    if row.operation != operation or row.request_digest != digest:
        raise IdempotencyConflict(gallery, key)
    return EnrollResult(
        subject_id=row.result_subject_id,
        subject_row_id=row.result_subject_row_id,
        sample_ids=tuple(row.result_sample_ids),
        replayed=True,
    )


def _record_idempotency(
    session: Session, gallery_id: int, key: str, operation: str, digest: str, result: EnrollResult
) -> None:
    session.execute(
        insert(IdempotencyKey).values(
            gallery_id=gallery_id,
            key=key,
            operation=operation,
            request_digest=digest,
            result_subject_id=result.subject_id,
            result_subject_row_id=result.subject_row_id,
            result_sample_ids=list(result.sample_ids),
        )
    )


def purge_idempotency_keys(session: Session, older_than: datetime) -> int:
    """Forget idempotency keys created before ``older_than``; returns how many."""
    _check_aware(older_than, "older_than")
    result = session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < older_than))
    return result.rowcount


# ---------------------------------------------------------------------------------------------
# Subjects and samples
# ---------------------------------------------------------------------------------------------


def enroll_subject(
    session: Session,
    keyring: KeyRing,
    gallery: str,
    subject_id: str,
    samples: Sequence[SampleInput],
    *,
    display_name: str = "",
    metadata: Mapping[str, str] | None = None,
    idempotency_key: str | None = None,
    request_digest: str | None = None,
) -> EnrollResult:
    """Create a subject with at least one sample.

    With ``idempotency_key``: a retry with the same key and the same request (same
    ``request_digest``, computed from the inputs when not given) returns the first result with
    ``replayed=True``; the same key with a different request raises
    :class:`IdempotencyConflict`. Without a key, an existing ``subject_id`` raises
    :class:`AlreadyExists`.
    """
    _check_subject_id(subject_id)
    _check_text(display_name, "display_name", MAX_DISPLAY_NAME, allow_empty=True)
    meta = _check_metadata(metadata)
    checked = _check_samples(samples)
    _check_idempotency(idempotency_key, request_digest)

    gallery_id = _lock_gallery(session, gallery)
    digest = ""
    if idempotency_key is not None:
        digest = request_digest or compute_request_digest(
            OP_ENROLL, subject_id, samples, display_name, meta
        )
        replay = _replay_or_conflict(
            session, gallery, gallery_id, idempotency_key, OP_ENROLL, digest
        )
        if replay is not None:
            return replay

    exists = session.execute(
        select(Subject.id).where(Subject.gallery_id == gallery_id, Subject.subject_id == subject_id)
    ).scalar_one_or_none()
    if exists is not None:
        raise AlreadyExists(f"subject {subject_id!r} already exists in gallery {gallery!r}")
    _check_dimensions(session, gallery, gallery_id, checked)

    (row_id,) = _reserve_ids(session, "subjects", 1)
    session.execute(
        insert(Subject).values(
            **_subject_row(keyring, gallery_id, row_id, subject_id, display_name, meta)
        )
    )
    sample_ids = _insert_samples(session, keyring, gallery_id, row_id, checked)
    result = EnrollResult(
        subject_id=subject_id, subject_row_id=row_id, sample_ids=tuple(sample_ids)
    )
    if idempotency_key is not None:
        _record_idempotency(session, gallery_id, idempotency_key, OP_ENROLL, digest, result)
    return result


def import_subjects(
    session: Session,
    keyring: KeyRing,
    gallery: str,
    subjects: Sequence[tuple[str, Sequence[SampleInput]]],
) -> list[EnrollResult]:
    """Create many new subjects (no display name, no metadata) in one round of statements.

    The bulk path for an import or a migration from another system: one gallery lock, one
    existence check, one dimension check and two multi-row inserts for the whole batch,
    instead of about eight statements per subject in :func:`enroll_subject`.  All or nothing:
    a subject id that exists (or repeats in the batch) refuses the whole batch.
    """
    if not subjects:
        return []
    ids = [_check_subject_id(sid) for sid, _ in subjects]
    if len(set(ids)) != len(ids):
        raise InvalidArgument("subject ids repeat within the batch")
    checked = [_check_samples(samples) for _, samples in subjects]
    gallery_id = _lock_gallery(session, gallery)
    taken = session.execute(
        select(Subject.subject_id).where(
            Subject.gallery_id == gallery_id, Subject.subject_id.in_(ids)
        )
    ).scalars().first()
    if taken is not None:
        raise AlreadyExists(f"subject {taken!r} already exists in gallery {gallery!r}")
    _check_dimensions(session, gallery, gallery_id, [c for group in checked for c in group])
    row_ids = _reserve_ids(session, "subjects", len(ids))
    session.execute(
        insert(Subject),
        [
            _subject_row(keyring, gallery_id, row_id, subject_id, "", {})
            for row_id, subject_id in zip(row_ids, ids, strict=True)
        ],
    )
    sample_ids, seqs = _reserve_sample_ids_and_seqs(session, sum(len(c) for c in checked))
    sample_rows, results, k = [], [], 0
    for row_id, subject_id, group in zip(row_ids, ids, checked, strict=True):
        mine = sample_ids[k : k + len(group)]
        sample_rows += [
            _sample_row(keyring, gallery_id, row_id, sample_id, seq, sample, vec)
            for sample_id, seq, (sample, vec) in zip(
                mine, seqs[k : k + len(group)], group, strict=True
            )
        ]
        k += len(group)
        results.append(EnrollResult(subject_id, row_id, tuple(mine)))
    session.execute(insert(Sample), sample_rows)
    return results


def add_samples(
    session: Session,
    keyring: KeyRing,
    gallery: str,
    subject_id: str,
    samples: Sequence[SampleInput],
    *,
    idempotency_key: str | None = None,
    request_digest: str | None = None,
) -> EnrollResult:
    """Add samples to an existing subject (idempotency as in :func:`enroll_subject`)."""
    _check_subject_id(subject_id)
    checked = _check_samples(samples)
    _check_idempotency(idempotency_key, request_digest)

    gallery_id = _lock_gallery(session, gallery)
    digest = ""
    if idempotency_key is not None:
        digest = request_digest or compute_request_digest(OP_ADD_SAMPLES, subject_id, samples)
        replay = _replay_or_conflict(
            session, gallery, gallery_id, idempotency_key, OP_ADD_SAMPLES, digest
        )
        if replay is not None:
            return replay
    row_id = _subject_row_id(session, gallery, gallery_id, subject_id)
    _check_dimensions(session, gallery, gallery_id, checked)
    sample_ids = _insert_samples(session, keyring, gallery_id, row_id, checked)
    _touch_subject(session, row_id)
    result = EnrollResult(
        subject_id=subject_id, subject_row_id=row_id, sample_ids=tuple(sample_ids)
    )
    if idempotency_key is not None:
        _record_idempotency(session, gallery_id, idempotency_key, OP_ADD_SAMPLES, digest, result)
    return result


def remove_samples(
    session: Session, gallery: str, subject_id: str, sample_ids: Iterable[int]
) -> list[int]:
    """Delete samples of one subject (all or nothing); returns the deleted ids.

    Each deletion leaves a tombstone so indexes persisted on disk drop the template too.
    """
    _check_subject_id(subject_id)
    try:
        wanted = sorted({int(i) for i in sample_ids})
    except (TypeError, ValueError):
        raise InvalidArgument("sample_ids must be integers") from None
    if not wanted:
        raise InvalidArgument("at least one sample id is required")
    gallery_id = _lock_gallery(session, gallery)
    row_id = _subject_row_id(session, gallery, gallery_id, subject_id)
    found = set(
        session.execute(
            select(Sample.id).where(Sample.subject_row_id == row_id, Sample.id.in_(wanted))
        ).scalars()
    )
    missing = [i for i in wanted if i not in found]
    if missing:
        raise SampleNotFound(gallery, subject_id, missing)
    deleted = _tombstone_and_delete_samples(
        session,
        gallery_id,
        "subject_row_id = :row_id AND id = ANY(:ids)",
        {"row_id": row_id, "ids": wanted},
    )
    _touch_subject(session, row_id)
    return deleted


def delete_subject(session: Session, gallery: str, subject_id: str) -> list[int]:
    """Erase a subject and all its samples; returns the deleted sample ids (now tombstoned)."""
    gallery_id = _lock_gallery(session, gallery)
    row_id = _subject_row_id(session, gallery, gallery_id, subject_id)
    deleted = _tombstone_and_delete_samples(
        session, gallery_id, "subject_row_id = :row_id", {"row_id": row_id}
    )
    session.execute(delete(Subject).where(Subject.id == row_id))
    return deleted


def _sample_counts(session: Session, row_ids: list[int]) -> dict[int, int]:
    if not row_ids:
        return {}
    rows = session.execute(
        select(Sample.subject_row_id, func.count())
        .where(Sample.subject_row_id.in_(row_ids))
        .group_by(Sample.subject_row_id)
    ).all()
    return {r[0]: r[1] for r in rows}


def _subject_record(
    keyring: KeyRing, subject: Subject, sample_count: int, samples: tuple[SampleInfo, ...] = ()
) -> SubjectRecord:
    return SubjectRecord(
        row_id=subject.id,
        subject_id=subject.subject_id,
        display_name=_decrypt_str(
            keyring,
            "subjects",
            subject.id,
            "display_name",
            subject.display_name_enc_key_id,
            subject.display_name_ct,
        ),
        metadata=_decrypt_metadata(
            keyring, subject.id, subject.metadata_enc_key_id, subject.metadata_ct
        ),
        created_at=subject.created_at,
        updated_at=subject.updated_at,
        sample_count=sample_count,
        samples=samples,
    )


def get_subject(
    session: Session,
    keyring: KeyRing,
    gallery: str,
    subject_id: str,
    *,
    include_templates: bool = False,
) -> SubjectRecord:
    """A subject with decrypted name/metadata and its samples (templates only if asked)."""
    gallery_id = _gallery_id(session, gallery)
    _check_subject_id(subject_id)
    subject = session.execute(
        select(Subject)
        .where(Subject.gallery_id == gallery_id, Subject.subject_id == subject_id)
        .execution_options(populate_existing=True)
    ).scalar_one_or_none()
    if subject is None:
        raise SubjectNotFound(gallery, subject_id)
    cols = [
        Sample.id,
        Sample.dim,
        Sample.model_version,
        Sample.profile_name,
        Sample.profile_version,
        Sample.template_key_id,
        Sample.created_at,
    ]
    if include_templates:
        cols += [Sample.template_enc_key_id, Sample.template_ct]
    rows = session.execute(
        select(*cols).where(Sample.subject_row_id == subject.id).order_by(Sample.id)
    ).all()
    samples = tuple(
        SampleInfo(
            sample_id=r.id,
            dim=r.dim,
            model_version=r.model_version,
            profile_name=r.profile_name,
            profile_version=r.profile_version,
            template_key_id=r.template_key_id,
            created_at=r.created_at,
            template=(
                _decrypt_template(keyring, r.id, r.template_enc_key_id, r.template_ct, r.dim)
                if include_templates
                else None
            ),
        )
        for r in rows
    )
    return _subject_record(keyring, subject, len(samples), samples)


def _encode_page_token(gallery_id: int, after_row_id: int) -> str:
    raw = json.dumps({"v": 1, "g": gallery_id, "a": after_row_id}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_page_token(token: str, gallery_id: int) -> int:
    bad = InvalidArgument(
        "page_token is not valid; pass the next_page_token of the previous response unchanged"
    )
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        doc = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise bad from None
    if (
        not isinstance(doc, dict)
        or doc.get("v") != 1
        or not isinstance(doc.get("g"), int)
        or not isinstance(doc.get("a"), int)
    ):
        raise bad
    if doc["g"] != gallery_id:
        raise InvalidArgument("page_token belongs to another gallery (or to a deleted one)")
    return doc["a"]


def list_subjects(
    session: Session,
    keyring: KeyRing,
    gallery: str,
    *,
    page_size: int = 100,
    page_token: str = "",
) -> SubjectPage:
    """One page of subjects in enrollment order (stable under concurrent inserts/deletes).

    The token is opaque to callers (keyset position, not an offset, so pages neither skip nor
    repeat subjects when others are added or deleted meanwhile).
    """
    if not isinstance(page_size, int) or not 1 <= page_size <= MAX_PAGE_SIZE:
        raise InvalidArgument(f"page_size must be between 1 and {MAX_PAGE_SIZE}")
    gallery_id = _gallery_id(session, gallery)
    after = _decode_page_token(page_token, gallery_id) if page_token else 0
    subjects = list(
        session.execute(
            select(Subject)
            .where(Subject.gallery_id == gallery_id, Subject.id > after)
            .order_by(Subject.id)
            .limit(page_size + 1)
            .execution_options(populate_existing=True)
        ).scalars()
    )
    more = len(subjects) > page_size
    subjects = subjects[:page_size]
    counts = _sample_counts(session, [s.id for s in subjects])
    records = [_subject_record(keyring, s, counts.get(s.id, 0)) for s in subjects]
    token = _encode_page_token(gallery_id, subjects[-1].id) if more else ""
    return SubjectPage(subjects=records, next_page_token=token)


def _update_encrypted_subject_field(
    session: Session,
    keyring: KeyRing,
    gallery: str,
    subject_id: str,
    column: str,
    plaintext: bytes,
) -> SubjectRecord:
    gallery_id = _gallery_id(session, gallery)
    row_id = _subject_row_id(session, gallery, gallery_id, subject_id)
    kid, ct = keyring.encrypt(plaintext, row_aad("subjects", row_id, column))
    updated = session.execute(
        update(Subject)
        .where(Subject.id == row_id)
        .values({f"{column}_ct": ct, f"{column}_enc_key_id": kid, "updated_at": func.now()})
        .returning(Subject.id)
    ).scalar_one_or_none()
    if updated is None:
        raise SubjectNotFound(gallery, subject_id)
    return get_subject(session, keyring, gallery, subject_id)


def rename_subject(
    session: Session, keyring: KeyRing, gallery: str, subject_id: str, display_name: str
) -> SubjectRecord:
    """Change the display name (encrypted anew with the primary key)."""
    _check_text(display_name, "display_name", MAX_DISPLAY_NAME, allow_empty=True)
    return _update_encrypted_subject_field(
        session, keyring, gallery, subject_id, "display_name", display_name.encode("utf-8")
    )


def update_subject_metadata(
    session: Session,
    keyring: KeyRing,
    gallery: str,
    subject_id: str,
    metadata: Mapping[str, str],
) -> SubjectRecord:
    """Replace the subject's metadata map (encrypted anew with the primary key)."""
    meta = _check_metadata(metadata)
    return _update_encrypted_subject_field(
        session, keyring, gallery, subject_id, "metadata", _metadata_bytes(meta)
    )


# ---------------------------------------------------------------------------------------------
# Index support: full scans and the change feed
# ---------------------------------------------------------------------------------------------


def _template_select():
    return select(
        Sample.id,
        Sample.subject_row_id,
        Subject.subject_id,
        Sample.template_ct,
        Sample.template_enc_key_id,
        Sample.dim,
        Sample.model_version,
        Sample.profile_name,
        Sample.profile_version,
        Sample.template_key_id,
        Sample.change_seq,
    ).join(Subject, Subject.id == Sample.subject_row_id)


def _template_record(keyring: KeyRing, r: Row) -> TemplateRecord:
    return TemplateRecord(
        sample_id=r.id,
        subject_row_id=r.subject_row_id,
        subject_id=r.subject_id,
        template=_decrypt_template(keyring, r.id, r.template_enc_key_id, r.template_ct, r.dim),
        model_version=r.model_version,
        profile_name=r.profile_name,
        profile_version=r.profile_version,
        template_key_id=r.template_key_id,
        change_seq=r.change_seq,
    )


def iter_gallery_templates(
    session: Session,
    keyring: KeyRing,
    gallery: str,
    *,
    chunk_size: int = 4096,
    model_version: str | None = None,
) -> Iterator[list[TemplateRecord]]:
    """Yield every template of a gallery, decrypted, in chunks ordered by sample id.

    Each chunk is its own keyset query, so a scan of millions of rows neither holds one huge
    snapshot nor loads everything at once. For a consistent index rebuild:

    1. ``cursor = change_watermark(session, gallery)``
    2. add every chunk from this iterator to the new index
    3. apply ``templates_changed_since(session, keyring, gallery, cursor)``

    Changes that happen during step 2 may be seen twice (upserts and removals are idempotent)
    but are never missed.
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise InvalidArgument("chunk_size must be a positive integer")
    gallery_id = _gallery_id(session, gallery)
    stmt = _template_select().where(Sample.gallery_id == gallery_id)
    if model_version is not None:
        stmt = stmt.where(Sample.model_version == model_version)
    last = 0
    while True:
        rows = session.execute(
            stmt.where(Sample.id > last).order_by(Sample.id).limit(chunk_size)
        ).all()
        if not rows:
            return
        yield [_template_record(keyring, r) for r in rows]
        if len(rows) < chunk_size:
            return
        last = rows[-1].id


def template_versions(session: Session, gallery: str) -> dict[tuple[str, str, str, str], int]:
    """Sample counts per (model_version, profile_name, profile_version, template_key_id).

    Shows the progress of a model upgrade or an identity-mapping key renewal: enroll new
    samples under the new version, watch the old one drain, then remove its samples.
    """
    gallery_id = _gallery_id(session, gallery)
    rows = session.execute(
        select(
            Sample.model_version,
            Sample.profile_name,
            Sample.profile_version,
            Sample.template_key_id,
            func.count(),
        )
        .where(Sample.gallery_id == gallery_id)
        .group_by(
            Sample.model_version,
            Sample.profile_name,
            Sample.profile_version,
            Sample.template_key_id,
        )
    ).all()
    return {(r[0], r[1], r[2], r[3]): r[4] for r in rows}


def _watermark_parts(session: Session, gallery: str) -> tuple[int, int, int, int]:
    """(gallery id, created_seq, tombstone_horizon, watermark) read in one snapshot."""
    _check_gallery_name(gallery)
    max_sample = (
        select(func.max(Sample.change_seq)).where(Sample.gallery_id == Gallery.id).scalar_subquery()
    )
    max_tomb = (
        select(func.max(SampleTombstone.change_seq))
        .where(SampleTombstone.gallery_id == Gallery.id)
        .scalar_subquery()
    )
    row = session.execute(
        select(
            Gallery.id,
            Gallery.created_seq,
            Gallery.tombstone_horizon,
            func.greatest(
                Gallery.created_seq,
                Gallery.tombstone_horizon,
                func.coalesce(max_sample, 0),
                func.coalesce(max_tomb, 0),
            ),
        ).where(Gallery.name == gallery)
    ).one_or_none()
    if row is None:
        raise GalleryNotFound(gallery)
    return row[0], row[1], row[2], row[3]


def change_watermark(session: Session, gallery: str) -> int:
    """The change-feed position that covers everything committed in the gallery so far.

    Store it with an index built from :func:`iter_gallery_templates` (read it *before* the
    scan) and pass it to :func:`templates_changed_since` later.
    """
    return _watermark_parts(session, gallery)[3]


def templates_changed_since(
    session: Session,
    keyring: KeyRing,
    gallery: str,
    cursor: int,
    *,
    limit: int = 10_000,
) -> ChangeSet:
    """Templates added and sample ids deleted in ``gallery`` after ``cursor``.

    ``cursor`` is ``0`` for an empty index, else a ``cursor`` returned earlier (or a
    :func:`change_watermark`). Raises :class:`StaleCursor` when the index cannot be caught up
    and must be rebuilt: the cursor predates purged tombstones, belongs to an earlier gallery
    with the same name, or is ahead of the database (e.g. the database was restored from an
    older backup while the index on disk was not).
    """
    if not isinstance(cursor, int) or cursor < 0:
        raise InvalidArgument("cursor must be a non-negative integer")
    if not isinstance(limit, int) or not 1 <= limit <= MAX_CHANGES_PER_CALL:
        raise InvalidArgument(f"limit must be between 1 and {MAX_CHANGES_PER_CALL}")
    gallery_id, created_seq, horizon, watermark = _watermark_parts(session, gallery)
    if cursor > 0:
        if cursor < created_seq:
            raise StaleCursor(
                f"cursor {cursor} was issued for an earlier gallery named {gallery!r}; "
                "rebuild the index from scratch"
            )
        if cursor < horizon:
            raise StaleCursor(
                f"cursor {cursor} is older than the purged tombstones of gallery {gallery!r} "
                f"(kept from {horizon}); rebuild the index from scratch"
            )
        if cursor > watermark:
            raise StaleCursor(
                f"cursor {cursor} is ahead of gallery {gallery!r} in the database ({watermark}); "
                "was the database restored from a backup? rebuild the index from scratch"
            )
    # Both queries are capped at the watermark read above: everything at or below it was
    # committed before that read (writes to a gallery are serialised), so the two statements
    # see the same set of changes even if they run in different snapshots.
    sample_rows = session.execute(
        _template_select()
        .where(
            Sample.gallery_id == gallery_id,
            Sample.change_seq > cursor,
            Sample.change_seq <= watermark,
        )
        .order_by(Sample.change_seq)
        .limit(limit)
    ).all()
    tomb_rows = session.execute(
        select(SampleTombstone.change_seq, SampleTombstone.sample_id)
        .where(
            SampleTombstone.gallery_id == gallery_id,
            SampleTombstone.change_seq > cursor,
            SampleTombstone.change_seq <= watermark,
        )
        .order_by(SampleTombstone.change_seq)
        .limit(limit)
    ).all()
    events: list[tuple[int, Row | None, int | None]] = [
        (r.change_seq, r, None) for r in sample_rows
    ] + [(r.change_seq, None, r.sample_id) for r in tomb_rows]
    events.sort(key=lambda e: e[0])
    has_more = len(sample_rows) == limit or len(tomb_rows) == limit
    if has_more:
        events = events[:limit]
    new_cursor = events[-1][0] if has_more and events else watermark
    return ChangeSet(
        gallery_id=gallery_id,
        cursor_before=cursor,
        cursor=new_cursor,
        upserts=[_template_record(keyring, r) for _, r, _ in events if r is not None],
        deleted_sample_ids=[sid for _, _, sid in events if sid is not None],
        has_more=has_more,
    )


def purge_tombstones(session: Session, older_than: datetime) -> int:
    """Drop tombstones older than ``older_than``; returns how many.

    Each affected gallery's horizon moves up, so an index whose cursor is older than a purged
    tombstone gets :class:`StaleCursor` (rebuild) instead of silently keeping a deleted face.
    """
    _check_aware(older_than, "older_than")
    rows = session.execute(
        text(
            "WITH purged AS ("
            "  DELETE FROM sample_tombstones WHERE deleted_at < :older_than"
            "  RETURNING gallery_id, change_seq"
            "), per_gallery AS ("
            "  SELECT gallery_id, max(change_seq) AS max_seq, count(*) AS n"
            "  FROM purged GROUP BY gallery_id"
            "), bumped AS ("
            "  UPDATE galleries g SET tombstone_horizon = GREATEST(g.tombstone_horizon, p.max_seq)"
            "  FROM per_gallery p WHERE g.id = p.gallery_id RETURNING g.id"
            ") SELECT coalesce(sum(n), 0) FROM per_gallery"
        ),
        {"older_than": older_than},
    ).scalar_one()
    return int(rows)


# ---------------------------------------------------------------------------------------------
# Audit trail
# ---------------------------------------------------------------------------------------------


def append_audit(
    session: Session,
    *,
    principal: str,
    operation: str,
    gallery: str | None = None,
    subject_ids: Sequence[str] = (),
    status: str = "OK",
) -> int:
    """Append one audit row (no biometric data by construction); returns its id.

    Write it in its own transaction when the audited operation failed, so the rollback of the
    operation does not take the audit row with it.
    """
    _check_text(principal, "principal", PRINCIPAL_MAX)
    _check_text(operation, "operation", OPERATION_MAX)
    _check_text(status, "status", STATUS_MAX)
    if gallery is not None:
        # Recorded as given (it may be the invalid name a rejected request carried).
        _check_text(gallery, "gallery", GALLERY_NAME_MAX)
    ids = [_check_text(s, "subject id", SUBJECT_ID_MAX) for s in subject_ids]
    return session.execute(
        insert(AuditEntry)
        .values(
            principal=principal,
            operation=operation,
            gallery=gallery,
            subject_ids=ids,
            status=status,
        )
        .returning(AuditEntry.id)
    ).scalar_one()


def list_audit(
    session: Session,
    *,
    gallery: str | None = None,
    principal: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    before_id: int | None = None,
    limit: int = 100,
) -> list[AuditRecord]:
    """Audit rows, newest first; page with ``before_id`` = the last id of the previous page."""
    if not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE_SIZE:
        raise InvalidArgument(f"limit must be between 1 and {MAX_PAGE_SIZE}")
    stmt = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
    if gallery is not None:
        stmt = stmt.where(AuditEntry.gallery == gallery)
    if principal is not None:
        stmt = stmt.where(AuditEntry.principal == principal)
    if since is not None:
        stmt = stmt.where(AuditEntry.at >= _check_aware(since, "since"))
    if until is not None:
        stmt = stmt.where(AuditEntry.at < _check_aware(until, "until"))
    if before_id is not None:
        stmt = stmt.where(AuditEntry.id < before_id)
    return [
        AuditRecord(
            id=a.id,
            at=a.at,
            principal=a.principal,
            operation=a.operation,
            gallery=a.gallery,
            subject_ids=list(a.subject_ids),
            status=a.status,
        )
        for a in session.execute(stmt).scalars()
    ]


# ---------------------------------------------------------------------------------------------
# Key rotation
# ---------------------------------------------------------------------------------------------

#: (model, table, logical column) of every encrypted value.
ENCRYPTED_COLUMNS: tuple[tuple[type, str, str], ...] = (
    (Subject, "subjects", "display_name"),
    (Subject, "subjects", "metadata"),
    (Sample, "samples", "template"),
)


def key_usage(session: Session) -> dict[str, int]:
    """How many stored values each encryption key id protects (all encrypted columns)."""
    parts = [
        select(getattr(model, f"{col}_enc_key_id").label("key_id"))
        for model, _, col in ENCRYPTED_COLUMNS
    ]
    u = union_all(*parts).subquery()
    rows = session.execute(select(u.c.key_id, func.count()).group_by(u.c.key_id)).all()
    return {r[0]: r[1] for r in rows}


def rotate_keys(session: Session, keyring: KeyRing, *, batch_size: int = 500) -> RotationReport:
    """Re-encrypt every value not under the primary key with the primary key, online.

    Works in batches of ``batch_size`` rows, each locked (``FOR UPDATE``) and **committed**
    on its own, so concurrent requests only ever wait for one short batch, and every row
    keeps decrypting throughout (each carries its key id). Rows that cannot be decrypted are
    skipped and reported in ``failures`` rather than aborting the run; their key stays in
    ``key_usage``, which is what tells the operator a key is still needed. Safe to re-run.
    Call it on a session with no transaction of its own in progress.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidArgument("batch_size must be a positive integer")
    primary = keyring.primary
    counts: dict[str, int] = {}
    failures: list[RotationFailure] = []
    if session.in_transaction():
        raise RuntimeError(
            "rotate_keys commits after every batch; call it on a session without an open "
            "transaction so it cannot commit unrelated work"
        )
    for model, table, col in ENCRYPTED_COLUMNS:
        ct_attr = getattr(model, f"{col}_ct")
        kid_attr = getattr(model, f"{col}_enc_key_id")
        done = 0
        last = 0
        while True:
            rows = session.execute(
                select(model.id, ct_attr, kid_attr)
                .where(kid_attr != primary, model.id > last)
                .order_by(model.id)
                .limit(batch_size)
                .with_for_update()
            ).all()
            if not rows:
                session.commit()
                break
            params = []
            for row_id, blob, kid in rows:
                aad = row_aad(table, row_id, col)
                try:
                    plain = keyring.decrypt(kid, blob, aad)
                except StorageError as exc:
                    failures.append(RotationFailure(table, col, row_id, str(exc)))
                    continue
                new_kid, new_blob = keyring.encrypt(plain, aad)
                params.append({"id": row_id, f"{col}_ct": new_blob, f"{col}_enc_key_id": new_kid})
            if params:
                session.execute(update(model), params)
            session.commit()
            done += len(params)
            last = rows[-1][0]
        counts[f"{table}.{col}"] = done
    usage = key_usage(session)
    session.commit()
    return RotationReport(
        primary_key_id=primary, reencrypted=counts, key_usage=usage, failures=failures
    )
