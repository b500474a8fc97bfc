"""The embedded PostgreSQL (pgserver) used on machines without a database server."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import make_url

from storage import migrate
from storage import repository as repo
from storage.database import make_engine, make_session_factory
from storage.embedded import database_url_or_embedded, start_embedded


def test_embedded_server_migrates_and_round_trips(tmp_path, keyring, make_samples) -> None:
    pg = start_embedded(tmp_path / "pgdata", database="privface")
    engine = None
    try:
        url = make_url(pg.url)
        assert url.drivername == "postgresql+psycopg" and url.database == "privface"
        assert Path(url.query["host"]).is_absolute()  # a Unix socket directory, no TCP port
        migrate.upgrade(pg.url)
        assert migrate.is_up_to_date(pg.url)

        engine = make_engine(pg.url)
        factory = make_session_factory(engine)
        samples = make_samples(2, dim=32)
        with factory.begin() as s:
            repo.create_gallery(s, "embedded")
            res = repo.enroll_subject(s, keyring, "embedded", "p1", samples, display_name="Eve")
        with factory() as s:
            subj = repo.get_subject(s, keyring, "embedded", "p1", include_templates=True)
        assert subj.display_name == "Eve"
        assert [x.sample_id for x in subj.samples] == list(res.sample_ids)
        assert (subj.samples[1].template == samples[1].template).all()

        # A second start on the same directory attaches to the running server.
        assert start_embedded(tmp_path / "pgdata", database="privface").url == pg.url
    finally:
        if engine is not None:
            engine.dispose()
        pg.stop()


def test_database_url_env_wins_over_embedded(tmp_path) -> None:
    url = database_url_or_embedded(
        tmp_path / "unused", environ={"DATABASE_URL": "postgresql://u@db.example:5433/pf"}
    )
    assert url == "postgresql+psycopg://u@db.example:5433/pf"
    assert not (tmp_path / "unused").exists()
    with pytest.raises(ValueError, match="database name"):
        start_embedded(tmp_path / "x", database="bad-name;")
