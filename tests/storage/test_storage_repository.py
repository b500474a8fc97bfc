"""Gallery / subject / sample operations against a real PostgreSQL."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from sqlalchemy import func, select, text

from storage import repository as repo
from storage.errors import (
    AlreadyExists,
    GalleryNotFound,
    IdempotencyConflict,
    InvalidArgument,
    SampleNotFound,
    SubjectNotFound,
    TemplateDimensionMismatch,
)
from storage.models import IdempotencyKey, Sample, SampleTombstone, Subject
from storage.records import SampleInput


def test_gallery_lifecycle_and_stats(session_factory, keyring, make_samples) -> None:
    with session_factory.begin() as s:
        info = repo.create_gallery(s, "lobby", "front door")
        assert (info.name, info.subject_count, info.sample_count) == ("lobby", 0, 0)
        repo.create_gallery(s, "annex")
    with session_factory.begin() as s, pytest.raises(AlreadyExists, match="lobby"):
        repo.create_gallery(s, "lobby")
    with session_factory.begin() as s:
        repo.enroll_subject(s, keyring, "lobby", "p1", make_samples(3))
        repo.enroll_subject(s, keyring, "lobby", "p2", make_samples(2))
    with session_factory() as s:
        listed = repo.list_galleries(s)
        assert [g.name for g in listed] == ["annex", "lobby"]
        lobby = repo.get_gallery(s, "lobby")
        assert (lobby.subject_count, lobby.sample_count, lobby.description) == (2, 5, "front door")
        with pytest.raises(GalleryNotFound):
            repo.get_gallery(s, "nope")
        with pytest.raises(InvalidArgument, match="gallery name"):
            repo.get_gallery(s, "bad name!")


def test_enroll_and_get_round_trip(session_factory, keyring, gallery, make_samples) -> None:
    samples = make_samples(3, dim=128)
    with session_factory.begin() as s:
        res = repo.enroll_subject(
            s,
            keyring,
            gallery,
            "emp-0001",
            samples,
            display_name="Zoë Ångström",
            metadata={"dept": "R&D", "badge": "4711"},
        )
    assert not res.replayed and len(res.sample_ids) == 3
    with session_factory() as s:
        subj = repo.get_subject(s, keyring, gallery, "emp-0001", include_templates=True)
        assert subj.display_name == "Zoë Ångström"
        assert subj.metadata == {"dept": "R&D", "badge": "4711"}
        assert subj.row_id == res.subject_row_id and subj.sample_count == 3
        assert [x.sample_id for x in subj.samples] == list(res.sample_ids)
        for stored, given in zip(subj.samples, samples, strict=True):
            assert stored.template.dtype == np.float32
            np.testing.assert_array_equal(stored.template, given.template)
            assert (
                stored.dim,
                stored.model_version,
                stored.profile_name,
                stored.profile_version,
                stored.template_key_id,
            ) == (128, "arcface-r50@1", "hfcf", "1", "gk1")
        bare = repo.get_subject(s, keyring, gallery, "emp-0001")
        assert all(x.template is None for x in bare.samples)
        with pytest.raises(SubjectNotFound, match="ghost"):
            repo.get_subject(s, keyring, gallery, "ghost")


def test_bad_input_is_rejected_and_nothing_is_stored(
    session_factory, keyring, gallery, make_samples
) -> None:
    good = make_samples(1)[0]

    def sample(template) -> SampleInput:
        return SampleInput(template, "m", "p", "1", "gk1")

    cases = [
        ([sample(np.array([1.0, np.nan], np.float32))], "NaN"),
        ([sample(np.array([1.0, np.inf]))], "NaN or infinity"),
        ([sample(np.ones((2, 4), np.float32))], "1-D"),
        ([sample(np.array([1, 2, 3]))], "floating point"),
        ([sample(np.zeros(8, np.float32))], "all zeros"),
        ([sample(np.array([1e39], np.float64))], "after float32 cast"),
        ([], "at least one sample"),
        ([good] * 1025, "limit is 1024"),
    ]
    for samples, message in cases:
        with session_factory.begin() as s, pytest.raises(InvalidArgument, match=message):
            repo.enroll_subject(s, keyring, gallery, "x", samples)
    bad_meta = [
        ({"k": 1}, "must be a string"),
        ({"": "v"}, "must not be empty"),
        ({f"k{i}": "v" for i in range(65)}, "limit is 64"),
    ]
    for meta, message in bad_meta:
        with session_factory.begin() as s, pytest.raises(InvalidArgument, match=message):
            repo.enroll_subject(s, keyring, gallery, "x", [good], metadata=meta)
    for subject_id in ["", " padded", "tab\tid", "x" * 257]:
        with session_factory.begin() as s, pytest.raises(InvalidArgument):
            repo.enroll_subject(s, keyring, gallery, subject_id, [good])
    with session_factory.begin() as s, pytest.raises(InvalidArgument, match="display_name"):
        repo.enroll_subject(s, keyring, gallery, "x", [good], display_name="n" * 1025)
    with session_factory.begin() as s, pytest.raises(GalleryNotFound):
        repo.enroll_subject(s, keyring, "no-such-gallery", "x", [good])
    with session_factory() as s:
        assert s.scalar(select(func.count()).select_from(Subject)) == 0


def test_duplicate_subject_and_dimension_mismatch(
    session_factory, keyring, gallery, make_samples
) -> None:
    with session_factory.begin() as s:
        repo.enroll_subject(s, keyring, gallery, "p1", make_samples(1, dim=64))
    with session_factory.begin() as s, pytest.raises(AlreadyExists, match="p1"):
        repo.enroll_subject(s, keyring, gallery, "p1", make_samples(1, dim=64))
    with session_factory.begin() as s, pytest.raises(TemplateDimensionMismatch, match="64"):
        repo.enroll_subject(s, keyring, gallery, "p2", make_samples(1, dim=32))
    with session_factory.begin() as s, pytest.raises(TemplateDimensionMismatch, match="64"):
        repo.add_samples(s, keyring, gallery, "p1", make_samples(1, dim=65))
    mixed = make_samples(1, dim=16, model_version="m2") + make_samples(
        1, dim=17, model_version="m2"
    )
    with session_factory.begin() as s, pytest.raises(TemplateDimensionMismatch, match="16"):
        repo.enroll_subject(s, keyring, gallery, "p3", mixed)
    # A different model version is a different template space: other dimensions are fine.
    with session_factory.begin() as s:
        repo.add_samples(s, keyring, gallery, "p1", make_samples(1, dim=32, model_version="m2"))


def test_add_and_remove_samples(session_factory, keyring, gallery, make_samples) -> None:
    with session_factory.begin() as s:
        first = repo.enroll_subject(s, keyring, gallery, "p1", make_samples(2))
        other = repo.enroll_subject(s, keyring, gallery, "p2", make_samples(1))
    with session_factory() as s:
        before = repo.get_subject(s, keyring, gallery, "p1").updated_at
    time.sleep(0.01)
    with session_factory.begin() as s:
        added = repo.add_samples(s, keyring, gallery, "p1", make_samples(2))
    assert added.subject_row_id == first.subject_row_id
    assert min(added.sample_ids) > max(first.sample_ids)
    with session_factory.begin() as s, pytest.raises(SubjectNotFound):
        repo.add_samples(s, keyring, gallery, "ghost", make_samples(1))

    # A sample of another subject, or an unknown id: refused, nothing removed.
    wrong = [first.sample_ids[0], other.sample_ids[0], 10**12]
    with session_factory.begin() as s, pytest.raises(SampleNotFound) as err:
        repo.remove_samples(s, gallery, "p1", wrong)
    assert err.value.sample_ids == sorted(wrong[1:])
    with session_factory.begin() as s, pytest.raises(InvalidArgument):
        repo.remove_samples(s, gallery, "p1", [])

    with session_factory.begin() as s:
        removed = repo.remove_samples(s, gallery, "p1", [first.sample_ids[0], added.sample_ids[1]])
    assert removed == sorted([first.sample_ids[0], added.sample_ids[1]])
    with session_factory() as s:
        subj = repo.get_subject(s, keyring, gallery, "p1")
        assert [x.sample_id for x in subj.samples] == [first.sample_ids[1], added.sample_ids[0]]
        assert subj.updated_at > before
        tombstoned = s.scalars(select(SampleTombstone.sample_id)).all()
        assert sorted(tombstoned) == removed


def test_rename_and_metadata_update(session_factory, keyring, gallery, make_samples) -> None:
    with session_factory.begin() as s:
        repo.enroll_subject(
            s, keyring, gallery, "p1", make_samples(1), display_name="Old", metadata={"a": "1"}
        )
        old_ct = s.scalar(select(Subject.display_name_ct))
    rotated = keyring.rotate()
    with session_factory.begin() as s:
        renamed = repo.rename_subject(s, rotated, gallery, "p1", "New Name")
        assert renamed.display_name == "New Name" and renamed.metadata == {"a": "1"}
        updated = repo.update_subject_metadata(s, rotated, gallery, "p1", {"b": "2"})
        assert updated.metadata == {"b": "2"} and updated.display_name == "New Name"
        with pytest.raises(SubjectNotFound):
            repo.rename_subject(s, rotated, gallery, "ghost", "x")
    with session_factory() as s:
        row = s.execute(select(Subject)).scalar_one()
        assert row.display_name_ct != old_ct
        assert (row.display_name_enc_key_id, row.metadata_enc_key_id) == ("k2", "k2")
        assert repo.get_subject(s, rotated, gallery, "p1").display_name == "New Name"


def test_delete_subject_cascades_and_leaves_tombstones(
    session_factory, keyring, gallery, make_samples
) -> None:
    samples = make_samples(3)
    with session_factory.begin() as s:
        gone = repo.enroll_subject(
            s, keyring, gallery, "gone", samples, idempotency_key="job-1:gone"
        )
        repo.enroll_subject(s, keyring, gallery, "kept", make_samples(1))
    with session_factory.begin() as s:
        deleted = repo.delete_subject(s, gallery, "gone")
    assert deleted == list(gone.sample_ids)
    with session_factory() as s:
        assert s.scalars(select(Subject.subject_id)).all() == ["kept"]
        assert s.scalar(select(func.count()).select_from(Sample)) == 1
        assert sorted(s.scalars(select(SampleTombstone.sample_id))) == deleted
        with pytest.raises(SubjectNotFound):
            repo.get_subject(s, keyring, gallery, "gone")
    # A batch job retrying the original request must not resurrect the erased person.
    with session_factory.begin() as s:
        retry = repo.enroll_subject(
            s, keyring, gallery, "gone", samples, idempotency_key="job-1:gone"
        )
    assert retry.replayed
    with session_factory() as s:
        assert s.scalars(select(Subject.subject_id)).all() == ["kept"]
    with session_factory.begin() as s, pytest.raises(SubjectNotFound):
        repo.delete_subject(s, gallery, "gone")


def test_delete_gallery_removes_everything(session_factory, keyring, make_samples) -> None:
    with session_factory.begin() as s:
        repo.create_gallery(s, "doomed")
        repo.create_gallery(s, "other")
        repo.enroll_subject(s, keyring, "doomed", "p1", make_samples(2), idempotency_key="k")
        repo.enroll_subject(s, keyring, "other", "p1", make_samples(1))
        repo.remove_samples(s, "doomed", "p1", [s.scalar(select(func.min(Sample.id)))])
    with session_factory.begin() as s:
        info = repo.delete_gallery(s, "doomed")
    assert (info.subject_count, info.sample_count) == (1, 1)
    with session_factory() as s:
        counts = {
            name: s.scalar(text(f"SELECT count(*) FROM {name}"))
            for name in ("subjects", "samples", "sample_tombstones", "idempotency_keys")
        }
        assert counts == {
            "subjects": 1,
            "samples": 1,
            "sample_tombstones": 0,
            "idempotency_keys": 0,
        }
        assert [g.name for g in repo.list_galleries(s)] == ["other"]
    with session_factory.begin() as s, pytest.raises(GalleryNotFound):
        repo.delete_gallery(s, "doomed")
    with session_factory.begin() as s:  # the name can be reused
        assert repo.create_gallery(s, "doomed").subject_count == 0


def test_idempotency_replay_and_conflict(session_factory, keyring, gallery, make_samples) -> None:
    samples = make_samples(2)
    with session_factory.begin() as s:
        first = repo.enroll_subject(
            s, keyring, gallery, "p1", samples, display_name="A", idempotency_key="batch-7/row-1"
        )
    with session_factory.begin() as s:
        again = repo.enroll_subject(
            s, keyring, gallery, "p1", samples, display_name="A", idempotency_key="batch-7/row-1"
        )
    assert again.replayed and (again.subject_row_id, again.sample_ids) == (
        first.subject_row_id,
        first.sample_ids,
    )
    with session_factory.begin() as s, pytest.raises(IdempotencyConflict) as err:
        repo.enroll_subject(
            s, keyring, gallery, "p1", samples, display_name="B", idempotency_key="batch-7/row-1"
        )
    assert err.value.grpc_code == "ALREADY_EXISTS"
    with session_factory.begin() as s, pytest.raises(IdempotencyConflict):
        repo.enroll_subject(
            s,
            keyring,
            gallery,
            "p1",
            make_samples(2),
            display_name="A",
            idempotency_key="batch-7/row-1",
        )
    # Same key on another operation conflicts too.
    with session_factory.begin() as s, pytest.raises(IdempotencyConflict):
        repo.add_samples(s, keyring, gallery, "p1", samples, idempotency_key="batch-7/row-1")

    # A caller-supplied digest (of the original request) is used as given.
    digest = "ab" * 32
    with session_factory.begin() as s:
        a = repo.add_samples(
            s,
            keyring,
            gallery,
            "p1",
            make_samples(1),
            idempotency_key="add-1",
            request_digest=digest,
        )
    with session_factory.begin() as s:
        b = repo.add_samples(
            s,
            keyring,
            gallery,
            "p1",
            make_samples(1),
            idempotency_key="add-1",
            request_digest=digest,
        )
    assert b.replayed and b.sample_ids == a.sample_ids
    with session_factory.begin() as s, pytest.raises(InvalidArgument, match="SHA-256"):
        repo.add_samples(
            s, keyring, gallery, "p1", samples, idempotency_key="x", request_digest="XYZ"
        )
    with session_factory() as s:
        assert s.scalar(select(func.count()).select_from(Sample)) == 3
        assert s.scalar(select(func.count()).select_from(IdempotencyKey)) == 2


def test_concurrent_retries_enroll_once(session_factory, keyring, gallery, make_samples) -> None:
    samples = make_samples(1)
    results, errors = [], []
    barrier = threading.Barrier(4)

    def worker() -> None:
        try:
            barrier.wait()
            with session_factory.begin() as s:
                results.append(
                    repo.enroll_subject(s, keyring, gallery, "p1", samples, idempotency_key="same")
                )
        except Exception as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(r.replayed for r in results) == [False, True, True, True]
    assert len({r.sample_ids for r in results}) == 1


def test_pagination_is_stable_and_tokens_are_checked(
    session_factory, keyring, gallery, make_samples
) -> None:
    with session_factory.begin() as s:
        for i in range(25):
            repo.enroll_subject(
                s, keyring, gallery, f"p{i:02d}", make_samples(1), display_name=f"Person {i}"
            )
        repo.create_gallery(s, "elsewhere")
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        with session_factory.begin() as s:
            page = repo.list_subjects(s, keyring, gallery, page_size=10, page_token=token)
            if pages == 1:  # concurrent changes do not shift later pages
                repo.delete_subject(s, gallery, "p00")
                repo.enroll_subject(s, keyring, gallery, "late", make_samples(1))
        pages += 1
        seen += [x.subject_id for x in page.subjects]
        assert all(x.sample_count == 1 for x in page.subjects)
        token = page.next_page_token
        if not token:
            break
    assert pages == 3
    assert seen == [f"p{i:02d}" for i in range(25)] + ["late"]
    with session_factory() as s:
        first = repo.list_subjects(s, keyring, gallery, page_size=3)
        assert [x.display_name for x in first.subjects] == ["Person 1", "Person 2", "Person 3"]
        for bad in ["garbage", "!!!", first.next_page_token[:-2] + "zz"]:
            with pytest.raises(InvalidArgument, match="page_token"):
                repo.list_subjects(s, keyring, gallery, page_token=bad)
        with pytest.raises(InvalidArgument, match="another gallery"):
            repo.list_subjects(s, keyring, "elsewhere", page_token=first.next_page_token)
        for size in (0, 1001):
            with pytest.raises(InvalidArgument, match="page_size"):
                repo.list_subjects(s, keyring, gallery, page_size=size)
        empty = repo.list_subjects(s, keyring, "elsewhere")
        assert empty.subjects == [] and empty.next_page_token == ""


def test_import_subjects_in_bulk(session_factory, keyring, gallery, make_samples) -> None:
    batch = [(f"imp-{i:03d}", make_samples(1 + i % 3, dim=64)) for i in range(40)]
    with session_factory.begin() as s:
        results = repo.import_subjects(s, keyring, gallery, batch)
    assert [r.subject_id for r in results] == [sid for sid, _ in batch]
    assert [len(r.sample_ids) for r in results] == [len(samples) for _, samples in batch]
    with session_factory() as s:
        info = repo.get_gallery(s, gallery)
        assert (info.subject_count, info.sample_count) == (40, sum(1 + i % 3 for i in range(40)))
        got = repo.get_subject(s, keyring, gallery, "imp-005")
        assert got.display_name == "" and got.metadata == {}
        stored = {
            r.sample_id: r.template
            for chunk in repo.iter_gallery_templates(s, keyring, gallery)
            for r in chunk
        }
    for (_, samples), res in zip(batch, results, strict=True):
        for sample, sample_id in zip(samples, res.sample_ids, strict=True):
            np.testing.assert_array_equal(stored[sample_id], sample.template)
    # all or nothing: one taken id refuses the whole batch, a repeat within it too
    with session_factory.begin() as s, pytest.raises(AlreadyExists, match="imp-007"):
        repo.import_subjects(s, keyring, gallery, [("new-1", make_samples(1, dim=64)),
                                                   ("imp-007", make_samples(1, dim=64))])
    with session_factory.begin() as s, pytest.raises(InvalidArgument, match="repeat"):
        repo.import_subjects(s, keyring, gallery, [("x", make_samples(1, dim=64))] * 2)
    with session_factory.begin() as s, pytest.raises(TemplateDimensionMismatch):
        repo.import_subjects(s, keyring, gallery, [("y", make_samples(1, dim=32))])
    with session_factory() as s:
        assert repo.get_gallery(s, gallery).subject_count == 40
