"""Every index type the gallery supports keeps the same contract: ranked results, deletion
(never returned, erased from the CPU copy at once), save / load / replay, compaction, and
moving between types with ``rebuild``."""

import json
import threading

import faiss
import numpy as np
import pytest

from matcher import factory as fx
from matcher import gpu
from matcher.index import GalleryIndex

D = 32
FLAT = "IDMap2,Flat"
HNSW = "IDMap2,HNSW32,Flat"
HNSW_SQ = "IDMap2,HNSW32,SQ8,RFlat"
IVF = "IVF8,Flat"
IVF_SQ = "IVF8,SQ8,RFlat"
IVF_PQ = "IVF8,PQ4x4np,RFlat"
TYPES = [FLAT, HNSW, HNSW_SQ, IVF, IVF_SQ, IVF_PQ]


@pytest.fixture(autouse=True)
def one_thread():
    """FAISS training and search on one core: the tests stay fast on a busy machine."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def unit(n, d=D, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make(kind, train=None, **kw):
    """An index of ``kind`` tuned to be exhaustive, so results can be compared exactly."""
    kw.setdefault("ef_search", 400)
    kw.setdefault("nprobe", 8)
    if kind.endswith(",RFlat"):
        kw.setdefault("rescore", 100)
    idx = GalleryIndex(D, kind, **kw)
    if train is not None:
        idx.train(train)
    return idx


def exact_top(g, ids, alive, q, k):
    s = g @ (q / np.linalg.norm(q))
    order = [i for i in np.argsort(-s, kind="stable") if alive[i]][:k]
    return ids[order].tolist(), s[order]


def same_hits(a, b):
    """Equal rankings; scores equal up to float rounding (FAISS vs numpy inner products)."""
    assert [[(h.subject, h.sample_id) for h in r] for r in a] == [
        [(h.subject, h.sample_id) for h in r] for r in b
    ]
    np.testing.assert_allclose(
        [h.score for r in a for h in r], [h.score for r in b for h in r], atol=1e-5
    )


def erased(idx, label):
    """True when the CPU copy holds nothing of a label's template any more."""
    if idx._exact is not None and idx._exact[label].any():
        return False
    cpu = idx._cpu
    store = fx.code_storage(cpu)
    if store is None:  # IVF: removed from its lists
        try:
            cpu.reconstruct(int(label))
        except RuntimeError:
            return True
        return False
    id_map = faiss.vector_to_array(cpu.id_map)
    pos = np.flatnonzero(id_map == label)
    if pos.size == 0:
        return True
    codes = faiss.vector_to_array(store.codes).reshape(store.ntotal, store.code_size)
    return not codes[pos[0]].any()


@pytest.fixture(scope="module")
def data():
    g = unit(300)
    return g, np.arange(300) + 1000, [i // 3 for i in range(300)]


@pytest.mark.parametrize("kind", TYPES)
def test_exact_results_and_exact_scores(kind, data):
    g, ids, subjects = data
    idx = make(kind, train=g)
    idx.add(g, ids, subjects)
    assert idx.removes_in_place == kind.startswith(("IDMap2,Flat", "IVF"))
    queries = unit(10, seed=1)
    got_ids, got_scores = idx.search_samples(queries, 10)
    for q, gi, gs in zip(queries, got_ids, got_scores, strict=True):
        want_ids, want_scores = exact_top(g, ids, np.ones(300, bool), q, 10)
        assert gi.tolist() == want_ids
        np.testing.assert_allclose(gs, want_scores, atol=1e-5)
    hits = idx.search(queries[0], 5)
    assert len({h.subject for h in hits}) == 5
    assert hits[0].sample_id == got_ids[0][0]


@pytest.mark.parametrize("kind", [HNSW_SQ, IVF_PQ])
def test_rescoring_turns_lossy_codes_into_exact_scores(kind, data):
    g, ids, subjects = data
    idx = GalleryIndex(D, kind, ef_search=64, nprobe=4)  # defaults: shortlist of 4k
    idx.train(g)
    idx.add(g, ids, subjects)
    assert idx.rescore == fx.DEFAULT_RESCORE
    got_ids, got_scores = idx.search_samples(g[:20], 5)
    for q, gi, gs in zip(g[:20], got_ids, got_scores, strict=True):
        rows = gi - 1000
        np.testing.assert_allclose(gs, g[rows] @ q, atol=1e-5)  # exact, not code scores
        assert gi[0] == ids[np.argmax(g @ q)]  # the template itself is found first


@pytest.mark.parametrize("kind", TYPES)
def test_removed_samples_are_never_returned_and_erased_at_once(kind, data):
    g, ids, subjects = data
    idx = make(kind, train=g)
    idx.add(g, ids, subjects)
    rng = np.random.default_rng(2)
    gone = rng.choice(ids, 120, replace=False)
    assert idx.remove(gone) == 120
    alive = ~np.isin(ids, gone)
    labels = gone - 1000  # labels follow insertion order here
    assert all(erased(idx, lab) for lab in labels)
    assert not erased(idx, int(np.flatnonzero(alive)[0]))
    assert idx.garbage == (0 if idx.removes_in_place else 120)
    got, _ = idx.search_samples(g[~alive], 15)
    assert not np.isin(got, gone).any() and (got >= 0).all()
    for hits in idx.search_batch(g[~alive][:20], 12):
        assert not {h.sample_id for h in hits} & set(gone.tolist())
    q = unit(1, seed=3)[0]
    want, _ = exact_top(g, ids, alive, q, 10)
    assert idx.search_samples(q, 10)[0][0].tolist() == want
    pending = idx.garbage
    assert idx.compact() == pending and idx.garbage == 0
    assert idx.search_samples(q, 10)[0][0].tolist() == want
    assert len(idx) == 180 and not np.isin(idx.sample_ids(), gone).any()


@pytest.mark.parametrize("medium", ["files", "buffer"])
@pytest.mark.parametrize("kind", TYPES)
def test_save_load_replay_round_trip(kind, medium, data, tmp_path):
    g, ids, subjects = data
    idx = make(kind, train=g)
    idx.add(g[:200], ids[:200], subjects[:200], seq=1)
    idx.remove(ids[:30], seq=2)
    if medium == "files":
        idx.save(tmp_path)
        idx.save(tmp_path)
        assert len(list(tmp_path.glob("index-*.faiss"))) == 1
        assert len(list(tmp_path.glob("exact-*.npy"))) == (1 if kind.endswith("RFlat") else 0)
        back = GalleryIndex.load(tmp_path)
    else:
        back = GalleryIndex.loads(idx.dumps())
    assert (back.factory, back.seq, back.nprobe, back.rescore) == (
        idx.factory,
        2,
        idx.nprobe,
        idx.rescore,
    )
    assert back.garbage == idx.garbage and len(back) == 170
    queries = unit(8, seed=4)
    assert back.search_batch(queries, 6) == idx.search_batch(queries, 6)
    np.testing.assert_array_equal(
        back.search_samples(queries, 9)[0], idx.search_samples(queries, 9)[0]
    )

    back.replay(5, added=(g[200:], ids[200:], subjects[200:]), removed=ids[30:50])
    alive = np.ones(300, bool)
    alive[:50] = False
    np.testing.assert_array_equal(back.sample_ids(), ids[alive])
    for q in queries:
        assert back.search_samples(q, 10)[0][0].tolist() == exact_top(g, ids, alive, q, 10)[0]
    assert back.add(g[:1], ids[:1], "late", seq=2) == 0  # tombstones survived the restart


@pytest.mark.parametrize(
    ("src", "dst"),
    [(FLAT, HNSW), (FLAT, IVF), (HNSW, HNSW_SQ), (HNSW_SQ, IVF_PQ), (IVF_PQ, FLAT)],
)
def test_rebuild_moves_between_types(src, dst, data, tmp_path):
    g, ids, subjects = data
    idx = make(src, train=g)
    idx.add(g, ids, subjects, seq=3)
    idx.remove(ids[::4], seq=4)
    alive = np.ones(300, bool)
    alive[::4] = False
    queries = unit(6, seed=5)
    before = idx.search_batch(queries, 5)
    assert idx.rebuild(dst, ef_search=400, nprobe=8, rescore=100) == dst
    assert idx.factory == dst and idx.garbage == 0 and idx.seq == 4
    same_hits(idx.search_batch(queries, 5), before)
    np.testing.assert_array_equal(idx.sample_ids(), ids[alive])
    assert idx.add(g[:1], ids[:1], "late", seq=4) == 0
    idx.remove(ids[1:2])  # deletion works on the new type
    assert erased(idx, 1)
    back = GalleryIndex.load(idx.save(tmp_path))
    assert back.factory == dst and len(back) == len(idx)


def test_rebuild_without_factory_follows_the_size_plan(monkeypatch, data):
    g, ids, subjects = data
    idx = GalleryIndex(D, expected_size=10)
    assert idx.factory == FLAT
    idx.add(g, ids, subjects)
    monkeypatch.setattr(fx, "FLAT_MAX_CELLS", 100 * D)  # 300 templates are "large" now
    assert idx.rebuild() == fx.large_factory(300, D)
    assert idx.ef_search == fx.hnsw_ef_search(300)
    with pytest.raises(ValueError, match="train"):
        GalleryIndex(D, FLAT).rebuild("IVF64,Flat")  # nothing to learn lists from


def test_choose_by_size_and_device():
    assert fx.choose(1000, 170) == fx.IndexPlan("IDMap2,Flat")
    big = fx.choose(1_000_000, 170)
    assert big.factory == "IDMap2,HNSW32,Flat" and big.ef_search >= 128
    assert fx.choose(1_000_000, 170, gpu=True).factory == "IDMap2,Flat"
    huge = fx.choose(10_000_000, 512, gpu=True)
    assert huge.factory.startswith("IVF") and huge.nprobe == fx.ivf_nlist(10_000_000) // 4
    assert fx.ivf_nlist(1_000_000) == 4096 and fx.ivf_nlist(10) == 16
    idx = GalleryIndex(170, expected_size=1_000_000)
    assert idx.factory == big.factory and idx.ef_search == big.ef_search


def test_unsafe_or_unknown_types_are_refused():
    with pytest.raises(ValueError, match="fast-scan"):
        GalleryIndex(D, "IVF8,PQ16x4fs,RFlat")
    with pytest.raises(ValueError, match="RFlat"):
        GalleryIndex(D, "IDMap2,HNSW32,SQ8")  # lossy codes without exact re-scoring
    with pytest.raises(ValueError, match="trailing"):
        GalleryIndex(D, "IDMap2,HNSW32,SQ8,Refine(Flat)")
    with pytest.raises(ValueError, match="unsupported"):
        GalleryIndex(D, "IDMap2,PQ4x4")
    with pytest.raises(ValueError):
        GalleryIndex(D, FLAT, ef_search=0)


def test_search_params_can_change_live(data):
    g, ids, subjects = data
    idx = GalleryIndex(D, IVF)
    assert idx.nprobe == fx.ivf_nprobe(8)
    idx.train(g)
    idx.add(g, ids, subjects)
    idx.set_search_params(nprobe=1)
    one = idx.search_samples(g[:50], 10)[0]
    idx.set_search_params(nprobe=8, ef_search=10, rescore=2)
    assert idx.nprobe == 8 and idx.ef_search == 10 and idx.rescore == 2
    full = idx.search_samples(g[:50], 10)[0]
    truth = np.array([exact_top(g, ids, np.ones(300, bool), q, 10)[0] for q in g[:50]])
    assert (full == truth).all() and not (one == truth).all()
    with pytest.raises(ValueError):
        idx.set_search_params(nprobe=0)


def test_version_1_snapshots_still_load(data, tmp_path):
    g, ids, subjects = data
    idx = GalleryIndex(D, HNSW)
    idx.add(g[:50], ids[:50], subjects[:50], seq=7)
    idx.save(tmp_path)
    with np.load(tmp_path / "meta.npz") as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"]))
    for key in ("nprobe", "rescore", "exact_file"):
        del meta[key]
    meta["version"] = 1
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(tmp_path / "meta.npz", **arrays)
    back = GalleryIndex.load(tmp_path)
    assert back.seq == 7 and back.rescore == 1
    assert back.search_batch(g[:3], 3) == idx.search_batch(g[:3], 3)


def test_search_samples_min_score_and_empty(data):
    g, ids, subjects = data
    idx = GalleryIndex(D, FLAT)
    ids0, s0 = idx.search_samples(g[:2], 3)
    assert (ids0 == -1).all() and np.isneginf(s0).all()
    idx.add(g, ids, subjects)
    got, scores = idx.search_samples(g[5], 4, min_score=0.999)
    assert got[0].tolist() == [1005, -1, -1, -1]
    with pytest.raises(ValueError):
        idx.search_samples(g[5], 0)


@pytest.mark.parametrize("kind", [HNSW_SQ, IVF, IVF_PQ])
def test_concurrent_writes_searches_and_rebuild(kind):
    idx = make(kind, train=unit(400, seed=20), ef_search=64, nprobe=4, rescore=4)
    idx.add(unit(200, seed=9), np.arange(200), [i % 40 for i in range(200)])
    removed: set[int] = set()
    guard = threading.Lock()
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer():
        try:
            nxt = 200
            for step in range(20):
                idx.add(unit(10, seed=100 + step), np.arange(nxt, nxt + 10), [nxt % 40] * 10)
                victims = np.arange(nxt - 20, nxt - 15)
                idx.remove(victims)
                with guard:
                    removed.update(victims.tolist())
                nxt += 10
                if step == 10:
                    idx.rebuild(kind, ef_search=64, nprobe=4, rescore=4)
        except BaseException as e:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(e)
        finally:
            stop.set()

    def reader(seed):
        try:
            queries = unit(4, seed=seed)
            while not stop.is_set():
                with guard:
                    before = set(removed)
                got, _ = idx.search_samples(queries, 10)
                assert not set(got.ravel().tolist()) & before
                for hits in idx.search_batch(queries, 5):
                    assert not {h.sample_id for h in hits} & before
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(3)]
    threads.append(threading.Thread(target=writer))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert len(idx) == 200 + 200 - 100


# ------------------------------------------------------------------ GPU paths (faked)


class FakeGpuIndex:
    """k <= 2048, no remove_ids, search-time parameters ignored (as on a GPU)."""

    def __init__(self, index):
        self.inner = faiss.clone_index(index)
        self.ks: list[int] = []

    @property
    def ntotal(self):
        return self.inner.ntotal

    def add_with_ids(self, x, ids):
        self.inner.add_with_ids(x, ids)

    def search(self, x, k, params=None):
        assert k <= gpu.GPU_MAX_K
        self.ks.append(k)
        return self.inner.search(x, k)

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


@pytest.mark.parametrize("kind", [IVF, IVF_PQ])
def test_gpu_ivf_removal_erases_cpu_copy_and_filters_gpu(kind, fake_gpu, data, tmp_path):
    g, ids, subjects = data
    idx = make(kind, train=g)
    assert idx.on_gpu and not idx.removes_in_place
    idx.add(g, ids, subjects)
    gone = ids[::3]
    idx.remove(gone)
    assert idx.garbage == 100 and fake_gpu[-1].ntotal == 300
    assert idx._cpu.ntotal == 200  # the CPU lists no longer hold them
    assert all(erased(idx, lab) for lab in gone - 1000)
    got, _ = idx.search_samples(g[::3], 10)
    assert not np.isin(got, gone).any() and (got >= 0).all()
    for hits in idx.search_batch(g[::3][:10], 8):
        assert len(hits) == 8 and not {h.sample_id for h in hits} & set(gone.tolist())
    back = GalleryIndex.load(idx.save(tmp_path))
    assert back.on_gpu and back.garbage == 0 and fake_gpu[-1].ntotal == 200
    assert idx.compact() == 100 and idx.garbage == 0 and fake_gpu[-1].ntotal == 200


def test_gpu_rescoring_shortlist_stays_within_the_gpu_limit(fake_gpu):
    n = 3000
    g = unit(n, seed=11)
    idx = GalleryIndex(D, "IVF8,SQ8,RFlat", nprobe=8, rescore=10)
    idx.train(g)
    idx.add(g, np.arange(n), np.arange(n))
    got, _ = idx.search_samples(g[:3], 300)  # 10 x 300 would exceed a GPU page
    assert max(fake_gpu[-1].ks) <= gpu.GPU_MAX_K
    for q, row in zip(g[:3], got, strict=True):
        assert row[0] == np.argmax(g @ q)


def test_gpu_plan_prefers_flat_then_ivf(fake_gpu):
    assert GalleryIndex(D, expected_size=1000).on_gpu
    plan = fx.choose(fx.GPU_FLAT_MAX_CELLS // D + 1, D, gpu=True)
    idx = GalleryIndex(D, expected_size=fx.GPU_FLAT_MAX_CELLS // D + 1)
    assert idx.factory == plan.factory and idx.nprobe == plan.nprobe
    assert not idx.on_gpu  # untrained until its first rebuild/train


@pytest.mark.parametrize(("kind", "param"), [(HNSW, "ef_search"), (IVF_SQ, "nprobe")])
def test_calibrate_picks_the_smallest_setting_reaching_the_target(kind, param):
    g = unit(2000, seed=30)
    idx = GalleryIndex(D, kind.replace("IVF8", "IVF32"), ef_search=16, nprobe=1)
    idx.train(g)
    idx.add(g, np.arange(2000), np.arange(2000) // 2)
    idx.remove(np.arange(0, 2000, 7))
    res = idx.calibrate(0.98, k=10, n_probes=100)
    assert res["param"] == param and res["recall"] >= 0.98
    cap = 32 if param == "nprobe" else 2048  # the ladder ends at nlist / 2048
    assert getattr(idx, param) == res["value"] >= min(4 / 3 * res["measured_at"], cap)
    assert res["value"] > res["measured_at"] or res["value"] == cap
    values = list(res["curve"])
    assert values == sorted(values) and all(r < 0.98 for r in list(res["curve"].values())[:-1])
    # Real probes instead of the gallery's own templates; their recall is measured the same way.
    probes = unit(50, seed=31)
    res2 = idx.calibrate(0.98, probes=probes)
    got, _ = idx.search_samples(probes, 10)
    live = np.setdiff1d(np.arange(2000), np.arange(0, 2000, 7))
    truth = live[np.argsort(-(probes @ g[live].T), axis=1)[:, :10]]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, truth, strict=True)])
    assert recall == pytest.approx(res2["recall"])
    assert GalleryIndex(D, FLAT).calibrate() == {"param": None, "recall": 1.0}
    assert idx.approximate and not GalleryIndex(D, FLAT).approximate


def test_outgrown_tells_when_the_plan_wants_another_type(monkeypatch, data, tmp_path):
    g, ids, subjects = data
    monkeypatch.setattr(fx, "FLAT_MAX_CELLS", 100 * D)  # Flat up to 100 templates
    idx = GalleryIndex(D, expected_size=10)
    assert idx.planned and idx.factory == FLAT
    idx.add(g[:110], ids[:110], subjects[:110])
    assert not idx.outgrown  # within the 25% slack
    idx.add(g[110:], ids[110:], subjects[110:])
    assert idx.outgrown
    assert GalleryIndex.load(idx.save(tmp_path)).outgrown  # remembered across restarts
    idx.rebuild()
    assert idx.factory == fx.large_factory(300, D) and not idx.outgrown
    idx.remove(ids[:250])  # shrinks far below: back to Flat is worth it
    assert idx.outgrown
    explicit = GalleryIndex(D, FLAT)
    explicit.add(g, ids, subjects)
    assert not explicit.outgrown  # an operator's choice is never second-guessed


def test_gpu_nprobe_change_recopies_and_recounts_garbage(fake_gpu, data):
    g, ids, subjects = data
    idx = make(IVF, train=g)
    idx.add(g, ids, subjects)
    idx.remove(ids[:30])
    assert idx.garbage == 30 and fake_gpu[-1].ntotal == 300
    idx.set_search_params(nprobe=4)
    assert idx.nprobe == 4 and fake_gpu[-1].inner.nprobe == 4
    assert idx.garbage == 0 and fake_gpu[-1].ntotal == 270
    got, _ = idx.search_samples(g[:30], 5)
    assert not np.isin(got, ids[:30]).any()
