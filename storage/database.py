"""Engine and session factories for PostgreSQL through psycopg 3.

Repository functions take a :class:`~sqlalchemy.orm.Session` and never commit (except the
batch jobs that say so), so the caller decides what one transaction is::

    factory = make_session_factory(make_engine(url))
    with factory.begin() as session:          # commits on success, rolls back on error
        repository.enroll_subject(session, keyring, ...)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from sqlalchemy import URL, Engine, create_engine, make_url
from sqlalchemy.orm import Session, sessionmaker

__all__ = [
    "ENV_DATABASE_URL",
    "database_url_from_env",
    "make_engine",
    "make_session_factory",
    "normalize_url",
]

#: Environment variable with the URL of an external PostgreSQL server.
ENV_DATABASE_URL = "DATABASE_URL"

_BARE_SCHEMES = {"postgres", "postgresql"}


def normalize_url(url: str | URL) -> URL:
    """Parse ``url`` and pin the driver to psycopg 3.

    Operators and tools (``pgserver``, Heroku-style ``DATABASE_URL``) hand out bare
    ``postgres://`` / ``postgresql://`` URLs, which SQLAlchemy would map to psycopg2 — not
    installed here. An explicit ``+driver`` is respected.
    """
    parsed = make_url(url) if isinstance(url, str) else url
    if parsed.drivername in _BARE_SCHEMES:
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def database_url_from_env(environ: Mapping[str, str] | None = None) -> URL | None:
    """The normalised ``DATABASE_URL``, or ``None`` when unset (then use the embedded server)."""
    env = os.environ if environ is None else environ
    value = env.get(ENV_DATABASE_URL, "").strip()
    return normalize_url(value) if value else None


def make_engine(
    url: str | URL,
    *,
    application_name: str = "privface",
    pool_size: int = 5,
    max_overflow: int = 10,
    echo: bool = False,
    **kwargs: Any,
) -> Engine:
    """A pooled engine; ``pool_pre_ping`` so a restarted database costs one retry, not errors.

    ``application_name`` shows up in ``pg_stat_activity``, which is how operators tell the
    service's connections from everything else.
    """
    connect_args = dict(kwargs.pop("connect_args", {}))
    connect_args.setdefault("application_name", application_name)
    return create_engine(
        normalize_url(url),
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_pre_ping=True,
        echo=echo,
        connect_args=connect_args,
        **kwargs,
    )


def make_session_factory(bind: Engine | str | URL) -> sessionmaker[Session]:
    """A session factory; objects stay usable after commit (``expire_on_commit=False``)."""
    engine = bind if isinstance(bind, Engine) else make_engine(bind)
    return sessionmaker(bind=engine, expire_on_commit=False)
