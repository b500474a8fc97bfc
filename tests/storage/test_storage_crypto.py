"""Key ring and AES-GCM envelope: no database needed."""

from __future__ import annotations

import base64
import json
import os
import stat

import pytest

from storage.crypto import KeyRing, load_keyring, new_keyring, row_aad, save_keyring
from storage.errors import DecryptionFailed, KeyRingError, UnknownKeyId

AAD = row_aad("subjects", 7, "display_name")


def test_round_trip_and_fresh_nonce_per_value() -> None:
    ring = new_keyring()
    kid1, ct1 = ring.encrypt(b"Ada Lovelace", AAD)
    kid2, ct2 = ring.encrypt(b"Ada Lovelace", AAD)
    assert kid1 == kid2 == "k1"
    assert ct1 != ct2  # random nonce: equal names do not produce equal ciphertexts
    assert b"Ada" not in ct1
    assert ring.decrypt(kid1, ct1, AAD) == b"Ada Lovelace"
    assert ring.decrypt(kid1, ring.encrypt(b"", AAD)[1], AAD) == b""


def test_associated_data_binds_row_and_column() -> None:
    ring = new_keyring()
    kid, ct = ring.encrypt(b"secret", AAD)
    for other in (
        row_aad("subjects", 8, "display_name"),
        row_aad("subjects", 7, "metadata"),
        row_aad("samples", 7, "display_name"),
    ):
        with pytest.raises(DecryptionFailed, match="copied from another row"):
            ring.decrypt(kid, ct, other)


def test_tampering_is_detected() -> None:
    ring = new_keyring()
    kid, ct = ring.encrypt(b"secret", AAD)
    flipped = bytearray(ct)
    flipped[-1] ^= 1
    with pytest.raises(DecryptionFailed):
        ring.decrypt(kid, bytes(flipped), AAD)
    with pytest.raises(DecryptionFailed, match="not a privface v1 ciphertext"):
        ring.decrypt(kid, b"\x02" + ct[1:], AAD)
    with pytest.raises(DecryptionFailed):
        ring.decrypt(kid, ct[:10], AAD)


def test_unknown_key_id_is_a_clear_error() -> None:
    old = new_keyring("k1")
    kid, ct = old.encrypt(b"x", AAD)
    other = new_keyring("k2")
    with pytest.raises(UnknownKeyId, match="'k1'.*not in the key ring.*loaded: k2") as err:
        other.decrypt(kid, ct, AAD)
    assert err.value.key_id == "k1"
    assert err.value.grpc_code == "FAILED_PRECONDITION"


def test_same_id_different_key_fails_authentication() -> None:
    kid, ct = new_keyring("k1").encrypt(b"x", AAD)
    with pytest.raises(DecryptionFailed, match="different key"):
        new_keyring("k1").decrypt(kid, ct, AAD)


def test_rotate_add_remove() -> None:
    ring = new_keyring()
    kid, ct = ring.encrypt(b"old", AAD)
    rotated = ring.rotate()
    assert rotated.primary == "k2" and rotated.key_ids == ["k1", "k2"]
    assert ring.primary == "k1"  # rings are immutable
    assert rotated.decrypt(kid, ct, AAD) == b"old"
    assert rotated.encrypt(b"new", AAD)[0] == "k2"
    with pytest.raises(KeyRingError, match="primary"):
        rotated.remove_key("k2")
    trimmed = rotated.remove_key("k1")
    assert trimmed.key_ids == ["k2"]
    with pytest.raises(UnknownKeyId):
        trimmed.decrypt(kid, ct, AAD)
    secondary = rotated.add_key("backup", os.urandom(32), make_primary=False)
    assert secondary.primary == "k2"
    with pytest.raises(KeyRingError, match="already exists"):
        secondary.add_key("backup")
    assert repr(secondary) == "KeyRing(primary='k2')"  # key material never in logs


def test_invalid_rings_are_rejected() -> None:
    with pytest.raises(KeyRingError, match="exactly 32 bytes"):
        KeyRing(primary="k1", keys={"k1": b"short"})
    with pytest.raises(KeyRingError, match="primary key id"):
        KeyRing(primary="k9", keys={"k1": os.urandom(32)})
    with pytest.raises(KeyRingError, match="invalid key id"):
        KeyRing(primary="bad id", keys={"bad id": os.urandom(32)})
    with pytest.raises(KeyRingError, match="no keys"):
        KeyRing(primary="k1", keys={})
    with pytest.raises(KeyRingError, match="not valid JSON"):
        KeyRing.from_json("{nope")
    with pytest.raises(KeyRingError, match="not valid base64"):
        KeyRing.from_json(json.dumps({"primary": "k1", "keys": {"k1": "***"}}))
    short = base64.b64encode(os.urandom(16)).decode()
    with pytest.raises(KeyRingError, match="16 bytes"):
        KeyRing.from_json(json.dumps({"primary": "k1", "keys": {"k1": short}}))


def test_key_file_round_trip_is_private_and_atomic(tmp_path) -> None:
    ring = new_keyring().rotate()
    path = save_keyring(ring, tmp_path / "keys" / "keyring.json")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = load_keyring(path)
    assert loaded.primary == "k2" and dict(loaded.keys) == dict(ring.keys)
    doc = json.loads(path.read_text())
    assert doc["primary"] == "k2" and set(doc["keys"]) == {"k1", "k2"}
    with pytest.raises(KeyRingError, match="already exists"):
        save_keyring(new_keyring(), path)
    save_keyring(loaded.rotate(), path, overwrite=True)
    assert load_keyring(path).primary == "k3"
    assert [p.name for p in path.parent.iterdir()] == ["keyring.json"]  # no temp files left


def test_load_from_environment(tmp_path) -> None:
    ring = new_keyring("prod-2024")
    assert load_keyring(environ={"PRIVFACE_KEYRING": ring.to_json()}).keys == ring.keys

    raw = os.urandom(32)
    single = load_keyring(environ={"PRIVFACE_KEYRING": base64.b64encode(raw).decode()})
    assert list(single.keys.values()) == [raw]
    again = load_keyring(environ={"PRIVFACE_KEYRING": base64.urlsafe_b64encode(raw).decode()})
    assert again.primary == single.primary  # key id derived from the key: stable
    assert single.primary.startswith("env-")

    path = save_keyring(ring, tmp_path / "k.json")
    assert load_keyring(environ={"PRIVFACE_KEYRING_FILE": str(path)}).primary == "prod-2024"

    with pytest.raises(KeyRingError, match="not both"):
        load_keyring(
            environ={"PRIVFACE_KEYRING_FILE": str(path), "PRIVFACE_KEYRING": ring.to_json()}
        )
    with pytest.raises(KeyRingError, match="no encryption keys configured"):
        load_keyring(environ={})
    with pytest.raises(KeyRingError, match="does not exist"):
        load_keyring(tmp_path / "missing.json")
