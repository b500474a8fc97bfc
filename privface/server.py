"""Composition of the running service: database, key ring, model, engine, gRPC server.

``privface serve`` with no configuration is the quick start: an embedded PostgreSQL
(``pgserver``) and a new key file in the data directory, no tokens, listening on
127.0.0.1:50051 — and a loud log line saying that anyone on this machine may call it. Any
address that is not loopback refuses to start without a tokens file. ``DATABASE_URL`` (or
``database_url`` in the config file) selects any other PostgreSQL.

Start-up order: schema migrations (idempotent, advisory-locked), then the key ring and the
model, then the server starts answering health checks with NOT_SERVING while every
gallery's index is loaded from PostgreSQL, then SERVING. SIGTERM / SIGINT: health goes
NOT_SERVING, in-flight calls get a grace period, the embedded database stops last.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from matcher import set_search_threads
from privface import servicer
from privface.auth import AuthInterceptor, TokenStore
from privface.config import Settings, check_index_backend
from privface.embedding import Embedder
from privface.gallery_service import GalleryEngine, MilvusOptions
from privface.keys import resolve_keyring
from storage import migrate
from storage.database import make_engine, make_session_factory, normalize_url

log = logging.getLogger("privface.server")

GRACE_SECONDS = 5.0


def split_address(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` / ``[v6]:PORT`` -> (host, port); ValueError with a usable message."""
    host, sep, port = listen.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"listen address {listen!r} must be HOST:PORT (e.g. 127.0.0.1:50051)")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    """True only for addresses that cannot be reached from another machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name may resolve to anything: treat it as exposed


def load_tokens(settings: Settings, host: str) -> TokenStore | None:
    """The token store, or None (open mode) — only allowed on loopback."""
    if settings.tokens_file:
        tokens = TokenStore.load(settings.tokens_file)
        log.info("authentication: %d tokens from %s", len(tokens), settings.tokens_file)
        return tokens
    if not is_loopback(host):
        raise SystemExit(
            f"refusing to listen on {host} without client tokens: set tokens_file "
            "(PRIVFACE_TOKENS_FILE; create tokens with `privface tokens add`), or listen on "
            "127.0.0.1 for a local, unauthenticated quick start"
        )
    log.warning("=" * 78)
    log.warning("NO AUTHENTICATION: no tokens file is configured, so every caller on this")
    log.warning("machine may enrol, search and delete (allowed on loopback %s only).", host)
    log.warning("Set tokens_file (PRIVFACE_TOKENS_FILE) before using real data.")
    log.warning("=" * 78)
    return None


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS when a certificate is configured; mutual TLS when a client CA is too."""
    if not settings.tls_cert and not settings.tls_key:
        if settings.tls_client_ca:
            raise SystemExit("tls_client_ca (mutual TLS) needs tls_cert and tls_key as well")
        return None
    if not (settings.tls_cert and settings.tls_key):
        raise SystemExit("TLS needs both tls_cert and tls_key")
    cert = Path(settings.tls_cert).expanduser().read_bytes()
    key = Path(settings.tls_key).expanduser().read_bytes()
    client_ca = (
        Path(settings.tls_client_ca).expanduser().read_bytes() if settings.tls_client_ca else None
    )
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def grpc_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", int(max_message_bytes)),
        ("grpc.max_send_message_length", int(max_message_bytes)),
    ]


@dataclass
class RunningServer:
    """A started service; ``port`` is the bound port (useful with ``:0``)."""

    server: grpc.Server
    engine: GalleryEngine
    health: health.HealthServicer
    host: str
    port: int
    tls: bool
    authenticated: bool
    database_url: str
    db: Any = None
    embedded: Any = None
    _stopped: threading.Event = field(default_factory=threading.Event)

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def stop(self, grace: float = GRACE_SECONDS) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.engine.close()
        if self.db is not None:
            self.db.dispose()
        if self.embedded is not None:
            self.embedded.stop()
        log.info("privface stopped")

    def wait(self) -> None:
        self.server.wait_for_termination()


def database_url(settings: Settings) -> tuple[str, Any]:
    """(URL, embedded server or None): the configured PostgreSQL, else an embedded one."""
    if settings.database_url:
        return normalize_url(settings.database_url).render_as_string(hide_password=False), None
    from storage.embedded import start_embedded

    data = Path(settings.data_dir).expanduser()
    data.mkdir(parents=True, exist_ok=True)
    pg_dir = data / "postgres"
    log.info("starting the embedded PostgreSQL in %s", pg_dir)
    embedded = start_embedded(pg_dir)
    return embedded.url, embedded


def milvus_options(settings: Settings) -> MilvusOptions | None:
    """The Milvus backend's settings, or None for the in-process FAISS indexes."""
    if settings.index_backend != "milvus":
        return None
    log.info("index backend: Milvus at %s (collections %s_*, %s); FAISS snapshots not used",
             settings.milvus_uri, settings.milvus_collection_prefix, settings.milvus_index_type)
    uri = settings.milvus_uri.strip()
    return MilvusOptions(
        uri=str(Path(uri).expanduser()) if uri.endswith(".db") else uri,
        token=settings.milvus_token,
        prefix=settings.milvus_collection_prefix,
        index_type=settings.milvus_index_type,
        index_params=settings.milvus_index_params,
        search_params=settings.milvus_search_params,
    )


def make_embedder(settings: Settings) -> Embedder:
    """The model as the settings serve it (the server, and operator commands that must
    score as it does)."""
    return Embedder(settings.model_path or None, threads=settings.torch_threads,
                    threshold=settings.threshold, precision=settings.model_precision,
                    runtime=settings.model_runtime,
                    average_permutations=settings.average_permutations,
                    score_centring=settings.score_centring)


def build_server(settings: Settings, *, warm_up: bool = True) -> RunningServer:
    """Start everything and return the running server (health SERVING once warmed up)."""
    check_index_backend(settings)
    host, port = split_address(settings.listen)
    tokens = load_tokens(settings, host)
    creds = server_credentials(settings)
    if tokens is not None and creds is None and not is_loopback(host):
        log.warning("tokens travel in clear text: configure tls_cert/tls_key for %s", host)
    # The model first: a missing model or threshold fails before any database starts.
    embedder = make_embedder(settings)
    set_search_threads(settings.index_threads)
    url, embedded = database_url(settings)
    try:
        migrate.upgrade(url)
        keys = resolve_keyring(settings.key_file, settings.data_dir,
                               create_quickstart=embedded is not None)
        db = make_engine(url, pool_size=max(5, settings.workers))
        sessions = make_session_factory(db)
        snapshots = Path(settings.data_dir).expanduser() / "snapshots"
        milvus = milvus_options(settings)
        engine = GalleryEngine(sessions, keys, embedder, force_cpu_index=settings.force_cpu_index,
                               max_message_bytes=settings.max_message_bytes,
                               snapshot_dir=snapshots if settings.index_snapshots else None,
                               milvus=milvus)
    except BaseException:
        if embedded is not None:
            embedded.stop()
        raise

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="privface"),
        interceptors=[AuthInterceptor(tokens)],
        options=grpc_options(settings.max_message_bytes),
    )
    servicer.add_to_server(engine, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (*servicer.SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    for name in ("", *servicer.SERVICE_NAMES):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    if bound == 0:
        if embedded is not None:
            embedded.stop()
        raise SystemExit(f"cannot listen on {address} (in use or not a local address?)")
    server.start()
    running = RunningServer(server, engine, health_servicer, host, bound, creds is not None,
                            tokens is not None, url, db, embedded)
    log.info("privface listening on %s (%s, %s); model %s", running.address,
             "TLS" + (" + client certificates" if settings.tls_client_ca else "")
             if creds else "plaintext", "tokens" if tokens else "NO AUTHENTICATION",
             engine.card.model_version)
    try:
        if warm_up:
            n = engine.warm_up()
            log.info("%d galleries loaded from PostgreSQL", n)
        engine.start_background_sync(settings.sync_interval)
        engine.start_background_snapshots(settings.snapshot_interval)
    except BaseException:
        running.stop(0)
        raise
    for name in ("", *servicer.SERVICE_NAMES):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return running


def serve(settings: Settings) -> int:
    """Run until SIGTERM / SIGINT; the body of ``privface serve``."""
    running = build_server(settings)
    done = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: shutting down", signum)
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("serving on %s", running.address)
    while not done.wait(1.0):
        pass
    running.stop()
    return 0
