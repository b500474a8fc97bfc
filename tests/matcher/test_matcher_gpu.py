"""GPU placement and GPU limits, exercised on CPU with a fake that enforces those limits."""

import faiss
import numpy as np
import pytest

from matcher import gpu
from matcher.index import GalleryIndex

D = 16


class FakeGpuIndex:
    """Behaves like a FAISS GPU index where it matters: k <= 2048, no remove_ids, and
    search-time parameters (id filters) silently ignored."""

    def __init__(self, index):
        self.inner = faiss.clone_index(index)
        self.ks: list[int] = []

    @property
    def ntotal(self):
        return self.inner.ntotal

    def add_with_ids(self, x, ids):
        self.inner.add_with_ids(x, ids)

    def search(self, x, k, params=None):
        assert k <= gpu.GPU_MAX_K, f"GPU asked for k={k}"
        self.ks.append(k)
        return self.inner.search(x, k)  # params ignored, as on the GPU

    def remove_ids(self, ids):
        raise RuntimeError("remove_ids not implemented on GPU")


@pytest.fixture
def fake_gpu(monkeypatch):
    made: list[FakeGpuIndex] = []

    def transfer(index, co=None, ngpu=-1):
        made.append(FakeGpuIndex(index))
        return made[-1]

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", transfer)
    return made


def unit(n, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, D))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_use_gpu_follows_faiss_and_override(monkeypatch):
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    assert not gpu.use_gpu()
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2)
    assert gpu.use_gpu()
    assert not gpu.use_gpu(force_cpu=True)
    monkeypatch.delattr(faiss, "get_num_gpus")
    assert not gpu.use_gpu()


def test_cpu_build_stays_on_cpu():
    assert faiss.get_num_gpus() == 0
    assert not GalleryIndex(D).on_gpu


def test_placement(fake_gpu):
    assert GalleryIndex(D, "IDMap2,Flat").on_gpu and len(fake_gpu) == 1
    assert not GalleryIndex(D, "IDMap2,Flat", force_cpu=True).on_gpu
    assert not GalleryIndex(D, "IDMap2,HNSW32,Flat").on_gpu  # no GPU HNSW in FAISS
    ivf = GalleryIndex(D, "IVF4,Flat")
    assert not ivf.on_gpu  # untrained indexes cannot be cloned yet
    ivf.train(unit(100))
    assert ivf.on_gpu


def test_gpu_removal_filters_and_compacts(fake_gpu):
    g = unit(500)
    idx = GalleryIndex(D, "IDMap2,Flat", overfetch=1)
    idx.add(g, np.arange(500), np.arange(500) % 100)
    gone = np.arange(0, 500, 5)
    assert idx.remove(gone) == 100  # must not call the GPU's missing remove_ids
    assert not idx.removes_in_place and idx.garbage == 100
    for hits in idx.search_batch(g[gone], 10):
        assert len(hits) == 10 and all(h.sample_id % 5 for h in hits)
    # The CPU mirror has the removed templates zeroed already.
    assert not idx._cpu.reconstruct(5).any()
    assert idx.compact() == 100 and idx.garbage == 0
    assert len(fake_gpu) == 2 and fake_gpu[-1].ntotal == 400
    for hits in idx.search_batch(g[gone], 10):
        assert all(h.sample_id % 5 for h in hits)


def test_topk_is_clamped_to_2048_and_paged_from_the_mirror(fake_gpu):
    n = 3000
    g = unit(n, seed=1)
    idx = GalleryIndex(D, "IDMap2,Flat")
    idx.add(g, np.arange(n), np.arange(n))
    q = unit(1, seed=2)[0]
    order = np.argsort(-(g @ q))
    hits = idx.search(q, 10)
    assert [h.sample_id for h in hits] == order[:10].tolist()
    assert fake_gpu[0].ks == [40]  # small queries are served by the GPU
    hits = idx.search(q, 1000)  # would over-fetch 4000: clamped to one GPU page of 2048
    assert [h.sample_id for h in hits] == order[:1000].tolist()
    assert fake_gpu[0].ks == [40, gpu.GPU_MAX_K]
    hits = idx.search(q, 2500)  # beyond any GPU page: served by the CPU mirror
    assert [h.sample_id for h in hits] == order[:2500].tolist()
    assert fake_gpu[0].ks == [40, gpu.GPU_MAX_K]


def test_gpu_save_and_load(fake_gpu, tmp_path):
    idx = GalleryIndex(D, "IDMap2,Flat")
    idx.add(unit(50), np.arange(50), "a")
    idx.remove([3])
    idx.save(tmp_path)
    back = GalleryIndex.load(tmp_path)
    assert back.on_gpu and back.garbage == 1
    assert 3 not in {h.sample_id for h in back.search(unit(50)[3], 1)}
    assert not GalleryIndex.load(tmp_path, force_cpu=True).on_gpu


def test_subject_heavy_results_page_past_the_gpu_limit(fake_gpu):
    rng = np.random.default_rng(3)
    q = unit(1, seed=4)[0]
    hub = q + 0.05 * rng.standard_normal((2100, D))  # one subject fills more than a GPU page
    g = np.vstack([hub, unit(100, seed=5)])
    subjects = ["hub"] * 2100 + list(range(100))
    idx = GalleryIndex(D, "IDMap2,Flat")
    idx.add(g, np.arange(len(g)), subjects)
    hits = idx.search(q, 5)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    others = np.argsort(-(gn[2100:] @ q))[:4]
    assert [h.subject for h in hits] == ["hub", *others.tolist()]
    assert max(fake_gpu[0].ks) == gpu.GPU_MAX_K
