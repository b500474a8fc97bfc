"""One search index per gallery: ranked subjects, safe deletion, GPU placement, persistence.

FAISS only knows int64 labels. The gallery gives every added template a fresh label (a
counter) and keeps label -> sample id / subject / alive in numpy arrays, because:

* index types without ``remove_ids`` (HNSW, every GPU index) keep removed templates until a
  rebuild; with fresh labels a sample id removed and later re-added is never confused with
  its own stale copy, and the alive mask filters stale copies out of every result;
* labels only grow, so FAISS's internal order equals label order and a removed template can
  be found and overwritten in place (``_scrub``) - erasure does not wait for a rebuild;
* mapping a result row to a subject is one numpy gather.

Searches run concurrently under a readers/writer lock; adds, removals and the swap at the end
of ``compact`` take the writer side.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from numpy.typing import ArrayLike

from . import factory as fx
from ._rwlock import RWLock
from .gpu import GPU_MAX_K, to_gpu, use_gpu

SubjectKey = int | str

FORMAT_VERSION = 1
META_FILE = "meta.npz"
# How much faster k grows when a query did not find enough distinct subjects.
GROWTH = 4


@dataclass(frozen=True, slots=True)
class Hit:
    """One ranked subject: its best-matching sample and that sample's cosine score."""

    subject: SubjectKey
    score: float
    sample_id: int


def normalize(x: ArrayLike, d: int) -> np.ndarray:
    """Cosine equals inner product only for unit vectors; bad input fails here, not in FAISS."""
    a = np.asarray(x)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.shape[1] != d:
        raise ValueError(f"expected vectors of dimension {d}, got shape {np.shape(x)}")
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise TypeError(f"expected real vectors, got dtype {a.dtype}")
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise ValueError("vectors contain NaN or inf")
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError("a zero vector has no direction to compare")
    return np.ascontiguousarray(a / norms, dtype=np.float32)


def _as_ids(sample_ids: ArrayLike) -> np.ndarray:
    ids = np.atleast_1d(np.asarray(sample_ids))
    if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
        raise ValueError("sample ids must be a 1-D array of integers")
    return ids.astype(np.int64)


def _as_key(key: object) -> SubjectKey:
    # Keys go to JSON on save, so only int and str are accepted (bool is an int; refuse it).
    if isinstance(key, bool) or not isinstance(key, int | str | np.integer):
        raise TypeError(f"subject keys must be int or str, got {type(key).__name__}")
    return int(key) if isinstance(key, int | np.integer) else key


class GalleryIndex:
    """FAISS index of one gallery returning ranked subjects; see the module docstring."""

    def __init__(
        self,
        d: int,
        factory: str | None = None,
        *,
        expected_size: int = 0,
        force_cpu: bool = False,
        overfetch: int = 4,
        ef_search: int = 64,
    ) -> None:
        if d < 1 or overfetch < 1 or ef_search < 1:
            raise ValueError("d, overfetch and ef_search must be positive")
        factory = factory or fx.choose_factory(expected_size, d)
        self._setup(d, factory, fx.make_index(d, factory), force_cpu, overfetch, ef_search)

    def _setup(
        self,
        d: int,
        factory: str,
        cpu: faiss.Index,
        force_cpu: bool,
        overfetch: int,
        ef_search: int,
    ) -> None:
        self.d = int(d)
        self.factory = factory
        self.force_cpu = force_cpu
        self.overfetch = int(overfetch)
        self.ef_search = int(ef_search)
        self.seq = -1  # last change sequence number included; -1 = none
        self._lock = RWLock()
        self._compact_lock = threading.Lock()
        self._save_lock = threading.Lock()
        self._cpu = cpu
        self._place()
        self._n_labels = 0
        self._sample = np.empty(0, np.int64)
        self._subject = np.empty(0, np.int64)
        self._alive = np.empty(0, bool)
        self._in_index = np.empty(0, bool)
        self._label_of: dict[int, int] = {}
        self._keys: list[SubjectKey] = []
        self._code_of: dict[SubjectKey, int] = {}
        self._live_count = np.empty(0, np.int64)
        self._n_subjects = 0
        self._garbage = 0
        self._sel: faiss.IDSelector | None = None
        self._sel_parts: tuple = ()
        self._tombstones: dict[int, int] = {}

    # ------------------------------------------------------------------ placement

    def _place(self) -> None:
        """GPU when available and the type allows it; the CPU index stays as the mirror that
        serves save, compaction and searches deeper than the GPU's k limit."""
        self._gpu = None
        if self._cpu.is_trained and fx.gpu_capable(self._cpu) and use_gpu(self.force_cpu):
            self._gpu = to_gpu(self._cpu)
        # On GPU nothing is removed in place: the mirror keeps label order for _scrub, and
        # IndexFlat.remove_ids costs a copy of the whole table per call.
        self._physical = fx.can_remove(self._cpu) and self._gpu is None

    @property
    def on_gpu(self) -> bool:
        return self._gpu is not None

    @property
    def removes_in_place(self) -> bool:
        """False for HNSW and GPU: removals are filtered until ``compact``."""
        return self._physical

    # ------------------------------------------------------------------ counts

    def __len__(self) -> int:
        return len(self._label_of)

    def __contains__(self, sample_id: object) -> bool:
        return sample_id in self._label_of

    @property
    def n_subjects(self) -> int:
        return self._n_subjects

    @property
    def garbage(self) -> int:
        """Removed templates still inside the searched FAISS index (filtered, zeroed on CPU)."""
        return self._garbage

    @property
    def garbage_fraction(self) -> float:
        """Callers ``compact()`` above a fraction of their choice (0.2 is a sane default)."""
        return self._garbage / max(1, self._cpu.ntotal)

    def sample_ids(self) -> np.ndarray:
        """Live sample ids, sorted, e.g. to prove an erasure or diff against the database."""
        with self._lock.read():
            return np.sort(np.fromiter(self._label_of, np.int64, len(self._label_of)))

    # ------------------------------------------------------------------ writes

    def train(self, x: ArrayLike) -> None:
        """Only for types that learn from data (the IVF hook); a no-op for Flat and HNSW."""
        xs = normalize(x, self.d)
        with self._lock.write():
            if not self._cpu.is_trained:
                self._cpu.train(xs)
                self._place()

    def add(
        self,
        x: ArrayLike,
        sample_ids: ArrayLike,
        subjects: Sequence[SubjectKey] | SubjectKey,
        *,
        seq: int | None = None,
    ) -> int:
        """Add templates; re-adding a live sample id replaces it so replays are idempotent.

        With ``seq``, an add not newer than a recorded removal of the same sample is dropped:
        an enrolment thread that loses a race with a deletion cannot resurrect the sample.
        """
        xs = normalize(x, self.d)
        ids = _as_ids(sample_ids)
        if isinstance(subjects, int | str | np.integer):
            keys = [_as_key(subjects)] * len(ids)
        else:
            keys = [_as_key(k) for k in subjects]
        if not len(xs) == len(ids) == len(keys):
            raise ValueError("x, sample_ids and subjects differ in length")
        if len(np.unique(ids)) != len(ids):
            raise ValueError("duplicate sample ids in one add")
        with self._lock.write():
            if not self._cpu.is_trained:
                raise RuntimeError(f"{self.factory!r} must be trained before adding")
            if seq is not None and self._tombstones:
                keep = [self._tombstones.get(s, seq - 1) < seq for s in ids.tolist()]
                keep_idx = np.flatnonzero(keep)
                xs, ids, keys = xs[keep_idx], ids[keep_idx], [keys[i] for i in keep_idx]
            n = len(ids)
            if n:
                old = [self._label_of[s] for s in ids.tolist() if s in self._label_of]
                if old:
                    self._drop(np.asarray(old, np.int64))
                labels = np.arange(self._n_labels, self._n_labels + n, dtype=np.int64)
                codes = np.fromiter((self._code(k) for k in keys), np.int64, n)
                self._grow(self._n_labels + n)
                self._cpu.add_with_ids(xs, labels)
                if self._gpu is not None:
                    self._gpu.add_with_ids(xs, labels)
                self._sample[labels] = ids
                self._subject[labels] = codes
                self._alive[labels] = True
                self._in_index[labels] = True
                self._label_of.update(zip(ids.tolist(), labels.tolist(), strict=True))
                np.add.at(self._live_count, codes, 1)
                self._n_labels += n
                self._recount()
            self._bump(seq)
        return n

    def remove(self, sample_ids: ArrayLike, *, seq: int | None = None) -> int:
        """Remove samples; from the moment this returns they are never returned by a search.

        Unknown ids are ignored (a replay may repeat a removal). With ``seq`` the removal is
        remembered so an older add arriving late is dropped.
        """
        ids = np.unique(_as_ids(sample_ids))
        with self._lock.write():
            self._remember(ids, seq)
            labels = [self._label_of[s] for s in ids.tolist() if s in self._label_of]
            if labels:
                self._drop(np.asarray(labels, np.int64))
            self._bump(seq)
        return len(labels)

    def remove_subject(self, subject: SubjectKey, *, seq: int | None = None) -> int:
        """Cascading delete of every sample of one subject."""
        with self._lock.write():
            code = self._code_of.get(_as_key(subject))
            n = self._n_labels
            if code is None:
                labels = np.empty(0, np.int64)
            else:
                labels = np.flatnonzero(self._alive[:n] & (self._subject[:n] == code))
            self._remember(self._sample[labels], seq)
            if labels.size:
                self._drop(labels)
            self._bump(seq)
        return int(labels.size)

    def replay(
        self,
        seq: int,
        added: tuple[ArrayLike, ArrayLike, Sequence[SubjectKey]] | None = None,
        removed: ArrayLike | None = None,
    ) -> None:
        """Bring a loaded snapshot up to ``seq`` with the changes made after ``self.seq``.

        Both lists are final states from the source of truth (samples alive now, samples
        deleted since). Removals go first and win: a sample in both lists stays removed.
        """
        if removed is not None:
            self.remove(removed, seq=seq)
        if added is not None:
            x, ids, subjects = added
            if len(_as_ids(ids)):
                self.add(x, ids, subjects, seq=seq)
        with self._lock.write():
            self._bump(seq)

    def compact(self) -> int:
        """Rebuild without removed templates; returns how many were purged.

        The rebuild runs outside the lock on a snapshot (searches and writes go on); only the
        catch-up with changes made meanwhile and the swap take the writer lock. Peak memory
        is two copies of the index.
        """
        with self._compact_lock:
            with self._lock.read():
                if self._garbage == 0:
                    return 0
                n0 = self._n_labels
                live = np.flatnonzero(self._alive[:n0])
                xs = self._reconstruct(live)
                fresh = self._fresh_index()
                on_gpu = self._gpu is not None
            if live.size:
                fresh.add_with_ids(xs, live)
            del xs
            gpu = to_gpu(fresh) if on_gpu else None
            with self._lock.write():
                n1 = self._n_labels
                new = n0 + np.flatnonzero(self._alive[n0:n1])
                if new.size:
                    xs = self._reconstruct(new)
                    fresh.add_with_ids(xs, new)
                    if gpu is not None:
                        gpu.add_with_ids(xs, new)
                gone = live[~self._alive[live]]
                purged = self._garbage
                self._cpu, self._gpu = fresh, gpu
                self._physical = fx.can_remove(fresh) and gpu is None
                self._in_index[:n1] = False
                self._in_index[live] = True
                self._in_index[new] = True
                self._garbage = 0
                if gone.size:
                    self._purge(gone)
                self._refresh_selector()
                return purged - self._garbage

    # ------------------------------------------------------------------ search

    def search(self, query: ArrayLike, top_k: int, *, min_score: float | None = None) -> list[Hit]:
        """Best ``top_k`` subjects for one template, best first; ``min_score`` cuts no-matches."""
        q = np.asarray(query)
        if q.ndim != 1:
            raise ValueError("search takes one vector; use search_batch for several")
        return self.search_batch(q[None, :], top_k, min_score=min_score)[0]

    def search_batch(
        self, queries: ArrayLike, top_k: int, *, min_score: float | None = None
    ) -> list[list[Hit]]:
        """One FAISS call for all queries; only queries short of subjects are searched again.

        A subject with many samples fills many result slots, so k starts at top_k * overfetch
        (plus the garbage count where removed templates cannot be filtered inside FAISS) and
        grows until top_k distinct subjects are found or the index is exhausted.
        """
        q = normalize(queries, self.d)
        if top_k < 1:
            raise ValueError("top_k must be >= 1")
        out: list[list[Hit]] = [[] for _ in range(len(q))]
        with self._lock.read():
            need = min(int(top_k), self._n_subjects)
            ntotal = self._cpu.ntotal
            if need == 0 or ntotal == 0:
                return out
            k = need * self.overfetch
            if self._gpu is not None:
                k = min(k + self._garbage, GPU_MAX_K)
            k = min(max(k, need), ntotal)
            pending = np.arange(len(q))
            while pending.size:
                D, I = self._raw_search(q[pending], k)
                short = []
                for row, qi in enumerate(pending.tolist()):
                    hits, complete = self._collect(D[row], I[row], k, need, min_score)
                    if complete or k >= ntotal:
                        out[qi] = hits
                    else:
                        short.append(qi)
                pending = np.asarray(short, np.int64)
                grown = k * GROWTH
                if self._gpu is not None and k < GPU_MAX_K < grown:
                    grown = GPU_MAX_K  # use the GPU's last page before leaving it
                k = min(ntotal, grown)
        return out

    def _raw_search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """GPU while k fits its limit; deeper pages come from the CPU mirror, which can also
        filter removed labels inside FAISS (the GPU ignores id selectors)."""
        if self._gpu is not None and k <= GPU_MAX_K:
            return self._gpu.search(q, k)
        params = fx.search_params(self._cpu, k, self.ef_search, self._sel)
        return self._cpu.search(q, k, params=params)

    def _collect(
        self, D: np.ndarray, I: np.ndarray, k: int, need: int, min_score: float | None
    ) -> tuple[list[Hit], bool]:
        found = I >= 0
        labels, scores = I[found], D[found]
        alive = self._alive[labels]  # the only guard that holds on every index type
        labels, scores = labels[alive], scores[alive]
        floor = False
        if min_score is not None:
            ok = scores >= min_score
            floor = not ok.all()  # results are sorted: everything above the floor is here
            labels, scores = labels[ok], scores[ok]
        codes = self._subject[labels]
        _, first = np.unique(codes, return_index=True)
        first = np.sort(first)[:need]
        hits = [
            Hit(self._keys[codes[i]], float(scores[i]), int(self._sample[labels[i]]))
            for i in first.tolist()
        ]
        return hits, len(hits) >= need or floor or int(found.sum()) < k

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike) -> Path:
        """Snapshot into directory ``path``: a new index file, then an atomic swap of the
        metadata naming it, so a crash mid-save leaves the previous snapshot loadable.

        On HNSW/GPU removed templates are still in the file but zeroed; ``compact()`` first
        to leave no trace of them at all.
        """
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        with self._save_lock:
            with self._lock.read():
                name = f"index-{uuid.uuid4().hex}.faiss"
                faiss.write_index(self._cpu, str(root / name))
                _fsync(root / name)
                n = self._n_labels
                tomb = np.array(sorted(self._tombstones.items()), np.int64).reshape(-1, 2)
                meta = {
                    "version": FORMAT_VERSION,
                    "d": self.d,
                    "factory": self.factory,
                    "overfetch": self.overfetch,
                    "ef_search": self.ef_search,
                    "seq": self.seq,
                    "index_file": name,
                    "keys": self._keys,
                }
                tmp = root / f".{META_FILE}.{uuid.uuid4().hex}.tmp"
                with open(tmp, "wb") as f:
                    np.savez(
                        f,
                        meta=np.array(json.dumps(meta)),
                        sample=self._sample[:n],
                        subject=self._subject[:n],
                        alive=self._alive[:n],
                        in_index=self._in_index[:n],
                        tombstones=tomb,
                    )
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, root / META_FILE)
                _fsync(root)
            for old in root.glob("index-*.faiss"):
                if old.name != name:
                    old.unlink(missing_ok=True)
        return root

    @classmethod
    def load(cls, path: str | os.PathLike, *, force_cpu: bool = False) -> GalleryIndex:
        """Open a snapshot; then ``replay`` the changes made after ``.seq``."""
        root = Path(path)
        with np.load(root / META_FILE, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            arrays = {k: z[k] for k in ("sample", "subject", "alive", "in_index", "tombstones")}
        if meta["version"] != FORMAT_VERSION:
            raise ValueError(f"unsupported snapshot version {meta['version']}")
        cpu = faiss.read_index(str(root / meta["index_file"]))
        if cpu.d != meta["d"] or cpu.ntotal != int(arrays["in_index"].sum()):
            raise ValueError(f"index file in {root} does not match its metadata")
        self = cls.__new__(cls)
        self._setup(
            meta["d"], meta["factory"], cpu, force_cpu, meta["overfetch"], meta["ef_search"]
        )
        self.seq = int(meta["seq"])
        n = len(arrays["sample"])
        self._grow(n)
        self._n_labels = n
        self._sample[:n] = arrays["sample"]
        self._subject[:n] = arrays["subject"]
        self._alive[:n] = arrays["alive"]
        self._in_index[:n] = arrays["in_index"]
        self._keys = [_as_key(k) for k in meta["keys"]]
        self._code_of = {k: i for i, k in enumerate(self._keys)}
        live = np.flatnonzero(self._alive[:n])
        self._label_of = dict(zip(self._sample[live].tolist(), live.tolist(), strict=True))
        self._live_count = np.bincount(self._subject[live], minlength=len(self._keys))
        self._recount()
        self._garbage = int((~self._alive[:n] & self._in_index[:n]).sum())
        self._refresh_selector()
        self._tombstones = {int(s): int(q) for s, q in arrays["tombstones"]}
        return self

    # ------------------------------------------------------------------ internals

    def _bump(self, seq: int | None) -> None:
        if seq is not None:
            self.seq = max(self.seq, int(seq))

    def _remember(self, sample_ids: np.ndarray, seq: int | None) -> None:
        if seq is None:
            return
        for s in sample_ids.tolist():
            self._tombstones[s] = max(self._tombstones.get(s, seq), seq)

    def _code(self, key: SubjectKey) -> int:
        code = self._code_of.get(key)
        if code is None:
            code = self._code_of[key] = len(self._keys)
            self._keys.append(key)
            if code >= len(self._live_count):
                self._live_count = np.concatenate(
                    [self._live_count, np.zeros(max(16, code + 1), np.int64)]
                )
        return code

    def _recount(self) -> None:
        self._n_subjects = int(np.count_nonzero(self._live_count))

    def _grow(self, n: int) -> None:
        cap = len(self._sample)
        if n <= cap:
            return
        cap = max(n, 2 * cap, 64)
        for name, fill in (("_sample", -1), ("_subject", -1), ("_alive", False)):
            old = getattr(self, name)
            new = np.full(cap, fill, old.dtype)
            new[: len(old)] = old
            setattr(self, name, new)
        in_index = np.zeros(cap, bool)
        in_index[: len(self._in_index)] = self._in_index
        self._in_index = in_index

    def _drop(self, labels: np.ndarray) -> None:
        """Writer lock held. After this the alive mask hides the labels from every search."""
        self._alive[labels] = False
        for s in self._sample[labels].tolist():
            self._label_of.pop(s, None)
        np.subtract.at(self._live_count, self._subject[labels], 1)
        self._recount()
        self._purge(labels)
        self._refresh_selector()

    def _purge(self, labels: np.ndarray) -> None:
        """Take dead labels out of FAISS where the type allows, else zero them and count them."""
        if self._physical:
            self._cpu.remove_ids(labels)
            self._in_index[labels] = False
        else:
            self._scrub(labels)
            self._garbage += len(labels)

    def _scrub(self, labels: np.ndarray) -> None:
        """Overwrite removed templates with zeros in the CPU copy so erasure is immediate.

        An HNSW node must stay as a waypoint of the graph; with a zero vector it still routes
        searches but scores 0 against everything (and the alive mask hides it anyway).
        """
        store = fx.flat_storage(self._cpu)
        if store is None or not isinstance(self._cpu, faiss.IndexIDMap):
            return
        id_map = faiss.vector_to_array(self._cpu.id_map)
        if (id_map[1:] > id_map[:-1]).all():  # always, as labels only grow; O(n) to check
            pos = np.searchsorted(id_map, labels)
        else:
            order = np.argsort(id_map, kind="stable")
            pos = order[np.searchsorted(id_map, labels, sorter=order)]
        pos = np.minimum(pos, len(id_map) - 1)
        if not (id_map[pos] == labels).all():
            raise RuntimeError("label not found in index while scrubbing")
        xb = faiss.rev_swig_ptr(store.get_xb(), store.ntotal * store.d)
        xb.reshape(store.ntotal, store.d)[pos] = 0.0

    def _refresh_selector(self) -> None:
        """Exclude dead labels inside the CPU search, so HNSW spends no result slots on them."""
        n = self._n_labels
        dead = np.flatnonzero(~self._alive[:n] & self._in_index[:n]).astype(np.int64)
        if dead.size == 0:
            self._sel, self._sel_parts = None, ()
            return
        batch = faiss.IDSelectorBatch(dead)
        self._sel = faiss.IDSelectorNot(batch)
        self._sel_parts = (batch, dead)  # the C++ selectors hold raw pointers

    def _reconstruct(self, labels: np.ndarray) -> np.ndarray:
        if labels.size == 0:
            return np.empty((0, self.d), np.float32)
        return self._cpu.reconstruct_batch(labels.astype(np.int64))

    def _fresh_index(self) -> faiss.Index:
        fresh = fx.make_index(self.d, self.factory)
        if not fresh.is_trained:  # keep the learned quantizer of a trained type
            fresh = faiss.clone_index(self._cpu)
            fresh.reset()
        return fresh


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
