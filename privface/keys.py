"""The service's key ring: where it comes from, how it reloads, and the template-mapping keys.

One key file (``storage.crypto`` format) holds two kinds of 256-bit secrets:

* **encryption keys** (``k1``, ``k2``, ...): AES-256-GCM keys of the values encrypted at rest
  (display names, metadata, templates). The primary one encrypts; all decrypt. ``privface keys
  rotate`` adds a new primary and re-encrypts everything online.
* **template-mapping secrets** (``tmap-1``, ``tmap-2``, ...): never used for encryption. The
  identity-mapping key of a gallery (method.md §5, PolyProtect) is derived from one of them,
  the gallery name and the secret's id: ``derive_key(secret, "gallery:<name>:<id>")``. The id
  is the *template key version* recorded with every sample (``template_key_id``). The
  highest version makes new templates; older versions keep being searched while their
  samples exist, so ``privface keys new-template-key`` renews templates without downtime
  (re-enrol, then remove the old samples). Rotating the encryption keys never touches them:
  templates stay comparable across rotations.

Neither kind is ever stored in the database. Where the ring comes from, first match wins:
``Settings.key_file`` (``PRIVFACE_KEY_FILE``), ``PRIVFACE_KEYRING_FILE``, ``PRIVFACE_KEYRING``
(JSON or one base64 key), an existing ``<data_dir>/keyring.json``, or — only for the quick start
on the embedded database — a new ``<data_dir>/keyring.json`` (mode 0600) created and logged.

A ring read from a file is re-read when the file changes (checked at most once a second), so
a rotation reaches a running server without a restart.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import threading
import time
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

from enrollment.identity_mapping import MappingKey, derive_key
from storage.crypto import KeyRing, keyring_from_env, load_keyring, new_keyring, save_keyring
from storage.errors import KeyRingError

log = logging.getLogger("privface.keys")

TEMPLATE_KEY_PREFIX = "tmap-"
_TEMPLATE_KEY_RE = re.compile(r"^tmap-(\d+)$")
QUICKSTART_KEY_FILE = "keyring.json"


def template_key_ids(ring: KeyRing) -> list[str]:
    """Template-mapping secret ids of a ring, oldest version first."""
    found = [(int(m.group(1)), k) for k in ring.keys if (m := _TEMPLATE_KEY_RE.match(k))]
    return [k for _, k in sorted(found)]


def encryption_key_ids(ring: KeyRing) -> list[str]:
    return [k for k in ring.key_ids if not _TEMPLATE_KEY_RE.match(k)]


def add_template_key(ring: KeyRing) -> KeyRing:
    """A ring with one more (newest) template-mapping secret; the primary is unchanged."""
    ids = template_key_ids(ring)
    n = int(ids[-1][len(TEMPLATE_KEY_PREFIX) :]) + 1 if ids else 1
    return ring.add_key(f"{TEMPLATE_KEY_PREFIX}{n}", make_primary=False)


def new_service_keyring() -> KeyRing:
    """A fresh ring: encryption key ``k1`` (primary) and template secret ``tmap-1``."""
    return add_template_key(new_keyring("k1"))


def rotate_encryption_key(ring: KeyRing) -> KeyRing:
    """Add a new primary encryption key (``k<n+1>``), template secrets untouched."""
    numbers = [int(k[1:]) for k in ring.keys if re.fullmatch(r"k\d+", k)]
    return ring.add_key(f"k{max(numbers, default=0) + 1}", make_primary=True)


@lru_cache(maxsize=4096)
def _derive(secret: bytes, context: str, m: int, c_max: int, overlap: int) -> MappingKey:
    return derive_key(secret, context, m=m, c_max=c_max, overlap=overlap)


def mapping_key(
    ring: KeyRing, gallery: str, key_id: str, *, m: int = 5, c_max: int = 50, overlap: int = 2
) -> MappingKey | None:
    """The identity-mapping key of ``gallery`` at template key version ``key_id``.

    ``None`` when the ring no longer holds that secret (its templates cannot be searched).
    """
    secret = ring.keys.get(key_id)
    if secret is None or not _TEMPLATE_KEY_RE.match(key_id):
        return None
    return _derive(bytes(secret), f"gallery:{gallery}:{key_id}", m, c_max, overlap)


class KeyRingSource:
    """The current key ring; re-reads its key file when the file changes."""

    def __init__(self, ring: KeyRing, path: Path | None = None, origin: str = "") -> None:
        self._ring = ring
        self._path = path
        self.origin = origin or (str(path) if path else "environment")
        self._stamp = _stamp(path)
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    @property
    def path(self) -> Path | None:
        return self._path

    def get(self) -> KeyRing:
        if self._path is not None and time.monotonic() - self._checked >= 1.0:
            self.reload()
        return self._ring

    def reload(self, force: bool = False) -> KeyRing:
        """Re-read the key file if it changed (or ``force``); keeps the old ring on errors."""
        if self._path is None:
            return self._ring
        with self._lock:
            self._checked = time.monotonic()
            stamp = _stamp(self._path)
            if stamp == self._stamp and not force:
                return self._ring
            try:
                ring = load_keyring(self._path)
            except KeyRingError as exc:
                log.error("key file %s changed but cannot be loaded (%s); keeping the previous "
                          "keys", self._path, exc)
                self._stamp = stamp
                return self._ring
            if ring.key_ids != self._ring.key_ids or ring.primary != self._ring.primary:
                log.info("key file %s reloaded: keys %s, primary %s", self._path,
                         ", ".join(ring.key_ids), ring.primary)
            self._ring, self._stamp = ring, stamp
            return ring


def _stamp(path: Path | None) -> tuple[int, int, int] | None:
    if path is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def resolve_keyring(
    key_file: str,
    data_dir: str | os.PathLike[str],
    *,
    create_quickstart: bool,
    environ: Mapping[str, str] | None = None,
) -> KeyRingSource:
    """Find the key ring (see the module docstring for the order); refuse if there is none.

    ``create_quickstart``: allowed to create ``<data_dir>/keyring.json`` (the embedded
    database of the quick start). With an external database a missing key is an error: a key
    created silently beside a server could be lost while the database lives on.
    """
    env = os.environ if environ is None else environ
    if key_file:
        path = Path(key_file).expanduser()
        return KeyRingSource(load_keyring(path), path)
    ring = keyring_from_env(env)
    if ring is not None:
        file_value = env.get("PRIVFACE_KEYRING_FILE", "").strip()
        if file_value:
            path = Path(file_value).expanduser()
            return KeyRingSource(ring, path)
        return KeyRingSource(ring, None, "PRIVFACE_KEYRING")
    path = Path(data_dir).expanduser() / QUICKSTART_KEY_FILE
    if path.exists():
        log.info("using the key file %s", path)
        return KeyRingSource(load_keyring(path), path)
    if not create_quickstart:
        raise KeyRingError(
            "no key ring configured: set key_file (PRIVFACE_KEY_FILE) or PRIVFACE_KEYRING_FILE "
            "to a key file made by `privface keys init FILE`, or PRIVFACE_KEYRING. A server on "
            "an external database never creates keys on its own."
        )
    save_keyring(new_service_keyring(), path)
    os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
    log.warning(
        "created a new key file %s (mode 0600): it holds the keys of every encrypted value and "
        "template in this data directory; back it up apart from the database", path
    )
    return KeyRingSource(load_keyring(path), path)
