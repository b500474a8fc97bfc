"""Subjects over their life, across restarts: erasure that holds, indexes rebuilt from
PostgreSQL, nothing personal in a database dump, key rotation and template-key renewal
while serving. Each test module server here has its own database, so restarts are real."""

from __future__ import annotations

import shutil
import subprocess
import time

import grpc
import numpy as np
import pytest
from sqlalchemy import create_engine, pool, text

from privface.client import ClientError
from privface.keys import add_template_key, rotate_encryption_key
from privface.server import build_server
from privface.v1 import gallery_pb2 as pb
from storage.crypto import load_keyring, save_keyring
from tests.privface.conftest import ServiceHandle, service_settings, write_keys, write_tokens

SECRET_NAME = "Zebulon Quixote-Marchetti"
SECRET_VALUE = "badge-7f3a9e1c"


@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory, new_database, service_model):
    """(start, settings, database url): start() builds a server on this module's database."""
    root = tmp_path_factory.mktemp("lifecycle")
    tokens = write_tokens(root / "tokens.json")
    write_keys(root / "keyring.json")
    with new_database("life") as url:
        settings = service_settings(root, url, service_model, sync_interval=0.5)
        servers: list = []

        def start() -> ServiceHandle:
            running = build_server(settings)
            servers.append(running)
            return ServiceHandle(running, tokens, settings)

        yield start, settings, url
        for running in servers:
            running.stop(0)


def _answers(client, gallery, probes):
    out = []
    for p in probes:
        r = client.identify(gallery, p, top_k=5)
        out.append((r.decision, [(c.subject_id, c.sample_id, round(c.score, 5))
                                 for c in r.candidates]))
    return out


def test_delete_restart_dump(lifecycle, att_inputs):
    start, settings, url = lifecycle
    service = start()
    g = "life"
    subjects = range(1, 9)
    with service.client("admin") as c:
        c.create_gallery(g, "lifecycle test")
        for s in subjects:
            c.enroll(g, f"s{s}", [att_inputs[(s, i)] for i in (1, 2, 3)],
                     display_name=SECRET_NAME if s == 3 else f"Person {s}",
                     metadata={"badge": SECRET_VALUE} if s == 3 else {})
        c.enroll(g, "solo", [att_inputs[(9, 1)]])
        # The exact enrolled inputs come back with their own subject on top, score ~1.
        r = c.identify(g, att_inputs[(3, 2)])
        assert r.candidates[0].subject_id == "s3" and r.candidates[0].score > 0.999
        assert r.decision == pb.MATCH

        probes = [att_inputs[(s, 8)] for s in subjects] + [att_inputs[(3, 1)]]
        before = _answers(c, g, probes)

        removed = c.delete_subject(g, "s3")
        assert len(removed) == 3
        after_delete = _answers(c, g, probes)
        for _, cands in after_delete:
            assert all(sid != "s3" for sid, _, _ in cands)
        with pytest.raises(ClientError) as info:
            c.verify(g, "s3", att_inputs[(3, 1)])
        assert info.value.code == grpc.StatusCode.NOT_FOUND
        # Whatever did not involve s3 answers exactly as before.
        for (_, c0), (_, c1) in zip(before, after_delete, strict=True):
            kept = [x for x in c0 if x[0] != "s3"]
            assert c1[: len(kept)] == kept

        # Samples: remove one of s1's, then add one back.
        s1 = c.get_subject(g, "s1")
        gone = s1.samples[0].sample_id
        assert c.remove_samples(g, "s1", [gone]) == [gone]
        hits = c.identify(g, att_inputs[(1, 1)], top_k=9).candidates
        assert all(h.sample_id != gone for h in hits)
        added = c.add_samples(g, "s1", [att_inputs[(1, 1)]])
        top = c.identify(g, att_inputs[(1, 1)]).candidates[0]
        assert (top.subject_id, top.sample_id) == ("s1", added.sample_ids[0])
        c.rename_subject(g, "s2", "Renamed Two")
        c.update_metadata(g, "s2", {"floor": "3"})
        final = _answers(c, g, probes)
        stats = c.gallery_stats(g)

    # Restart: a new server process state, indexes rebuilt from PostgreSQL.
    service.running.stop(0)
    service = start()
    with service.client("admin") as c:
        assert _answers(c, g, probes) == final
        assert c.gallery_stats(g).indexed_samples == stats.indexed_samples
        s2 = c.get_subject(g, "s2")
        assert (s2.display_name, dict(s2.metadata)) == ("Renamed Two", {"floor": "3"})
        ids = [s.subject_id for s in c.list_subjects(g, page_size=2)]
        assert ids == ["s1", "s2", "s4", "s5", "s6", "s7", "s8", "solo"]
        template = service.engine.template_of(g, att_inputs[(9, 1)])
        solo = c.get_subject(g, "solo")
        assert solo.samples[0].template_key_id == "tmap-1"

    # A dump of the database: no display name, metadata value or template in clear.
    dump = _dump(url)
    assert "solo" in dump and "Person 1" not in dump  # the dump is real; names are not there
    for secret in (SECRET_NAME, SECRET_VALUE, "Renamed Two", "floor"):
        assert secret not in dump
        assert secret.encode().hex() not in dump
    raw = np.asarray(template, "<f4").tobytes()
    assert raw[:16].hex() not in dump  # bytea is dumped as hex
    stored = _stored_template(url, solo.samples[0].sample_id)
    assert len(stored) > len(raw)  # ciphertext + nonce + tag, not the vector
    assert raw[:16] not in stored


def _dump(url: str) -> str:
    """pg_dump of the database if available, else every table as text through SQL."""
    from sqlalchemy.engine import make_url

    u = make_url(url)
    if shutil.which("pg_dump"):
        out = subprocess.run(
            ["pg_dump", "--data-only", "-h", u.host or "127.0.0.1", "-p", str(u.port or 5432),
             "-U", u.username or "postgres", u.database],
            capture_output=True, text=True, check=True,
        )
        return out.stdout
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"),
                           poolclass=pool.NullPool)
    parts = []
    with engine.connect() as conn:
        tables = conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname='public'"))
        for (table,) in tables.all():
            for row in conn.execute(text(f'SELECT t::text FROM "{table}" t')):
                parts.append(row[0])
    engine.dispose()
    return "\n".join(parts)


def _stored_template(url: str, sample_id: int) -> bytes:
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as conn:
        blob = conn.execute(text("SELECT template_ct FROM samples WHERE id = :i"),
                            {"i": sample_id}).scalar_one()
    engine.dispose()
    return bytes(blob)


def test_deleted_subject_hidden_while_index_removal_pends(lifecycle, att_inputs, monkeypatch):
    start, _, _ = lifecycle
    service = start()
    engine = service.engine
    g = "pending"
    with service.client("admin") as c:
        c.create_gallery(g)
        for s in (11, 12, 13):
            c.enroll(g, f"s{s}", [att_inputs[(s, 1)], att_inputs[(s, 2)]])
        assert c.identify(g, att_inputs[(12, 1)]).candidates[0].subject_id == "s12"
        # Hold back every index update, as if the removal were stuck behind other work.
        monkeypatch.setattr(engine, "sync", lambda gallery: None)
        engine.close()  # and the background catch-up
        removed = c.delete_subject(g, "s12")
        state = engine._states[g]
        assert all(any(sid in idx for idx in state.indexes.values()) for sid in removed)
        for probe in (att_inputs[(12, 1)], att_inputs[(12, 2)]):
            r = c.identify(g, probe, top_k=5)
            assert "s12" not in [x.subject_id for x in r.candidates]
            assert len(r.candidates) == 2
        monkeypatch.undo()
        engine.sync(g)
        assert not any(sid in idx for idx in state.indexes.values() for sid in removed)
        assert "s12" not in [x.subject_id for x in c.identify(g, att_inputs[(12, 1)]).candidates]


def test_key_rotation_and_template_key_renewal_while_serving(lifecycle, att_inputs):
    start, settings, url = lifecycle
    service = start()
    g = "renew"
    with service.client("admin") as c:
        c.create_gallery(g)
        c.enroll(g, "old", [att_inputs[(21, 1)]], display_name="Old Key Person")
        # Rotate the encryption key in the key file, re-encrypt everything, drop the old key.
        ring = load_keyring(settings.key_file)
        rotated = rotate_encryption_key(ring)
        save_keyring(rotated, settings.key_file, overwrite=True)
        time.sleep(1.2)  # the server re-reads a changed key file within a second
        from storage.database import make_engine, make_session_factory
        from storage.repository import rotate_keys

        db = make_engine(url)
        with make_session_factory(db)() as s:
            report = rotate_keys(s, rotated)
        db.dispose()
        assert set(report.key_usage) == {rotated.primary}
        save_keyring(rotated.remove_key(ring.primary), settings.key_file, overwrite=True)
        time.sleep(1.2)
        assert c.get_subject(g, "old").display_name == "Old Key Person"
        assert c.identify(g, att_inputs[(21, 1)]).candidates[0].subject_id == "old"

        # Renew the template key: new samples use tmap-2, tmap-1 samples stay searchable.
        save_keyring(add_template_key(load_keyring(settings.key_file)), settings.key_file,
                     overwrite=True)
        time.sleep(1.2)
        assert c.server_info().template_key_id == "tmap-2"
        c.enroll(g, "new", [att_inputs[(22, 1)]])
        assert c.get_subject(g, "new").samples[0].template_key_id == "tmap-2"
        for s, sid in ((21, "old"), (22, "new")):
            top = c.identify(g, att_inputs[(s, 1)]).candidates[0]
            assert top.subject_id == sid and top.score > 0.999
            assert c.verify(g, sid, att_inputs[(s, 1)]).score > 0.999
        versions = {v.template_key_id: v.sample_count for v in c.gallery_stats(g).template_versions}
        assert versions == {"tmap-1": 1, "tmap-2": 1}
