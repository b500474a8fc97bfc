"""Alembic migrations of the privface schema; run them with :func:`storage.migrate.upgrade`."""
