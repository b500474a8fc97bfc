"""Which FAISS index a gallery gets, and what that index type can and cannot do.

Index types differ in ways the gallery has to design around (product.md, "Known FAISS
limits"): HNSW has no ``remove_ids``; HNSW returns fewer than k results unless efSearch >= k;
IVF keeps ids itself and breaks under an ``IDMap`` wrapper once ids are removed. These
helpers answer such questions from the index object, so the gallery code never guesses from
the factory string.
"""

from __future__ import annotations

import faiss

# Exhaustive search stays fast (a few ms per query on a CPU core) while n * d stays below
# this many floats: about 100k templates of dimension 512.
FLAT_MAX_CELLS = 50_000_000
HNSW_M = 32


def choose_factory(n: int, d: int) -> str:
    """Exact search while it is cheap; a graph index beyond, where brute force stops scaling."""
    if n * d <= FLAT_MAX_CELLS:
        return "IDMap2,Flat"
    return large_factory(n, d)


def large_factory(n: int, d: int) -> str:
    """Hook for big galleries; tuning of IVF/HNSW parameters belongs here (separate issue).

    HNSW needs no training and keeps recall high, so it is the default. An IVF alternative
    must *not* be wrapped in IDMap2 (IVF stores ids natively and ``IndexIDMap.remove_ids``
    assumes the sub-index renumbers like a flat array), e.g. ``f"IVF{nlist},Flat"`` with
    nlist ~ 4 * sqrt(n); ``make_index`` already gives IVF the direct map it needs and
    ``GalleryIndex.train`` trains it.
    """
    del n, d  # not used until the tuning issue lands
    return f"IDMap2,HNSW{HNSW_M},Flat"


def make_index(d: int, factory: str) -> faiss.Index:
    """Inner-product index, since templates are L2-normalised and compared by cosine."""
    index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        # Hashtable (not Array) keeps remove_ids working and allows reconstruct for compaction.
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
    wrapped = isinstance(index, faiss.IndexIDMap)
    if wrapped and ivf is not None:
        raise ValueError(f"factory {factory!r}: IDMap over IVF corrupts ids on removal")
    if not wrapped and ivf is None:
        raise ValueError(f"factory {factory!r} cannot take sample ids: wrap it in IDMap2")
    return index


def inner(index: faiss.Index) -> faiss.Index:
    """The index doing the work under an IDMap wrapper, with its real Python type."""
    if isinstance(index, faiss.IndexIDMap):
        return faiss.downcast_index(index.index)
    return faiss.downcast_index(index)


def can_remove(index: faiss.Index) -> bool:
    """True where ``remove_ids`` exists and keeps labels stable (a whitelist, not a guess)."""
    base = inner(index)
    return isinstance(base, faiss.IndexFlat | faiss.IndexIVF)


def gpu_capable(index: faiss.Index) -> bool:
    """FAISS GPU clones flat and IVF indexes; HNSW stays on the CPU."""
    return isinstance(inner(index), faiss.IndexFlat | faiss.IndexIVF)


def flat_storage(index: faiss.Index) -> faiss.IndexFlat | None:
    """The raw vector table, if there is one, so deleted templates can be overwritten."""
    base = inner(index)
    if isinstance(base, faiss.IndexHNSW):
        base = faiss.downcast_index(base.storage)
    return base if isinstance(base, faiss.IndexFlat) else None


def search_params(
    index: faiss.Index, k: int, ef_search: int, sel: faiss.IDSelector | None
) -> faiss.SearchParameters | None:
    """Per-call parameters; HNSW needs efSearch >= k or it silently returns fewer than k."""
    base = inner(index)
    if isinstance(base, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(efSearch=max(ef_search, k), sel=sel)
    if sel is None:
        return None
    if isinstance(base, faiss.IndexIVF):
        # A bare SearchParametersIVF would reset nprobe to 1.
        return faiss.SearchParametersIVF(sel=sel, nprobe=base.nprobe)
    return faiss.SearchParameters(sel=sel)
