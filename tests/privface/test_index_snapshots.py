"""Encrypted index snapshots: the file format alone, then restarts of a real server that
load a snapshot and replay what other writers changed while it was down."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from matcher import GalleryIndex
from privface import index_snapshots as snaps
from privface.server import build_server
from storage.crypto import new_keyring
from tests.privface.conftest import ServiceHandle, service_settings, write_keys, write_tokens


def _index(n: int = 50, d: int = 16, seed: int = 0) -> tuple[GalleryIndex, np.ndarray]:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    idx = GalleryIndex(d, "IDMap2,Flat")
    # subject ids long enough that random ciphertext cannot contain one by chance (a 2-byte
    # "s1" turns up in a few KB of ciphertext about a third of the time)
    idx.add(x, np.arange(n) + 100, [f"subject-{i // 2:04d}" for i in range(n)], seq=7)
    return idx, x


def _write(tmp_path, ring, **payloads):
    return snaps.write_snapshot(tmp_path, ring, gallery="g/ä 1", gallery_id=3, cursor=42,
                                model_version="m1", payloads=payloads)


def test_round_trip_in_chunks_and_no_template_in_clear(tmp_path, monkeypatch):
    monkeypatch.setattr(snaps, "CHUNK", 1000)  # many chunks
    ring = new_keyring()
    idx, x = _index()
    path = _write(tmp_path, ring, **{"tmap-1": idx.dumps(), "tmap-2": b"second"})
    raw = path.read_bytes()
    body = raw.split(b"}", 1)[1]
    # the plaintext holds the template bytes and the subject ids (numpy stores them UTF-32)
    subject = "subject-0001".encode("utf-32-le")
    assert x[0].tobytes()[:12] in idx.dumps() and subject in idx.dumps()
    assert x[0].tobytes()[:12] not in raw and subject not in body
    assert b"subject-0001" not in body
    assert (path.stat().st_mode & 0o777) == 0o600
    snap = snaps.read_snapshot(tmp_path, ring, "g/ä 1")
    assert (snap.gallery_id, snap.cursor, snap.model_version) == (3, 42, "m1")
    assert snap.payloads["tmap-2"] == b"second"
    back = GalleryIndex.loads(snap.payloads["tmap-1"])
    assert back.seq == 7 and back.search_batch(x[:5], 3) == idx.search_batch(x[:5], 3)
    assert snaps.read_snapshot(tmp_path, ring, "another gallery") is None


@pytest.mark.parametrize("damage", ["flip", "truncate", "header", "drop_chunk", "other_key"])
def test_damaged_or_foreign_snapshots_are_refused(tmp_path, monkeypatch, damage):
    monkeypatch.setattr(snaps, "CHUNK", 1000)
    ring = new_keyring()
    path = _write(tmp_path, ring, **{"tmap-1": _index()[0].dumps()})
    raw = bytearray(path.read_bytes())
    header_end = raw.index(b"}") + 1
    if damage == "flip":
        raw[-100] ^= 1
    elif damage == "truncate":
        raw = raw[: len(raw) - 1030]  # whole last chunk gone: the new last one is not "last"
    elif damage == "header":
        raw = bytearray(bytes(raw).replace(b'"cursor": 42', b'"cursor": 43', 1))
    elif damage == "drop_chunk":
        first = header_end + 8 + int.from_bytes(raw[header_end : header_end + 8], "big")
        del raw[header_end:first]
    else:
        ring = new_keyring()  # same key id, another key
    path.write_bytes(bytes(raw))
    with pytest.raises(snaps.SnapshotError):
        snaps.read_snapshot(tmp_path, ring, "g/ä 1")


@pytest.fixture
def servers(tmp_path, new_database, service_model):
    """start(**settings) -> a server on one database and one data directory."""
    tokens = write_tokens(tmp_path / "tokens.json")
    write_keys(tmp_path / "keyring.json")
    started = []
    with new_database("snap") as url:

        def start(**extra) -> ServiceHandle:
            settings = service_settings(tmp_path, url, service_model, sync_interval=0,
                                        **extra)
            running = build_server(settings)
            started.append(running)
            return ServiceHandle(running, tokens, settings)

        yield start
        for running in started:
            running.stop(0)


def _answers(client, gallery, probes):
    return [[(c.subject_id, c.sample_id, round(c.score, 5))
             for c in client.identify(gallery, p, top_k=5).candidates] for p in probes]


def _stock(client, gallery, att_inputs, subjects, images) -> None:
    client.create_gallery(gallery)
    for s in subjects:
        client.enroll(gallery, f"s{s}", [att_inputs[(s, i)] for i in images])


def test_restart_loads_snapshot_and_replays_changes_made_meanwhile(servers, att_inputs, caplog):
    g = "snapshots"
    probes = [att_inputs[(s, 9)] for s in range(1, 8)]
    a = servers()
    with a.client("admin") as c:
        _stock(c, g, att_inputs, range(1, 7), (1, 2))
    a.running.stop(0)  # writes the snapshot
    files = list((Path(a.settings.data_dir) / "snapshots").glob("*.pfsnap"))
    assert len(files) == 1

    # Another writer (snapshots off) changes the gallery while the first server is down.
    b = servers(index_snapshots=False)
    with b.client("admin") as c:
        c.delete_subject(g, "s2")
        c.remove_samples(g, "s3", [c.get_subject(g, "s3").samples[0].sample_id])
        c.enroll(g, "s7", [att_inputs[(7, 1)]])
        want = _answers(c, g, probes)
    b.running.stop(0)
    assert files[0].exists()

    caplog.set_level(logging.INFO, logger="privface.gallery")
    a2 = servers()
    assert any("from the index snapshot" in r.getMessage() for r in caplog.records)
    with a2.client("admin") as c:
        got = _answers(c, g, probes)
        assert got == want
        assert all(sid != "s2" for cands in got for sid, _, _ in cands)
        assert got[6][0][0] == "s7"
    a2.running.stop(0)

    # A damaged snapshot is only a cache: the next start rebuilds from PostgreSQL.
    raw = bytearray(files[0].read_bytes())
    raw[-50] ^= 0xFF
    files[0].write_bytes(bytes(raw))
    caplog.clear()
    a3 = servers()
    assert any("snapshot not used" in r.getMessage() for r in caplog.records)
    with a3.client("admin") as c:
        assert _answers(c, g, probes) == want
        c.delete_gallery(g)
    assert not files[0].exists()


def test_a_snapshot_of_the_other_scoring_is_not_loaded(servers, service_model, att_inputs,
                                                       caplog):
    """score_centring changes what the index stores (two more coordinates per template), not
    the model version: a restart that switches it rebuilds from PostgreSQL, and both ways
    answer with their own scores."""
    from enrollment.model_io import load_model

    if load_model(service_model.path)[1]["cohort"] is None:
        pytest.skip("the model carries no score-centring cohort")
    g = "scoring-switch"
    probes = [att_inputs[(s, 9)] for s in range(1, 4)]
    a = servers()
    with a.client("admin") as c:
        _stock(c, g, att_inputs, range(1, 4), (1,))
        plain = _answers(c, g, probes)
    a.running.stop(0)  # writes the snapshot
    caplog.set_level(logging.INFO, logger="privface.gallery")
    b = servers(score_centring=True)
    assert any("snapshot is of an older gallery, model or scoring" in r.getMessage()
               for r in caplog.records)
    with b.client("admin") as c:
        centred = _answers(c, g, probes)
        verified = c.verify(g, "s1", probes[0]).score
    b.running.stop(0)
    assert centred[0][0][2] == pytest.approx(verified, abs=1e-5)
    # the same subjects, scored on another scale (centred: the cosine less the cohort means)
    for rc, rp in zip(centred, plain, strict=True):
        by_subject = {x[0]: x[2] for x in rp}
        assert all(abs(score - by_subject[sid]) > 0.05 for sid, _, score in rc)
    caplog.clear()
    a2 = servers()  # and back: the centred snapshot is not loaded either
    assert any("snapshot is of an older gallery, model or scoring" in r.getMessage()
               for r in caplog.records)
    with a2.client("admin") as c:
        assert _answers(c, g, probes) == plain


def test_service_calibrates_approximate_indexes(caplog):
    from privface.gallery_service import _calibrate

    rng = np.random.default_rng(3)
    x = rng.standard_normal((3000, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    idx = GalleryIndex(16, "IDMap2,HNSW32,Flat", ef_search=16)
    idx.add(x, np.arange(3000), np.arange(3000) // 3)
    assert idx.approximate
    caplog.set_level(logging.INFO, logger="privface.gallery")
    _calibrate("g", idx)
    assert idx.ef_search > 16
    assert any("ef_search" in r.getMessage() for r in caplog.records)
