"""Who is calling and what they may do: per-client tokens, roles, gallery scopes.

A client sends ``authorization: Bearer <token>`` metadata. The tokens file maps each token
(better: its SHA-256, so the file itself holds no usable secret) to a principal::

    {
      "sha256:9f86d0...": {"name": "door-7", "roles": ["identify"], "galleries": ["lobby"]},
      "sha256:60303a...": {"name": "hr-sync", "roles": ["enroll"], "galleries": ["*"]},
      "sha256:fd61a0...": {"name": "ops", "roles": ["admin"], "galleries": ["*"]}
    }

``privface tokens add`` draws a random token, stores its hash and prints the token once.
Gallery entries are shell patterns (``lobby``, ``site-a-*``, ``*``) and must be given: there is
no implicit "all galleries". Roles: ``identify`` (Identify, Verify, reads), ``enroll``
(subject writes, reads), ``admin`` (everything, including creating and deleting galleries).

Checks happen in two places, each where its input exists: the interceptor sees only the
method and the metadata, so it authenticates the token and checks the role the method needs
(UNAUTHENTICATED / PERMISSION_DENIED before the handler runs); the gallery is inside the
request message, so the gallery scope is checked by the engine
(:meth:`Principal.require`). The principal travels from the interceptor to the handler in a
:class:`contextvars.ContextVar`: grpcio runs a call's interceptors and its handler in the same
``contextvars.Context`` (see ``grpc.ServerInterceptor.intercept_service``).

Without a tokens file the server runs "open" (every caller is :data:`ANONYMOUS` with every
role) — allowed only on a loopback address; :mod:`privface.server` enforces that.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger("privface.auth")

ROLES = ("identify", "enroll", "admin")
ANY_ROLE = frozenset(ROLES)
MIN_TOKEN_LENGTH = 16
METADATA_KEY = "authorization"

_GALLERY = "/privface.v1.GalleryService/"
_SUBJECT = "/privface.v1.SubjectService/"
_MATCH = "/privface.v1.MatchService/"

#: Roles that may call each method (admin may call everything). A method not listed under a
#: privface service is refused: new methods must be given a role explicitly.
METHOD_ROLES: dict[str, frozenset[str]] = {
    _GALLERY + "CreateGallery": frozenset({"admin"}),
    _GALLERY + "DeleteGallery": frozenset({"admin"}),
    _GALLERY + "ListGalleries": ANY_ROLE,
    _GALLERY + "GetGalleryStats": ANY_ROLE,
    _GALLERY + "GetServerInfo": ANY_ROLE,
    _SUBJECT + "Enroll": frozenset({"enroll"}),
    _SUBJECT + "EnrollBatch": frozenset({"enroll"}),
    _SUBJECT + "AddSamples": frozenset({"enroll"}),
    _SUBJECT + "RemoveSamples": frozenset({"enroll"}),
    _SUBJECT + "DeleteSubject": frozenset({"enroll"}),
    _SUBJECT + "RenameSubject": frozenset({"enroll"}),
    _SUBJECT + "UpdateSubjectMetadata": frozenset({"enroll"}),
    _SUBJECT + "GetSubject": frozenset({"enroll", "identify"}),
    _SUBJECT + "ListSubjects": frozenset({"enroll", "identify"}),
    _MATCH + "Identify": frozenset({"identify"}),
    _MATCH + "Verify": frozenset({"identify"}),
}

#: Methods anyone may call: load balancers probe health, tools list the API by reflection.
PUBLIC_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


class AuthError(Exception):
    """A refused call; ``code`` is the gRPC status name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: a name for the audit trail, roles, gallery patterns."""

    name: str
    roles: frozenset[str]
    galleries: tuple[str, ...]

    def has_role(self, allowed: frozenset[str] | set[str] | str) -> bool:
        if isinstance(allowed, str):
            allowed = {allowed}
        return "admin" in self.roles or bool(self.roles & set(allowed))

    def may_use(self, gallery: str) -> bool:
        return any(fnmatchcase(gallery, pattern) for pattern in self.galleries)

    def require(self, role: str | frozenset[str], gallery: str | None = None) -> None:
        """Raise :class:`AuthError` (PERMISSION_DENIED) unless the role and gallery fit.

        The answer for a gallery out of scope does not depend on whether it exists, so a
        token of gallery A learns nothing about gallery B.
        """
        if not self.has_role(role):
            wanted = role if isinstance(role, str) else " or ".join(sorted(role))
            raise AuthError(
                "PERMISSION_DENIED",
                f"token {self.name!r} (roles: {', '.join(sorted(self.roles)) or 'none'}) "
                f"lacks the {wanted} role",
            )
        if gallery is not None and not self.may_use(gallery):
            raise AuthError(
                "PERMISSION_DENIED",
                f"token {self.name!r} may not use gallery {gallery!r}",
            )


ANONYMOUS = Principal("anonymous", ANY_ROLE, ("*",))

_current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "privface_principal", default=None
)


def current_principal() -> Principal:
    """The caller of the RPC being handled (set by :class:`AuthInterceptor`)."""
    principal = _current.get()
    if principal is None:  # a handler reached without the interceptor: refuse, never open
        raise AuthError("UNAUTHENTICATED", "no authenticated caller for this call")
    return principal


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _parse_entry(key: str, entry: Any, where: str) -> tuple[str, Principal]:
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: each token must map to an object with name, roles, galleries")
    if key.startswith("sha256:"):
        digest = key[len("sha256:") :].lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"{where}: {key[:16]}... is not a sha256:<64 hex> token hash")
    else:
        if len(key) < MIN_TOKEN_LENGTH:
            raise ValueError(
                f"{where}: a token must be at least {MIN_TOKEN_LENGTH} characters "
                "(use `privface tokens add`, which draws a random one)"
            )
        digest = token_hash(key)
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{where}: every token needs a non-empty name")
    roles = entry.get("roles")
    if not isinstance(roles, list) or not roles or not set(roles) <= set(ROLES):
        raise ValueError(f"{where}: token {name!r} needs roles from {list(ROLES)}")
    galleries = entry.get("galleries")
    if (
        not isinstance(galleries, list)
        or not galleries
        or not all(isinstance(g, str) and g for g in galleries)
    ):
        raise ValueError(
            f"{where}: token {name!r} needs a list of galleries (patterns; [\"*\"] for all)"
        )
    return digest, Principal(name.strip(), frozenset(roles), tuple(galleries))


class TokenStore:
    """Tokens by SHA-256; reloads its file when it changes, so tokens are added or revoked
    without a restart (checked at most once a second)."""

    def __init__(self, principals: Mapping[str, Principal], path: Path | None = None) -> None:
        self._by_hash = dict(principals)
        self._path = path
        self._stamp = _stamp(path) if path else None
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    @classmethod
    def parse(cls, text: str, where: str = "tokens") -> dict[str, Principal]:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
        if isinstance(doc, Mapping) and isinstance(doc.get("tokens"), Mapping):
            doc = doc["tokens"]
        if not isinstance(doc, Mapping):
            raise ValueError(f"{where}: expected an object mapping tokens to principals")
        out: dict[str, Principal] = {}
        for key, entry in doc.items():
            digest, principal = _parse_entry(str(key), entry, where)
            out[digest] = principal
        return out

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TokenStore:
        p = Path(path).expanduser()
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"cannot read tokens file {p}: {exc.strerror}") from None
        principals = cls.parse(text, str(p))
        if not principals:
            raise ValueError(f"tokens file {p} holds no tokens")
        if p.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("tokens file %s is readable by group/others; chmod 600 it", p)
        return cls(principals, p)

    def __len__(self) -> int:
        return len(self._by_hash)

    def _maybe_reload(self) -> None:
        if self._path is None or time.monotonic() - self._checked < 1.0:
            return
        with self._lock:
            self._checked = time.monotonic()
            stamp = _stamp(self._path)
            if stamp == self._stamp:
                return
            try:
                principals = self.parse(self._path.read_text(encoding="utf-8"), str(self._path))
            except (OSError, ValueError) as exc:
                log.error("tokens file %s changed but cannot be used (%s); keeping the "
                          "previous tokens", self._path, exc)
                self._stamp = stamp
                return
            self._by_hash, self._stamp = principals, stamp
            log.info("tokens file %s reloaded: %d tokens", self._path, len(principals))

    def authenticate(self, token: str) -> Principal | None:
        self._maybe_reload()
        # Looked up by the SHA-256 of the presented token: the lookup's timing depends on the
        # hash, not on how many leading characters of a real token an attacker guessed.
        return self._by_hash.get(token_hash(token))


def _stamp(path: Path | None) -> tuple[int, int, int] | None:
    try:
        st = path.stat() if path else None
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino) if st else None


def new_token() -> str:
    """A random 256-bit token, URL-safe (43 characters)."""
    return secrets.token_urlsafe(32)


def add_token(
    path: str | os.PathLike[str], name: str, roles: list[str], galleries: list[str]
) -> str:
    """Draw a token, store its hash in the tokens file (created 0600), return the token."""
    p = Path(path).expanduser()
    doc: dict[str, Any] = {}
    if p.exists():
        doc = json.loads(p.read_text(encoding="utf-8") or "{}")
    token = new_token()
    entry = {"name": name, "roles": sorted(set(roles)), "galleries": galleries}
    _parse_entry("sha256:" + token_hash(token), entry, str(p))  # validate before writing
    if any(isinstance(v, Mapping) and v.get("name") == name for v in doc.values()):
        raise ValueError(f"a token named {name!r} already exists in {p}")
    doc["sha256:" + token_hash(token)] = entry
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, p)
    return token


def bearer_token(metadata: Any) -> str | None:
    """The token of ``authorization: Bearer <token>`` metadata, if any."""
    for key, value in metadata or ():
        if key.lower() == METADATA_KEY:
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


def _aborting_handler(handler: grpc.RpcMethodHandler, code: str, message: str):
    """A handler of the same streaming kind as ``handler`` that fails the call at once."""
    status = grpc.StatusCode[code]

    def abort(_request: Any, context: grpc.ServicerContext) -> None:
        context.abort(status, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


class AuthInterceptor(grpc.ServerInterceptor):
    """Authenticates every privface call and checks its method's role.

    ``tokens=None`` is the open loopback mode: every caller is :data:`ANONYMOUS`.
    """

    def __init__(
        self,
        tokens: TokenStore | None,
        method_roles: Mapping[str, frozenset[str]] = METHOD_ROLES,
        on_denied: Callable[[str, str, str], None] | None = None,
    ) -> None:
        self._tokens = tokens
        self._roles = dict(method_roles)
        self._on_denied = on_denied

    def authorize(self, method: str, metadata: Any) -> Principal:
        """The principal for a call, or :class:`AuthError`."""
        if self._tokens is None:
            principal = ANONYMOUS
        else:
            token = bearer_token(metadata)
            if token is None:
                raise AuthError(
                    "UNAUTHENTICATED",
                    "missing token: send 'authorization: Bearer <token>' metadata "
                    "(privface CLI: --token or PRIVFACE_TOKEN)",
                )
            found = self._tokens.authenticate(token)
            if found is None:
                raise AuthError("UNAUTHENTICATED", "invalid token")
            principal = found
        allowed = self._roles.get(method)
        if allowed is None:
            raise AuthError("PERMISSION_DENIED", f"method {method} is not open to any role")
        if not principal.has_role(allowed):
            raise AuthError(
                "PERMISSION_DENIED",
                f"token {principal.name!r} (roles: {', '.join(sorted(principal.roles))}) may "
                f"not call {method.rsplit('/', 1)[-1]}: it needs the "
                f"{' or '.join(sorted(allowed))} role",
            )
        return principal

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(PUBLIC_PREFIXES):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED
            return None
        try:
            principal = self.authorize(method, handler_call_details.invocation_metadata)
        except AuthError as exc:
            log.warning("refused %s: %s %s", method, exc.code, exc)
            if self._on_denied is not None:
                self._on_denied(method, exc.code, str(exc))
            return _aborting_handler(handler, exc.code, str(exc))
        _current.set(principal)
        return handler
