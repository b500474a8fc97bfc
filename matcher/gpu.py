"""GPU placement of a gallery index.

Kept apart so the choice can be tested on CPU-only machines by monkeypatching
``faiss.get_num_gpus`` and ``faiss.index_cpu_to_all_gpus`` (both exist in faiss-cpu; the
transfer fails there for lack of ``StandardGpuResources``).
"""

from __future__ import annotations

import faiss

# FAISS GPU k-selection is capped at 2048 results per query (GPU_MAX_SELECTION_K).
GPU_MAX_K = 2048


def use_gpu(force_cpu: bool = False) -> bool:
    """GPU by default when the FAISS build sees one; ``force_cpu`` is the operator's override."""
    if force_cpu:
        return False
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    return get_num_gpus is not None and get_num_gpus() > 0


def to_gpu(index: faiss.Index) -> faiss.Index:
    """Copy to every visible GPU; looked up at call time so tests can substitute a fake."""
    return faiss.index_cpu_to_all_gpus(index)
