"""Full scans and the change feed that keeps an index persisted on disk in sync."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from storage import repository as repo
from storage.errors import InvalidArgument, StaleCursor


class FakeIndex:
    """What the matcher keeps: sample id -> (subject id, template), plus a cursor."""

    def __init__(self) -> None:
        self.items: dict[int, tuple[str, np.ndarray]] = {}
        self.cursor = 0
        self.gallery_id: int | None = None

    def rebuild(self, session, keyring, gallery: str, chunk_size: int = 3) -> None:
        self.items.clear()
        self.cursor = repo.change_watermark(session, gallery)
        for chunk in repo.iter_gallery_templates(session, keyring, gallery, chunk_size=chunk_size):
            assert len(chunk) <= chunk_size
            for t in chunk:
                self.items[t.sample_id] = (t.subject_id, t.template)

    def catch_up(self, session, keyring, gallery: str, limit: int = 10_000) -> int:
        calls = 0
        while True:
            changes = repo.templates_changed_since(
                session, keyring, gallery, self.cursor, limit=limit
            )
            calls += 1
            assert changes.cursor_before == self.cursor and changes.cursor >= self.cursor
            if self.gallery_id is None:
                self.gallery_id = changes.gallery_id
            assert changes.gallery_id == self.gallery_id
            for t in changes.upserts:
                self.items[t.sample_id] = (t.subject_id, t.template)
            for sid in changes.deleted_sample_ids:
                self.items.pop(sid, None)
            self.cursor = changes.cursor
            if not changes.has_more:
                return calls


def _truth(session, keyring, gallery) -> dict[int, str]:
    return {
        t.sample_id: t.subject_id
        for chunk in repo.iter_gallery_templates(session, keyring, gallery)
        for t in chunk
    }


def test_iterate_templates_in_chunks(session_factory, keyring, gallery, make_samples) -> None:
    given = {}
    with session_factory.begin() as s:
        for i in range(4):
            samples = make_samples(2, dim=32)
            res = repo.enroll_subject(s, keyring, gallery, f"p{i}", samples)
            given.update(zip(res.sample_ids, (x.template for x in samples), strict=True))
        repo.add_samples(s, keyring, gallery, "p0", make_samples(1, dim=16, model_version="m2"))
    with session_factory() as s:
        chunks = list(repo.iter_gallery_templates(s, keyring, gallery, chunk_size=3))
        assert [len(c) for c in chunks] == [3, 3, 3]
        records = [t for c in chunks for t in c]
        assert [t.sample_id for t in records] == sorted(t.sample_id for t in records)
        for t in records[:-1]:
            np.testing.assert_array_equal(t.template, given[t.sample_id])
        only_m2 = [
            t
            for c in repo.iter_gallery_templates(s, keyring, gallery, model_version="m2")
            for t in c
        ]
        assert [(t.subject_id, t.template.shape) for t in only_m2] == [("p0", (16,))]
        with pytest.raises(InvalidArgument):
            next(repo.iter_gallery_templates(s, keyring, gallery, chunk_size=0))


def test_index_catches_up_with_adds_and_deletes(
    session_factory, keyring, gallery, make_samples
) -> None:
    with session_factory.begin() as s:
        for i in range(3):
            repo.enroll_subject(s, keyring, gallery, f"p{i}", make_samples(2))
    index = FakeIndex()
    with session_factory() as s:
        index.rebuild(s, keyring, gallery)
        assert repo.templates_changed_since(s, keyring, gallery, index.cursor).upserts == []

    with session_factory.begin() as s:  # changes while the index is "offline"
        repo.enroll_subject(s, keyring, gallery, "p3", make_samples(3))
        repo.delete_subject(s, gallery, "p0")
        repo.add_samples(s, keyring, gallery, "p1", make_samples(1))
        victim = repo.get_subject(s, keyring, gallery, "p2").samples[0].sample_id
        repo.remove_samples(s, gallery, "p2", [victim])

    with session_factory() as s:
        calls = index.catch_up(s, keyring, gallery, limit=2)
        assert calls > 1  # paged
        assert {k: v[0] for k, v in index.items.items()} == _truth(s, keyring, gallery)
        assert "p0" not in {v[0] for v in index.items.values()}
        assert victim not in index.items
        # Nothing new: the cursor stays put.
        again = repo.templates_changed_since(s, keyring, gallery, index.cursor)
        assert (again.upserts, again.deleted_sample_ids, again.cursor) == ([], [], index.cursor)

    # An empty index can start from cursor 0.
    fresh = FakeIndex()
    with session_factory() as s:
        fresh.catch_up(s, keyring, gallery, limit=3)
        assert {k: v[0] for k, v in fresh.items.items()} == _truth(s, keyring, gallery)


def test_rebuild_racing_with_writes_misses_nothing(
    session_factory, keyring, gallery, make_samples
) -> None:
    with session_factory.begin() as s:
        for i in range(5):
            repo.enroll_subject(s, keyring, gallery, f"p{i}", make_samples(1))
    index = FakeIndex()
    with session_factory() as s, session_factory() as writer:
        index.cursor = repo.change_watermark(s, gallery)
        scan = repo.iter_gallery_templates(s, keyring, gallery, chunk_size=2)
        for chunk_no, chunk in enumerate(scan):
            for t in chunk:
                index.items[t.sample_id] = (t.subject_id, t.template)
            if chunk_no == 0:  # writes land in the middle of the scan
                with writer.begin():
                    repo.delete_subject(writer, gallery, "p0")
                    repo.delete_subject(writer, gallery, "p4")
                    repo.enroll_subject(writer, keyring, gallery, "p5", make_samples(2))
        index.catch_up(s, keyring, gallery)
        assert {k: v[0] for k, v in index.items.items()} == _truth(s, keyring, gallery)


def test_stale_cursors_force_a_rebuild(session_factory, keyring, gallery, make_samples) -> None:
    with session_factory.begin() as s:
        repo.enroll_subject(s, keyring, gallery, "p0", make_samples(2))
        repo.enroll_subject(s, keyring, gallery, "p1", make_samples(1))
    index = FakeIndex()
    with session_factory() as s:
        index.rebuild(s, keyring, gallery)
        old_cursor = index.cursor
        with pytest.raises(StaleCursor, match="restored from a backup"):
            repo.templates_changed_since(s, keyring, gallery, old_cursor + 1000)
        with pytest.raises(InvalidArgument):
            repo.templates_changed_since(s, keyring, gallery, -1)

    with session_factory.begin() as s:
        repo.delete_subject(s, gallery, "p0")
    with session_factory.begin() as s:
        assert repo.purge_tombstones(s, dt.datetime.now(dt.UTC) - dt.timedelta(days=1)) == 0
        assert repo.purge_tombstones(s, dt.datetime.now(dt.UTC) + dt.timedelta(seconds=5)) == 2
    with session_factory() as s:
        with pytest.raises(StaleCursor, match="purged tombstones"):
            repo.templates_changed_since(s, keyring, gallery, old_cursor)
        index.rebuild(s, keyring, gallery)  # a rebuilt index is fine again
        assert repo.templates_changed_since(s, keyring, gallery, index.cursor).has_more is False
        assert {k: v[0] for k, v in index.items.items()} == _truth(s, keyring, gallery)

    # Same gallery name, new gallery: the old index must not be replayed onto it.
    with session_factory.begin() as s:
        repo.delete_gallery(s, gallery)
        repo.create_gallery(s, gallery)
        repo.enroll_subject(s, keyring, gallery, "q0", make_samples(1))
    with session_factory() as s:
        with pytest.raises(StaleCursor, match="earlier gallery"):
            repo.templates_changed_since(s, keyring, gallery, index.cursor)
        assert len(repo.templates_changed_since(s, keyring, gallery, 0).upserts) == 1


def test_template_versions_track_model_upgrades(
    session_factory, keyring, gallery, make_samples
) -> None:
    with session_factory.begin() as s:
        repo.enroll_subject(s, keyring, gallery, "p0", make_samples(2, model_version="m1"))
        repo.add_samples(s, keyring, gallery, "p0", make_samples(1, dim=32, model_version="m2"))
        assert repo.template_versions(s, gallery) == {
            ("m1", "hfcf", "1", "gk1"): 2,
            ("m2", "hfcf", "1", "gk1"): 1,
        }
    with session_factory.begin() as s, pytest.raises(InvalidArgument, match="timezone"):
        repo.purge_tombstones(s, dt.datetime.now())
