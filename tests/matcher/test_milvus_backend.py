"""The Milvus backend keeps GalleryIndex's contract; run against milvus-lite (embedded)."""

import itertools
import threading

import faiss
import numpy as np
import pytest

pytest.importorskip("pymilvus", reason="pymilvus not installed (pip install -e '.[milvus]')")
pytest.importorskip("milvus_lite", reason="milvus-lite not installed (pip install -e '.[milvus]')")

from matcher.index import GalleryIndex, Hit  # noqa: E402
from matcher.milvus_backend import (  # noqa: E402
    MILVUS_MAX_TOPK,
    MilvusGalleryIndex,
    decode_subject,
    encode_subject,
)

D = 16
EXACT = {"index_type": "FLAT", "params": {}}
_names = itertools.count()


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    faiss.omp_set_num_threads(1)  # milvus-lite runs FAISS in this process
    from pymilvus import MilvusClient

    path = tmp_path_factory.mktemp("milvus") / "gallery.db"
    try:
        c = MilvusClient(str(path))
        c.list_collections()
    except Exception as e:  # noqa: BLE001 - report why, do not fail the suite
        pytest.skip(f"milvus-lite cannot start here: {e}")
    yield c
    c.close()


def gallery(client, index=EXACT, **kw):
    return MilvusGalleryIndex(D, f"g{next(_names)}", client=client, index=index, **kw)


def unit(n, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, D))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def ranked(hits):
    return [(h.subject, h.sample_id) for h in hits]


@pytest.fixture(scope="module")
def data():
    g = unit(200)
    return g, np.arange(200) + 1, [f"p{i // 4}" if i % 2 else i // 4 for i in range(200)]


def test_subject_keys_round_trip():
    for key in (0, -3, 12, "alice", "i:7", "", "ünï"):
        assert decode_subject(encode_subject(key)) == key
    with pytest.raises(TypeError):
        encode_subject(True)


@pytest.mark.parametrize("group_by", [None, False])
def test_same_results_as_the_faiss_gallery(client, data, group_by):
    g, ids, subjects = data
    m = gallery(client, group_by=group_by)
    ref = GalleryIndex(D, "IDMap2,Flat")
    assert m.add(g, ids, subjects) == ref.add(g, ids, subjects) == 200
    assert len(m) == 200 and m.n_subjects == ref.n_subjects
    np.testing.assert_array_equal(m.sample_ids(), ref.sample_ids())
    queries = unit(12, seed=1)
    results = m.search_batch(queries, 7)
    assert m._group_by is (group_by is None)  # milvus-lite groups on the server
    for got, want in zip(results, ref.search_batch(queries, 7), strict=True):
        assert ranked(got) == ranked(want)
        np.testing.assert_allclose([h.score for h in got], [h.score for h in want], atol=1e-5)
    mi, ms = m.search_samples(queries, 9)
    ri, rs = ref.search_samples(queries, 9)
    np.testing.assert_array_equal(mi, ri)
    np.testing.assert_allclose(ms, rs, atol=1e-5)
    assert m.search(g[5], 3, min_score=0.999) == [Hit(subjects[5], pytest.approx(1.0), 6)]
    assert m.search(-g[5], 3, min_score=0.999) == []
    assert len(m.search(g[0], 1000)) == ref.n_subjects  # every subject once


def test_removals_are_never_returned_and_cascade(client, data):
    g, ids, subjects = data
    m = gallery(client)
    m.add(g, ids, subjects, seq=1)
    gone = ids[::3]
    assert m.remove(np.concatenate([gone, [10_000]]), seq=2) == len(gone)
    assert m.remove(gone) == 0
    for hits in m.search_batch(g[::3], 10):
        assert not {h.sample_id for h in hits} & set(gone.tolist())
    got, _ = m.search_samples(g[::3], 20)
    assert not np.isin(got, gone).any()
    assert gone[0] not in m and ids[1] in m
    victim = subjects[1]
    n = sum(1 for s, i in zip(subjects, ids, strict=True) if s == victim and i not in gone)
    assert m.remove_subject(victim, seq=3) == n and m.remove_subject("nobody") == 0
    assert all(h.subject != victim for h in m.search(g[1], 50))
    assert m.seq == 3
    m.compact()  # asks Milvus to purge deleted rows; results unchanged
    assert len(m) == 200 - len(gone) - n


def test_late_add_cannot_resurrect_a_removal(client, data):
    g, ids, subjects = data
    m = gallery(client)
    m.remove([7], seq=5)
    assert m.add(g[:1], [7], "a", seq=4) == 0 and 7 not in m
    assert m.add(g[:1], [7], "a", seq=6) == 1 and 7 in m


def test_late_add_racing_a_removal_on_another_replica(client, data, monkeypatch):
    g, ids, subjects = data
    a = gallery(client)
    b = MilvusGalleryIndex(D, a.collection, client=client)  # a second replica
    original = a._not_tombstoned
    calls = []

    def check_then_lose_the_race(sample_ids, seq):
        keep = original(sample_ids, seq)
        if not calls:  # between A's check and A's write, B deletes the sample
            b.remove([42], seq=9)
        calls.append(seq)
        return keep

    monkeypatch.setattr(a, "_not_tombstoned", check_then_lose_the_race)
    assert a.add(g[:2], [41, 42], "x", seq=8) == 1
    assert 42 not in a and 41 in b
    assert len(calls) == 2  # checked before and after the write


def test_save_load_replay(client, data, tmp_path):
    g, ids, subjects = data
    m = gallery(client)
    m.add(g[:150], ids[:150], subjects[:150], seq=1)
    m.remove(ids[:20], seq=2)
    assert m.save(tmp_path) == tmp_path
    back = MilvusGalleryIndex.load(tmp_path, client=client)
    assert back.seq == 2 and len(back) == 130 and back.collection == m.collection
    back.replay(5, added=(g[150:], ids[150:], subjects[150:]), removed=ids[20:40])
    back.replay(5, added=(g[150:], ids[150:], subjects[150:]), removed=ids[:40])  # repeat
    np.testing.assert_array_equal(back.sample_ids(), ids[40:])
    back.save()
    assert MilvusGalleryIndex(D, m.collection, client=client).seq == 5
    assert back.add(g[:1], ids[:1], "late", seq=2) == 0  # tombstones live in Milvus
    back.drop()
    assert not client.has_collection(m.collection)


def test_graph_index_and_dimension_guard(client, data):
    g, ids, subjects = data
    m = gallery(
        client,
        index={"index_type": "HNSW", "params": {"M": 16, "efConstruction": 64}},
        search_params={"ef": 64},
    )
    m.add(g, ids, subjects)
    assert m.factory == "milvus:HNSW" and not m.on_gpu and m.removes_in_place
    assert [h.sample_id for h in m.search_batch(g[:20], 1) for h in h] == ids[:20].tolist()
    with pytest.raises(ValueError, match="dimension"):
        MilvusGalleryIndex(D + 1, m.collection, client=client)


def test_bad_input_is_rejected_without_harm(client, data):
    g, ids, subjects = data
    m = gallery(client)
    m.add(g[:3], [1, 2, 3], "a")
    with pytest.raises(ValueError, match="dimension"):
        m.add(np.ones((1, D + 1)), [4], "a")
    with pytest.raises(ValueError, match="NaN"):
        m.add(np.full((1, D), np.nan), [4], "a")
    with pytest.raises(ValueError, match="duplicate"):
        m.add(g[:2], [5, 5], "a")
    with pytest.raises(ValueError, match="characters"):
        m.add(g[:1], [5], "x" * 2000)
    with pytest.raises(ValueError):
        m.search(g[0], 0)
    with pytest.raises(ValueError):
        m.search_samples(g[0], 0)
    assert len(m) == 3 and MILVUS_MAX_TOPK == 16384
    assert m.search_samples(g[0], 5)[0][0].tolist() == [1, 2, 3, -1, -1]


def test_concurrent_writes_and_searches(client):
    m = gallery(client)
    m.add(unit(100, seed=9), np.arange(100), [i % 20 for i in range(100)])
    removed: set[int] = set()
    guard = threading.Lock()
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer():
        try:
            nxt = 100
            for step in range(8):
                m.add(unit(5, seed=50 + step), np.arange(nxt, nxt + 5), [nxt % 20] * 5)
                victims = np.arange(nxt - 10, nxt - 7)
                m.remove(victims)
                with guard:
                    removed.update(victims.tolist())
                nxt += 5
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            stop.set()

    def reader():
        try:
            queries = unit(3, seed=7)
            while not stop.is_set():
                with guard:
                    before = set(removed)
                for hits in m.search_batch(queries, 5):
                    assert not {h.sample_id for h in hits} & before
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    threads.append(threading.Thread(target=writer))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert len(m) == 100 + 40 - 24
