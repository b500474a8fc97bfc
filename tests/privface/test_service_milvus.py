"""The service on the Milvus backend (milvus-lite, a .db file): the same answers as FAISS,
erasure, restarts that reuse the collections and catch up from their stored cursor, gallery
deletion, and the start-up checks of the settings.

The servers are real (``build_server`` on a free port, a real PostgreSQL, gRPC calls); the
loaded model is shared between the restarts of this module only to save the loading time.
"""

from __future__ import annotations

import importlib.util
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from privface import server as server_module
from privface.config import Settings, check_index_backend, load_settings
from privface.gallery_service import milvus_collection_name, milvus_gallery_stem
from privface.server import build_server
from storage import repository as repo
from tests.privface.conftest import ServiceHandle, service_settings, write_keys, write_tokens

SUBJECTS = range(1, 8)
IMAGES = (1, 2, 9)  # 1, 2 enrolled; 9 the probe
PREFIX = "pftest"


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def faces(att_dir, service_model) -> dict[tuple[int, int], bytes]:
    """Protected inputs of a few AT&T images (the conftest's att_inputs aligns all 400)."""
    from enrollment.align import align_file
    from enrollment.model_io import load_model, profile_for
    from privface.client import protect_many

    keys = [(s, i) for s in SUBJECTS for i in IMAGES]
    crops = np.stack([align_file(att_dir / f"s{s}" / f"{i}.pgm", cnn_fallback=True).image
                      for s, i in keys])
    _, info = load_model(service_model.path)
    blobs = protect_many(crops, profile_for(info),
                         rngs=[np.random.default_rng([s, i, 7]) for s, i in keys])
    return dict(zip(keys, blobs, strict=True))


class Cluster:
    """One database, one Milvus file; ``start_milvus`` / ``restart_milvus`` / ``faiss``."""

    def __init__(self, root: Path, url: str, model) -> None:
        self.root, self.url, self.model = root, url, model
        self.tokens = write_tokens(root / "tokens.json")
        write_keys(root / "keyring.json")
        self.milvus_uri = str(root / "milvus" / "privface.db")
        self.started: list = []
        self.milvus: ServiceHandle | None = None
        self.faiss: ServiceHandle | None = None

    def _start(self, **extra) -> ServiceHandle:
        settings = service_settings(self.root, self.url, self.model, sync_interval=0,
                                    torch_threads=1, **extra)
        running = build_server(settings)
        self.started.append(running)
        return ServiceHandle(running, self.tokens, settings)

    def start_milvus(self) -> ServiceHandle:
        self.milvus = self._start(index_backend="milvus", milvus_uri=self.milvus_uri,
                                  milvus_collection_prefix=PREFIX, milvus_index_type="FLAT",
                                  snapshot_interval=0)
        return self.milvus

    def stop_milvus(self) -> None:
        """Stop the Milvus server and milvus-lite with it, as when the process exits."""
        from milvus_lite.server_manager import server_manager_instance

        self.milvus.running.stop(0)
        server_manager_instance.release_server(self.milvus_uri)

    def restart_milvus(self) -> ServiceHandle:
        self.stop_milvus()
        return self.start_milvus()

    def collections(self, gallery: str) -> list[str]:
        stem = milvus_gallery_stem(PREFIX, gallery)
        client = self.milvus.engine._milvus_client
        return sorted(c for c in client.list_collections() if c.startswith(stem))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, new_database, service_model):
    pytest.importorskip("pymilvus", reason="pymilvus not installed (pip install -e '.[milvus]')")
    pytest.importorskip("milvus_lite", reason="milvus-lite not installed")
    from milvus_lite.server_manager import server_manager_instance
    from pymilvus import MilvusClient

    probe = tmp_path_factory.mktemp("milvus-probe") / "probe.db"
    try:
        MilvusClient(str(probe)).list_collections()
    except Exception as exc:  # noqa: BLE001 - report why, do not fail the suite
        pytest.skip(f"milvus-lite cannot start here: {exc}")
    finally:
        server_manager_instance.release_server(str(probe))
    embedders: dict = {}

    def shared_embedder(path=None, **kw):  # one model load for every restart below
        key = (path, tuple(sorted(kw.items())))
        if key not in embedders:
            embedders[key] = real_embedder(path, **kw)
        return embedders[key]

    real_embedder = server_module.Embedder
    with pytest.MonkeyPatch.context() as mp, new_database("milvus") as url:
        mp.setattr(server_module, "Embedder", shared_embedder)
        c = Cluster(tmp_path_factory.mktemp("milvus-svc"), url, service_model)
        c.start_milvus()
        c.faiss = c._start(index_backend="faiss", index_snapshots=False)
        yield c
        for running in c.started:
            running.stop(0)
        server_manager_instance.release_server(c.milvus_uri)


def _answers(service: ServiceHandle, gallery: str, probes, top_k: int = 5):
    if service.engine.milvus is None:
        service.engine.sync(gallery)  # the FAISS server catches up with the Milvus one's writes
    with service.client("identify") as c:
        return [[(x.subject_id, x.sample_id, x.score)
                 for x in c.identify(gallery, p, top_k=top_k).candidates] for p in probes]


def _same(got, want) -> None:
    """Same subjects and samples in the same order; scores equal up to float rounding."""
    assert [[c[:2] for c in cands] for cands in got] == [[c[:2] for c in cands] for cands in want]
    np.testing.assert_allclose([c[2] for cands in got for c in cands],
                               [c[2] for cands in want for c in cands], atol=1e-5)


def _enroll(service: ServiceHandle, gallery: str, faces, subjects, images=(1, 2)) -> None:
    with service.client("admin") as c:
        for s in subjects:
            c.enroll(gallery, f"s{s}", [faces[(s, i)] for i in images])


def _probes(faces, subjects=SUBJECTS):
    return [faces[(s, 9)] for s in subjects]


def _ids(answers):
    return {sid for cands in answers for sid, _, _ in cands}


# ------------------------------------------------------------------------------- tests


def test_same_answers_as_faiss_and_deleted_subjects_never_returned(cluster, faces):
    m, f, g = cluster.milvus, cluster.faiss, "mv-same"
    with m.client("admin") as c:
        c.create_gallery(g)
    _enroll(m, g, faces, range(1, 7))
    probes = _probes(faces, range(1, 7)) + [faces[(2, 1)]]
    got = _answers(m, g, probes)
    _same(got, _answers(f, g, probes))
    # an enrolled input finds itself, with the best score any probe gets (1 with plain
    # cosines; with score centring 1 less its template's cohort mean)
    assert got[6][0][0] == "s2" and got[6][0][2] >= max(a[0][2] for a in got) - 1e-6
    with m.client("admin") as c:
        stats = c.gallery_stats(g)
        assert (stats.index_type, stats.indexed_samples) == ("milvus:FLAT", 12)
        v = c.verify(g, "s3", faces[(3, 9)])
    with f.client("admin") as c:
        assert c.verify(g, "s3", faces[(3, 9)]).score == pytest.approx(v.score, abs=1e-5)

    with m.client("admin") as c:
        assert len(c.delete_subject(g, "s2")) == 2
    after = _answers(m, g, probes, top_k=10)
    assert "s2" not in _ids(after) and len(after[0]) == 5  # every other subject still found
    _same(after, _answers(f, g, probes, top_k=10))
    index = m.engine._states[g].indexes["tmap-1"]
    assert len(index) == 10 and not any(
        r["subject"] == "s:s2" for r in index._scan(["subject"]))


def test_restart_reuses_collections_and_catches_up(cluster, faces, monkeypatch, caplog):
    g = "mv-restart"
    with cluster.milvus.client("admin") as c:
        c.create_gallery(g)
    _enroll(cluster.milvus, g, faces, range(1, 6))
    probes = _probes(faces)
    before = _answers(cluster.milvus, g, probes)
    _same(before, _answers(cluster.faiss, g, probes))
    collections = cluster.collections(g)
    assert len(collections) == 2  # templates + __state of (gallery id, model, tmap-1)
    cluster.stop_milvus()

    # Another writer changes the gallery while the Milvus server is down.
    with cluster.faiss.client("admin") as c:
        c.delete_subject(g, "s2")
        c.remove_samples(g, "s3", [c.get_subject(g, "s3").samples[0].sample_id])
        c.enroll(g, "s6", [faces[(6, 1)]])
    want = _answers(cluster.faiss, g, probes)
    assert [c[:2] for c in want[0]] != [c[:2] for c in before[0]]

    from matcher.milvus_backend import MilvusGalleryIndex

    added: list[tuple[str, int]] = []
    real_add = MilvusGalleryIndex.add

    def counting_add(self, x, sample_ids, subjects, **kw):
        added.append((self.collection, len(sample_ids)))
        return real_add(self, x, sample_ids, subjects, **kw)

    monkeypatch.setattr(MilvusGalleryIndex, "add", counting_add)
    caplog.set_level(logging.INFO, logger="privface.gallery")
    m = cluster.start_milvus()
    mine = (g, milvus_gallery_stem(PREFIX, g))
    messages = [msg for r in caplog.records if any(k in (msg := r.getMessage()) for k in mine)]
    assert any("Milvus collections reused" in msg for msg in messages), messages
    assert not any("templates indexed" in msg or "dropped" in msg for msg in messages), messages
    assert [n for name, n in added if name in collections] == [1]  # s6's sample, nothing else
    assert cluster.collections(g) == collections
    got = _answers(m, g, probes)
    _same(got, want)
    assert "s2" not in _ids(got) and got[5][0][0] == "s6"


def test_unusable_cursor_or_recreated_gallery_rebuilds(cluster, faces, caplog):
    stale, again = "mv-stale", "mv-again"
    with cluster.milvus.client("admin") as c:
        c.create_gallery(stale)
        c.create_gallery(again)
    _enroll(cluster.milvus, stale, faces, range(1, 4))
    _enroll(cluster.milvus, again, faces, range(1, 4))
    old_again = cluster.collections(again)
    cluster.stop_milvus()

    with cluster.faiss.client("admin") as c:
        c.delete_subject(stale, "s1")
        c.delete_gallery(again)
        c.create_gallery(again)
    _enroll(cluster.faiss, again, faces, [7])
    # Purged tombstones: the stored cursor no longer proves every removal is applied.
    sessions = cluster.faiss.engine._sessions
    with sessions.begin() as s:
        assert repo.purge_tombstones(s, datetime.now(UTC) + timedelta(hours=1)) >= 1
    want = _answers(cluster.faiss, stale, _probes(faces, range(1, 4)))

    caplog.set_level(logging.INFO, logger="privface.gallery")
    m = cluster.start_milvus()
    messages = [r.getMessage() for r in caplog.records]
    assert any(stale in msg and "rebuilding" in msg for msg in messages), messages
    _same(_answers(m, stale, _probes(faces, range(1, 4))), want)
    assert "s1" not in _ids(want)
    # The re-created gallery got new collections; the old incarnation's are gone.
    new_again = cluster.collections(again)
    assert len(new_again) == 2 and not set(new_again) & set(old_again)
    got = _answers(m, again, _probes(faces, [1, 7]))
    assert _ids(got) == {"s7"}


def test_deleting_a_gallery_drops_its_collections(cluster, faces):
    g, other = "mv-delete", "mv.delete"  # the two names sanitise alike
    m = cluster.milvus
    with m.client("admin") as c:
        c.create_gallery(g)
        c.create_gallery(other)
    _enroll(m, g, faces, [1])
    _enroll(m, other, faces, [2])
    assert len(cluster.collections(g)) == len(cluster.collections(other)) == 2
    assert not set(cluster.collections(g)) & set(cluster.collections(other))
    with m.client("admin") as c:
        c.delete_gallery(g)
    assert cluster.collections(g) == []
    assert len(cluster.collections(other)) == 2
    assert _ids(_answers(m, other, [faces[(2, 9)]])) == {"s2"}


def test_collection_names():
    a = milvus_collection_name("privface", "doors.a", 7, "m@1", "tmap-1")
    assert a == milvus_collection_name("privface", "doors.a", 7, "m@1", "tmap-1")
    assert a.startswith(milvus_gallery_stem("privface", "doors.a"))
    others = {
        milvus_collection_name("privface", "doors-a", 7, "m@1", "tmap-1"),  # sanitises alike
        milvus_collection_name("privface", "doors.a", 8, "m@1", "tmap-1"),  # re-created
        milvus_collection_name("privface", "doors.a", 7, "m@2", "tmap-1"),  # another model
        milvus_collection_name("privface", "doors.a", 7, "m@1", "tmap-2"),  # another key
    }
    assert len(others) == 4 and a not in others
    longest = milvus_collection_name("p" * 64, "x" * 200, 2**63 - 1, "m" * 300, "tmap-" + "9" * 40)
    for name in (a, *others, longest):
        assert len(name + "__state") <= 255
        assert name[0].isalpha() and name.replace("_", "").isalnum() and name.isascii()


def test_settings_are_checked_at_start(tmp_path, service_model, monkeypatch):
    def refused(**values) -> str:
        with pytest.raises(ValueError) as info:
            check_index_backend(Settings(**values))
        return str(info.value)

    assert "'faiss'" in refused(index_backend="pgvector")
    assert "PRIVFACE_MILVUS_URI" in refused(index_backend="milvus")
    assert ".db" in refused(index_backend="milvus", milvus_uri="milvus:19530")
    assert "letters" in refused(index_backend="milvus", milvus_uri="x.db",
                                milvus_collection_prefix="1-bad")
    assert "JSON object" in refused(index_backend="milvus", milvus_uri="x.db",
                                    milvus_search_params="ef=64")
    check_index_backend(Settings())
    if importlib.util.find_spec("pymilvus"):  # else the check asks to install it
        check_index_backend(Settings(index_backend="milvus", milvus_uri="http://milvus:19530"))
    # The server refuses before it starts anything (no model, no database touched).
    settings = service_settings(tmp_path, "postgresql+psycopg://nobody@127.0.0.1:1/none",
                                service_model, index_backend="milvus")
    with pytest.raises(ValueError, match="milvus_uri"):
        build_server(settings)
    # From a file and the environment (JSON objects for the parameter tables).
    path = tmp_path / "privface.toml"
    path.write_text('index_backend = "milvus"\nmilvus_uri = "/srv/pf/milvus.db"\n'
                    '[milvus_index_params]\nM = 16\n')
    s = load_settings(path, env={"PRIVFACE_MILVUS_SEARCH_PARAMS": '{"ef": 64}',
                                 "PRIVFACE_MILVUS_TOKEN": "u:p"})
    assert (s.index_backend, s.milvus_uri, s.milvus_token) == ("milvus", "/srv/pf/milvus.db",
                                                               "u:p")
    assert (s.milvus_index_params, s.milvus_search_params) == ({"M": 16}, {"ef": 64})
    with pytest.raises(ValueError, match="JSON object"):
        load_settings(env={"PRIVFACE_MILVUS_INDEX_PARAMS": "[1]"})
