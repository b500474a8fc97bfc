"""Audit trail: who did what, which subjects came back; never biometric data."""

from __future__ import annotations

import pytest
from sqlalchemy import inspect

from storage import repository as repo
from storage.errors import InvalidArgument
from storage.models import AuditEntry


def test_append_and_list(session_factory, keyring, gallery, make_samples) -> None:
    with session_factory.begin() as s:
        repo.append_audit(
            s, principal="door-7", operation="Identify", gallery=gallery, subject_ids=["p1", "p2"]
        )
        repo.append_audit(
            s, principal="hr-batch", operation="Enroll", gallery=gallery, subject_ids=["p3"]
        )
        repo.append_audit(
            s,
            principal="door-7",
            operation="Identify",
            gallery="bad name!",
            status="INVALID_ARGUMENT",
        )
    with session_factory.begin() as s:  # the trail outlives the gallery
        repo.delete_gallery(s, gallery)
    with session_factory() as s:
        rows = repo.list_audit(s)
        assert [(r.principal, r.operation, r.status) for r in rows] == [
            ("door-7", "Identify", "INVALID_ARGUMENT"),
            ("hr-batch", "Enroll", "OK"),
            ("door-7", "Identify", "OK"),
        ]
        assert rows[2].subject_ids == ["p1", "p2"] and rows[2].gallery == gallery
        door = repo.list_audit(s, principal="door-7", gallery=gallery)
        assert [r.subject_ids for r in door] == [["p1", "p2"]]
        page2 = repo.list_audit(s, limit=2, before_id=rows[1].id)
        assert [r.id for r in page2] == [rows[2].id]
        assert repo.list_audit(s, since=rows[0].at, until=rows[0].at) == []
    with session_factory.begin() as s, pytest.raises(InvalidArgument):
        repo.append_audit(s, principal="", operation="Identify")


def test_audit_schema_cannot_hold_biometric_data() -> None:
    types = {c.name: type(c.type).__name__ for c in inspect(AuditEntry).columns}
    assert "LargeBinary" not in types.values()
    assert set(types) == {"id", "at", "principal", "operation", "gallery", "subject_ids", "status"}
