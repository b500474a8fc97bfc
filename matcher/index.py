"""One search index per gallery: ranked subjects, safe deletion, GPU placement, persistence.

FAISS only knows int64 labels. The gallery gives every added template a fresh label (a
counter) and keeps label -> sample id / subject / alive in numpy arrays, because:

* index types without ``remove_ids`` (HNSW, every GPU index) keep removed templates until a
  rebuild; with fresh labels a sample id removed and later re-added is never confused with
  its own stale copy, and the alive mask filters stale copies out of every result;
* labels only grow, so FAISS's internal order equals label order and a removed template can
  be found and overwritten in place (``_scrub``) - erasure does not wait for a rebuild;
* mapping a result row to a subject is one numpy gather.

Index types (``factory.choose`` picks one by gallery size): exact ``IDMap2,Flat``; graph
``IDMap2,HNSW32,Flat``; ``IVF..,Flat``; and compressed codes with exact re-scoring
(``HNSW32,SQ8,RFlat``, ``IVF..,PQ..,RFlat``), where the gallery keeps the float32 templates
by label beside FAISS and re-ranks a shortlist of ``rescore * k`` candidates with them. Every
type keeps the same guarantees: a removed sample is never returned (the alive mask, plus an
id filter inside CPU searches), its template is erased from the CPU copy at once (removed
where FAISS can, overwritten with zeros where it cannot), and save / load / replay restore
exactly the searched state. ``rebuild`` moves a gallery to another type as it grows.

Searches run concurrently under a readers/writer lock; adds, removals and the swap at the end
of ``compact`` / ``rebuild`` take the writer side.
"""

from __future__ import annotations

import contextlib
import io
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

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
META_FILE = "meta.npz"
_ARRAYS = ("sample", "subject", "alive", "in_index", "tombstones")
# How much faster k grows when a query did not find enough distinct subjects.
GROWTH = 4
_EF_LADDER = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
_EXACT_CHUNK = 65_536
#: Searches of fewer queries than this run with ``set_search_threads`` OpenMP threads.
SMALL_BATCH = 16
_search_threads = 0


def _probe_ladder(nlist: int) -> list[int]:
    out, p = [], 1
    while p < nlist:
        out.append(p)
        p *= 2
    return [*out, nlist]


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


def check_batch(x, sample_ids, subjects, d: int, key=None) -> tuple[np.ndarray, np.ndarray, list]:
    """Normalised vectors, int64 ids and one subject key per id for an add; refuses
    mismatched lengths and duplicate ids.  ``key`` encodes a subject (backend-specific)."""
    key = key or _as_key
    xs = normalize(x, d)
    ids = _as_ids(sample_ids)
    if isinstance(subjects, int | str | np.integer):
        keys = [key(subjects)] * len(ids)
    else:
        keys = [key(k) for k in subjects]
    if not len(xs) == len(ids) == len(keys):
        raise ValueError("x, sample_ids and subjects differ in length")
    if len(np.unique(ids)) != len(ids):
        raise ValueError("duplicate sample ids in one add")
    return xs, ids, keys


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
        ef_search: int | None = None,
        nprobe: int | None = None,
        rescore: int | None = None,
    ) -> None:
        """``factory`` None: the type ``factory.choose`` picks for ``expected_size``.

        ``ef_search`` (HNSW), ``nprobe`` (IVF) and ``rescore`` (``,RFlat`` types: shortlist
        factor) default to the plan's values for that type.
        """
        if d < 1 or overfetch < 1:
            raise ValueError("d and overfetch must be positive")
        plan = fx.choose(expected_size, d, gpu=use_gpu(force_cpu)) if not factory else None
        factory = factory or plan.factory
        base, refine = fx.split_refine(factory)
        cpu = fx.make_index(d, base)
        ef, probe, factor = _defaults(cpu, refine, plan, ef_search, nprobe, rescore)
        self._setup(d, factory, cpu, force_cpu, overfetch, ef, probe, factor)
        self.planned = plan is not None

    def _setup(
        self,
        d: int,
        factory: str,
        cpu: faiss.Index,
        force_cpu: bool,
        overfetch: int,
        ef_search: int,
        nprobe: int,
        rescore: int,
    ) -> None:
        refine = fx.split_refine(factory)[1]
        if not refine and not fx.exact_codes(cpu):
            raise ValueError(
                f"factory {factory!r} stores lossy codes: add ',RFlat' so results are re-scored "
                "and rebuilt from the exact templates"
            )
        if ef_search < 1 or nprobe < 1 or rescore < 1:
            raise ValueError("ef_search, nprobe and rescore must be positive")
        self.d = int(d)
        self.factory = factory
        self.force_cpu = force_cpu
        self.overfetch = int(overfetch)
        self.ef_search = int(ef_search)
        self.rescore = int(rescore)
        self.seq = -1  # last change sequence number included; -1 = none
        self.planned = False  # type chosen by factory.choose (so ``outgrown`` applies)
        self._lock = RWLock()
        self._compact_lock = threading.Lock()
        self._save_lock = threading.Lock()
        self._cpu = cpu
        self._base = fx.inner(cpu)  # the working index, downcast once (per-query cost)
        _set_nprobe(cpu, nprobe)
        self._place()
        self._n_labels = 0
        self._sample = np.empty(0, np.int64)
        self._subject = np.empty(0, np.int64)
        self._alive = np.empty(0, bool)
        self._in_index = np.empty(0, bool)
        # Exact templates by label, for ``,RFlat`` types (re-scoring, compaction, rebuild).
        self._exact: np.ndarray | None = np.empty((0, self.d), np.float32) if refine else None
        self._label_of: dict[int, int] = {}
        self._keys: list[SubjectKey] = []
        self._code_of: dict[SubjectKey, int] = {}
        self._live_count = np.empty(0, np.int64)
        self._n_subjects = 0
        self._garbage = 0
        self._sel: faiss.IDSelector | None = None
        self._sel_parts: tuple = ()
        self._tombstones: dict[int, int] = {}

    @property
    def approximate(self) -> bool:
        """HNSW or IVF: recall depends on efSearch / nprobe, which ``calibrate`` tunes."""
        return isinstance(fx.inner(self._cpu), faiss.IndexHNSW | faiss.IndexIVF)

    @property
    def nprobe(self) -> int:
        """IVF lists scanned per query (1 for other types); stored inside the FAISS index."""
        ivf = faiss.try_extract_index_ivf(self._cpu)
        return 1 if ivf is None else int(ivf.nprobe)

    def set_search_params(
        self, *, ef_search: int | None = None, nprobe: int | None = None, rescore: int | None = None
    ) -> None:
        """Change the speed/recall trade-off of a live index (no rebuild)."""
        for v in (ef_search, nprobe, rescore):
            if v is not None and v < 1:
                raise ValueError("search parameters must be positive")
        with self._lock.write():
            if ef_search is not None:
                self.ef_search = int(ef_search)
            if rescore is not None:
                self.rescore = int(rescore)
            if nprobe is not None and nprobe != self.nprobe:
                _set_nprobe(self._cpu, nprobe)
                if self._gpu is not None:
                    self._set_gpu_nprobe(self.nprobe)

    def _set_gpu_nprobe(self, nprobe: int) -> None:
        """The GPU clone took nprobe at copy time: set it there, else copy again."""
        space = getattr(faiss, "GpuParameterSpace", None)
        try:
            space().set_index_parameter(self._gpu, "nprobe", nprobe)
        except Exception:  # noqa: BLE001 - no GPU parameter space (or a stand-in index)
            self._place()
            # A fresh copy holds only what the CPU copy holds: removed IVF entries are gone.
            n = self._n_labels
            self._garbage = int((~self._alive[:n] & self._in_index[:n]).sum())

    # ------------------------------------------------------------------ placement

    def _place(self) -> None:
        """GPU when available and the type allows it; the CPU index stays as the mirror that
        serves save, compaction and searches deeper than the GPU's k limit."""
        self._gpu = None
        if self._cpu.is_trained and fx.gpu_capable(self._cpu) and use_gpu(self.force_cpu):
            self._gpu = to_gpu(self._cpu)
        # On GPU nothing is removed from the searched copy: the flat mirror keeps label order
        # for _scrub (IndexFlat.remove_ids costs a copy of the whole table per call anyway).
        self._physical = fx.can_remove(self._cpu) and self._gpu is None

    @property
    def on_gpu(self) -> bool:
        return self._gpu is not None

    @property
    def removes_in_place(self) -> bool:
        """False for HNSW and GPU: removals are filtered until ``compact``."""
        return self._physical

    @property
    def outgrown(self) -> bool:
        """True when ``factory.choose`` picks another type for the live size, even with 25%
        slack either way (no flapping at a boundary): time to ``rebuild()`` (and
        ``calibrate()``), in the background. Only for types chosen by the plan."""
        if not self.planned:
            return False
        n, gpu = len(self), self.on_gpu or use_gpu(self.force_cpu)
        return all(
            fx.choose(int(m), self.d, gpu=gpu).factory != self.factory for m in (n / 1.25, n * 1.25)
        )

    def _searched_ntotal(self) -> int:
        """Entries in the index a search goes to first (the GPU copy keeps removed ones)."""
        n = self._cpu.ntotal
        return n if self._gpu is None else max(n, self._gpu.ntotal)

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
        return self._garbage / max(1, self._searched_ntotal())

    def sample_ids(self) -> np.ndarray:
        """Live sample ids, sorted, e.g. to prove an erasure or diff against the database."""
        with self._lock.read():
            return np.sort(np.fromiter(self._label_of, np.int64, len(self._label_of)))

    # ------------------------------------------------------------------ writes

    def train(self, x: ArrayLike) -> None:
        """Only for types that learn from data (IVF, SQ, PQ); a no-op for Flat and HNSW."""
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
        xs, ids, keys = check_batch(x, sample_ids, subjects, self.d, _as_key)
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
                if self._exact is not None:
                    self._exact[labels] = xs
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
        is two copies of the index. Trained types keep their quantizer (no retraining).
        """
        with self._compact_lock:
            with self._lock.read():
                if self._garbage == 0:
                    return 0
                fresh = self._fresh_index()
            return self._rebuild_into(fresh, self.factory, self.ef_search, self.rescore)

    def rebuild(
        self,
        factory: str | None = None,
        *,
        ef_search: int | None = None,
        nprobe: int | None = None,
        rescore: int | None = None,
        max_train: int = 200_000,
    ) -> str:
        """Move the gallery into another index type, e.g. from Flat to HNSW as it grows.

        ``factory`` None: what ``factory.choose`` picks for the live size. Trained types are
        trained on (up to ``max_train`` of) the live templates. Like ``compact``, searches
        and writes go on meanwhile, removed templates are purged, and labels, sample ids,
        tombstones and ``seq`` carry over. Returns the new factory string.
        """
        with self._compact_lock:
            with self._lock.read():
                n_live = len(self._label_of)
            plan = None
            if not factory:
                plan = fx.choose(n_live, self.d, gpu=use_gpu(self.force_cpu))
            planned = plan is not None
            factory = factory or plan.factory
            base, refine = fx.split_refine(factory)
            fresh = fx.make_index(self.d, base)
            ef, probe, factor = _defaults(fresh, refine, plan, ef_search, nprobe, rescore)
            if not refine and not fx.exact_codes(fresh):
                raise ValueError(f"factory {factory!r} stores lossy codes: add ',RFlat'")
            if not fresh.is_trained:
                with self._lock.read():
                    live = np.flatnonzero(self._alive[: self._n_labels])
                    if live.size > max_train:
                        rng = np.random.default_rng(0)
                        live = np.sort(rng.choice(live, max_train, replace=False))
                    sample = self._reconstruct(live)
                _train(fresh, sample)
                del sample
            _set_nprobe(fresh, probe)
            self._rebuild_into(fresh, factory, ef, factor)
            self.planned = planned
            return factory

    def _rebuild_into(self, fresh: faiss.Index, factory: str, ef: int, rescore: int) -> int:
        """Fill ``fresh`` (empty, trained) with the live templates, catch up, swap it in.

        Caller holds ``_compact_lock``. Returns the number of removed templates purged.
        """
        with self._lock.read():
            n0 = self._n_labels
            live = np.flatnonzero(self._alive[:n0])
            xs = self._reconstruct(live)
        if live.size:
            fresh.add_with_ids(xs, live)
        gpu = None
        if fx.gpu_capable(fresh) and use_gpu(self.force_cpu):
            gpu = to_gpu(fresh)
        refine = fx.split_refine(factory)[1]
        with self._lock.write():
            n1 = self._n_labels
            new = n0 + np.flatnonzero(self._alive[n0:n1])
            xs_new = self._reconstruct(new)
            if new.size:
                fresh.add_with_ids(xs_new, new)
                if gpu is not None:
                    gpu.add_with_ids(xs_new, new)
            exact = None
            if refine:
                exact = np.zeros((len(self._sample), self.d), np.float32)
                exact[live] = xs
                exact[new] = xs_new
            gone = live[~self._alive[live]]
            purged = self._garbage
            self.factory, self.ef_search, self.rescore = factory, int(ef), int(rescore)
            self._cpu, self._gpu, self._exact = fresh, gpu, exact
            self._base = fx.inner(fresh)
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
            ntotal = self._searched_ntotal()
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

    def search_samples(
        self, queries: ArrayLike, k: int, *, min_score: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best live samples per query (not grouped by subject): (sample ids,
        scores), each (m, k), best first, padded with -1 / -inf. The index-level search the
        benchmarks compare with other engines; also a duplicate check before enrolment."""
        q = normalize(queries, self.d)
        if k < 1:
            raise ValueError("k must be >= 1")
        m = len(q)
        ids = np.full((m, k), -1, np.int64)
        scores = np.full((m, k), -np.inf, np.float32)
        with self._lock.read():
            ntotal = self._searched_ntotal()
            if ntotal == 0 or not self._label_of:
                return ids, scores
            kk = k + (self._garbage if self._gpu is not None else 0)
            kk = min(kk, GPU_MAX_K) if self._gpu is not None and k <= GPU_MAX_K else kk
            kk = min(max(kk, k), ntotal)
            pending = np.arange(m)
            while pending.size:
                D, I = self._raw_search(q[pending], kk)
                short = []
                for row, qi in enumerate(pending.tolist()):
                    found = I[row] >= 0
                    lab, sc = I[row][found], D[row][found]
                    keep = self._alive[lab]
                    floor = False
                    if min_score is not None:
                        above = sc >= min_score
                        floor = not above.all()  # sorted: all above the floor are here
                        keep &= above
                    lab, sc = lab[keep][:k], sc[keep][:k]
                    exhausted = found.sum() < kk or kk >= ntotal
                    if len(lab) < k and not (floor or exhausted):
                        short.append(qi)
                        continue
                    ids[qi, : len(lab)] = self._sample[lab]
                    scores[qi, : len(lab)] = sc
                pending = np.asarray(short, np.int64)
                kk = min(ntotal, kk * GROWTH)
        return ids, scores

    def _raw_search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k labels by the index; with ``,RFlat`` a ``rescore * k`` shortlist re-ranked
        by exact inner products with the stored templates."""
        if self._exact is None:
            return self._index_search(q, k)
        kk = k * self.rescore
        if self._gpu is not None and k <= GPU_MAX_K:
            kk = min(kk, GPU_MAX_K)  # one GPU page; the shortlist must not leave the GPU
        kk = max(k, min(kk, self._searched_ntotal()))
        _, I = self._index_search(q, kk)
        valid = I >= 0
        vecs = self._exact[np.where(valid, I, 0)]  # (m, kk, d)
        S = np.einsum("mkd,md->mk", vecs, q)
        S[~valid] = -np.inf
        order = np.argsort(-S, axis=1, kind="stable")[:, :k]
        D = np.take_along_axis(S, order, 1)
        I = np.where(np.isfinite(D), np.take_along_axis(I, order, 1), -1)
        return D.astype(np.float32), I

    def _index_search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """GPU while k fits its limit; deeper pages come from the CPU mirror, which can also
        filter removed labels inside FAISS (the GPU ignores id selectors)."""
        if self._gpu is not None and k <= GPU_MAX_K:
            return self._gpu.search(q, k)
        params = fx.search_params(self._cpu, k, self.ef_search, self._sel, base=self._base)
        with _omp_threads(_search_threads if len(q) < SMALL_BATCH else 0):
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

    # ------------------------------------------------------------------ tuning

    def calibrate(
        self,
        target_recall: float = 0.995,
        *,
        k: int = 10,
        probes: ArrayLike | None = None,
        n_probes: int = 200,
        safety: float = 4 / 3,
        seed: int = 0,
    ) -> dict:
        """Set the smallest efSearch (HNSW) or nprobe (IVF) whose recall@k reaches a target.

        Recall depends on how the gallery's templates are spread far more than on the index,
        so it is measured on this gallery: ``probes`` (e.g. real probe templates) or, by
        default, ``n_probes`` of its own templates, each excluding itself from both result
        lists. That is optimistic (a stored template sits on a graph node, a probe does not):
        on protected LFW templates, efSearch 48 gave recall 0.9955 on stored templates but
        0.992 on real probes at 20k, and at 1M 384 gave 0.995 on stored templates, 0.9939 on
        real probes. So without ``probes`` the setting found is multiplied by ``safety`` and
        rounded up to the ladder: 4/3 is one rung (1M: 384 -> 512, 0.9966 on real probes,
        p50 3.6 ms; a factor 2 gave 768, 0.9983, 5.0 ms). Exact results come from a chunked
        brute-force pass; searches and writes go on meanwhile. Returns the parameter, the
        value set, the value that reached the target (``measured_at``), its recall and the
        curve. Exact types return ``{"param": None, "recall": 1.0}``.
        """
        base = fx.inner(self._cpu)
        if isinstance(base, faiss.IndexHNSW):
            param, ladder = "ef_search", [e for e in _EF_LADDER if e >= k] or [k]
        elif isinstance(base, faiss.IndexIVF):
            param, ladder = "nprobe", _probe_ladder(base.nlist)
        else:
            return {"param": None, "recall": 1.0}
        rng = np.random.default_rng(seed)
        with self._lock.read():
            live = np.flatnonzero(self._alive[: self._n_labels])
            if live.size <= k:
                return {"param": param, "value": getattr(self, param), "recall": None}
            if probes is None:
                qlab = np.sort(rng.choice(live, min(n_probes, live.size), replace=False))
                Q = self._reconstruct(qlab)
                own = self._sample[qlab]
            else:
                Q, own = normalize(probes, self.d), np.full(len(probes), -1, np.int64)
        truth = self._exact_samples(Q, live, k + 1)
        truth = [[s for s in row if s != o][:k] for row, o in zip(truth, own, strict=True)]
        curve: dict[int, float] = {}
        for value in ladder:
            self.set_search_params(**{param: value})
            got, _ = self.search_samples(Q, k + 1)
            rec = [
                len(set([s for s in row if s != o][:k]) & set(t)) / max(1, len(t))
                for row, o, t in zip(got.tolist(), own, truth, strict=True)
            ]
            curve[value] = float(np.mean(rec))
            if curve[value] >= target_recall:
                break
        found = value
        if probes is None and safety > 1:
            value = next((v for v in ladder if v >= found * safety), ladder[-1])
            self.set_search_params(**{param: value})
        return {
            "param": param,
            "value": value,
            "measured_at": found,
            "recall": curve[found],
            "curve": curve,
        }

    def _exact_samples(self, Q: np.ndarray, live: np.ndarray, k: int) -> list[list[int]]:
        """Exact top-k live sample ids per query, in chunks (a short read lock per chunk)."""
        best_s = np.full((len(Q), 0), -np.inf, np.float32)
        best_l = np.empty((len(Q), 0), np.int64)
        for start in range(0, len(live), _EXACT_CHUNK):
            labels = live[start : start + _EXACT_CHUNK]
            with self._lock.read():
                labels = labels[self._alive[labels]]
                V = self._reconstruct(labels)
            S = np.concatenate([best_s, Q @ V.T], 1)
            L = np.concatenate([best_l, np.broadcast_to(labels, (len(Q), len(labels)))], 1)
            top = np.argsort(-S, axis=1, kind="stable")[:, :k]
            best_s, best_l = np.take_along_axis(S, top, 1), np.take_along_axis(L, top, 1)
        with self._lock.read():
            return self._sample[best_l].tolist()

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
                stamp = uuid.uuid4().hex
                name = f"index-{stamp}.faiss"
                faiss.write_index(self._cpu, str(root / name))
                _fsync(root / name)
                exact_name = None
                if self._exact is not None:
                    exact_name = f"exact-{stamp}.npy"
                    with open(root / exact_name, "wb") as f:
                        np.save(f, self._exact[: self._n_labels])
                        f.flush()
                        os.fsync(f.fileno())
                meta = {**self._meta(), "index_file": name, "exact_file": exact_name}
                tmp = root / f".{META_FILE}.{uuid.uuid4().hex}.tmp"
                with open(tmp, "wb") as f:
                    np.savez(f, meta=np.array(json.dumps(meta)), **self._arrays())
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, root / META_FILE)
                _fsync(root)
            for old in [*root.glob("index-*.faiss"), *root.glob("exact-*.npy")]:
                if old.name not in (name, exact_name):
                    old.unlink(missing_ok=True)
        return root

    @classmethod
    def load(cls, path: str | os.PathLike, *, force_cpu: bool = False) -> GalleryIndex:
        """Open a snapshot; then ``replay`` the changes made after ``.seq``."""
        root = Path(path)
        with np.load(root / META_FILE, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            arrays = {k: z[k] for k in _ARRAYS}
        _check_version(meta)
        cpu = faiss.read_index(str(root / meta["index_file"]))
        exact = None
        if meta.get("exact_file"):
            exact = np.load(root / meta["exact_file"], allow_pickle=False)
        return cls._restore(meta, arrays, cpu, exact, force_cpu, str(root))

    def dumps(self) -> bytes:
        """The same snapshot as :meth:`save`, as one in-memory buffer.

        For callers that must not let templates touch the disk in clear (the service
        encrypts this buffer before writing it). Searches go on while it is taken.
        """
        with self._lock.read():
            parts = {
                "meta": np.array(json.dumps(self._meta())),
                "index": faiss.serialize_index(self._cpu),
                **self._arrays(),
            }
            if self._exact is not None:
                parts["exact"] = self._exact[: self._n_labels]
            buf = io.BytesIO()
            np.savez(buf, **parts)
        return buf.getvalue()

    @classmethod
    def loads(cls, data: bytes, *, force_cpu: bool = False) -> GalleryIndex:
        """Open a buffer made by :meth:`dumps`; then ``replay`` what changed after ``.seq``."""
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            arrays = {k: z[k] for k in _ARRAYS}
            cpu = faiss.deserialize_index(z["index"])
            exact = z["exact"] if "exact" in z.files else None
        _check_version(meta)
        return cls._restore(meta, arrays, cpu, exact, force_cpu, "snapshot buffer")

    def _meta(self) -> dict:
        return {
            "version": FORMAT_VERSION,
            "d": self.d,
            "factory": self.factory,
            "overfetch": self.overfetch,
            "ef_search": self.ef_search,
            "nprobe": self.nprobe,
            "rescore": self.rescore,
            "planned": self.planned,
            "seq": self.seq,
            "keys": self._keys,
        }

    def _arrays(self) -> dict[str, np.ndarray]:
        n = self._n_labels
        tomb = np.array(sorted(self._tombstones.items()), np.int64).reshape(-1, 2)
        return {
            "sample": self._sample[:n],
            "subject": self._subject[:n],
            "alive": self._alive[:n],
            "in_index": self._in_index[:n],
            "tombstones": tomb,
        }

    @classmethod
    def _restore(
        cls,
        meta: dict,
        arrays: dict[str, np.ndarray],
        cpu: faiss.Index,
        exact: np.ndarray | None,
        force_cpu: bool,
        where: str,
    ) -> GalleryIndex:
        n = len(arrays["sample"])
        if (
            cpu.d != meta["d"]
            or cpu.ntotal != int(arrays["in_index"].sum())
            or (exact is not None and exact.shape != (n, meta["d"]))
        ):
            raise ValueError(f"index file in {where} does not match its metadata")
        self = cls.__new__(cls)
        self._setup(
            meta["d"],
            meta["factory"],
            cpu,
            force_cpu,
            meta["overfetch"],
            meta["ef_search"],
            int(meta.get("nprobe", _nprobe_of(cpu))),
            int(meta.get("rescore", 1)),
        )
        self.seq = int(meta["seq"])
        self.planned = bool(meta.get("planned", False))
        self._grow(n)
        if self._exact is not None and exact is not None:
            self._exact[:n] = exact
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
        if self._exact is not None:
            exact = np.zeros((cap, self.d), np.float32)
            exact[: len(self._exact)] = self._exact
            self._exact = exact

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
        """Erase dead labels from the CPU copy now: removed where the type allows, else their
        codes overwritten with zeros. What the searched index still holds is garbage."""
        if self._exact is not None:
            self._exact[labels] = 0.0
        if fx.can_remove(self._cpu) and (self._gpu is None or fx.code_storage(self._cpu) is None):
            # Physical removal; on GPU only for IVF, whose CPU lists need no label order.
            self._cpu.remove_ids(labels)
            self._in_index[labels] = False
        else:
            self._scrub(labels)
        if not self._physical:
            self._garbage += len(labels)

    def _scrub(self, labels: np.ndarray) -> None:
        """Overwrite removed templates' codes with zeros in the CPU copy: erasure is immediate.

        An HNSW node must stay as a waypoint of the graph; with zeroed codes it still routes
        searches (a zero float vector scores 0 against everything) and the alive mask hides it.
        """
        store = fx.code_storage(self._cpu)
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
        size = store.code_size
        codes = faiss.rev_swig_ptr(store.codes.data(), store.ntotal * size)
        codes.reshape(store.ntotal, size)[pos] = 0

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
        """Exact templates of live labels (the stored copy for ``,RFlat`` types)."""
        if labels.size == 0:
            return np.empty((0, self.d), np.float32)
        if self._exact is not None:
            return self._exact[labels]
        return self._cpu.reconstruct_batch(labels.astype(np.int64))

    def _fresh_index(self) -> faiss.Index:
        fresh = fx.make_index(self.d, fx.split_refine(self.factory)[0])
        if not fresh.is_trained:  # keep the learned quantizer of a trained type
            fresh = faiss.clone_index(self._cpu)
            fresh.reset()
        _set_nprobe(fresh, self.nprobe)
        return fresh


def _nprobe_of(index: faiss.Index) -> int:
    ivf = faiss.try_extract_index_ivf(index)
    return 1 if ivf is None else int(ivf.nprobe)


def _set_nprobe(index: faiss.Index, nprobe: int) -> None:
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = int(min(nprobe, ivf.nlist))


def _defaults(
    index: faiss.Index,
    refine: bool,
    plan: fx.IndexPlan | None,
    ef_search: int | None,
    nprobe: int | None,
    rescore: int | None,
) -> tuple[int, int, int]:
    """(ef_search, nprobe, rescore): explicit values, else the plan's, else per-type ones."""
    ivf = faiss.try_extract_index_ivf(index)
    if ef_search is None:
        ef_search = plan.ef_search if plan else fx.IndexPlan("").ef_search
    if nprobe is None:
        if plan is not None and ivf is not None:
            nprobe = plan.nprobe
        else:
            nprobe = 1 if ivf is None else fx.ivf_nprobe(ivf.nlist)
    if rescore is None:
        rescore = fx.DEFAULT_RESCORE if refine else 1
    return int(ef_search), int(nprobe), int(rescore)


def _train(index: faiss.Index, x: np.ndarray) -> None:
    """Train a fresh index; FAISS wants ~40 points per centroid but copes with fewer."""
    ivf = faiss.try_extract_index_ivf(index)
    need = ivf.nlist if ivf is not None else 1
    if len(x) < need:
        raise ValueError(f"{len(x)} templates cannot train {need} IVF lists")
    index.train(x)


def set_search_threads(n: int) -> int:
    """FAISS (OpenMP) threads for searches of fewer than ``SMALL_BATCH`` queries; 0 leaves
    OpenMP's default (all cores, or OMP_NUM_THREADS). Returns the setting.

    A service answers many single queries at once: one thread per query is fastest there,
    and parallelism comes from concurrent requests. Measured on 2 busy cores: one 10k flat
    query took 0.25 ms with 1 OpenMP thread and 1.7 ms with 2 (the team spinning against
    other work). OpenMP's thread count belongs to the calling thread, so it is applied
    around each small search in whatever thread runs it (and restored); batch searches,
    index builds and calibration keep the default.
    """
    global _search_threads
    _search_threads = max(0, int(n))
    return _search_threads


@contextlib.contextmanager
def _omp_threads(n: int):
    old = faiss.omp_get_max_threads() if n > 0 else n
    if n <= 0 or old == n:
        yield
        return
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(old)


def _check_version(meta: dict) -> None:
    if meta["version"] not in READABLE_VERSIONS:
        raise ValueError(f"unsupported snapshot version {meta['version']}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
