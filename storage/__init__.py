"""privface storage: PostgreSQL as the source of truth, personal data encrypted at rest.

Modules (each usable alone; nothing here imports ``enrollment``, ``matcher`` or ``privface``):

* :mod:`storage.models` — SQLAlchemy 2 ORM schema.
* :mod:`storage.migrate` — Alembic migrations shipped in the package (``upgrade(url)``).
* :mod:`storage.database` — engine / session factories (psycopg 3), ``DATABASE_URL``.
* :mod:`storage.embedded` — embedded PostgreSQL via ``pgserver`` for zero-setup machines.
* :mod:`storage.crypto` — AES-256-GCM key ring (``PRIVFACE_KEYRING`` / ``PRIVFACE_KEYRING_FILE``).
* :mod:`storage.repository` — the operations the service calls; values in :mod:`storage.records`.
* :mod:`storage.errors` — exceptions, each naming the gRPC status it maps to.

Typical start-up::

    url = embedded.database_url_or_embedded(data_dir)   # DATABASE_URL wins if set
    migrate.upgrade(url)
    factory = database.make_session_factory(url)
    keyring = crypto.load_keyring()                       # never from the database
    with factory.begin() as session:
        repository.enroll_subject(session, keyring, "lobby", "emp-1", samples)

Key rotation, online:

1. ``save_keyring(load_keyring(path).rotate(), path, overwrite=True)`` — the new key is primary.
2. Roll the new key file out to every replica (they now encrypt with the new key and still
   decrypt with the old one).
3. ``repository.rotate_keys(session, keyring)`` — re-encrypts in small committed batches.
4. When its report's ``key_usage`` no longer lists the old key id, ``remove_key`` it and roll
   out again.
"""
