"""Plain values passed into and returned by :mod:`storage.repository`.

Frozen dataclasses rather than ORM objects, so callers (the gRPC service, the matcher) never
hold a lazy-loading database object, and decrypted data exists only where it is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import numpy as np


@dataclass(frozen=True, slots=True)
class SampleInput:
    """One protected template to store, with the versions that produced it.

    ``template`` is a 1-D float vector (stored as float32); ``template_key_id`` names the
    version of the gallery's identity-mapping key used to protect it (method.md §5).
    """

    template: np.ndarray
    model_version: str
    profile_name: str
    profile_version: str
    template_key_id: str


@dataclass(frozen=True, slots=True)
class GalleryInfo:
    id: int
    name: str
    description: str
    created_at: datetime
    subject_count: int
    sample_count: int


@dataclass(frozen=True, slots=True)
class SampleInfo:
    """A stored sample; ``template`` only when asked for (it is decrypted on demand)."""

    sample_id: int
    dim: int
    model_version: str
    profile_name: str
    profile_version: str
    template_key_id: str
    created_at: datetime
    template: np.ndarray | None = None


@dataclass(frozen=True, slots=True)
class SubjectRecord:
    """A subject with its decrypted display name and metadata."""

    row_id: int
    subject_id: str
    display_name: str
    metadata: dict[str, str]
    created_at: datetime
    updated_at: datetime
    sample_count: int
    samples: tuple[SampleInfo, ...] = ()


@dataclass(frozen=True, slots=True)
class EnrollResult:
    """Outcome of an enroll / add-samples call; ``replayed`` when an idempotency key matched."""

    subject_id: str
    subject_row_id: int
    sample_ids: tuple[int, ...]
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class SubjectPage:
    """One page of subjects; ``next_page_token`` is ``""`` on the last page."""

    subjects: list[SubjectRecord]
    next_page_token: str


@dataclass(frozen=True, slots=True)
class TemplateRecord:
    """A decrypted protected template with what an index needs to map hits back to subjects."""

    sample_id: int
    subject_row_id: int
    subject_id: str
    template: np.ndarray
    model_version: str
    profile_name: str
    profile_version: str
    template_key_id: str
    change_seq: int


@dataclass(frozen=True, slots=True)
class ChangeSet:
    """Changes to apply to an index after ``cursor_before``, up to and including ``cursor``.

    Apply ``upserts`` (add, or replace if present) and remove ``deleted_sample_ids``, then
    store ``cursor`` with the index. Sample ids are never reused, so the two lists can be
    applied in either order. ``has_more``: call again with ``cursor`` for the rest.
    ``gallery_id`` lets an index check it still belongs to the same gallery incarnation.
    """

    gallery_id: int
    cursor_before: int
    cursor: int
    upserts: list[TemplateRecord]
    deleted_sample_ids: list[int]
    has_more: bool


@dataclass(frozen=True, slots=True)
class RotationFailure:
    table: str
    column: str
    row_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class RotationReport:
    """What :func:`storage.repository.rotate_keys` did.

    ``key_usage`` counts encrypted values per key id after the run: a key may be removed from
    the key ring once it no longer appears there.
    """

    primary_key_id: str
    reencrypted: dict[str, int]
    key_usage: dict[str, int]
    failures: list[RotationFailure] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class AuditRecord:
    id: int
    at: datetime
    principal: str
    operation: str
    gallery: str | None
    subject_ids: list[str]
    status: str
