"""The service's plain modules without a server: tokens and roles, key ring and template
keys, idempotency digests, thresholds, settings."""

from __future__ import annotations

import json
import os
import stat
import time

import numpy as np
import pytest

from privface import auth, keys
from privface.config import load_settings
from privface.embedding import THRESHOLD_META_KEY, model_version_of, resolve_threshold
from privface.gallery_service import request_digest
from privface.v1 import gallery_pb2 as pb
from storage.crypto import KeyRing, load_keyring, new_keyring, save_keyring
from storage.errors import KeyRingError

# ------------------------------------------------------------------------------- tokens


def test_token_file_rules(tmp_path):
    good = {"name": "door", "roles": ["identify"], "galleries": ["lobby"]}
    assert len(auth.TokenStore.parse(json.dumps({"x" * 20: good}))) == 1
    assert len(auth.TokenStore.parse(json.dumps({"tokens": {"y" * 20: good}}))) == 1
    bad_entries = [
        {"short": good},  # a guessable token
        {"x" * 20: {**good, "roles": ["root"]}},
        {"x" * 20: {**good, "roles": []}},
        {"x" * 20: {"name": "door", "roles": ["identify"]}},  # no galleries: no default
        {"x" * 20: {**good, "name": " "}},
        {"sha256:abc": good},
    ]
    for doc in bad_entries:
        with pytest.raises(ValueError):
            auth.TokenStore.parse(json.dumps(doc))
    with pytest.raises(ValueError, match="JSON"):
        auth.TokenStore.parse("{not json")


def test_add_token_and_authenticate(tmp_path):
    path = tmp_path / "tokens.json"
    t1 = auth.add_token(path, "door-1", ["identify"], ["lobby", "site-*"])
    t2 = auth.add_token(path, "ops", ["admin"], ["*"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert t1 not in text and t2 not in text  # only hashes are stored
    with pytest.raises(ValueError, match="already exists"):
        auth.add_token(path, "ops", ["admin"], ["*"])
    store = auth.TokenStore.load(path)
    door = store.authenticate(t1)
    assert door.name == "door-1" and door.roles == {"identify"}
    assert store.authenticate("nope" * 10) is None
    assert door.may_use("lobby") and door.may_use("site-7") and not door.may_use("lobby2")
    # Revocation without a restart: the file is re-read when it changes.
    doc = json.loads(text)
    del doc["sha256:" + auth.token_hash(t1)]
    path.write_text(json.dumps(doc))
    os.utime(path, (time.time() + 5, time.time() + 5))
    store._checked -= 2
    assert store.authenticate(t1) is None and store.authenticate(t2).name == "ops"


def test_principal_require():
    p = auth.Principal("app", frozenset({"identify"}), ("team-a*",))
    p.require("identify", "team-a1")
    with pytest.raises(auth.AuthError) as e:
        p.require("enroll", "team-a1")
    assert e.value.code == "PERMISSION_DENIED"
    with pytest.raises(auth.AuthError, match="may not use gallery"):
        p.require("identify", "team-b")
    admin = auth.Principal("ops", frozenset({"admin"}), ("*",))
    admin.require("enroll", "anything")
    admin.require(frozenset({"identify", "enroll"}), "x")


def test_bearer_token_parsing():
    assert auth.bearer_token((("authorization", "Bearer abc"),)) == "abc"
    assert auth.bearer_token((("Authorization", "bearer  abc "),)) == "abc"
    assert auth.bearer_token((("authorization", "Basic abc"),)) is None
    assert auth.bearer_token((("authorization", "Bearer"),)) is None
    assert auth.bearer_token((("x-other", "Bearer abc"),)) is None
    assert auth.bearer_token(None) is None


def test_every_rpc_has_a_role():
    """A new RPC must be given roles explicitly; unlisted methods are refused."""
    methods = {
        f"/{service.full_name}/{method.name}"
        for service in pb.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert methods == set(auth.METHOD_ROLES)
    interceptor = auth.AuthInterceptor(None)
    with pytest.raises(auth.AuthError, match="not open"):
        interceptor.authorize("/privface.v1.SubjectService/Unlisted", ())
    assert interceptor.authorize("/privface.v1.MatchService/Identify", ()) is auth.ANONYMOUS


def test_current_principal_fails_closed():
    with pytest.raises(auth.AuthError) as e:
        auth.current_principal()
    assert e.value.code == "UNAUTHENTICATED"


# ------------------------------------------------------------------------------- keys


def test_template_keys_and_rotation():
    ring = keys.new_service_keyring()
    assert ring.primary == "k1" and keys.template_key_ids(ring) == ["tmap-1"]
    for _ in range(10):
        ring = keys.add_template_key(ring)
    assert keys.template_key_ids(ring)[-2:] == ["tmap-10", "tmap-11"]  # numeric order
    rotated = keys.rotate_encryption_key(ring)
    assert rotated.primary == "k2" and keys.encryption_key_ids(rotated) == ["k1", "k2"]
    assert keys.template_key_ids(rotated) == keys.template_key_ids(ring)

    a = keys.mapping_key(ring, "lobby", "tmap-1")
    assert a == keys.mapping_key(rotated, "lobby", "tmap-1")  # survives encryption rotation
    assert a != keys.mapping_key(ring, "garage", "tmap-1")  # one key per gallery
    assert a != keys.mapping_key(ring, "lobby", "tmap-2")  # renewable
    assert keys.mapping_key(ring, "lobby", "tmap-99") is None
    assert keys.mapping_key(ring, "lobby", "k1") is None  # encryption keys never map
    other = keys.new_service_keyring()
    assert keys.mapping_key(other, "lobby", "tmap-1") != a  # secret-dependent


def test_resolve_keyring(tmp_path):
    data = tmp_path / "data"
    with pytest.raises(KeyRingError, match="never creates keys"):
        keys.resolve_keyring("", data, create_quickstart=False, environ={})
    src = keys.resolve_keyring("", data, create_quickstart=True, environ={})
    created = data / keys.QUICKSTART_KEY_FILE
    assert src.path == created and stat.S_IMODE(created.stat().st_mode) == 0o600
    assert keys.template_key_ids(src.get()) == ["tmap-1"]
    # Found again (not re-created) on the next start, even for an external database.
    again = keys.resolve_keyring("", data, create_quickstart=False, environ={})
    assert again.get().keys == src.get().keys

    explicit = tmp_path / "explicit.json"
    save_keyring(keys.new_service_keyring(), explicit)
    assert keys.resolve_keyring(str(explicit), data, create_quickstart=False,
                                environ={}).path == explicit
    env = {"PRIVFACE_KEYRING_FILE": str(explicit)}
    assert keys.resolve_keyring("", data, create_quickstart=False, environ=env).path == explicit
    inline = {"PRIVFACE_KEYRING": keys.new_service_keyring().to_json()}
    src = keys.resolve_keyring("", data, create_quickstart=False, environ=inline)
    assert src.path is None and keys.template_key_ids(src.get()) == ["tmap-1"]


def test_keyring_source_reloads(tmp_path):
    path = tmp_path / "k.json"
    save_keyring(keys.new_service_keyring(), path)
    src = keys.KeyRingSource(load_keyring(path), path)
    rotated = keys.rotate_encryption_key(src.get())
    save_keyring(rotated, path, overwrite=True)
    assert src.reload().primary == "k2"
    path.write_text("{broken")
    os.utime(path, (time.time() + 5, time.time() + 5))
    assert src.reload().primary == "k2"  # a broken file never replaces working keys


def test_single_env_key_has_no_template_key():
    ring = KeyRing.from_single_key(new_keyring().to_json().split('"')[-2])
    assert keys.template_key_ids(ring) == []


# ------------------------------------------------------------------------------- misc


def test_request_digest():
    base = request_digest("enroll", "s1", [b"a", b"b"], "Ann", {"k": "v"})
    assert base == request_digest("enroll", "s1", [b"a", b"b"], "Ann", {"k": "v"})
    for other in (
        request_digest("enroll", "s1", [b"a", b"c"], "Ann", {"k": "v"}),
        request_digest("enroll", "s1", [b"ab"], "Ann", {"k": "v"}),
        request_digest("enroll", "s2", [b"a", b"b"], "Ann", {"k": "v"}),
        request_digest("enroll", "s1", [b"a", b"b"], "Anne", {"k": "v"}),
        request_digest("enroll", "s1", [b"a", b"b"], "Ann", {"k": "w"}),
        request_digest("add_samples", "s1", [b"a", b"b"], "Ann", {"k": "v"}),
    ):
        assert other != base
    assert len(base) == 64 and base == base.lower()


def test_threshold_resolution(tmp_path):
    assert resolve_threshold({THRESHOLD_META_KEY: 0.31}, 0.0) == (0.31, "model")
    assert resolve_threshold({THRESHOLD_META_KEY: 0.31}, 0.4) == (0.4, "settings")
    with pytest.raises(ValueError, match="PRIVFACE_THRESHOLD"):
        resolve_threshold({}, 0.0)
    a, b = tmp_path / "m.pt", tmp_path / "n.pt"
    a.write_bytes(b"one")
    b.write_bytes(b"two")
    assert model_version_of(a).startswith("m@") and model_version_of(a) != model_version_of(b)


def test_client_settings_from_environment():
    env = {"PRIVFACE_SERVER": "10.0.0.5:443", "PRIVFACE_TOKEN": "t" * 20,
           "PRIVFACE_GALLERY": "lobby", "PRIVFACE_THRESHOLD": "0.3",
           "PRIVFACE_SYNC_INTERVAL": "0.5", "PRIVFACE_TORCH_THREADS": "2"}
    s = load_settings(env=env)
    assert (s.server, s.token, s.gallery) == ("10.0.0.5:443", "t" * 20, "lobby")
    assert (s.threshold, s.sync_interval, s.torch_threads) == (0.3, 0.5, 2)


def test_protect_many_matches_protect_face(aligned_faces):
    from enrollment.profiles import get_profile
    from privface.client import content_rng, protect_face, protect_many

    profile = get_profile("partialface-paper")
    faces = aligned_faces[:3]
    rngs = [np.random.default_rng(i) for i in range(3)]
    many = protect_many(faces, profile, rngs=rngs)
    assert many == [protect_face(f, profile, rng=np.random.default_rng(i))
                    for i, f in enumerate(faces)]
    same = [content_rng(b"img", "p").integers(1 << 30) for _ in range(2)]
    assert same[0] == same[1] != content_rng(b"img2", "p").integers(1 << 30)


def test_face_and_mirror_reveal_one_subset(aligned_faces):
    """Every channel of the mirror view is a channel of the face view, mirrored (up to sign
    and float16 rounding): the server learns 9 coefficients per plane of a face, not 18."""
    from enrollment import wire
    from enrollment.profiles import get_profile
    from privface.client import protect_many

    profile = get_profile("partialface-paper")
    blobs = protect_many(aligned_faces[:8], profile, rng=np.random.default_rng(5))
    for blob in blobs:
        views = np.asarray(wire.decode(blob)[1], np.float32)
        face = np.abs(views[0][:, :, ::-1]).reshape(27, -1)
        mirror = np.abs(views[1]).reshape(27, -1)
        gap = np.abs(mirror[:, None] - face[None]).max(axis=2).min(axis=1)
        assert (gap <= 2e-3 * face.max() + 0.05).all()


def test_embedder_precision(service_model, att_inputs):
    """bf16 autocast (model_precision) gives the fp32 embeddings up to rounding, so templates
    made in either precision stay comparable; an unknown precision stops the start."""
    from privface.embedding import Embedder

    kw = {"threads": 1, "threshold": service_model.settings_threshold}
    fp32 = Embedder(service_model.path, **kw)
    bf16 = Embedder(service_model.path, precision="bf16", **kw)
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    views = [fp32.decode(att_inputs[(s, 1)], "sample") for s in range(1, 7)]
    a, b = fp32.embed(views), bf16.embed(views)
    assert np.all(np.sum(a * b, axis=1) > 0.999)
    assert not np.array_equal(a, b)  # it really ran in bf16
    assert load_settings(env={"PRIVFACE_MODEL_PRECISION": "auto"}).model_precision == "auto"
    with pytest.raises(ValueError, match="precision"):
        Embedder(service_model.path, precision="fp16", **kw)


def test_embedder_runtimes(service_model, att_inputs):
    """ONNX Runtime (the default for fp32) and torch give the same embeddings, so templates
    stay comparable whichever ran; impossible combinations stop the start."""
    from privface.embedding import Embedder

    kw = {"threads": 1, "threshold": service_model.settings_threshold}
    onnx, eager = Embedder(service_model.path, **kw), Embedder(service_model.path,
                                                               runtime="torch", **kw)
    assert (onnx.runtime, eager.runtime) == ("onnx", "torch")
    assert Embedder(service_model.path, precision="bf16", **kw).runtime == "torch"
    views = [onnx.decode(att_inputs[(s, 1)], "sample") for s in range(1, 7)]
    np.testing.assert_allclose(onnx.embed(views), eager.embed(views), rtol=0, atol=2e-5)
    assert load_settings(env={"PRIVFACE_MODEL_RUNTIME": "torch"}).model_runtime == "torch"
    with pytest.raises(ValueError, match="model_runtime"):
        Embedder(service_model.path, runtime="tensorrt", **kw)
    with pytest.raises(ValueError, match="fp32 or int8"):
        Embedder(service_model.path, runtime="onnx", precision="bf16", **kw)
    with pytest.raises(ValueError, match="ONNX Runtime"):
        Embedder(service_model.path, runtime="torch", precision="int8", **kw)


def test_embedder_int8(service_model, att_inputs, tmp_path):
    """The int8 graph (privface quantize) embeds close to fp32, so int8 probes search fp32
    templates; a graph quantised from another model file is refused at start."""
    import shutil

    from enrollment import onnx_runtime
    from enrollment.model_io import load_model, update_meta
    from privface.embedding import Embedder

    kw = {"threads": 1, "threshold": service_model.settings_threshold}
    path = service_model.path
    if not onnx_runtime.int8_path(path).exists():  # the tiny stand-in: quantise a copy here
        path = shutil.copy(path, tmp_path / "model.pt")
        fp32 = Embedder(path, runtime="torch", **kw)
        calibration = np.concatenate([fp32.decode(att_inputs[(s, 2)], "c") for s in range(1, 17)])
        graph = onnx_runtime.quantize_int8(load_model(path)[0], calibration.astype(np.float32))
        onnx_runtime.save_int8(path, graph)
    e8, e32 = Embedder(path, precision="int8", **kw), Embedder(path, **kw)
    assert (e8.precision, e8.runtime, e8.card.model_version) == (
        "int8", "onnx", e32.card.model_version)
    views = [e8.decode(att_inputs[(s, 1)], "sample") for s in range(20, 30)]
    a, b = e8.embed(views), e32.embed(views)
    assert np.sum(a * b, axis=1).min() > 0.99
    assert not np.allclose(a, b, atol=1e-4)
    other = shutil.copy(path, tmp_path / "other.pt")
    shutil.copy(onnx_runtime.int8_path(path), onnx_runtime.int8_path(other))
    update_meta(other, note="recalibrated")  # e.g. eval --write-threshold after quantize
    with pytest.raises(ValueError, match="another version"):
        Embedder(other, precision="int8", **kw)


def test_embedder_keeps_float16_until_the_model(service_model, att_inputs):
    from privface.embedding import Embedder

    e = Embedder(service_model.path, threads=1, threshold=service_model.settings_threshold)
    views = [e.decode(att_inputs[(s, 1)], "sample") for s in range(1, 4)]
    assert all(v.dtype == np.float16 for v in views)  # as the client sends them
    as_float32 = e.embed([v.astype(np.float32) for v in views])
    np.testing.assert_allclose(e.embed(views), as_float32, rtol=0, atol=1e-6)
    mixed = e.embed([views[0].astype(np.float32), views[1], views[2]])
    np.testing.assert_allclose(mixed, as_float32, rtol=0, atol=1e-6)


def test_embedder_reads_the_rank_off_each_view_for_per_subset_stems(
    subset_backbone, aligned_faces, tmp_path
):
    """A model with per-subset stems is served from the views alone: the server infers each
    view's rank, undoes its permutation and picks the subset's stem, in torch and in ONNX
    Runtime alike; so two permutations of one subset embed exactly alike."""
    from enrollment import wire
    from enrollment.model_io import save_model
    from enrollment.partialface import protect
    from enrollment.profiles import get_profile
    from privface.client import protect_many
    from privface.embedding import Embedder

    path = tmp_path / "stems.pt"
    save_model(path, subset_backbone, "partialface", "partialface-paper", {})
    onnx = Embedder(path, threads=1, threshold=0.5)
    eager = Embedder(path, threads=1, threshold=0.5, runtime="torch")
    profile = get_profile("partialface-paper")
    views = [onnx.decode(b, "s") for b in protect_many(aligned_faces, profile,
                                                       rng=np.random.default_rng(3))]
    np.testing.assert_allclose(onnx.embed(views), eager.embed(views), rtol=0, atol=2e-5)
    # one face, one subset, the six permutations: one embedding
    sent = protect(np.repeat(aligned_faces[:1], 6, axis=0), [[4, p] for p in range(6)])
    arrays = [eager.decode(wire.encode(v[None].astype(np.float16), profile), "s") for v in sent]
    e = eager.embed(arrays)
    np.testing.assert_allclose(e, np.repeat(e[:1], 6, axis=0), rtol=0, atol=1e-6)


def test_embedder_averages_each_view_over_the_permutations_of_its_subset(
    service_model, served_profile, aligned_faces
):
    """By default the server embeds each view under all six permutations of the subset it
    reads off the view and averages: what the model gives for those six inputs, averaged,
    whichever permutation the client drew; ``average_permutations = False`` embeds the view
    as sent."""
    import torch

    from enrollment import whitening
    from enrollment.model_io import embed, load_model, model_inputs
    from enrollment.partialface import protect
    from privface.embedding import Embedder

    profile = served_profile
    kw = {"threads": 1, "threshold": 0.5, "runtime": "torch"}
    averaged, as_sent = Embedder(service_model.path, **kw), Embedder(
        service_model.path, average_permutations=False, **kw)
    assert averaged.average_permutations and not as_sent.average_permutations
    assert not load_settings(env={"PRIVFACE_AVERAGE_PERMUTATIONS": "0"}).average_permutations
    face = aligned_faces[:1]
    sent = [protect(face, [[3, p]], subsets=profile.subsets, permutations=profile.permutations)
            for p in range(6)]  # one view each, six permutations
    e = averaged.embed(sent)
    np.testing.assert_allclose(e, np.repeat(e[:1], 6, axis=0), rtol=0, atol=1e-5)
    model, info = load_model(service_model.path)
    faces = torch.from_numpy(np.repeat(face, 6, axis=0).astype(np.float32)).permute(0, 3, 1, 2)
    each = embed(model, model_inputs(faces, "partialface", profile, np.c_[[3] * 6, range(6)]))
    mean = each.sum(axis=0, keepdims=True) / np.linalg.norm(each.sum(axis=0))
    # then the model file's whitening, if it carries one (the shipped model does)
    np.testing.assert_allclose(e[0], whitening.apply(mean, info["whitening"])[0], rtol=0,
                               atol=1e-5)
    single = as_sent.embed(sent)
    np.testing.assert_allclose(single, whitening.apply(each, info["whitening"]), rtol=0,
                               atol=1e-5)
    assert np.abs(single - e).max() > 1e-3
