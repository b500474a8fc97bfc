"""The one configuration object: defaults, then a TOML file, then the environment.

Every tunable the service and the commands read lives here; nothing else reads the
environment.  ``PRIVFACE_CONFIG`` (or ``--config``) names the file; each field can be
overridden by ``PRIVFACE_<FIELD>`` (upper case), and ``DATABASE_URL`` sets ``database_url``.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path


def _default_home() -> str:
    return str(Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "privface")


def _default_cache() -> str:
    return str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "privface")


@dataclass
class Settings:
    #: where aligned crops and teacher descriptors are cached for training and evaluation
    cache_dir: str = field(default_factory=_default_cache)
    #: data directory of the service (embedded PostgreSQL, persisted indexes)
    data_dir: str = field(default_factory=_default_home)
    #: the model the service embeds with (default: the shipped weights)
    model_path: str = ""
    #: PostgreSQL URL; empty means the embedded PostgreSQL under data_dir
    database_url: str = ""
    #: gRPC listen address
    listen: str = "127.0.0.1:50051"
    #: key ring file (JSON); PRIVFACE_KEYRING may carry the key ring itself
    key_file: str = ""
    #: client tokens file (JSON: token -> {name, roles, galleries})
    tokens_file: str = ""
    #: TLS: server certificate and key (PEM); a client CA turns on mutual TLS
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    #: largest gRPC message accepted, bytes
    max_message_bytes: int = 64 * 1024 * 1024
    #: decision threshold on the protected-template score; 0 = the model card's (FAR 1e-3)
    threshold: float = 0.0
    #: force the CPU FAISS index even with a GPU present
    force_cpu_index: bool = False
    #: gRPC worker threads
    workers: int = 8
    #: torch intra-op threads for embedding on the server; 0 = min(4, CPU count)
    torch_threads: int = 0
    #: FAISS (OpenMP) threads per single search; 1 is fastest under concurrent load
    #: (parallelism comes from the gRPC workers); 0 = OpenMP's default (all cores). Index
    #: builds and batch searches always use all cores
    index_threads: int = 1
    #: seconds between catch-ups of the in-memory indexes with PostgreSQL (changes made by
    #: other replicas or tools); 0 turns the background catch-up off
    sync_interval: float = 2.0
    #: keep encrypted snapshots of the search indexes in <data_dir>/snapshots, so a restart
    #: replays what changed since instead of rebuilding every index from PostgreSQL
    index_snapshots: bool = True
    #: seconds between snapshots of galleries that changed (one is also written at shutdown)
    snapshot_interval: float = 300.0
    #: client side: the server to call (HOST:PORT); empty = the listen address
    server: str = ""
    #: client side: the bearer token sent with every call
    token: str = ""
    #: client side: the gallery the commands work on
    gallery: str = ""
    #: client side TLS: CA certificate that signed the server's certificate (PEM) turns TLS
    #: on; a client certificate and key are sent for mutual TLS
    server_ca: str = ""
    client_cert: str = ""
    client_key: str = ""


def _coerce(kind: type | str, text: str):
    kind = {"int": int, "float": float, "bool": bool, "str": str}.get(kind, kind)
    if kind is bool:
        return text.strip().lower() in ("1", "true", "yes", "on")
    return kind(text)


def load_settings(path: str | os.PathLike | None = None, env: dict | None = None) -> Settings:
    """Settings from defaults < TOML file < environment."""
    env = dict(os.environ if env is None else env)
    settings = Settings()
    path = path or env.get("PRIVFACE_CONFIG")
    if path:
        data = tomllib.loads(Path(path).read_text())
        data = data.get("privface", data)
        known = {f.name for f in fields(Settings)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown settings in {path}: {sorted(unknown)}")
        for key, value in data.items():
            setattr(settings, key, value)
    for f in fields(Settings):
        value = env.get(f"PRIVFACE_{f.name.upper()}")
        if value is not None:
            setattr(settings, f.name, _coerce(f.type, value))
    if env.get("DATABASE_URL"):
        settings.database_url = env["DATABASE_URL"]
    return settings
