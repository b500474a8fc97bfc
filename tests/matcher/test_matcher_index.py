import threading
import time

import faiss
import numpy as np
import pytest

from matcher.factory import FLAT_MAX_CELLS, choose_factory
from matcher.index import GalleryIndex, Hit

FLAT = "IDMap2,Flat"
HNSW = "IDMap2,HNSW32,Flat"
KINDS = [FLAT, HNSW]
D = 32


def unit(n, d=D, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute(gallery, ids, subjects, alive, query, top_k):
    """Plain numpy: best sample per subject, subjects ranked by that score."""
    q = query / np.linalg.norm(query)
    scores = gallery @ q
    best = {}
    for i in np.argsort(-scores, kind="stable"):
        if alive[i] and subjects[i] not in best:
            best[subjects[i]] = (float(scores[i]), int(ids[i]))
    ranked = sorted(best.items(), key=lambda kv: -kv[1][0])[:top_k]
    return [(s, sc, sid) for s, (sc, sid) in ranked]


def assert_same(hits, expected, tol=1e-5):
    assert [h.subject for h in hits] == [e[0] for e in expected]
    assert [h.sample_id for h in hits] == [e[2] for e in expected]
    np.testing.assert_allclose([h.score for h in hits], [e[1] for e in expected], atol=tol)


def test_choose_factory_by_size():
    assert choose_factory(1000, 512) == FLAT
    assert "HNSW" in choose_factory(FLAT_MAX_CELLS, 512)
    assert GalleryIndex(D, expected_size=10).factory == FLAT


def test_flat_search_equals_bruteforce():
    g = unit(400)
    ids = np.arange(400) + 10_000
    subjects = [f"s{i}" for i in range(400)]
    idx = GalleryIndex(D, FLAT)
    assert idx.add(g * 3.0, ids, subjects) == 400  # scale must not matter: normalised on add
    queries = unit(15, seed=1) * 7.0
    got = idx.search_batch(queries, 10)
    for q, hits in zip(queries, got, strict=True):
        assert_same(hits, brute(g, ids, subjects, np.ones(400, bool), q, 10))
    assert idx.search(queries[0], 10) == got[0]
    assert all(isinstance(h, Hit) for h in got[0])


def test_hnsw_recall_close_to_bruteforce():
    g = unit(500)
    ids = np.arange(500)
    idx = GalleryIndex(D, HNSW)
    idx.add(g, ids, ids.tolist())
    recall = []
    for q in unit(20, seed=2):
        exp = {e[0] for e in brute(g, ids, ids.tolist(), np.ones(500, bool), q, 10)}
        recall.append(len(exp & {h.subject for h in idx.search(q, 10)}) / 10)
    assert np.mean(recall) >= 0.95


@pytest.mark.parametrize("kind", KINDS)
def test_subject_aggregation_with_many_samples(kind):
    rng = np.random.default_rng(3)
    q = unit(1, seed=4)[0]
    # One subject owns 300 samples, all closer to q than anyone else's.
    hub = q + 0.1 * rng.standard_normal((300, D))
    others = unit(200, seed=5)
    g = np.vstack([hub, others])
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    subjects = ["hub"] * 300 + [i // 4 for i in range(200)]  # 50 subjects x 4 samples
    ids = np.arange(500) * 3
    idx = GalleryIndex(D, kind, overfetch=2)
    idx.add(g, ids, subjects)
    assert len(idx) == 500 and idx.n_subjects == 51
    hits = idx.search(q, 8)
    assert len({h.subject for h in hits}) == 8  # one entry per subject
    assert_same(hits, brute(g, ids, subjects, np.ones(500, bool), q, 8))
    assert len(idx.search(q, 1000)) == 51  # more than exist: every subject once


def test_min_score_is_an_explicit_no_match():
    g = unit(100)
    idx = GalleryIndex(D, FLAT)
    idx.add(g, np.arange(100), list(range(100)))
    assert idx.search(g[3], 5, min_score=0.99)[0].sample_id == 3
    assert len(idx.search(g[3], 5, min_score=0.99)) == 1
    assert idx.search(-g[3], 5, min_score=0.99) == []


@pytest.mark.parametrize("kind", KINDS)
def test_removed_ids_are_never_returned(kind):
    g = unit(300)
    ids = np.arange(300) + 1
    subjects = [i // 3 for i in range(300)]
    idx = GalleryIndex(D, kind)
    idx.add(g, ids, subjects)
    gone = np.random.default_rng(6).choice(ids, 120, replace=False)
    assert idx.remove(gone) == 120
    assert idx.remove(gone) == 0  # repeats are harmless
    alive = ~np.isin(ids, gone)
    pending = 0 if kind == FLAT else 120
    assert idx.garbage == pending and idx.removes_in_place == (kind == FLAT)
    # The removed templates themselves are the hardest queries.
    for hits in idx.search_batch(g[~alive], 20):
        assert not {h.sample_id for h in hits} & set(gone.tolist())
        assert len(hits) == 20
    q = g[~alive][0]
    exp = brute(g, ids, subjects, alive, q, 20)
    if kind == FLAT:
        assert_same(idx.search(q, 20), exp)
    assert idx.compact() == pending
    assert idx.garbage == 0 and len(idx) == 180
    assert not {h.sample_id for h in idx.search(q, 100)} & set(gone.tolist())
    # A removed sample id can come back with a new template (fresh label, not the stale one).
    idx.add(-q, [int(gone[0])], "back")
    assert idx.search(-q, 1)[0] == Hit("back", pytest.approx(1.0, abs=1e-5), int(gone[0]))


def test_hnsw_pending_removals_are_filtered_and_overfetched():
    g = unit(400)
    ids = np.arange(400)
    idx = GalleryIndex(D, HNSW, overfetch=1)
    idx.add(g, ids, ids.tolist())
    idx.remove(ids[10:])  # 390 pending removals, 10 live
    assert idx.garbage == 390 and idx.garbage_fraction == pytest.approx(390 / 400)
    for q in unit(5, seed=7):
        assert sorted(h.sample_id for h in idx.search(q, 10)) == list(range(10))
    # Erasure does not wait for compaction: the stored template is zeroed at once.
    assert not idx._cpu.reconstruct(200).any()
    assert idx._cpu.reconstruct(3).any()


def test_remove_subject_cascades():
    g = unit(60)
    idx = GalleryIndex(D, HNSW)
    idx.add(g, np.arange(60), [i % 6 for i in range(60)])
    assert idx.remove_subject(2) == 10
    assert idx.remove_subject("nobody") == 0
    assert idx.n_subjects == 5
    assert all(h.subject != 2 for h in idx.search(g[2], 10))


def test_late_add_cannot_resurrect_a_removal(tmp_path):
    g = unit(3)
    idx = GalleryIndex(D, FLAT)
    idx.remove([7], seq=5)  # the deletion overtook the enrolment
    assert idx.add(g[:1], [7], "a", seq=4) == 0
    idx = GalleryIndex.load(idx.save(tmp_path))  # removals are remembered across restarts
    assert idx.add(g[:1], [7], "a", seq=5) == 0
    assert 7 not in idx
    assert idx.add(g[:1], [7], "a", seq=6) == 1  # a newer add is legitimate
    assert idx.search(g[0], 1)[0].sample_id == 7
    assert idx.seq == 6


def test_readding_a_live_sample_replaces_it():
    g = unit(4)
    idx = GalleryIndex(D, HNSW)
    idx.add(g[:2], [1, 2], ["a", "b"])
    idx.add(g[2:3], [1], "c")
    assert len(idx) == 2 and idx.n_subjects == 2
    assert idx.search(g[2], 1)[0] == Hit("c", pytest.approx(1.0, abs=1e-5), 1)
    assert all(h.subject != "a" for h in idx.search(g[0], 5))


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_then_replay(kind, tmp_path):
    g = unit(260)
    ids = np.arange(260) + 100
    subjects = [f"p{i // 2}" for i in range(260)]
    idx = GalleryIndex(D, kind)
    idx.add(g[:200], ids[:200], subjects[:200], seq=1)
    idx.remove(ids[:30], seq=2)
    idx.save(tmp_path / "snap")
    idx.save(tmp_path / "snap")  # a second snapshot replaces the first
    assert len(list((tmp_path / "snap").glob("index-*.faiss"))) == 1

    back = GalleryIndex.load(tmp_path / "snap", force_cpu=True)
    assert back.seq == 2 and len(back) == 170 and back.garbage == idx.garbage
    queries = unit(10, seed=8)
    assert back.search_batch(queries, 7) == idx.search_batch(queries, 7)
    np.testing.assert_array_equal(back.sample_ids(), idx.sample_ids())

    # Changes after the snapshot, in final state: 60 new samples, 20 more removed.
    back.replay(5, added=(g[200:], ids[200:], subjects[200:]), removed=ids[30:50])
    assert back.seq == 5
    alive = np.ones(260, bool)
    alive[:50] = False
    fresh = GalleryIndex(D, kind)
    fresh.add(g[alive], ids[alive], [s for s, a in zip(subjects, alive, strict=True) if a])
    if kind == FLAT:
        for q in queries:
            assert_same(back.search(q, 7), brute(g, ids, subjects, alive, q, 7))
    np.testing.assert_array_equal(back.sample_ids(), fresh.sample_ids())
    for hits in back.search_batch(g[:50], 10):
        assert all(h.sample_id >= 150 for h in hits)
    # A replay that repeats the snapshot's own changes is harmless.
    back.replay(5, added=(g[200:], ids[200:], subjects[200:]), removed=ids[:50])
    np.testing.assert_array_equal(back.sample_ids(), fresh.sample_ids())


def test_load_rejects_mismatched_files(tmp_path):
    idx = GalleryIndex(D, FLAT)
    idx.add(unit(5), np.arange(5), "x")
    idx.save(tmp_path)
    other = faiss.index_factory(D, FLAT, faiss.METRIC_INNER_PRODUCT)
    name = next(tmp_path.glob("index-*.faiss")).name
    faiss.write_index(other, str(tmp_path / name))
    with pytest.raises(ValueError, match="does not match"):
        GalleryIndex.load(tmp_path)


@pytest.mark.parametrize("kind", KINDS)
def test_concurrent_add_remove_search(kind):
    idx = GalleryIndex(D, kind)
    idx.add(unit(200, seed=9), np.arange(200), [i % 40 for i in range(200)])
    removed: set[int] = set()
    guard = threading.Lock()
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer():
        try:
            nxt = 200
            for step in range(30):
                x = unit(10, seed=100 + step)
                idx.add(x, np.arange(nxt, nxt + 10), [nxt % 40] * 10)
                victims = np.arange(nxt - 20, nxt - 15)
                idx.remove(victims)
                with guard:
                    removed.update(victims.tolist())
                nxt += 10
                if step % 10 == 9:
                    idx.compact()
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
                for hits in idx.search_batch(queries, 10):
                    assert not {h.sample_id for h in hits} & before
                time.sleep(0)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(4)]
    threads.append(threading.Thread(target=writer))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert len(idx) == 200 + 300 - 150


def test_bad_input_is_rejected_without_harm():
    idx = GalleryIndex(D, FLAT)
    idx.add(unit(3), [1, 2, 3], "a")
    with pytest.raises(ValueError, match="dimension"):
        idx.add(np.ones((1, D + 1)), [4], "a")
    with pytest.raises(ValueError, match="NaN"):
        idx.add(np.full((1, D), np.nan), [4], "a")
    with pytest.raises(ValueError, match="zero"):
        idx.search(np.zeros(D), 1)
    with pytest.raises(ValueError, match="duplicate"):
        idx.add(unit(2), [5, 5], "a")
    with pytest.raises(TypeError):
        idx.add(unit(1), [5], [True])
    with pytest.raises(ValueError):
        idx.search(unit(1)[0], 0)
    assert len(idx) == 3 and GalleryIndex(D).search(unit(1)[0], 3) == []


def test_ivf_hook_trains_removes_and_rejects_idmap():
    g = unit(300)
    idx = GalleryIndex(D, "IVF8,Flat")
    with pytest.raises(RuntimeError, match="trained"):
        idx.add(g, np.arange(300), "s")
    idx.train(g)
    idx.add(g, np.arange(300), [i % 30 for i in range(300)])
    faiss.extract_index_ivf(idx._cpu).nprobe = 8  # exhaustive for the check
    idx.remove(np.arange(0, 300, 2))
    assert idx.removes_in_place and idx.garbage == 0
    for hits in idx.search_batch(g[:10], 5):
        assert all(h.sample_id % 2 == 1 for h in hits)
    with pytest.raises(ValueError, match="IDMap over IVF"):
        GalleryIndex(D, "IDMap2,IVF8,Flat")


def test_small_searches_use_the_search_thread_setting_in_their_own_thread(monkeypatch):
    import threading

    import faiss

    from matcher import index as mi
    from matcher import set_search_threads

    seen = []
    real = faiss.omp_set_num_threads
    monkeypatch.setattr(mi.faiss, "omp_set_num_threads", lambda n: (seen.append(n), real(n)))
    x = np.eye(8, dtype=np.float32)
    idx = GalleryIndex(8, "IDMap2,Flat")
    idx.add(x, np.arange(8), np.arange(8))
    before = faiss.omp_get_max_threads()
    try:
        assert set_search_threads(1) == 1
        worker = threading.Thread(target=lambda: idx.search(x[0], 1))
        worker.start()
        worker.join()
        if before != 1:  # set for the search, then restored, in the worker thread
            assert seen == [1, before]
        seen.clear()
        idx.search_batch(np.repeat(x, 3, axis=0), 1)  # a batch keeps the default
        assert seen == []
        assert faiss.omp_get_max_threads() == before
    finally:
        set_search_threads(0)
