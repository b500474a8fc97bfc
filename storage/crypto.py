"""Encryption at rest: AES-256-GCM with a key ring, for the few columns that hold personal data.

Why this shape:

* **AES-256-GCM, random 96-bit nonce per value.** Authenticated, fast, and in ``cryptography``.
  A fresh nonce per encryption means equal plaintexts give unrelated ciphertexts, so the
  database does not reveal which subjects share a name.
* **Associated data = the row's identity** (``b"subjects:42:display_name"``, see
  :func:`row_aad`). GCM authenticates it without storing it, so a ciphertext copied into
  another row or column fails to decrypt instead of silently swapping two people's data.
* **A key id stored next to every ciphertext.** The key ring holds several keys; new values
  use the *primary* one, old values keep decrypting with theirs. Rotation is therefore online:
  add a key, make it primary, re-encrypt rows in small batches, and remove the old key only
  when nothing references it.
* **Keys never live in the database**: they come from a key file or the environment (see
  :func:`load_keyring`), so a stolen database dump or backup is useless on its own.

Stored format of one value (the ``*_ct`` columns): ``version (1 byte, 0x01) || nonce (12) ||
ciphertext || tag (16)``. The key id lives in the sibling ``*_enc_key_id`` column, so finding the
rows that still use an old key is a plain indexed SQL query.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from storage.errors import DecryptionFailed, KeyRingError, UnknownKeyId

__all__ = [
    "ENV_KEYRING",
    "ENV_KEYRING_FILE",
    "KeyRing",
    "keyring_from_env",
    "load_keyring",
    "new_keyring",
    "row_aad",
    "save_keyring",
]

_log = logging.getLogger(__name__)

#: Environment variable holding the key ring JSON, or one base64-encoded 32-byte key.
ENV_KEYRING = "PRIVFACE_KEYRING"
#: Environment variable holding the path of a key file (same JSON as :meth:`KeyRing.to_json`).
ENV_KEYRING_FILE = "PRIVFACE_KEYRING_FILE"

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
_FORMAT_V1 = 0x01
_KEY_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def row_aad(table: str, row_id: int, column: str) -> bytes:
    """Associated data binding a ciphertext to one cell: ``b"{table}:{row_id}:{column}"``."""
    return f"{table}:{int(row_id)}:{column}".encode()


def _check_key_id(key_id: str) -> str:
    if not isinstance(key_id, str) or not _KEY_ID_RE.match(key_id):
        raise KeyRingError(
            f"invalid key id {key_id!r}: use 1-64 characters from A-Z a-z 0-9 . _ - "
            "starting with a letter or digit"
        )
    return key_id


def _decode_key(value: str, key_id: str) -> bytes:
    """Decode a base64 (standard or URL-safe) key and insist on exactly 32 bytes."""
    text = value.strip()
    try:
        raw = base64.b64decode(text.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KeyRingError(f"key {key_id!r} is not valid base64") from exc
    if len(raw) != KEY_BYTES:
        raise KeyRingError(
            f"key {key_id!r} is {len(raw)} bytes; AES-256 needs exactly {KEY_BYTES} bytes"
        )
    return raw


@dataclass(frozen=True, eq=False)
class KeyRing:
    """Several AES-256 keys by key id; ``primary`` encrypts new values, all of them decrypt.

    Immutable: :meth:`add_key`, :meth:`rotate` and :meth:`remove_key` return a new ring, so a
    ring shared by many threads never changes under them.
    """

    primary: str
    keys: Mapping[str, bytes] = field(repr=False)
    _aead: Mapping[str, AESGCM] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.keys:
            raise KeyRingError("key ring holds no keys")
        keys: dict[str, bytes] = {}
        for key_id, key in self.keys.items():
            _check_key_id(key_id)
            if not isinstance(key, bytes | bytearray) or len(key) != KEY_BYTES:
                raise KeyRingError(f"key {key_id!r} must be exactly {KEY_BYTES} bytes")
            keys[key_id] = bytes(key)
        if self.primary not in keys:
            raise KeyRingError(
                f"primary key id {self.primary!r} is not among the keys ({', '.join(keys)})"
            )
        object.__setattr__(self, "keys", MappingProxyType(keys))
        object.__setattr__(self, "_aead", MappingProxyType({k: AESGCM(v) for k, v in keys.items()}))

    @property
    def key_ids(self) -> list[str]:
        """All key ids, sorted."""
        return sorted(self.keys)

    # -- encryption -------------------------------------------------------------------------

    def encrypt(self, plaintext: bytes, aad: bytes) -> tuple[str, bytes]:
        """Encrypt with the primary key; returns ``(key_id, blob)`` to store side by side."""
        nonce = os.urandom(NONCE_BYTES)
        ct = self._aead[self.primary].encrypt(nonce, bytes(plaintext), aad)
        return self.primary, bytes([_FORMAT_V1]) + nonce + ct

    def decrypt(self, key_id: str, blob: bytes, aad: bytes) -> bytes:
        """Decrypt a blob made by :meth:`encrypt` for the same ``aad``.

        Raises :class:`UnknownKeyId` when the key is not loaded and :class:`DecryptionFailed`
        when authentication fails (wrong row/column, tampering, or a different key under the
        same id).
        """
        aead = self._aead.get(key_id)
        if aead is None:
            raise UnknownKeyId(key_id, list(self.keys))
        blob = bytes(blob)
        if len(blob) < 1 + NONCE_BYTES + TAG_BYTES or blob[0] != _FORMAT_V1:
            raise DecryptionFailed(
                f"stored value for {aad.decode(errors='replace')} is not a privface v1 ciphertext"
            )
        try:
            return aead.decrypt(blob[1 : 1 + NONCE_BYTES], blob[1 + NONCE_BYTES :], aad)
        except InvalidTag:
            raise DecryptionFailed(
                f"cannot authenticate the value stored for {aad.decode(errors='replace')} with key "
                f"{key_id!r}: it was tampered with, copied from another row, or the key file "
                "holds a different key under that id"
            ) from None

    # -- key management ---------------------------------------------------------------------

    def add_key(
        self, key_id: str | None = None, key: bytes | None = None, *, make_primary: bool = True
    ) -> KeyRing:
        """Return a ring with one more key (random unless given), primary by default."""
        key_id = _check_key_id(key_id) if key_id is not None else self._next_key_id()
        if key_id in self.keys:
            raise KeyRingError(f"key id {key_id!r} already exists in the key ring")
        new_keys = dict(self.keys)
        new_keys[key_id] = key if key is not None else secrets.token_bytes(KEY_BYTES)
        return KeyRing(primary=key_id if make_primary else self.primary, keys=new_keys)

    def rotate(self, key_id: str | None = None) -> KeyRing:
        """Add a fresh random key and make it primary (step 1 of a rotation).

        Step 2 is :func:`storage.repository.rotate_keys`, step 3 :meth:`remove_key`.
        """
        return self.add_key(key_id, make_primary=True)

    def remove_key(self, key_id: str) -> KeyRing:
        """Return a ring without ``key_id``; the primary key cannot be removed."""
        if key_id not in self.keys:
            raise KeyRingError(f"key id {key_id!r} is not in the key ring")
        if key_id == self.primary:
            raise KeyRingError(f"cannot remove the primary key {key_id!r}; rotate first")
        return KeyRing(
            primary=self.primary, keys={k: v for k, v in self.keys.items() if k != key_id}
        )

    def _next_key_id(self) -> str:
        numbers = [int(k[1:]) for k in self.keys if re.fullmatch(r"k\d+", k)]
        n = max(numbers, default=len(self.keys)) + 1
        while f"k{n}" in self.keys:
            n += 1
        return f"k{n}"

    # -- serialisation ----------------------------------------------------------------------

    def to_json(self) -> str:
        """The key file format: ``{"primary": "k2", "keys": {"k1": "<base64>", ...}}``."""
        keys = {k: base64.b64encode(v).decode("ascii") for k, v in sorted(self.keys.items())}
        return json.dumps({"primary": self.primary, "keys": keys}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> KeyRing:
        """Parse the key file format; every problem is a :class:`KeyRingError`."""
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise KeyRingError(
                f"key ring is not valid JSON: {exc.msg} (line {exc.lineno})"
            ) from None
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), dict):
            raise KeyRingError('key ring JSON must look like {"primary": "k1", "keys": {...}}')
        primary = doc.get("primary")
        if not isinstance(primary, str):
            raise KeyRingError('key ring JSON needs a "primary" key id (a string)')
        keys: dict[str, bytes] = {}
        for key_id, value in doc["keys"].items():
            _check_key_id(key_id)
            if not isinstance(value, str):
                raise KeyRingError(f"key {key_id!r} must be a base64 string")
            keys[key_id] = _decode_key(value, key_id)
        return cls(primary=primary, keys=keys)

    @classmethod
    def from_single_key(cls, key_b64: str) -> KeyRing:
        """A one-key ring from a bare base64 key, e.g. ``PRIVFACE_KEYRING=<base64>``.

        The key id is derived from the key (``env-<12 hex>``) so it is stable across restarts
        and a different key shows up as an unknown key id rather than as corrupt data.
        """
        key = _decode_key(key_b64, "PRIVFACE_KEYRING")
        digest = hashlib.sha256(b"privface-key-id\x00" + key).hexdigest()[:12]
        key_id = f"env-{digest}"
        return cls(primary=key_id, keys={key_id: key})


def new_keyring(key_id: str = "k1") -> KeyRing:
    """A ring with one fresh random 256-bit key (from the OS CSPRNG)."""
    return KeyRing(primary=_check_key_id(key_id), keys={key_id: secrets.token_bytes(KEY_BYTES)})


def save_keyring(
    keyring: KeyRing, path: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Write a key file atomically with mode 0600.

    Atomic (temp file + rename) because a half-written key file after a crash would lock every
    encrypted value away; refuses to replace an existing file unless ``overwrite``.
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise KeyRingError(f"key file {target} already exists; pass overwrite=True to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".keyring-", dir=target.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(keyring.to_json())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _read_key_file(path: Path) -> KeyRing:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KeyRingError(f"key file {path} does not exist") from None
    except OSError as exc:
        raise KeyRingError(f"cannot read key file {path}: {exc.strerror}") from None
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        _log.warning(
            "key file %s is accessible by group/others (mode %o); chmod 600 it",
            path,
            stat.S_IMODE(mode),
        )
    return KeyRing.from_json(text)


def keyring_from_env(environ: Mapping[str, str] | None = None) -> KeyRing | None:
    """The key ring named by the environment, or ``None`` when neither variable is set.

    ``PRIVFACE_KEYRING_FILE`` names a key file; ``PRIVFACE_KEYRING`` holds the JSON itself or
    one base64 key. Setting both is refused: silently preferring one would make it unclear
    which keys a running server uses.
    """
    env = os.environ if environ is None else environ
    file_value = env.get(ENV_KEYRING_FILE, "").strip()
    inline = env.get(ENV_KEYRING, "").strip()
    if file_value and inline:
        raise KeyRingError(f"set either {ENV_KEYRING} or {ENV_KEYRING_FILE}, not both")
    if file_value:
        return _read_key_file(Path(file_value).expanduser())
    if inline:
        if inline.startswith("{"):
            return KeyRing.from_json(inline)
        return KeyRing.from_single_key(inline)
    return None


def load_keyring(
    path: str | os.PathLike[str] | None = None, *, environ: Mapping[str, str] | None = None
) -> KeyRing:
    """Load the key ring from ``path`` if given, else from the environment.

    There is deliberately no built-in default key: a missing configuration is an error that
    tells the operator how to create one.
    """
    if path is not None:
        return _read_key_file(Path(path).expanduser())
    ring = keyring_from_env(environ)
    if ring is None:
        raise KeyRingError(
            f"no encryption keys configured: set {ENV_KEYRING_FILE} to a key file (create one "
            f"with storage.crypto.save_keyring(storage.crypto.new_keyring(), path)) or set "
            f"{ENV_KEYRING} to the key ring JSON or a base64 32-byte key"
        )
    return ring
