"""Run the Alembic migrations shipped inside the package, without an alembic.ini on disk.

Call :func:`upgrade` at service start (it is idempotent and safe with several replicas: the
migration holds a PostgreSQL advisory lock), or from an operator command before a rollout.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import URL, Connection, Engine, create_engine, pool

from storage.database import normalize_url

__all__ = [
    "MIGRATIONS_DIR",
    "alembic_config",
    "current_revision",
    "downgrade",
    "head_revision",
    "is_up_to_date",
    "upgrade",
]

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

Database = str | URL | Engine | Connection

# Alembic keeps the running migration context in module globals, so two migrations in one
# process must not overlap; across processes the advisory lock in env.py serialises them.
_process_lock = threading.Lock()


def alembic_config(connection: Connection | None = None, url: str | URL | None = None) -> Config:
    """An in-memory Alembic config pointing at ``storage/migrations``."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("path_separator", "os")
    if connection is not None:
        cfg.attributes["connection"] = connection
    if url is not None:
        cfg.attributes["database_url"] = normalize_url(url)
    return cfg


@contextmanager
def _connection(database: Database) -> Iterator[Connection]:
    """Yield a connection; one we open ourselves is committed on success.

    A caller's own connection is used as is: its transaction stays the caller's to end.
    """
    if isinstance(database, Connection):
        yield database
        return
    engine = (
        database
        if isinstance(database, Engine)
        else create_engine(normalize_url(database), poolclass=pool.NullPool)
    )
    try:
        with engine.connect() as conn:
            yield conn
            if conn.in_transaction():
                conn.commit()
    finally:
        if engine is not database:
            engine.dispose()


def upgrade(database: Database, revision: str = "head") -> None:
    """Migrate ``database`` (URL, engine or connection) up to ``revision``."""
    with _process_lock, _connection(database) as conn:
        command.upgrade(alembic_config(conn), revision)


def downgrade(database: Database, revision: str) -> None:
    """Migrate down to ``revision`` (``"base"`` drops every privface table)."""
    with _process_lock, _connection(database) as conn:
        command.downgrade(alembic_config(conn), revision)


def head_revision() -> str:
    """The newest revision shipped with this code."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(database: Database) -> str | None:
    """The revision the database is at, ``None`` for a database never migrated."""
    with _connection(database) as conn:
        return MigrationContext.configure(conn).get_current_revision()


def is_up_to_date(database: Database) -> bool:
    """Whether the schema matches this code (for a readiness check that refuses old schemas)."""
    return current_revision(database) == head_revision()
