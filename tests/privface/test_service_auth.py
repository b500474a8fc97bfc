"""Security over real gRPC: tokens, roles, gallery scopes, health, reflection, TLS, mTLS,
and the rules on when a server may run without tokens."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from privface.client import ClientError, PrivfaceClient
from privface.server import build_server, is_loopback, split_address
from tests.privface.conftest import service_settings, write_keys, write_tokens


def _code(call) -> grpc.StatusCode:
    with pytest.raises(ClientError) as info:
        call()
    return info.value.code


@pytest.fixture(scope="module")
def galleries(service, att_inputs):
    """team-a1 (in the scoped token's patterns) and other-b (not), one subject each."""
    with service.client("admin") as c:
        for name in ("team-a1", "other-b"):
            c.create_gallery(name)
            c.enroll(name, "s1", [att_inputs[(1, 1)]], display_name="Secret Name")
    return "team-a1", "other-b"


def test_missing_or_wrong_token_is_unauthenticated(service, galleries, att_inputs):
    a, _ = galleries
    for token in (None, "wrong-token-0123456789", "Bearer"):
        with PrivfaceClient(service.address, token=token) as c:
            assert _code(c.list_galleries) == grpc.StatusCode.UNAUTHENTICATED
            assert _code(lambda c=c: c.identify(a, att_inputs[(1, 2)])) == (
                grpc.StatusCode.UNAUTHENTICATED)
            assert _code(lambda c=c: list(c.enroll_batch(iter([])))) == (
                grpc.StatusCode.UNAUTHENTICATED)
    # A malformed authorization header is refused the same way.
    with PrivfaceClient(service.address) as c:
        c._metadata = (("authorization", f"Basic {service.tokens['admin']}"),)
        assert _code(c.list_galleries) == grpc.StatusCode.UNAUTHENTICATED


def test_identify_only_token_cannot_enrol_or_delete(service, galleries, att_inputs):
    a, _ = galleries
    probe = att_inputs[(1, 2)]
    with service.client("identify") as c:
        assert c.identify(a, probe).candidates[0].subject_id == "s1"
        assert c.verify(a, "s1", probe).score > 0
        assert c.get_subject(a, "s1").display_name == "Secret Name"
        denied = [
            lambda: c.enroll(a, "s9", [probe]),
            lambda: list(c.enroll_batch(iter([c.enroll_request(a, "s9", [probe])]))),
            lambda: c.add_samples(a, "s1", [probe]),
            lambda: c.remove_samples(a, "s1", [1]),
            lambda: c.delete_subject(a, "s1"),
            lambda: c.rename_subject(a, "s1", "x"),
            lambda: c.update_metadata(a, "s1", {}),
            lambda: c.create_gallery("new-one"),
            lambda: c.delete_gallery(a),
        ]
        for call in denied:
            assert _code(call) == grpc.StatusCode.PERMISSION_DENIED
    with service.client("enroll") as c:  # enroll may write subjects but not search
        assert _code(lambda: c.identify(a, probe)) == grpc.StatusCode.PERMISSION_DENIED
        assert _code(lambda: c.create_gallery("new-one")) == grpc.StatusCode.PERMISSION_DENIED
    with service.client("admin") as c:
        assert c.get_subject(a, "s1").sample_count == 1  # nothing happened


def test_gallery_scope(service, galleries, att_inputs):
    a, b = galleries
    probe = att_inputs[(1, 2)]
    with service.client("team_a") as c:
        assert [g.name for g in c.list_galleries()] == [a]
        assert c.identify(a, probe).candidates[0].subject_id == "s1"
        calls = [
            lambda g: c.identify(g, probe),
            lambda g: c.verify(g, "s1", probe),
            lambda g: c.get_subject(g, "s1"),
            lambda g: c.list_subjects_page(g),
            lambda g: c.gallery_stats(g),
            lambda g: c.enroll(g, "s2", [probe]),
            lambda g: c.delete_subject(g, "s1"),
        ]
        for call in calls:
            # B exists, "other-zzz" does not: the same answer, so nothing leaks.
            assert _code(lambda call=call: call(b)) == grpc.StatusCode.PERMISSION_DENIED
            assert _code(lambda call=call: call("other-zzz")) == grpc.StatusCode.PERMISSION_DENIED
        results = list(c.enroll_batch(iter([c.enroll_request(b, "s2", [probe])])))
        assert results[0].status == "PERMISSION_DENIED"
        with pytest.raises(ClientError) as info:
            c.get_subject(b, "s1")
        assert "Secret" not in info.value.details
    with service.client("admin") as c:
        assert c.gallery_stats(b).gallery.subject_count == 1


def test_server_info_says_who_calls(service, service_model, served_profile):
    from enrollment.model_io import load_model

    with service.client("team_a") as c:
        info = c.server_info()
    assert info.principal == "team-a-app" and sorted(info.roles) == ["enroll", "identify"]
    assert info.profile == served_profile.name
    assert info.template_key_id == "tmap-1"
    assert info.default_threshold != 0 and info.threshold_source in ("model", "settings")
    whitened = load_model(service_model.path)[1]["whitening"] is not None
    # the default settings (no score centring), and whether the model file carries a
    # whitening
    assert info.model_runtime == "onnx fp32, permutation-averaged" + (
        ", whitened" if whitened else "")


def test_health_and_reflection_need_no_token(service):
    channel = grpc.insecure_channel(service.address)
    try:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "privface.v1.MatchService", "privface.v1.SubjectService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"privface.v1.GalleryService", "privface.v1.SubjectService",
                "privface.v1.MatchService", "grpc.health.v1.Health"} <= services
        desc = db.FindFileContainingSymbol("privface.v1.MatchService")
        assert desc.package == "privface.v1"
    finally:
        channel.close()


def test_loopback_rules():
    assert split_address("127.0.0.1:50051") == ("127.0.0.1", 50051)
    assert split_address("[::1]:7") == ("::1", 7)
    for bad in ("50051", "host:", "host:port", ":5"):
        with pytest.raises(ValueError):
            split_address(bad)
    assert is_loopback("localhost") and is_loopback("127.0.0.2") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("10.1.2.3")
    assert not is_loopback("example.org")


def test_no_tokens_refused_off_loopback(tmp_path, service_model):
    for listen in ("0.0.0.0:0", "[::]:0", "myhost.example:0"):
        settings = service_settings(tmp_path, "postgresql://unused/none", service_model,
                                    listen=listen, tokens_file="")
        with pytest.raises(SystemExit, match="without client tokens"):
            build_server(settings)


# ------------------------------------------------------------------------------- TLS


def _certificates(root: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def issue(subject_cn, key, issuer_cn, issuer_key, *, ca=False, san=None, usage=None):
        b = (x509.CertificateBuilder().subject_name(name(subject_cn)).issuer_name(name(issuer_cn))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(minutes=5))
             .not_valid_after(now + dt.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        if usage:
            b = b.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    def write(stem, cert, key):
        (root / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if key is not None:
            (root / f"{stem}.key").write_bytes(key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = issue("privface test CA", ca_key, "privface test CA", ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = issue("localhost", server_key, "privface test CA", ca_key,
                   san=[x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
                   usage=[ExtendedKeyUsageOID.SERVER_AUTH])
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = issue("door-7", client_key, "privface test CA", ca_key,
                   usage=[ExtendedKeyUsageOID.CLIENT_AUTH])
    write("ca", ca, None)
    write("server", server, server_key)
    write("client", client, client_key)
    return {k: root / k for k in ("ca.pem", "server.pem", "server.key", "client.pem",
                                  "client.key")}


def test_tls_and_mutual_tls(tmp_path, service_db, service_model):
    certs = _certificates(tmp_path)
    tokens = write_tokens(tmp_path / "tokens.json")
    write_keys(tmp_path / "keyring.json")
    settings = service_settings(
        tmp_path, service_db, service_model, tls_cert=str(certs["server.pem"]),
        tls_key=str(certs["server.key"]), tls_client_ca=str(certs["ca.pem"]), sync_interval=0,
    )
    running = build_server(settings, warm_up=False)
    try:
        assert running.tls
        target = f"localhost:{running.port}"
        with PrivfaceClient(target, token=tokens["admin"], server_ca=certs["ca.pem"],
                            client_cert=certs["client.pem"], client_key=certs["client.key"],
                            timeout=10) as c:
            assert c.server_info().principal == "ops"
        # The token is still required over mutual TLS.
        with PrivfaceClient(target, server_ca=certs["ca.pem"], client_cert=certs["client.pem"],
                            client_key=certs["client.key"], timeout=10) as c:
            assert _code(c.server_info) == grpc.StatusCode.UNAUTHENTICATED
        # No client certificate, or no TLS at all: the handshake fails.
        with PrivfaceClient(target, token=tokens["admin"], server_ca=certs["ca.pem"],
                            timeout=10) as c:
            assert _code(c.server_info) == grpc.StatusCode.UNAVAILABLE
        with PrivfaceClient(target, token=tokens["admin"], timeout=10) as c:
            assert _code(c.server_info) == grpc.StatusCode.UNAVAILABLE
    finally:
        running.stop(0)

    # TLS without client certificates.
    settings.tls_client_ca = ""
    running = build_server(settings, warm_up=False)
    try:
        with PrivfaceClient(f"localhost:{running.port}", token=tokens["identify"],
                            server_ca=certs["ca.pem"], timeout=10) as c:
            assert c.server_info().principal == "door-7"
    finally:
        running.stop(0)
