"""The one configuration object: defaults, then a TOML file, then the environment.

Every tunable the service and the commands read lives here; nothing else reads the
environment.  ``PRIVFACE_CONFIG`` (or ``--config``) names the file; each field can be
overridden by ``PRIVFACE_<FIELD>`` (upper case), and ``DATABASE_URL`` sets ``database_url``.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

#: values of ``Settings.index_backend``
INDEX_BACKENDS = ("faiss", "milvus")
#: what a Milvus collection name may start with (letters, digits, underscores; the derived
#: names add the gallery, its id and the template key version, see gallery_service)
_MILVUS_PREFIX_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


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
    #: arithmetic of the model on the server: "fp32", "bf16" (autocast), "auto" (bf16 where
    #: the CPU has AMX tiles or AVX512-BF16) or "int8" (the <model>.int8.onnx graph that `privface
    #: quantize` writes beside the model file); see docs/model-card.md for their effect
    model_precision: str = "fp32"
    #: what runs the model on the server: "onnx" (ONNX Runtime: fp32 1.5x torch's views/s on
    #: a 2-core AVX-512 CPU with the same embeddings, or int8), "torch" (fp32, bf16), or "auto"
    #: (torch for bf16, else onnx)
    model_runtime: str = "auto"
    #: embed each view under every permutation of its subset (the server reads the rank off
    #: the view) and average: one point more 1:N rank-1 on LFW for 6x the model's work per
    #: view (model card); false embeds the views as sent
    average_permutations: bool = True
    #: centre every score with the model file's cohort (enrollment.score_centring: the
    #: cosine less half of either side's mean top-k cosine against training-split faces):
    #: on LFW +0.8 points and twice the TAR at FAR 1e-3, but the threshold it is calibrated
    #: with moves with the population (on AT&T the LFW threshold passes 3.2e-2 of strangers'
    #: pairs instead of 2.3e-3): turn it on only with a threshold calibrated on the
    #: deployment's own people (``privface calibrate``; model card, "Cohort score centring")
    score_centring: bool = False
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
    #: where the search indexes live: "faiss" (in-process, per gallery, the default) or
    #: "milvus" (collections in a Milvus server or cluster, see docs/scaling.md)
    index_backend: str = "faiss"
    #: Milvus: http://HOST:19530 (server or cluster), or a path ending in .db for milvus-lite
    #: in this process
    milvus_uri: str = ""
    #: Milvus: "user:password" or an API key; empty for a server without authentication
    milvus_token: str = ""
    #: Milvus: start of every collection name this service creates (one collection per
    #: gallery and template key version); letters, digits and underscores
    milvus_collection_prefix: str = "privface"
    #: Milvus: index type of the vector field (HNSW, IVF_FLAT, FLAT, GPU_CAGRA, ...)
    milvus_index_type: str = "HNSW"
    #: Milvus: build parameters of that index (TOML table / JSON object); empty = M 32,
    #: efConstruction 128 for HNSW, Milvus' defaults otherwise
    milvus_index_params: dict = field(default_factory=dict)
    #: Milvus: search parameters (e.g. {"ef": 128} for HNSW, {"nprobe": 64} for IVF);
    #: empty = ef 128 for HNSW, Milvus' defaults otherwise
    milvus_search_params: dict = field(default_factory=dict)
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
    kind = {"int": int, "float": float, "bool": bool, "str": str, "dict": dict}.get(kind, kind)
    if kind is bool:
        return text.strip().lower() in ("1", "true", "yes", "on")
    if kind is dict:  # a JSON object in the environment
        value = json.loads(text) if text.strip() else {}
        if not isinstance(value, dict):
            raise ValueError(f"expected a JSON object, got {text!r}")
        return value
    return kind(text)


def check_index_backend(settings: Settings) -> None:
    """Refuse an unusable index backend configuration (at start-up), saying how to fix it."""
    backend = settings.index_backend
    if backend not in INDEX_BACKENDS:
        raise ValueError(
            f"index_backend {backend!r} is unknown: set index_backend (PRIVFACE_INDEX_BACKEND) "
            "to 'faiss' (in-process indexes, the default) or 'milvus' (with milvus_uri)"
        )
    if backend != "milvus":
        return
    uri = settings.milvus_uri.strip()
    if not uri:
        raise ValueError(
            "index_backend 'milvus' needs milvus_uri (PRIVFACE_MILVUS_URI): "
            "http://HOST:19530 for a Milvus server or cluster, or a path ending in .db for "
            "milvus-lite in this process"
        )
    if not uri.endswith(".db") and not re.match(r"(https?|tcp)://|unix:", uri):
        raise ValueError(
            f"milvus_uri {uri!r} is neither a Milvus address (http://HOST:19530, https://..., "
            "unix:...) nor a milvus-lite file (a path ending in .db)"
        )
    if not _MILVUS_PREFIX_RE.fullmatch(settings.milvus_collection_prefix):
        raise ValueError(
            f"milvus_collection_prefix {settings.milvus_collection_prefix!r} is not a valid "
            "start of a Milvus collection name: use 1-64 letters, digits or underscores, "
            "starting with a letter or underscore (default 'privface')"
        )
    if not settings.milvus_index_type.strip():
        raise ValueError("milvus_index_type is empty: use e.g. HNSW (the default), IVF_FLAT "
                         "or FLAT")
    for name in ("milvus_index_params", "milvus_search_params"):
        if not isinstance(getattr(settings, name), dict):
            raise ValueError(
                f"{name} must be a table (TOML) or a JSON object (PRIVFACE_{name.upper()}), "
                f"e.g. {{\"ef\": 128}}; got {getattr(settings, name)!r}"
            )
    try:
        import pymilvus  # noqa: F401

        if uri.endswith(".db"):
            import milvus_lite  # noqa: F401
    except ImportError as exc:
        raise ValueError(
            f"index_backend 'milvus' needs the Milvus client ({exc.name} is not installed): "
            "pip install -e '.[milvus]' (pymilvus, and milvus-lite for a .db milvus_uri)"
        ) from None


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
