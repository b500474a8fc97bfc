"""Migrations produce exactly the ORM schema, and run safely from several processes."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, pool

from storage import migrate
from storage.models import Base

REPO_ROOT = Path(__file__).resolve().parents[2]


def _diffs(url: str) -> list:
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(
                conn, opts={"compare_type": True, "compare_server_default": True}
            )
            return compare_metadata(ctx, Base.metadata)
    finally:
        engine.dispose()


def _tables(url: str) -> set[str]:
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_migrated_schema_equals_orm_and_downgrade_is_clean(new_database) -> None:
    with new_database("migrate") as url:
        assert migrate.current_revision(url) is None
        assert not migrate.is_up_to_date(url)
        migrate.upgrade(url)
        assert migrate.current_revision(url) == migrate.head_revision()
        assert migrate.is_up_to_date(url)
        assert _diffs(url) == []
        migrate.upgrade(url)  # idempotent

        migrate.downgrade(url, "base")
        assert _tables(url) == {"alembic_version"}
        migrate.upgrade(url)
        assert _diffs(url) == []


def _schema_dump(url: str) -> str:
    from sqlalchemy import make_url

    u = make_url(url)
    out = subprocess.run(
        [
            "pg_dump",
            "--schema-only",
            "--no-owner",
            "--no-privileges",
            "--exclude-table=alembic_version",
            "-h",
            u.host or "",
            "-p",
            str(u.port or 5432),
            "-U",
            u.username or "postgres",
            u.database or "",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return "\n".join(
        line
        for line in out.splitlines()
        if line.strip() and not line.startswith(("--", "SET ", "SELECT ", "\\"))
    )


@pytest.mark.skipif(shutil.which("pg_dump") is None, reason="pg_dump not installed")
def test_migration_matches_create_all_exactly_in_pg_dump(new_database) -> None:
    """Stronger than compare_metadata: also check constraints, sequences and identities."""
    with new_database("mig") as migrated, new_database("orm") as created:
        migrate.upgrade(migrated)
        engine = create_engine(created, poolclass=pool.NullPool)
        Base.metadata.create_all(engine)
        engine.dispose()
        try:
            a, b = _schema_dump(migrated), _schema_dump(created)
        except subprocess.CalledProcessError as exc:  # e.g. client older than the server
            pytest.skip(f"pg_dump failed: {exc.stderr.strip()}")
        assert a == b


def test_concurrent_upgrades_migrate_once(new_database) -> None:
    """Replicas starting together: the advisory lock makes one migrate, the others wait."""
    with new_database("race") as url:
        code = "import sys; from storage import migrate; migrate.upgrade(sys.argv[1])"
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code, url], cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True
            )
            for _ in range(3)
        ]
        failures = [p.stderr.read() for p in procs if p.wait(timeout=60) != 0]
        assert failures == []
        assert migrate.current_revision(url) == migrate.head_revision()
        assert _diffs(url) == []

        # Threads of one process are serialised too (Alembic's context is process-global).
        errors: list[BaseException] = []

        def run() -> None:
            try:
                migrate.upgrade(url)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=run) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
