"""Which FAISS index a gallery gets, and what that index type can and cannot do.

The choice by gallery size (``choose``) comes from measurements on protected LFW templates
plus matched synthetic distractors (``bench/identify.py``, docs/scaling.md):

* **Exact flat search** while the table is small: a single query is one pass over n * d
  floats, memory-bound once the table leaves the CPU cache. Up to ``FLAT_MAX_CELLS`` (8M
  floats, 32 MB: ~47k templates of 170 dimensions) a query stays around 1-2 ms on one core,
  results are exact, and removals are physical.
* **HNSW (M = 32) over float vectors** beyond: no training, scores are exact for every
  candidate it visits, and on face templates it reached recall@10 >= 0.999 at efSearch 128
  where IVF needed to scan an eighth of its lists for 0.97 (templates of many identities do
  not form coarse clusters). efSearch grows with the gallery.
* With a GPU, brute force stays exact and fast far longer (memory bandwidth is ~50x a CPU
  core's), so the GPU keeps ``Flat`` up to ``GPU_FLAT_MAX_CELLS`` and uses IVF-Flat beyond
  (FAISS has no GPU HNSW).

Index types differ in ways the gallery has to design around (product.md, "Known FAISS
limits"): HNSW has no ``remove_ids``; HNSW returns fewer than k results unless efSearch >= k;
IVF keeps ids itself and breaks under an ``IDMap`` wrapper once ids are removed; IVF
fast-scan (``PQ..x4fs``) lists cannot remove at all; compressed codes (``SQ``, ``PQ``) do not
give back the exact template. These helpers answer such questions from the index object, so
the gallery code never guesses from the factory string.

Factory strings may end in ``,RFlat`` (as in FAISS): the gallery then keeps every template as
float32 beside the index and re-scores a shortlist of ``rescore * k`` candidates exactly.
Compressed codes require it, so compaction and type changes never rebuild from lossy codes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import faiss

# Exhaustive search while n * d stays below this many floats (32 MB): about 1-2 ms per
# query on one CPU core (measured 0.06 ns per float in cache, 0.12-0.3 beyond).
FLAT_MAX_CELLS = 8_000_000
# On a GPU, brute force up to 2 GB of float32 templates (~3M templates of 170 dimensions).
GPU_FLAT_MAX_CELLS = 500_000_000
HNSW_M = 32
REFINE_SUFFIX = ",RFlat"
DEFAULT_RESCORE = 4  # shortlist of 4k candidates re-scored exactly


@dataclass(frozen=True)
class IndexPlan:
    """An index type with its search-time parameters."""

    factory: str
    ef_search: int = 64  # HNSW candidate list (raised to k when smaller)
    nprobe: int = 1  # IVF lists scanned per query
    rescore: int = 1  # shortlist factor for ``,RFlat`` types


def hnsw_ef_search(n: int) -> int:
    """efSearch for an HNSW32 gallery of n templates.

    Measured on protected LFW templates + matched distractors, real probes (recall@10):
    20k: 64 -> 0.997, 128 -> 0.9994; 100k: 128 -> 0.9936, 256 -> 0.9983; 1M: 256 -> 0.9890,
    384 -> 0.9939, 512 -> 0.9966 (p50 3.6 ms on one core). A start before ``calibrate``
    measures the gallery itself (the service calibrates every approximate index it builds).
    """
    if n <= 200_000:
        return 128
    if n <= 500_000:
        return 384
    return 512


def ivf_nlist(n: int) -> int:
    """Lists for an IVF index: a power of two near 4 * sqrt(n), at least 16."""
    return 1 << max(4, round(math.log2(4 * math.sqrt(max(n, 1)))))


def ivf_nprobe(nlist: int) -> int:
    """IVF scanned an eighth of its lists for recall@10 0.97 on face templates; a quarter
    for more. GPUs scan lists in parallel, so that fraction costs little there."""
    return max(1, nlist // 4)


def choose(n: int, d: int, *, gpu: bool = False) -> IndexPlan:
    """The index for a gallery of about ``n`` templates of dimension ``d``."""
    if gpu:
        if n * d <= GPU_FLAT_MAX_CELLS:
            return IndexPlan("IDMap2,Flat")
        nlist = ivf_nlist(n)
        return IndexPlan(f"IVF{nlist},Flat", nprobe=ivf_nprobe(nlist))
    if n * d <= FLAT_MAX_CELLS:
        return IndexPlan("IDMap2,Flat")
    return IndexPlan(large_factory(n, d), ef_search=hnsw_ef_search(n))


def choose_factory(n: int, d: int) -> str:
    """Exact search while it is cheap; a graph index beyond, where brute force stops scaling."""
    return choose(n, d).factory


def large_factory(n: int, d: int) -> str:
    """The CPU index for galleries too big for brute force: HNSW over float vectors.

    Alternatives the gallery supports (tested, and measured in bench/identify.py --sweep):
    ``f"IVF{ivf_nlist(n)},Flat"`` (removes in place, runs on GPU; needs ``train``),
    ``"HNSW32,SQ8,RFlat"`` and ``f"IVF{nlist},PQ{m}np,RFlat"`` (compressed codes searched,
    exact re-scoring of the shortlist). IVF must *not* be wrapped in IDMap2 (IVF stores ids
    natively and ``IndexIDMap.remove_ids`` assumes the sub-index renumbers like a flat array).
    """
    del n, d
    return f"IDMap2,HNSW{HNSW_M},Flat"


def split_refine(factory: str) -> tuple[str, bool]:
    """(FAISS factory of the searched index, whether exact re-scoring is on)."""
    if factory.endswith(REFINE_SUFFIX):
        return factory[: -len(REFINE_SUFFIX)], True
    if "Refine" in factory or "RFlat" in factory:
        raise ValueError(f"factory {factory!r}: only a trailing ',RFlat' is supported")
    return factory, False


def make_index(d: int, factory: str) -> faiss.Index:
    """Inner-product index, since templates are L2-normalised and compared by cosine.

    ``factory`` here is without the ``,RFlat`` suffix (see ``split_refine``).
    """
    index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf = faiss.downcast_index(ivf)
    if isinstance(ivf, faiss.IndexIVFFastScan):
        raise ValueError(
            f"factory {factory!r}: IVF fast-scan lists cannot remove templates, so a deleted "
            "face would stay searchable; use PQ without 'fs' (e.g. IVF1024,PQ34np,RFlat)"
        )
    if ivf is not None:
        # Hashtable (not Array) keeps remove_ids working and allows reconstruct for compaction.
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
    wrapped = isinstance(index, faiss.IndexIDMap)
    if wrapped and ivf is not None:
        raise ValueError(f"factory {factory!r}: IDMap over IVF corrupts ids on removal")
    if not wrapped and ivf is None:
        raise ValueError(f"factory {factory!r} cannot take sample ids: wrap it in IDMap2")
    base = inner(index)
    if not isinstance(base, faiss.IndexFlat | faiss.IndexHNSW | faiss.IndexIVF):
        raise ValueError(f"factory {factory!r}: unsupported index type {type(base).__name__}")
    return index


def inner(index: faiss.Index) -> faiss.Index:
    """The index doing the work under an IDMap wrapper, with its real Python type."""
    if isinstance(index, faiss.IndexIDMap):
        return faiss.downcast_index(index.index)
    return faiss.downcast_index(index)


def can_remove(index: faiss.Index) -> bool:
    """True where ``remove_ids`` exists and keeps labels stable (a whitelist, not a guess)."""
    base = inner(index)
    return isinstance(base, faiss.IndexFlat | faiss.IndexIVF) and not isinstance(
        base, faiss.IndexIVFFastScan
    )


def exact_codes(index: faiss.Index) -> bool:
    """True where the index stores the float32 templates themselves (not lossy codes)."""
    base = inner(index)
    if isinstance(base, faiss.IndexHNSW):
        base = faiss.downcast_index(base.storage)
    return isinstance(base, faiss.IndexFlat | faiss.IndexIVFFlat)


def gpu_capable(index: faiss.Index) -> bool:
    """FAISS GPU clones flat and IVF indexes; HNSW stays on the CPU."""
    return isinstance(inner(index), faiss.IndexFlat | faiss.IndexIVF)


def code_storage(index: faiss.Index) -> faiss.IndexFlatCodes | None:
    """The table of per-template codes in insertion order (flat, or HNSW's storage), so
    deleted templates can be overwritten in place; None for IVF (which removes instead)."""
    base = inner(index)
    if isinstance(base, faiss.IndexHNSW):
        base = faiss.downcast_index(base.storage)
    return base if isinstance(base, faiss.IndexFlatCodes) else None


def flat_storage(index: faiss.Index) -> faiss.IndexFlat | None:
    """The raw float vector table, if there is one."""
    base = code_storage(index)
    return base if isinstance(base, faiss.IndexFlat) else None


def search_params(
    index: faiss.Index,
    k: int,
    ef_search: int,
    sel: faiss.IDSelector | None,
    nprobe: int | None = None,
    base: faiss.Index | None = None,
) -> faiss.SearchParameters | None:
    """Per-call parameters; HNSW needs efSearch >= k or it silently returns fewer than k.

    ``base``: ``inner(index)`` if the caller has it already (it costs two downcasts).
    """
    base = inner(index) if base is None else base
    if isinstance(base, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(efSearch=max(ef_search, k), sel=sel)
    if isinstance(base, faiss.IndexIVF):
        # A bare SearchParametersIVF would reset nprobe to 1.
        probe = base.nprobe if nprobe is None else nprobe
        if sel is None and probe == base.nprobe:
            return None
        return faiss.SearchParametersIVF(sel=sel, nprobe=min(probe, base.nlist))
    if sel is None:
        return None
    return faiss.SearchParameters(sel=sel)
