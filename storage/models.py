"""ORM schema. PostgreSQL is the source of truth; FAISS indexes are rebuilt from it.

Conventions:

* **Encrypted columns** are a pair: ``<name>_ct`` (BYTEA, see :mod:`storage.crypto` for the
  byte format) and ``<name>_enc_key_id`` (the key ring id that encrypted it). The pair, not a
  self-describing blob, so "which rows still use key k1?" is a plain SQL filter during key
  rotation. Associated data is ``"{table}:{row id}:{name}"``, so row ids of subjects and samples
  are drawn from their sequences *before* the insert (see ``repository._reserve_ids``).
* **Plaintext on purpose**: gallery names, external subject ids (callers should use opaque
  ids, not names), model/profile versions and template dimensions; they are needed for
  lookups and index maintenance and are not biometric.
* **Change sequence** ``change_seq``: every sample insert/template change and every sample
  deletion (a tombstone) takes the next value, so an index persisted on disk can be caught up
  with :func:`storage.repository.templates_changed_since` instead of a full rebuild.
* Constraint and index names come from :data:`NAMING_CONVENTION`, so migrations and the ORM
  agree on them exactly (checked by the tests with Alembic's ``compare_metadata``).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Sequence,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Column sizes, shared with input validation in the repository.
GALLERY_NAME_MAX = 128
SUBJECT_ID_MAX = 256
KEY_ID_MAX = 64
VERSION_MAX = 128
IDEMPOTENCY_KEY_MAX = 256
PRINCIPAL_MAX = 256
OPERATION_MAX = 64
STATUS_MAX = 32


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: DateTime(timezone=True)}


#: Global, monotonically increasing change counter (see module docstring).
change_seq = Sequence("change_seq", metadata=Base.metadata)


class Gallery(Base):
    """A collection of subjects searched as one index; deleting it deletes everything in it."""

    __tablename__ = "galleries"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    name: Mapped[str] = mapped_column(String(GALLERY_NAME_MAX), unique=True)
    description: Mapped[str] = mapped_column(Text, server_default="")
    # change_seq value drawn when the gallery was created: a change-feed cursor below it was
    # issued for an earlier gallery of the same name and must not be replayed onto this one.
    created_seq: Mapped[int] = mapped_column(BigInteger)
    # Tombstones up to this change_seq were purged: older cursors need a full rebuild.
    tombstone_horizon: Mapped[int] = mapped_column(BigInteger, server_default="0")
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class Subject(Base):
    """A person in a gallery, addressed by the caller's external ``subject_id``."""

    __tablename__ = "subjects"
    __table_args__ = (
        UniqueConstraint("gallery_id", "subject_id"),
        # Stable pagination order (gallery, row id).
        Index(None, "gallery_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    gallery_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("galleries.id", ondelete="CASCADE")
    )
    subject_id: Mapped[str] = mapped_column(String(SUBJECT_ID_MAX))
    display_name_ct: Mapped[bytes] = mapped_column(LargeBinary)
    display_name_enc_key_id: Mapped[str] = mapped_column(String(KEY_ID_MAX))
    # A JSON object of string -> string, encrypted as one blob.
    metadata_ct: Mapped[bytes] = mapped_column(LargeBinary)
    metadata_enc_key_id: Mapped[str] = mapped_column(String(KEY_ID_MAX))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now())


class Sample(Base):
    """One protected template of a subject (never a raw image or raw embedding)."""

    __tablename__ = "samples"
    __table_args__ = (
        CheckConstraint("dim > 0", name="dim_positive"),
        Index(None, "subject_row_id"),
        Index(None, "gallery_id", "id"),
        Index(None, "gallery_id", "change_seq"),
        Index(None, "gallery_id", "model_version"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    subject_row_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("subjects.id", ondelete="CASCADE")
    )
    # Denormalised from the subject (subjects never change gallery) so per-gallery scans and
    # the change feed need no join.
    gallery_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("galleries.id", ondelete="CASCADE")
    )
    # Little-endian float32 vector of the *protected* template, encrypted.
    template_ct: Mapped[bytes] = mapped_column(LargeBinary)
    template_enc_key_id: Mapped[str] = mapped_column(String(KEY_ID_MAX))
    dim: Mapped[int] = mapped_column(Integer)
    model_version: Mapped[str] = mapped_column(String(VERSION_MAX))
    profile_name: Mapped[str] = mapped_column(String(VERSION_MAX))
    profile_version: Mapped[str] = mapped_column(String(VERSION_MAX))
    # Version of the gallery's identity-mapping (template protection) key that produced the
    # template; not an encryption key id.
    template_key_id: Mapped[str] = mapped_column(String(VERSION_MAX))
    change_seq: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now())


class SampleTombstone(Base):
    """A deleted sample id, kept so indexes persisted on disk learn about the deletion."""

    __tablename__ = "sample_tombstones"
    __table_args__ = (
        Index(None, "gallery_id", "change_seq"),
        Index(None, "deleted_at"),
    )

    sample_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    gallery_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("galleries.id", ondelete="CASCADE")
    )
    subject_row_id: Mapped[int] = mapped_column(BigInteger)
    change_seq: Mapped[int] = mapped_column(BigInteger)
    deleted_at: Mapped[datetime] = mapped_column(server_default=func.now())


class IdempotencyKey(Base):
    """The first result of an idempotent request, so a retry gets it back instead of a duplicate.

    Kept after the subject is deleted (until purged): a retrying batch job must not silently
    re-enroll a person who was erased in between.
    """

    __tablename__ = "idempotency_keys"
    __table_args__ = (
        CheckConstraint("length(request_digest) = 64", name="digest_sha256_hex"),
        Index(None, "created_at"),
    )

    gallery_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("galleries.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(IDEMPOTENCY_KEY_MAX), primary_key=True)
    operation: Mapped[str] = mapped_column(String(OPERATION_MAX))
    request_digest: Mapped[str] = mapped_column(String(64))
    result_subject_id: Mapped[str] = mapped_column(String(SUBJECT_ID_MAX))
    result_subject_row_id: Mapped[int] = mapped_column(BigInteger)
    result_sample_ids: Mapped[list[int]] = mapped_column(
        ARRAY(BigInteger), server_default=text("'{}'")
    )
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class AuditEntry(Base):
    """Who did what to which gallery, and which subjects came back. Never biometric data."""

    __tablename__ = "audit_log"
    __table_args__ = (
        Index(None, "at"),
        Index(None, "gallery", "at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    at: Mapped[datetime] = mapped_column(server_default=func.now())
    principal: Mapped[str] = mapped_column(String(PRINCIPAL_MAX))
    operation: Mapped[str] = mapped_column(String(OPERATION_MAX))
    # A name, not a foreign key: the trail must outlive the gallery.
    gallery: Mapped[str | None] = mapped_column(String(GALLERY_NAME_MAX))
    subject_ids: Mapped[list[str]] = mapped_column(
        ARRAY(String(SUBJECT_ID_MAX)), server_default=text("'{}'")
    )
    status: Mapped[str] = mapped_column(String(STATUS_MAX))
