"""Alembic environment, driven programmatically by :mod:`storage.migrate` (no alembic.ini).

``storage.migrate`` passes either an open SQLAlchemy connection (``attributes["connection"]``)
or a database URL (``attributes["database_url"]``; not a config option, because configparser
interpolation would mangle ``%`` in passwords).

All migrations run in one transaction holding a PostgreSQL advisory lock, so several service
replicas starting at once migrate exactly once and the others wait, then see ``head``.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine, pool, text

from storage.models import Base

#: Arbitrary constant shared by every privface process ("privface" in ASCII, truncated).
MIGRATION_LOCK_KEY = 0x7072697666616365 >> 8

config = context.config
target_metadata = Base.metadata


def _configure(**kwargs: object) -> None:
    context.configure(
        target_metadata=target_metadata,
        compare_type=True,
        compare_server_default=True,
        **kwargs,
    )


def run_migrations_offline() -> None:
    """Emit SQL to stdout (``alembic upgrade --sql``), for DBAs who apply scripts by hand."""
    _configure(
        url=config.attributes.get("database_url") or config.get_main_option("sqlalchemy.url"),
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def _run_online(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_online(connection)
        return
    url = config.attributes.get("database_url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("storage migrations need a database URL or connection")
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            _run_online(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
