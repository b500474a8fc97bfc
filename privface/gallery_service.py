"""The gallery engine: everything the gRPC service does, as plain calls testable without a
server.

Pipeline of a sample (enrolment) or a probe (search)::

    protected input (wire bytes) --validate--> views (N, C, H, W)
        --model--> unit embedding (views averaged)
        --identity mapping (gallery key, method.md §5)--> protected template (unit vector)

**Source of truth.** PostgreSQL holds subjects, samples and the protected templates
(encrypted by :mod:`storage`); the FAISS indexes are a cache built from it. Writes commit to
PostgreSQL first, then the gallery's indexes catch up through the storage change feed
(:func:`storage.repository.templates_changed_since`) — the same code path as the start-up
load and the periodic catch-up with other writers, so the index cannot drift from the
database whatever the interleaving of concurrent writes.

**Erasure.** A deletion registers the removed sample ids in the gallery's in-memory
tombstone set right after its commit and before the call returns; every search filters
its hits through that set. So a deleted subject is never returned again, even while the
index removal is still pending behind another write. Tombstones are pruned once the
removal is applied and no search that started before it can still be running.

**Template spaces.** Only templates of the current model are searchable. Within a gallery
they are grouped by template key version (``template_key_id``): one index per version, the
probe mapped with each version's key, results merged per subject. That is what makes the
identity mapping renewable online; normally a gallery has exactly one version.

**Threads.** Searches run in parallel (each index has a readers/writer lock); catching up a
gallery is serialised per gallery; model calls are serialised by the embedder.

**Milvus backend** (``MilvusOptions``): the indexes are Milvus collections
(:class:`matcher.milvus_backend.MilvusGalleryIndex`), one per gallery incarnation, model
version and template key version (:func:`milvus_collection_name`). Milvus keeps them across
restarts, so a start reuses them and catches up from the change-feed cursor each stores
(saved every ``snapshot_interval`` and at shutdown) instead of re-adding every template; an
unusable cursor (never saved, stale) drops and refills them from PostgreSQL. The encrypted
FAISS snapshots are not used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from enrollment import score_centring
from enrollment.identity_mapping import MappingKey, protect, protected_dim
from matcher import GalleryIndex
from matcher.milvus_backend import STATE_SUFFIX, MilvusGalleryIndex
from privface.auth import AuthError, Principal
from privface.embedding import MAX_VIEWS, Embedder
from privface.errors import ServiceError
from privface.index_snapshots import (
    SnapshotError,
    read_snapshot,
    remove_snapshot,
    write_snapshot,
)
from privface.keys import KeyRingSource, mapping_key, template_key_ids
from privface.threshold_calibration import Calibration, Group, calibrate
from storage import repository as repo
from storage.errors import GalleryNotFound, StaleCursor, StorageError
from storage.records import (
    EnrollResult,
    GalleryInfo,
    SampleInput,
    SubjectPage,
    SubjectRecord,
    TemplateRecord,
)

log = logging.getLogger("privface.gallery")

T = TypeVar("T")

DEFAULT_TOP_K = 5
MAX_TOP_K = 100
DEFAULT_PAGE_SIZE = 100
#: Seconds a tombstone outlives the catch-up that applied its removal: longer than any
#: search that could have read the index before the removal.
TOMBSTONE_GRACE = 60.0
#: Compact an index (HNSW/GPU keep removed vectors) above this fraction of garbage.
COMPACT_AT = 0.2
#: Milvus collection names: letters, digits, underscores, at most 255 characters.
_MILVUS_UNSAFE = re.compile(r"[^A-Za-z0-9_]")
_MILVUS_NAME_HASH = 10  # hex digits of the exact gallery name in its collection names


@dataclass(frozen=True)
class MilvusOptions:
    """Where and how the Milvus backend keeps the galleries (``Settings.milvus_*``)."""

    uri: str
    token: str = ""
    prefix: str = "privface"
    index_type: str = "HNSW"
    index_params: Mapping[str, Any] | None = None
    search_params: Mapping[str, Any] | None = None

    def index_spec(self) -> dict[str, Any]:
        params = dict(self.index_params or {})
        if not params and self.index_type.upper() == "HNSW":
            params = {"M": 32, "efConstruction": 128}
        return {"index_type": self.index_type, "params": params}

    def search_spec(self) -> dict[str, Any]:
        params = dict(self.search_params or {})
        if not params and self.index_type.upper() == "HNSW":
            params = {"ef": 128}
        return params


def _milvus_safe(text: str, limit: int) -> str:
    return _MILVUS_UNSAFE.sub("_", text)[:limit]


def milvus_gallery_stem(prefix: str, gallery: str) -> str:
    """``<prefix>_<hash of the exact name>_``: the start of every collection of ``gallery``
    (the hash keeps names apart that sanitise alike, e.g. ``a.b`` and ``a-b``)."""
    digest = hashlib.sha256(gallery.encode()).hexdigest()[:_MILVUS_NAME_HASH]
    return f"{prefix}_{digest}_"


def milvus_incarnation_stem(prefix: str, gallery: str, gallery_id: int) -> str:
    """The start of every collection of one incarnation (database id) of ``gallery``."""
    return f"{milvus_gallery_stem(prefix, gallery)}{_milvus_safe(gallery, 64)}_g{int(gallery_id)}_"


def milvus_collection_name(
    prefix: str, gallery: str, gallery_id: int, model_version: str, key_id: str
) -> str:
    """The collection of one gallery incarnation (database id), model version and template
    key version, e.g. ``privface_1f0c..._doors_g7_tmap_1_5be0...``: deterministic, only
    letters, digits and underscores, at most 255 characters with the ``__state``
    companion. A re-created gallery (new id) or another model never meets an old collection.
    """
    tag = hashlib.sha256(f"{model_version}\0{key_id}".encode()).hexdigest()[:10]
    return f"{milvus_incarnation_stem(prefix, gallery, gallery_id)}{_milvus_safe(key_id, 32)}_{tag}"


@dataclass(frozen=True)
class Candidate:
    subject_id: str
    score: float
    sample_id: int
    match: bool


@dataclass(frozen=True)
class IdentifyResult:
    match: bool
    subject_id: str
    score: float
    threshold: float
    candidates: list[Candidate]
    model_version: str


@dataclass(frozen=True)
class VerifyResult:
    match: bool
    score: float
    threshold: float
    sample_id: int
    model_version: str


@dataclass(frozen=True)
class GalleryStats:
    gallery: GalleryInfo
    template_versions: list[dict[str, Any]]
    indexed_samples: int
    index_type: str
    on_gpu: bool
    default_threshold: float


@dataclass(frozen=True)
class EnrollItem:
    """One subject to enrol (the arguments of :meth:`GalleryEngine.enroll`)."""

    gallery: str
    subject_id: str
    samples: Sequence[bytes]
    display_name: str = ""
    metadata: Mapping[str, str] | None = None
    idempotency_key: str = ""


@dataclass
class _GalleryState:
    """The in-memory side of one gallery: its indexes, change-feed cursor, tombstones."""

    name: str
    gallery_id: int = 0
    cursor: int = 0
    built: bool = False
    indexes: dict[str, GalleryIndex | MilvusGalleryIndex] = field(default_factory=dict)
    saved_cursor: int | None = None  # change-feed cursor of the last snapshot written/read
    # sample id -> monotonic time of the deletion's commit (see module docstring)
    deleted: dict[int, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def mark_deleted(self, sample_ids: Iterable[int]) -> None:
        now = time.monotonic()
        for sid in sample_ids:
            self.deleted[int(sid)] = now

    def prune(self, before: float) -> None:
        for sid in [s for s, t in list(self.deleted.items()) if t < before]:
            self.deleted.pop(sid, None)


def request_digest(
    operation: str,
    subject_id: str,
    samples: Sequence[bytes],
    display_name: str = "",
    metadata: Mapping[str, str] | None = None,
) -> str:
    """SHA-256 of the request as sent (protected-input bytes, not templates).

    Templates of the same input can differ in the last bits between runs (batch
    composition, hardware), so idempotency compares what the client sent.
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
    for blob in samples:
        part(bytes(blob))
    return h.hexdigest()


def _calibrate(gallery: str, index: GalleryIndex) -> None:
    """Tune efSearch / nprobe on the gallery's own templates (recall is a property of the
    data: at 1M the size plan's efSearch 256 gave recall@10 0.989, the calibrated 512
    0.997). Searches go on meanwhile; a snapshot keeps the value across restarts."""
    t0 = time.monotonic()
    try:
        res = index.calibrate()
    except Exception:  # noqa: BLE001 - the index keeps serving with its planned setting
        log.exception("gallery %s: index calibration failed", gallery)
        return
    if res.get("param"):
        log.info("gallery %s: %s = %s (recall@10 %.4f at %s on its own templates), %.1f s",
                 gallery, res["param"], res["value"], res["recall"] or float("nan"),
                 res.get("measured_at"), time.monotonic() - t0)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


class GalleryEngine:
    """Galleries, subjects, identify and verify over PostgreSQL + FAISS (module docstring)."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        keys: KeyRingSource,
        embedder: Embedder,
        *,
        force_cpu_index: bool = False,
        max_message_bytes: int = 0,
        snapshot_dir: str | os.PathLike | None = None,
        milvus: MilvusOptions | None = None,
    ) -> None:
        self._sessions = sessions
        self.milvus = milvus
        # Milvus keeps the indexes itself: no FAISS snapshots with it.
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir and milvus is None else None
        self.keys = keys
        self.embedder = embedder
        self.card = embedder.card
        self._force_cpu = force_cpu_index
        self.max_message_bytes = max_message_bytes
        self._states: dict[str, _GalleryState] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._syncer: threading.Thread | None = None
        self._snapshotter: threading.Thread | None = None
        self._maintaining: set[int] = set()
        self.template_dim = protected_dim(self.card.embedding_dim, self._any_key())
        # centred scores are inner products of index vectors two coordinates longer
        # (enrollment.score_centring); templates in PostgreSQL keep template_dim
        self.index_dim = self.template_dim + (
            score_centring.EXTRA_DIMS if embedder.cohort is not None else 0)
        self._cohorts: dict[MappingKey, np.ndarray] = {}  # cohort centroids, per mapping key
        # what the index vectors are: a snapshot or Milvus collection of another (the other
        # scoring of the same model) is never loaded
        self.index_version = self.card.model_version + (
            "+centred" if embedder.cohort is not None else "")
        self._milvus_client: Any = None
        if milvus is not None:
            from pymilvus import MilvusClient

            if milvus.uri.endswith(".db"):
                Path(milvus.uri).expanduser().parent.mkdir(parents=True, exist_ok=True)
            self._milvus_client = MilvusClient(uri=milvus.uri, token=milvus.token)
            self._milvus_client.list_collections()  # unreachable: fail at start, not later

    # ------------------------------------------------------------------ plumbing

    def _any_key(self):
        ring = self.keys.get()
        ids = template_key_ids(ring)
        if not ids:
            raise ServiceError(
                "FAILED_PRECONDITION",
                f"the key ring ({self.keys.origin}) holds no template-mapping secret (tmap-N): "
                "add one to a key file with `privface keys new-template-key`, or make a "
                "complete key file with `privface keys init FILE`",
            )
        return mapping_key(ring, "-", ids[-1], **self.card.mapping)

    def _key(self, gallery: str, key_id: str):
        return mapping_key(self.keys.get(), gallery, key_id, **self.card.mapping)

    def _cohort_means(self, key: MappingKey, templates: np.ndarray) -> np.ndarray:
        """Each unit template's cohort mean: the model's cohort mapped under the same key
        (once per key), as the scores it centres are between templates of that key; zeros
        when the model centres no scores."""
        cohort = self.embedder.cohort
        if cohort is None:
            return np.zeros(len(templates))
        centroids = self._cohorts.get(key)
        if centroids is None:
            centroids = self._cohorts[key] = score_centring.centroids_under(cohort, key)
        return score_centring.cohort_means(templates, centroids, cohort.k)

    def current_template_key_id(self) -> str:
        ids = template_key_ids(self.keys.get())
        if not ids:
            self._any_key()  # raises the actionable error
        return ids[-1]

    def _audit(
        self,
        principal: Principal,
        operation: str,
        gallery: str | None,
        subject_ids: Sequence[str] = (),
        status: str = "OK",
        session: Session | None = None,
    ) -> None:
        """Append an audit row; in ``session`` (same transaction as the work) or on its own.

        A failing audit of a *failed* request is logged, never raised over the real error.
        """
        args = dict(principal=principal.name, operation=operation, gallery=gallery,
                    subject_ids=[s for s in subject_ids if s][:100], status=status)
        if session is not None:
            repo.append_audit(session, **args)
            return
        try:
            with self._sessions.begin() as s:
                repo.append_audit(s, **args)
        except Exception as exc:  # noqa: BLE001 - the audit must not mask the request's error
            log.warning("could not write audit row for %s (%s): %s", operation, status, exc)

    def _guard(
        self,
        principal: Principal,
        operation: str,
        gallery: str | None,
        subject_ids: Sequence[str],
        work: Callable[[], T],
    ) -> T:
        """Run ``work``; audit a refusal with its status code and translate DB outages."""
        try:
            return work()
        except (ServiceError, StorageError, AuthError) as exc:
            code = getattr(exc, "code", None) or getattr(exc, "grpc_code", "INTERNAL")
            self._audit(principal, operation, gallery, subject_ids, code)
            raise
        except OperationalError as exc:
            log.error("database unavailable during %s: %s", operation, exc)
            raise ServiceError(
                "UNAVAILABLE", "the database is unavailable; retry later", "database"
            ) from None

    def _require(self, principal: Principal, role: str | frozenset[str], gallery: str) -> None:
        principal.require(role, gallery)

    # ------------------------------------------------------------------ gallery states

    def _state(self, gallery: str) -> _GalleryState:
        """The loaded state of a gallery (built from PostgreSQL on first use)."""
        with self._lock:
            state = self._states.get(gallery)
            if state is None:
                state = self._states[gallery] = _GalleryState(gallery)
        if not state.built:
            with state.lock:
                if not state.built:
                    try:
                        self._build(state)
                    except GalleryNotFound:
                        with self._lock:
                            if self._states.get(gallery) is state:
                                del self._states[gallery]
                        raise
        return state

    def _new_index(
        self, expected: int, gallery: str = "", gallery_id: int = 0, key_id: str = ""
    ) -> GalleryIndex | MilvusGalleryIndex:
        """An empty index; with Milvus a new collection (an old one of that name dropped)."""
        if self.milvus is None:
            return GalleryIndex(
                self.index_dim, expected_size=expected, force_cpu=self._force_cpu
            )
        index = self._open_collection(gallery, gallery_id, key_id)
        if index.seq != -1 or len(index):
            index.drop()
            index = self._open_collection(gallery, gallery_id, key_id)
        return index

    # ------------------------------------------------------------------ Milvus collections

    def _collection_name(self, gallery: str, gallery_id: int, key_id: str) -> str:
        return milvus_collection_name(self.milvus.prefix, gallery, gallery_id,
                                      self.index_version, key_id)

    def _open_collection(self, gallery: str, gallery_id: int, key_id: str) -> MilvusGalleryIndex:
        """The collection of (gallery incarnation, model, key version), created if new."""
        return MilvusGalleryIndex(
            self.index_dim, self._collection_name(gallery, gallery_id, key_id),
            uri=self.milvus.uri, client=self._milvus_client,
            index=self.milvus.index_spec(), search_params=self.milvus.search_spec(),
        )

    def _ring_key_ids(self, gallery: str) -> list[str]:
        """Template key versions this server can search with (their secret is in the ring)."""
        return [k for k in template_key_ids(self.keys.get()) if self._key(gallery, k) is not None]

    def _drop_collections(self, names: Iterable[str], why: str) -> int:
        client, n = self._milvus_client, 0
        for name in names:
            if client.has_collection(name):
                client.drop_collection(name)
                n += 1
                log.info("Milvus collection %s dropped (%s)", name, why)
        return n

    def _drop_other_incarnations(self, gallery: str, gallery_id: int) -> None:
        """Collections of an earlier gallery of the same name (deleted, maybe re-created)."""
        stem = milvus_gallery_stem(self.milvus.prefix, gallery)
        mine = milvus_incarnation_stem(self.milvus.prefix, gallery, gallery_id)
        self._drop_collections(
            [c for c in self._milvus_client.list_collections()
             if c.startswith(stem) and not c.startswith(mine)],
            f"gallery {gallery} was deleted (and re-created) since",
        )

    def _drop_orphan_collections(self, listed: Sequence[str], live: Iterable[str]) -> None:
        """Drop the collections in ``listed`` of galleries not in ``live`` (deleted while
        this server was down). ``live`` must be read from PostgreSQL *after* ``listed``:
        a collection is only ever made for a gallery that exists."""
        pattern = re.compile(rf"{re.escape(self.milvus.prefix)}_[0-9a-f]{{{_MILVUS_NAME_HASH}}}_")
        stems = {milvus_gallery_stem(self.milvus.prefix, g) for g in live}
        self._drop_collections(
            [c for c in listed if (m := pattern.match(c)) and m.group(0) not in stems],
            "its gallery no longer exists",
        )

    def _resume_collections(self, state: _GalleryState) -> bool:
        """Reuse the gallery's Milvus collections, caught up from the change-feed cursor they
        store; False when there is nothing usable (lock held; the caller rebuilds)."""
        t0 = time.monotonic()
        with self._sessions() as s:
            info = repo.get_gallery(s, state.name)
            versions = repo.template_versions(s, state.name)
        self._drop_other_incarnations(state.name, info.id)
        names = {k: self._collection_name(state.name, info.id, k)
                 for k in self._ring_key_ids(state.name)}
        existing = [k for k, name in names.items() if self._milvus_client.has_collection(name)]
        if not existing:
            return False
        needed = {k for (m, _, _, k), n in versions.items()
                  if n and m == self.card.model_version and k in names}
        missing = sorted(needed - set(existing))
        if missing:
            log.warning("gallery %s: no Milvus collection for template key %s; rebuilding "
                        "them from PostgreSQL", state.name, ", ".join(missing))
            return False
        indexes = {k: self._open_collection(state.name, info.id, k) for k in existing}
        cursor = min(index.seq for index in indexes.values())
        if cursor <= 0:  # never saved (or "empty"), so not known to hold every removal
            log.warning("gallery %s: Milvus collections have no saved change cursor; "
                        "rebuilding them from PostgreSQL", state.name)
            return False
        state.indexes = indexes
        state.gallery_id = info.id
        state.cursor = state.saved_cursor = cursor
        state.built = True
        self._catch_up(state)  # a stale cursor rebuilds (drop + refill) in there
        if state.indexes is indexes:
            log.info("gallery %s: Milvus collections reused at change %d (%d templates), "
                     "caught up to %d in %.2f s", state.name, cursor,
                     sum(len(i) for i in indexes.values()), state.cursor,
                     time.monotonic() - t0)
        return True

    def _save_collections(self, state: _GalleryState) -> None:
        """Record the gallery's cursor in its collections (lock held): every change up to
        it is applied to every index of the gallery, so a restart resumes from there."""
        for index in state.indexes.values():
            index.seq = max(index.seq, state.cursor)
            index.save()
        state.saved_cursor = state.cursor

    def _build(self, state: _GalleryState, from_snapshot: bool = True) -> None:
        """Load a gallery's searchable templates (lock held): from its encrypted snapshot
        plus the changes since, or else from PostgreSQL. With Milvus: its collections caught
        up from their stored cursor, or else dropped and refilled from PostgreSQL."""
        if self.milvus is not None:
            if from_snapshot and self._resume_collections(state):
                return
            with self._sessions() as s:
                gallery_id = repo.get_gallery(s, state.name).id
            self._drop_other_incarnations(state.name, gallery_id)
            names = [self._collection_name(state.name, gallery_id, k)
                     for k in self._ring_key_ids(state.name)]
            self._drop_collections([n + suffix for n in names for suffix in ("", STATE_SUFFIX)],
                                   f"gallery {state.name} is rebuilt from PostgreSQL")
        elif from_snapshot and self._load_snapshot(state):
            return
        t0 = time.monotonic()
        mv = self.card.model_version
        indexes: dict[str, GalleryIndex | MilvusGalleryIndex] = {}
        with self._sessions() as s:
            info = repo.get_gallery(s, state.name)
            cursor = repo.change_watermark(s, state.name)  # read before the scan (storage)
            for chunk in repo.iter_gallery_templates(
                s, self.keys.get(), state.name, model_version=mv
            ):
                groups: dict[str, list[TemplateRecord]] = {}
                for r in chunk:
                    groups.setdefault(r.template_key_id, []).append(r)
                for key_id, records in groups.items():
                    key = self._key(state.name, key_id)
                    if key is None:
                        continue
                    if key_id not in indexes:
                        indexes[key_id] = self._new_index(info.sample_count, state.name,
                                                          info.id, key_id)
                    self._add(indexes[key_id], key, records, cursor)
            versions = repo.template_versions(s, state.name)
        state.indexes = indexes
        state.gallery_id = info.id
        state.cursor = cursor
        state.built = True
        self._catch_up(state)
        if self.milvus is not None:
            self._save_collections(state)  # the next start resumes instead of refilling
        for index in indexes.values():
            if getattr(index, "approximate", False):  # Milvus tunes its own indexes
                threading.Thread(target=_calibrate, args=(state.name, index),
                                 name=f"privface-calibrate-{state.name}", daemon=True).start()
        unsearchable = sum(
            n for (m, _, _, k), n in versions.items()
            if m != mv or self._key(state.name, k) is None
        )
        if unsearchable:
            log.warning(
                "gallery %s: %d samples were made by another model or with a template key no "
                "longer in the key ring; they are not searched (see GalleryStats)",
                state.name, unsearchable,
            )
        log.info("gallery %s: %d templates indexed in %.2f s", state.name,
                 sum(len(i) for i in indexes.values()), time.monotonic() - t0)

    def _load_snapshot(self, state: _GalleryState) -> bool:
        """Restore from the snapshot and catch up; False when there is no usable one."""
        if self.snapshot_dir is None:
            return False
        t0 = time.monotonic()
        try:
            snap = read_snapshot(self.snapshot_dir, self.keys.get(), state.name)
        except SnapshotError as exc:
            log.warning("gallery %s: index snapshot not used (%s); building from PostgreSQL",
                        state.name, exc)
            return False
        if snap is None:
            return False
        try:
            with self._sessions() as s:
                info = repo.get_gallery(s, state.name)
        except GalleryNotFound:
            remove_snapshot(self.snapshot_dir, state.name)  # deleted by another replica
            raise
        if snap.gallery_id != info.id or snap.model_version != self.index_version:
            log.info("gallery %s: index snapshot is of an older gallery, model or scoring; "
                     "not used", state.name)
            return False
        try:
            indexes = {
                key_id: GalleryIndex.loads(payload, force_cpu=self._force_cpu)
                for key_id, payload in snap.payloads.items()
                if self._key(state.name, key_id) is not None
            }
        except Exception as exc:  # noqa: BLE001 - a snapshot is only a cache
            log.warning("gallery %s: index snapshot unreadable (%s); building from PostgreSQL",
                        state.name, exc)
            return False
        loaded = time.monotonic() - t0
        state.indexes = indexes
        state.gallery_id = info.id
        state.cursor = state.saved_cursor = snap.cursor
        state.built = True
        self._catch_up(state)
        log.info("gallery %s: %d templates from the index snapshot in %.2f s, caught up in "
                 "%.2f s", state.name, sum(len(i) for i in indexes.values()), loaded,
                 time.monotonic() - t0 - loaded)
        return True

    def save_snapshots(self) -> int:
        """Write an encrypted snapshot of every loaded gallery that changed since its last
        one; returns how many were written. Searches go on meanwhile; the gallery's
        catch-up waits only while its indexes are serialised in memory."""
        if self.milvus is not None:
            return self._save_all_collections()
        if self.snapshot_dir is None:
            return 0
        with self._lock:
            states = list(self._states.values())
        written = 0
        for state in states:
            with state.lock:
                if not state.built or state.cursor == state.saved_cursor:
                    continue
                payloads = {k: index.dumps() for k, index in state.indexes.items()}
                cursor, gallery_id = state.cursor, state.gallery_id
            write_snapshot(
                self.snapshot_dir, self.keys.get(), gallery=state.name, gallery_id=gallery_id,
                cursor=cursor, model_version=self.index_version, payloads=payloads,
            )
            state.saved_cursor = cursor
            written += 1
        return written

    def _save_all_collections(self) -> int:
        """Milvus: store the cursor of every loaded gallery that changed since it was last
        stored (what :meth:`save_snapshots` is for FAISS); returns how many."""
        with self._lock:
            states = list(self._states.values())
        written = 0
        for state in states:
            with state.lock:
                if state.built and state.cursor != state.saved_cursor:
                    self._save_collections(state)
                    written += 1
        return written

    def _add(
        self, index: GalleryIndex | MilvusGalleryIndex, key: MappingKey,
        records: Sequence[TemplateRecord], seq: int,
    ) -> None:
        """Index templates made with ``key``: with score centring, their index vectors."""
        if not records:
            return
        x = np.stack([r.template for r in records])  # unit, as _protect made them
        if self.embedder.cohort is not None:
            x = score_centring.index_vectors(x, self._cohort_means(key, x))
        index.add(x, [r.sample_id for r in records], [r.subject_id for r in records], seq=seq)

    def _catch_up(self, state: _GalleryState) -> None:
        """Apply every change committed since ``state.cursor`` (lock held)."""
        started = time.monotonic()
        mv = self.card.model_version
        while True:
            try:
                with self._sessions() as s:
                    cs = repo.templates_changed_since(s, self.keys.get(), state.name,
                                                      state.cursor)
            except StaleCursor as exc:
                log.warning("gallery %s: %s; rebuilding its index", state.name, exc)
                state.built = False
                self._build(state, from_snapshot=False)
                return
            if cs.gallery_id != state.gallery_id:
                log.warning("gallery %s was deleted and re-created; rebuilding", state.name)
                self._build(state, from_snapshot=False)
                return
            if cs.deleted_sample_ids:
                for index in state.indexes.values():
                    index.remove(cs.deleted_sample_ids, seq=cs.cursor)
            groups: dict[str, list[TemplateRecord]] = {}
            for r in cs.upserts:
                if r.model_version == mv:
                    groups.setdefault(r.template_key_id, []).append(r)
            for key_id, records in groups.items():
                key = self._key(state.name, key_id)
                if key is None:
                    continue
                index = state.indexes.get(key_id)
                if index is None:
                    index = state.indexes[key_id] = self._new_index(
                        len(records), state.name, state.gallery_id, key_id)
                self._add(index, key, records, cs.cursor)
            state.cursor = cs.cursor
            if not cs.has_more:
                break
        for index in state.indexes.values():
            self._maintain(state.name, index)
        state.prune(started - TOMBSTONE_GRACE)

    def _maintain(self, gallery: str, index: GalleryIndex | MilvusGalleryIndex) -> None:
        """Compact an index full of removed templates, or move it to the index type its size
        now calls for (``outgrown``, e.g. Flat -> HNSW), in the background: both keep
        searches and writes going, so neither may run under the gallery's lock."""
        grow = bool(getattr(index, "outgrown", False))  # matcher: type fits the size no more
        if not grow and index.garbage_fraction <= COMPACT_AT:
            return
        with self._lock:
            if id(index) in self._maintaining:
                return
            self._maintaining.add(id(index))

        def run() -> None:
            t0 = time.monotonic()
            try:
                if grow:
                    was = index.factory
                    index.rebuild()
                    log.info("gallery %s: index %s -> %s for %d templates in %.1f s", gallery,
                             was, index.factory, len(index), time.monotonic() - t0)
                    _calibrate(gallery, index)
                else:
                    purged = index.compact()
                    log.info("gallery %s: compacted, %d removed templates purged", gallery,
                             purged)
            except Exception:  # noqa: BLE001 - the index keeps serving as it is
                log.exception("gallery %s: index maintenance failed", gallery)
            finally:
                with self._lock:
                    self._maintaining.discard(id(index))

        threading.Thread(target=run, name=f"privface-index-{gallery}", daemon=True).start()

    def sync(self, gallery: str) -> None:
        """Bring a loaded gallery's indexes up to date with PostgreSQL."""
        with self._lock:
            state = self._states.get(gallery)
        if state is None or not state.built:
            return  # loads everything on first use
        with state.lock:
            try:
                self._catch_up(state)
            except GalleryNotFound:
                self._forget(gallery, state)

    def _forget(self, gallery: str, state: _GalleryState | None = None) -> None:
        with self._lock:
            current = self._states.get(gallery)
            if current is not None and (state is None or current is state):
                del self._states[gallery]

    def sync_all(self) -> None:
        with self._lock:
            names = list(self._states)
        for name in names:
            try:
                self.sync(name)
            except Exception as exc:  # noqa: BLE001 - keep the background loop alive
                log.warning("catch-up of gallery %s failed: %s", name, exc)

    def warm_up(self) -> int:
        """Load every gallery (at start, so the first search needs no build)."""
        listed = self._milvus_client.list_collections() if self.milvus is not None else []
        with self._sessions() as s:
            names = [g.name for g in repo.list_galleries(s)]
        if self.milvus is not None:
            try:
                self._drop_orphan_collections(listed, names)
            except Exception:  # noqa: BLE001 - leftovers cost space, not correctness
                log.exception("dropping Milvus collections of deleted galleries failed")
        for name in names:
            try:
                self._state(name)
            except GalleryNotFound:
                continue
        return len(names)

    def start_background_sync(self, interval: float) -> None:
        """Catch up with other writers (replicas, tools) every ``interval`` seconds."""
        if interval <= 0 or self._syncer is not None:
            return

        def loop() -> None:
            while not self._stop.wait(interval):
                self.sync_all()

        self._syncer = threading.Thread(target=loop, name="privface-sync", daemon=True)
        self._syncer.start()

    def start_background_snapshots(self, interval: float) -> None:
        """Snapshot changed galleries every ``interval`` seconds (and at :meth:`close`);
        with Milvus, store their change cursors in their collections."""
        if interval <= 0 or self._snapshotter is not None:
            return
        if self.snapshot_dir is None and self.milvus is None:
            return

        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    self.save_snapshots()
                except Exception:  # noqa: BLE001 - keep serving; the next round retries
                    log.exception("writing index snapshots failed")

        self._snapshotter = threading.Thread(target=loop, name="privface-snapshot", daemon=True)
        self._snapshotter.start()

    def close(self) -> None:
        self._stop.set()
        for thread in (self._syncer, self._snapshotter):
            if thread is not None:
                thread.join(timeout=5)
        try:
            n = self.save_snapshots()
            if n:
                log.info("%d %s for a fast restart", n, "index snapshots written"
                         if self.milvus is None else "Milvus change cursors stored")
        except Exception:  # noqa: BLE001 - shutting down: the next start rebuilds from SQL
            log.exception("writing index snapshots at shutdown failed")
        if self._milvus_client is not None:
            self._milvus_client.close()

    # ------------------------------------------------------------------ embedding

    def _decode_all(self, blobs: Sequence[bytes], what: str = "sample") -> list[np.ndarray]:
        if not blobs:
            raise ServiceError("INVALID_ARGUMENT", f"at least one {what} is required", "empty")
        if len(blobs) > repo.MAX_SAMPLES_PER_CALL:
            raise ServiceError(
                "INVALID_ARGUMENT",
                f"{len(blobs)} samples in one call; the limit is {repo.MAX_SAMPLES_PER_CALL}",
                "too_many",
            )
        return [self.embedder.decode(b, f"{what} {i}") for i, b in enumerate(blobs)]

    def _templates(self, gallery: str, arrays: Sequence[np.ndarray]) -> list[SampleInput]:
        return self._protect(gallery, self.embedder.embed(arrays))

    def _protect(self, gallery: str, emb: np.ndarray) -> list[SampleInput]:
        """Embeddings -> protected templates under the gallery's current template key."""
        key_id = self.current_template_key_id()
        key = self._key(gallery, key_id)
        templates = _unit(protect(emb, key))
        p = self.card.profile
        return [
            SampleInput(t, self.card.model_version, p.name, str(p.version), key_id)
            for t in templates
        ]

    def template_of(self, gallery: str, blob: bytes) -> np.ndarray:
        """The protected template one sample would get in ``gallery`` (diagnostics, tests)."""
        return self._templates(gallery, self._decode_all([blob]))[0].template

    def probe(self, blob: bytes) -> np.ndarray:
        """The unit embedding of one protected probe (validated)."""
        arrays = self._decode_all([blob], "probe")
        return self.embedder.embed(arrays)[0]

    # ------------------------------------------------------------------ server facts

    def server_info(self) -> dict[str, Any]:
        p = self.card.profile
        return {
            "model_version": self.card.model_version,
            "profile": p.name,
            "profile_version": p.version,
            "profile_digest": p.digest(),
            "embedding_dim": self.card.embedding_dim,
            "template_dim": self.template_dim,
            "default_threshold": self.card.threshold,
            "threshold_source": self.card.threshold_source,
            "template_key_id": self.current_template_key_id(),
            "max_message_bytes": self.max_message_bytes,
            "max_views_per_input": MAX_VIEWS,
            "model_runtime": f"{self.embedder.runtime} {self.embedder.precision}"
            + (", permutation-averaged" if self.embedder.average_permutations else "")
            + (", whitened" if self.embedder.whitened else "")
            + (", score-centred" if self.embedder.cohort is not None else ""),
        }

    # ------------------------------------------------------------------ galleries

    def create_gallery(self, principal: Principal, name: str, description: str = "") -> GalleryInfo:
        def work() -> GalleryInfo:
            self._require(principal, "admin", name)
            with self._sessions.begin() as s:
                info = repo.create_gallery(s, name, description)
                self._audit(principal, "create_gallery", name, session=s)
            self._forget(name)  # a stale state of an earlier gallery of that name
            return info

        return self._guard(principal, "create_gallery", name, (), work)

    def delete_gallery(self, principal: Principal, name: str) -> GalleryInfo:
        def work() -> GalleryInfo:
            self._require(principal, "admin", name)
            with self._sessions.begin() as s:
                info = repo.delete_gallery(s, name)
                self._audit(principal, "delete_gallery", name, session=s)
            self._forget(name)
            if self.snapshot_dir is not None:
                remove_snapshot(self.snapshot_dir, name)
            if self.milvus is not None:
                stem = milvus_gallery_stem(self.milvus.prefix, name)
                try:
                    self._drop_collections(
                        [c for c in self._milvus_client.list_collections() if c.startswith(stem)],
                        f"gallery {name} deleted",
                    )
                except Exception:  # noqa: BLE001 - deleted in PostgreSQL; the next start sweeps
                    log.exception("dropping the Milvus collections of gallery %s failed", name)
            return info

        return self._guard(principal, "delete_gallery", name, (), work)

    def list_galleries(self, principal: Principal) -> list[GalleryInfo]:
        with self._sessions() as s:
            return [g for g in repo.list_galleries(s) if principal.may_use(g.name)]

    def gallery_stats(self, principal: Principal, name: str) -> GalleryStats:
        def work() -> GalleryStats:
            self._require(principal, frozenset({"identify", "enroll"}), name)
            state = self._state(name)
            with self._sessions() as s:
                info = repo.get_gallery(s, name)
                versions = repo.template_versions(s, name)
            rows = [
                {
                    "model_version": m,
                    "profile_name": p,
                    "profile_version": v,
                    "template_key_id": k,
                    "sample_count": n,
                    "searchable": m == self.card.model_version and self._key(name, k) is not None,
                }
                for (m, p, v, k), n in sorted(versions.items())
            ]
            indexes = list(state.indexes.values())
            return GalleryStats(
                gallery=info,
                template_versions=rows,
                indexed_samples=sum(len(i) for i in indexes),
                index_type=", ".join(sorted({i.factory for i in indexes})) or "none",
                on_gpu=any(i.on_gpu for i in indexes),
                default_threshold=self.card.threshold,
            )

        return self._guard(principal, "gallery_stats", name, (), work)

    # ------------------------------------------------------------------ subjects

    def enroll(
        self,
        principal: Principal,
        gallery: str,
        subject_id: str,
        samples: Sequence[bytes],
        *,
        display_name: str = "",
        metadata: Mapping[str, str] | None = None,
        idempotency_key: str = "",
    ) -> EnrollResult:
        """Create a subject with one template per protected sample (module docstring)."""

        item = EnrollItem(gallery, subject_id, samples, display_name, metadata, idempotency_key)

        def work() -> EnrollResult:
            arrays = self._admit(principal, item)
            result = self._commit_enroll(principal, item, self._templates(gallery, arrays))
            self.sync(gallery)
            return result

        return self._guard(principal, "enroll", gallery, [subject_id], work)

    def enroll_many(
        self, principal: Principal, items: Sequence[EnrollItem]
    ) -> list[EnrollResult | Exception]:
        """Enrol several subjects with one model call; a result or the error per item.

        What makes batch enrolment fast: the model runs once over every view of the group
        (its cost per view falls with the batch size), and each touched gallery catches up
        once. Each item still commits in its own transaction, so one bad item fails alone.
        Results are returned after the catch-up: an acknowledged subject is searchable.
        """
        out: list[EnrollResult | Exception | None] = [None] * len(items)
        admitted: dict[int, list[np.ndarray]] = {}
        for i, item in enumerate(items):
            try:
                admitted[i] = self._guard(principal, "enroll", item.gallery, [item.subject_id],
                                          lambda item=item: self._admit(principal, item))
            except Exception as exc:  # noqa: BLE001 - reported per item
                out[i] = exc
        views = [a for arrays in admitted.values() for a in arrays]
        emb = self.embedder.embed(views) if views else None
        pos = 0
        touched: list[str] = []
        for i, arrays in admitted.items():
            item, part = items[i], emb[pos : pos + len(arrays)]
            pos += len(arrays)

            def work(item=item, part=part) -> EnrollResult:
                return self._commit_enroll(principal, item, self._protect(item.gallery, part))

            try:
                out[i] = self._guard(principal, "enroll", item.gallery, [item.subject_id], work)
                if item.gallery not in touched:
                    touched.append(item.gallery)
            except Exception as exc:  # noqa: BLE001 - reported per item
                out[i] = exc
        for gallery in touched:
            self.sync(gallery)
        return out  # type: ignore[return-value]

    def _admit(self, principal: Principal, item: EnrollItem) -> list[np.ndarray]:
        """Everything checked before the model runs: role, gallery, inputs."""
        self._require(principal, "enroll", item.gallery)
        self._state(item.gallery)  # NOT_FOUND before any model work
        return self._decode_all(item.samples)

    def _commit_enroll(
        self, principal: Principal, item: EnrollItem, inputs: Sequence[SampleInput]
    ) -> EnrollResult:
        digest = None
        if item.idempotency_key:
            digest = request_digest("enroll", item.subject_id, item.samples, item.display_name,
                                    item.metadata)
        with self._sessions.begin() as s:
            result = repo.enroll_subject(
                s, self.keys.get(), item.gallery, item.subject_id, inputs,
                display_name=item.display_name, metadata=dict(item.metadata or {}),
                idempotency_key=item.idempotency_key or None, request_digest=digest,
            )
            self._audit(principal, "enroll", item.gallery, [item.subject_id],
                        "REPLAYED" if result.replayed else "OK", session=s)
        return result

    def add_samples(
        self,
        principal: Principal,
        gallery: str,
        subject_id: str,
        samples: Sequence[bytes],
        *,
        idempotency_key: str = "",
    ) -> EnrollResult:
        def work() -> EnrollResult:
            self._require(principal, "enroll", gallery)
            self._state(gallery)
            arrays = self._decode_all(samples)
            inputs = self._templates(gallery, arrays)
            digest = request_digest("add_samples", subject_id, samples) if idempotency_key else None
            with self._sessions.begin() as s:
                result = repo.add_samples(
                    s, self.keys.get(), gallery, subject_id, inputs,
                    idempotency_key=idempotency_key or None, request_digest=digest,
                )
                self._audit(principal, "add_samples", gallery, [subject_id],
                            "REPLAYED" if result.replayed else "OK", session=s)
            self.sync(gallery)
            return result

        return self._guard(principal, "add_samples", gallery, [subject_id], work)

    def _after_delete(self, gallery: str, removed: Sequence[int]) -> None:
        with self._lock:
            state = self._states.get(gallery)
        if state is not None:
            state.mark_deleted(removed)  # before the call returns: never found again
        self.sync(gallery)

    def remove_samples(
        self, principal: Principal, gallery: str, subject_id: str, sample_ids: Sequence[int]
    ) -> list[int]:
        def work() -> list[int]:
            self._require(principal, "enroll", gallery)
            with self._sessions.begin() as s:
                removed = repo.remove_samples(s, gallery, subject_id, sample_ids)
                self._audit(principal, "remove_samples", gallery, [subject_id], session=s)
            self._after_delete(gallery, removed)
            return removed

        return self._guard(principal, "remove_samples", gallery, [subject_id], work)

    def delete_subject(self, principal: Principal, gallery: str, subject_id: str) -> list[int]:
        """Cascading erasure; the subject is never returned by a search once this returns."""

        def work() -> list[int]:
            self._require(principal, "enroll", gallery)
            with self._sessions.begin() as s:
                removed = repo.delete_subject(s, gallery, subject_id)
                self._audit(principal, "delete_subject", gallery, [subject_id], session=s)
            self._after_delete(gallery, removed)
            return removed

        return self._guard(principal, "delete_subject", gallery, [subject_id], work)

    def get_subject(self, principal: Principal, gallery: str, subject_id: str) -> SubjectRecord:
        def work() -> SubjectRecord:
            self._require(principal, frozenset({"identify", "enroll"}), gallery)
            with self._sessions.begin() as s:
                record = repo.get_subject(s, self.keys.get(), gallery, subject_id)
                self._audit(principal, "get_subject", gallery, [subject_id], session=s)
            return record

        return self._guard(principal, "get_subject", gallery, [subject_id], work)

    def list_subjects(
        self, principal: Principal, gallery: str, page_size: int = 0, page_token: str = ""
    ) -> SubjectPage:
        def work() -> SubjectPage:
            self._require(principal, frozenset({"identify", "enroll"}), gallery)
            with self._sessions.begin() as s:
                page = repo.list_subjects(
                    s, self.keys.get(), gallery,
                    page_size=page_size or DEFAULT_PAGE_SIZE, page_token=page_token,
                )
                self._audit(principal, "list_subjects", gallery, session=s)
            return page

        return self._guard(principal, "list_subjects", gallery, (), work)

    def rename_subject(
        self, principal: Principal, gallery: str, subject_id: str, display_name: str
    ) -> SubjectRecord:
        def work() -> SubjectRecord:
            self._require(principal, "enroll", gallery)
            with self._sessions.begin() as s:
                record = repo.rename_subject(s, self.keys.get(), gallery, subject_id,
                                             display_name)
                self._audit(principal, "rename_subject", gallery, [subject_id], session=s)
            return record

        return self._guard(principal, "rename_subject", gallery, [subject_id], work)

    def update_metadata(
        self, principal: Principal, gallery: str, subject_id: str, metadata: Mapping[str, str]
    ) -> SubjectRecord:
        def work() -> SubjectRecord:
            self._require(principal, "enroll", gallery)
            with self._sessions.begin() as s:
                record = repo.update_subject_metadata(s, self.keys.get(), gallery, subject_id,
                                                      dict(metadata))
                self._audit(principal, "update_metadata", gallery, [subject_id], session=s)
            return record

        return self._guard(principal, "update_metadata", gallery, [subject_id], work)

    # ------------------------------------------------------------------ matching

    def _threshold(self, threshold: float | None) -> float:
        if threshold is None:
            return self.card.threshold
        if not np.isfinite(threshold) or not -1.0 <= threshold <= 1.0:
            raise ServiceError(
                "INVALID_ARGUMENT", f"threshold {threshold} must be a score in [-1, 1]",
                "threshold",
            )
        return float(threshold)

    def search(
        self, gallery: str, embedding: np.ndarray, top_k: int
    ) -> list[Candidate]:
        """Ranked subjects for a unit embedding (no threshold applied, ``match`` False)."""
        state = self._state(gallery)
        best: dict[str, Candidate] = {}
        for key_id, index in list(state.indexes.items()):
            key = self._key(gallery, key_id)
            if key is None:
                continue
            query = _unit(protect(embedding[None], key))
            mean = float(self._cohort_means(key, query)[0])
            centred = self.embedder.cohort is not None
            if centred:
                query = score_centring.query_vectors(query)
            # Fetch a little deeper so hits hidden by pending tombstones leave no hole.
            extra = min(len(state.deleted), 1000)
            for hit in index.search(query[0], top_k + extra):
                if hit.sample_id in state.deleted:
                    continue
                score = score_centring.from_index_score(hit.score, mean) if centred \
                    else hit.score
                known = best.get(hit.subject)
                if known is None or score > known.score:
                    best[hit.subject] = Candidate(str(hit.subject), float(score),
                                                  hit.sample_id, False)
        ranked = sorted(best.values(), key=lambda c: (-c.score, c.subject_id))
        return ranked[:top_k]

    def identify(
        self,
        principal: Principal,
        gallery: str,
        probe: bytes,
        top_k: int = 0,
        threshold: float | None = None,
    ) -> IdentifyResult:
        def work() -> IdentifyResult:
            self._require(principal, "identify", gallery)
            k = top_k or DEFAULT_TOP_K
            if not 1 <= k <= MAX_TOP_K:
                raise ServiceError("INVALID_ARGUMENT", f"top_k must be 1-{MAX_TOP_K}", "top_k")
            limit = self._threshold(threshold)
            self._state(gallery)
            embedding = self.probe(probe)
            ranked = self.search(gallery, embedding, k)
            candidates = [
                Candidate(c.subject_id, c.score, c.sample_id, c.score >= limit) for c in ranked
            ]
            top = candidates[0] if candidates else None
            matched = top is not None and top.match
            self._audit(principal, "identify", gallery, [top.subject_id] if matched else [],
                        "MATCH" if matched else "NO_MATCH")
            return IdentifyResult(
                match=matched,
                subject_id=top.subject_id if matched else "",
                score=top.score if top else 0.0,
                threshold=limit,
                candidates=candidates,
                model_version=self.card.model_version,
            )

        return self._guard(principal, "identify", gallery, (), work)

    def verify(
        self,
        principal: Principal,
        gallery: str,
        subject_id: str,
        probe: bytes,
        threshold: float | None = None,
    ) -> VerifyResult:
        """1:1 against the subject's stored templates (PostgreSQL, not the index)."""

        def work() -> VerifyResult:
            self._require(principal, "identify", gallery)
            limit = self._threshold(threshold)
            with self._sessions() as s:
                record = repo.get_subject(s, self.keys.get(), gallery, subject_id,
                                          include_templates=True)
            embedding = self.probe(probe)
            best_score, best_id = None, 0
            for sample in record.samples:
                if sample.model_version != self.card.model_version:
                    continue
                key = self._key(gallery, sample.template_key_id)
                if key is None or sample.template is None:
                    continue
                query = _unit(protect(embedding[None], key))
                template = _unit(sample.template[None])
                score = float(score_centring.centre(
                    np.dot(query[0], template[0]), *self._cohort_means(key, query),
                    *self._cohort_means(key, template)))
                if best_score is None or score > best_score:
                    best_score, best_id = score, sample.sample_id
            if best_score is None:
                raise ServiceError(
                    "FAILED_PRECONDITION",
                    f"subject {subject_id!r} has no template this server can compare (made by "
                    "another model or template key); enrol new samples",
                    "no_template",
                )
            matched = best_score >= limit
            self._audit(principal, "verify", gallery, [subject_id],
                        "MATCH" if matched else "NO_MATCH")
            return VerifyResult(matched, best_score, limit, best_id, self.card.model_version)

        return self._guard(principal, "verify", gallery, [subject_id], work)

    def calibrate_threshold(
        self, gallery: str, far: float = 1e-3, max_pairs: int = 2_000_000
    ) -> Calibration:
        """The gallery's own threshold at ``far`` from its enrolled samples, scored as
        identify and verify score them (privface.threshold_calibration); an operator's
        command, not an RPC: the scores of every pair say more about the gallery than any
        one client may learn."""
        records: dict[str, list[TemplateRecord]] = {}
        with self._sessions() as s:
            for chunk in repo.iter_gallery_templates(s, self.keys.get(), gallery,
                                                     model_version=self.card.model_version):
                for r in chunk:
                    records.setdefault(r.template_key_id, []).append(r)
        groups = []
        for key_id, rs in records.items():
            key = self._key(gallery, key_id)
            if key is None:  # a retired template key: those templates are not scored either
                continue
            t = _unit(np.stack([r.template for r in rs]))
            groups.append(Group(t, np.array([r.subject_id for r in rs]),
                                self._cohort_means(key, t)))
        return calibrate(groups, far, self._threshold(None), max_pairs)
