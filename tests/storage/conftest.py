"""Fixtures for the storage tests: a real PostgreSQL database, fresh for each test session.

The server is ``PRIVFACE_TEST_DATABASE_URL`` (default: the dev/CI server at 127.0.0.1:5432,
trust auth). A uniquely named database is created on it through the ``postgres`` maintenance
database, migrated, and dropped afterwards, so runs never see each other's data.
"""

from __future__ import annotations

import contextlib
import os
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pytest
from sqlalchemy import URL, Engine, create_engine, pool, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from storage import migrate
from storage.crypto import KeyRing, new_keyring
from storage.database import make_engine, make_session_factory, normalize_url
from storage.records import SampleInput
from storage.repository import create_gallery

DEFAULT_SERVER_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def server_url() -> URL:
    return normalize_url(os.environ.get("PRIVFACE_TEST_DATABASE_URL", DEFAULT_SERVER_URL))


def _admin_engine() -> Engine:
    return create_engine(
        server_url().set(database="postgres"),
        isolation_level="AUTOCOMMIT",
        poolclass=pool.NullPool,
    )


@contextmanager
def fresh_database(purpose: str) -> Iterator[str]:
    """Create an empty, uniquely named database; drop it (forcibly) afterwards."""
    name = f"privface_{purpose}_{uuid.uuid4().hex[:12]}"
    admin = _admin_engine()
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as exc:
        admin.dispose()
        pytest.fail(
            f"cannot reach PostgreSQL at {server_url().render_as_string()}: {exc.orig}\n"
            "start it (pg_ctlcluster --skip-systemctl-redirect <version> main start) or set "
            "PRIVFACE_TEST_DATABASE_URL",
            pytrace=False,
        )
    try:
        yield server_url().set(database=name).render_as_string(hide_password=False)
    finally:
        try:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        except Exception as exc:  # noqa: BLE001 - never mask the test's own failure
            warnings.warn(f"could not drop test database {name}: {exc}", stacklevel=1)
        finally:
            admin.dispose()


@pytest.fixture(scope="session")
def new_database() -> Callable[[str], contextlib.AbstractContextManager[str]]:
    """``with new_database("purpose") as url:`` an empty database, dropped afterwards."""
    return fresh_database


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A migrated database shared by the session's tests (tables are emptied per test)."""
    with fresh_database("test") as url:
        migrate.upgrade(url)
        yield url


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[Engine]:
    eng = make_engine(database_url)
    yield eng
    eng.dispose()


@pytest.fixture
def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Session factory on an emptied schema."""
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE galleries, audit_log CASCADE"))
    return make_session_factory(engine)


@pytest.fixture
def keyring() -> KeyRing:
    return new_keyring("k1")


@pytest.fixture
def gallery(session_factory: sessionmaker[Session]) -> str:
    name = f"g-{uuid.uuid4().hex[:8]}"
    with session_factory.begin() as s:
        create_gallery(s, name, "test gallery")
    return name


@pytest.fixture
def make_samples() -> Callable[..., list[SampleInput]]:
    """Random unit-norm protected templates with fixed version labels."""
    rng = np.random.default_rng(1234)

    def make(
        n: int = 2,
        dim: int = 64,
        model_version: str = "arcface-r50@1",
        profile_name: str = "hfcf",
        profile_version: str = "1",
    ) -> list[SampleInput]:
        out = []
        for _ in range(n):
            v = rng.standard_normal(dim).astype(np.float32)
            v /= np.linalg.norm(v)
            out.append(SampleInput(v, model_version, profile_name, profile_version, "gk1"))
        return out

    return make
