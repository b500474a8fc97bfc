"""Personal and biometric data is encrypted at rest, bound to its row, and rotatable online."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from sqlalchemy import make_url, select, text, update

from storage import repository as repo
from storage.crypto import KeyRing
from storage.errors import DecryptionFailed, UnknownKeyId
from storage.models import Sample, Subject

NAMES = ["Margarethe Quellenbach", "Þórunn Ýrsdóttir", "李小龍"]
META = {"department": "Cryptography Lab 7", "employee_no": "EMP-99183-XQ"}


def _enroll_people(session_factory, keyring, gallery, make_samples) -> list[np.ndarray]:
    templates = []
    with session_factory.begin() as s:
        for i, name in enumerate(NAMES):
            samples = make_samples(2, dim=96)
            templates += [x.template for x in samples]
            repo.enroll_subject(
                s, keyring, gallery, f"subj-{i}", samples, display_name=name, metadata=META
            )
    return templates


def _all_stored_values(session) -> list[tuple[str, str, bytes]]:
    """Every value of every bytea / text / varchar (incl. array) column, read raw via SQL."""
    cols = session.execute(
        text(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = 'public' AND (data_type IN ('bytea', 'text', 'character varying')"
            " OR (data_type = 'ARRAY' AND udt_name IN ('_varchar', '_text')))"
        )
    ).all()
    values = []
    for table, column in cols:
        for (value,) in session.execute(text(f'SELECT "{column}"::text FROM "{table}"')):
            if value is not None:
                values.append((table, column, value.encode()))
        for (value,) in session.execute(text(f'SELECT "{column}" FROM "{table}"')):
            if isinstance(value, bytes | memoryview):
                values.append((table, column, bytes(value)))
    return values


def _needles(templates: list[np.ndarray]) -> list[bytes]:
    needles = [n.encode() for n in NAMES] + [v.encode() for v in META.values()]
    for t in templates:
        raw = t.astype("<f4").tobytes()
        needles += [raw[:16], raw[-16:], raw[:16].hex().encode()]
    return needles


def test_no_plaintext_anywhere_in_the_database(
    session_factory, keyring, gallery, make_samples
) -> None:
    templates = _enroll_people(session_factory, keyring, gallery, make_samples)
    with session_factory() as s:
        values = _all_stored_values(s)
    assert {t for t, _, _ in values} >= {"subjects", "samples"}
    for needle in _needles(templates):
        leaks = [(t, c) for t, c, v in values if needle in v]
        assert leaks == [], f"plaintext {needle[:20]!r} found in {leaks}"


@pytest.mark.skipif(shutil.which("pg_dump") is None, reason="pg_dump not installed")
def test_pg_dump_contains_no_plaintext(
    session_factory, keyring, gallery, make_samples, database_url
) -> None:
    templates = _enroll_people(session_factory, keyring, gallery, make_samples)
    u = make_url(database_url)
    dump = subprocess.run(
        [
            "pg_dump",
            "--data-only",
            "-h",
            u.host,
            "-p",
            str(u.port or 5432),
            "-U",
            u.username,
            u.database,
        ],
        check=True,
        capture_output=True,
    ).stdout
    assert b"subj-0" in dump  # the dump really has the rows
    for needle in _needles(templates):
        assert needle not in dump


def test_ciphertext_moved_to_another_row_fails(
    session_factory, keyring, gallery, make_samples
) -> None:
    _enroll_people(session_factory, keyring, gallery, make_samples)
    with session_factory.begin() as s:
        a, b = s.execute(
            select(Subject.id, Subject.display_name_ct).order_by(Subject.id).limit(2)
        ).all()
        # An attacker with write access swaps A's encrypted name into B's row.
        s.execute(
            update(Subject).where(Subject.id == b.id).values(display_name_ct=a.display_name_ct)
        )
        # ...and copies a template between samples.
        t1, t2 = s.execute(select(Sample.id, Sample.template_ct).order_by(Sample.id).limit(2)).all()
        s.execute(update(Sample).where(Sample.id == t2.id).values(template_ct=t1.template_ct))
    with session_factory() as s:
        assert repo.get_subject(s, keyring, gallery, "subj-0").display_name == NAMES[0]
        with pytest.raises(DecryptionFailed, match=f"subjects:{b.id}:display_name"):
            repo.get_subject(s, keyring, gallery, "subj-1")
        with pytest.raises(DecryptionFailed, match=f"samples:{t2.id}:template"):
            repo.get_subject(s, keyring, gallery, "subj-0", include_templates=True)


def test_key_rotation_reencrypts_everything_online(
    session_factory, keyring, gallery, make_samples
) -> None:
    _enroll_people(session_factory, keyring, gallery, make_samples)
    with session_factory() as s:
        before = {x.subject_id: x for x in repo.list_subjects(s, keyring, gallery).subjects}
        old_templates = {
            t.sample_id: t.template
            for chunk in repo.iter_gallery_templates(s, keyring, gallery)
            for t in chunk
        }
    ring2 = keyring.rotate()  # k2 is now primary; k1 still decrypts
    with session_factory.begin() as s:  # new writes during the rollout use k2
        repo.enroll_subject(s, ring2, gallery, "new", make_samples(1, dim=96), display_name="N")
    with session_factory() as s:
        assert repo.key_usage(s) == {"k1": 3 * 2 + 6, "k2": 3}
        # Mixed keys: everything still readable while rotation has not run yet.
        assert repo.get_subject(s, ring2, gallery, "subj-0").display_name == NAMES[0]

    with session_factory() as s:
        report = repo.rotate_keys(s, ring2, batch_size=2)
    assert report.failures == []
    assert report.reencrypted == {
        "subjects.display_name": 3,
        "subjects.metadata": 3,
        "samples.template": 6,
    }
    assert report.key_usage == {"k2": 3 * 2 + 6 + 3}

    only_k2 = ring2.remove_key("k1")
    with session_factory() as s:
        after = {x.subject_id: x for x in repo.list_subjects(s, only_k2, gallery).subjects}
        for sid, subj in before.items():
            assert (after[sid].display_name, after[sid].metadata) == (
                subj.display_name,
                subj.metadata,
            )
            assert after[sid].updated_at == subj.updated_at  # rotation is not a user change
        for chunk in repo.iter_gallery_templates(s, only_k2, gallery):
            for t in chunk:
                if t.sample_id in old_templates:
                    np.testing.assert_array_equal(t.template, old_templates[t.sample_id])
        with pytest.raises(UnknownKeyId, match="'k2'"):
            repo.get_subject(s, KeyRing(primary="k1", keys=dict(keyring.keys)), gallery, "new")
    with session_factory() as s:  # re-running is a no-op
        assert sum(repo.rotate_keys(s, ring2).reencrypted.values()) == 0


def test_rotation_reports_undecryptable_rows_and_keeps_going(
    session_factory, keyring, gallery, make_samples
) -> None:
    _enroll_people(session_factory, keyring, gallery, make_samples)
    with session_factory.begin() as s:
        broken = s.scalar(select(Subject.id).order_by(Subject.id).limit(1))
        s.execute(
            update(Subject)
            .where(Subject.id == broken)
            .values(display_name_ct=b"\x01" + b"\x00" * 40)
        )
    ring2 = keyring.rotate()
    with session_factory() as s:
        report = repo.rotate_keys(s, ring2, batch_size=1)
    assert [(f.table, f.column, f.row_id) for f in report.failures] == [
        ("subjects", "display_name", broken)
    ]
    assert report.reencrypted["subjects.display_name"] == 2
    assert report.key_usage == {"k1": 1, "k2": 3 + 3 + 6 - 1}  # k1 must not be removed yet


def test_rotate_keys_refuses_to_commit_foreign_work(session_factory, keyring) -> None:
    with session_factory() as s:
        s.execute(text("SELECT 1"))
        with pytest.raises(RuntimeError, match="open transaction"):
            repo.rotate_keys(s, keyring)
