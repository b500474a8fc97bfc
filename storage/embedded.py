"""An embedded PostgreSQL for machines without a database server (``pgserver``).

``pgserver`` ships real PostgreSQL binaries in its wheel, runs ``initdb`` in a data directory
on first use and starts a server that listens only on a Unix socket inside (or, for long
paths, next to) that directory — no TCP port, so it cannot clash with a system server. Its
``get_uri()`` is a bare ``postgresql://postgres:@/postgres?host=<socket dir>`` URL; here it is
rebuilt for psycopg 3 (``postgresql+psycopg://``) and pointed at a dedicated database.

Behaviour worth knowing (from pgserver 0.1.4's source):

* Several processes may share one data directory; the server stops when the last process
  that opened it exits (``stop_at_exit=True``) or keeps running (``False``).
* Run as root, pgserver creates a system user ``pgserver`` to own the cluster and makes the
  data directory's parent directories traversable (``o+rx``) for it.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import URL, create_engine, pool, text
from sqlalchemy.exc import ProgrammingError

from storage.database import database_url_from_env

__all__ = ["EmbeddedPostgres", "database_url_or_embedded", "start_embedded"]

_DB_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


@dataclass
class EmbeddedPostgres:
    """A running embedded server; ``url`` is a SQLAlchemy URL string for psycopg 3."""

    data_dir: Path
    database: str
    url: str
    _server: Any = field(repr=False)

    def stop(self) -> None:
        """Release this process's handle; the server stops if no other process uses it."""
        self._server.cleanup()


def _import_pgserver() -> Any:
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); pgserver then
        # uses /tmp/runtime-<uid> for its lock file, which is fine.
        warnings.simplefilter("ignore")
        import pgserver

    return pgserver


def _server_url(server: Any, database: str) -> URL:
    info = server.get_postmaster_info()
    if info.socket_dir is not None:
        return URL.create(
            "postgresql+psycopg",
            username="postgres",
            database=database,
            query={"host": str(info.socket_dir), "port": str(info.port or 5432)},
        )
    return URL.create(
        "postgresql+psycopg",
        username="postgres",
        host=info.hostname,
        port=info.port,
        database=database,
    )


def _ensure_database(server: Any, database: str) -> None:
    engine = create_engine(
        _server_url(server, "postgres"), isolation_level="AUTOCOMMIT", poolclass=pool.NullPool
    )
    try:
        with engine.connect() as conn:
            exists = conn.execute(
                text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": database}
            ).first()
            if exists is None:
                quoted = engine.dialect.identifier_preparer.quote(database)
                try:
                    conn.execute(text(f"CREATE DATABASE {quoted}"))
                except ProgrammingError as exc:  # another process created it first
                    if "already exists" not in str(exc):
                        raise
    finally:
        engine.dispose()


def start_embedded(
    data_dir: str | os.PathLike[str],
    *,
    database: str = "privface",
    stop_at_exit: bool = True,
) -> EmbeddedPostgres:
    """Start (or attach to) the embedded server in ``data_dir`` and ensure ``database`` exists.

    ``data_dir`` is created if missing (its parent must exist). The schema is not created
    here: run :func:`storage.migrate.upgrade` on the returned ``url``.
    """
    if not _DB_NAME_RE.match(database):
        raise ValueError(f"database name {database!r} must match {_DB_NAME_RE.pattern}")
    pgserver = _import_pgserver()
    path = Path(data_dir).expanduser().resolve()
    server = pgserver.get_server(path, cleanup_mode="stop" if stop_at_exit else None)
    _ensure_database(server, database)
    url = _server_url(server, database).render_as_string(hide_password=False)
    return EmbeddedPostgres(data_dir=path, database=database, url=url, _server=server)


def database_url_or_embedded(
    data_dir: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None
) -> str:
    """``DATABASE_URL`` if set, else the URL of an embedded server started in ``data_dir``.

    This is the "one command, no setup" default for a fresh machine; the embedded server
    stops when the process exits.
    """
    configured = database_url_from_env(environ)
    if configured is not None:
        return configured.render_as_string(hide_password=False)
    return start_embedded(data_dir).url
