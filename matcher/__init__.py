"""privface matcher: per-gallery FAISS search and secure two-party distance computation."""

from .factory import choose_factory
from .gpu import GPU_MAX_K, use_gpu
from .index import GalleryIndex, Hit, normalize, set_search_threads

__all__ = [
    "GPU_MAX_K",
    "GalleryIndex",
    "Hit",
    "choose_factory",
    "normalize",
    "set_search_threads",
    "use_gpu",
]
