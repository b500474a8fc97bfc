"""Bad input (product.md): each case gets its precise status; nothing stored is harmed; the
server keeps serving. Everything goes through a real gRPC server on a real PostgreSQL."""

from __future__ import annotations

import functools

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from enrollment import wire
from enrollment.profiles import get_profile
from privface.client import ClientError
from privface.v1 import gallery_pb2 as pb
from tests.privface import helpers
from tests.privface.helpers import MAX_MESSAGE

SHAPE = (27, 112, 112)


@pytest.fixture(scope="module")
def raw_wire(served_profile):
    """Wire bytes with any header, protected for the served model unless a test names another
    profile: bad input must fail on what is bad in it, not on being for another model."""
    return functools.partial(helpers.raw_wire, profile=served_profile.name)


@pytest.fixture(scope="module")
def stocked(service, att_inputs):
    """A gallery with two subjects, and a probe with its answer before any bad input."""
    name = "bad-input"
    with service.client("admin") as c:
        c.create_gallery(name)
        c.enroll(name, "s1", [att_inputs[(1, i)] for i in (1, 2)], display_name="One",
                 metadata={"k": "v"}, idempotency_key="idem-1")
        c.enroll(name, "s2", [att_inputs[(2, 1)]])
        before = c.identify(name, att_inputs[(1, 1)], top_k=2)
        stats = c.gallery_stats(name)
    return name, before, stats


def _refused(call, code: grpc.StatusCode, reason: str | None = None) -> ClientError:
    with pytest.raises(ClientError) as info:
        call()
    assert info.value.code == code, info.value
    if reason is not None:
        assert info.value.reason == reason, info.value
    assert info.value.details  # a message a person can act on
    return info.value


def _good_array(n: int = 1) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, *SHAPE)).astype(np.float16)


def test_protected_input_cases(service, stocked, raw_wire, served_profile):
    name, _, _ = stocked
    bad = {
        "shape": raw_wire(np.zeros((1, 27, 56, 56), np.float16)),
        "dtype": raw_wire(np.zeros((1, *SHAPE), np.int32)),
        "non_finite": raw_wire(np.where(np.arange(27 * 112 * 112).reshape(1, *SHAPE) == 5,
                                        np.nan, 0.0).astype(np.float16)),
        "profile": raw_wire(_good_array(), profile="no-such-profile"),
        "profile_version": raw_wire(_good_array(), version=99),
        "profile_digest": raw_wire(_good_array(), digest="0123456789abcdef"),
        "empty": raw_wire(np.zeros((0, *SHAPE), np.float16)),
        "malformed": b"PFPI\x01garbage",
        "views": raw_wire(_good_array(9)),
    }
    inf = _good_array()
    inf[0, 3, 4, 5] = np.inf
    bad["non_finite_inf"] = raw_wire(inf)
    # A payload that does not match its declared shape.
    bad["shape_payload"] = raw_wire(_good_array(), shape=(2, *SHAPE))
    # A known profile the server's model does not accept.
    hfcf = get_profile("hfcf")
    bad["other_profile"] = wire.encode(np.zeros((1, *hfcf.shape), np.float16), hfcf)
    expected_reason = {"non_finite_inf": "non_finite", "shape_payload": "shape",
                       "other_profile": "profile"}
    with service.client("admin") as c:
        for case, blob in bad.items():
            reason = expected_reason.get(case, case)
            e = _refused(lambda b=blob, k=case: c.enroll(name, f"x-{k}", [b]),
                         grpc.StatusCode.INVALID_ARGUMENT, reason)
            assert "sample 0" in e.details
            _refused(lambda b=blob: c.identify(name, b), grpc.StatusCode.INVALID_ARGUMENT, reason)
            _refused(lambda b=blob: c.verify(name, "s1", b), grpc.StatusCode.INVALID_ARGUMENT,
                     reason)
        # The second sample is the bad one: the message names it, nothing is stored.
        good = wire.encode(_good_array(), served_profile)
        e = _refused(lambda: c.enroll(name, "x-mixed", [good, bad["shape"]]),
                     grpc.StatusCode.INVALID_ARGUMENT, "shape")
        assert "sample 1" in e.details
        _refused(lambda: c.get_subject(name, "x-mixed"), grpc.StatusCode.NOT_FOUND)


def test_request_cases(service, stocked, att_inputs):
    name, _, _ = stocked
    probe = att_inputs[(1, 6)]
    with service.client("admin") as c:
        _refused(lambda: c.enroll(name, "x-none", []), grpc.StatusCode.INVALID_ARGUMENT, "empty")
        _refused(lambda: c.identify(name, b""), grpc.StatusCode.INVALID_ARGUMENT, "empty")
        for call in (
            lambda: c.enroll("no-such-gallery", "s1", [probe]),
            lambda: c.identify("no-such-gallery", probe),
            lambda: c.verify("no-such-gallery", "s1", probe),
            lambda: c.gallery_stats("no-such-gallery"),
            lambda: c.delete_gallery("no-such-gallery"),
            lambda: c.get_subject("no-such-gallery", "s1"),
            lambda: c.verify(name, "nobody", probe),
            lambda: c.delete_subject(name, "nobody"),
            lambda: c.remove_samples(name, "s1", [10**12]),
        ):
            _refused(call, grpc.StatusCode.NOT_FOUND)
        _refused(lambda: c.enroll(name, " padded ", [probe]), grpc.StatusCode.INVALID_ARGUMENT)
        _refused(lambda: c.create_gallery("bad name!"), grpc.StatusCode.INVALID_ARGUMENT)
        _refused(lambda: c.create_gallery(name), grpc.StatusCode.ALREADY_EXISTS)
        _refused(lambda: c.enroll(name, "s2", [probe]), grpc.StatusCode.ALREADY_EXISTS)
        _refused(lambda: c.identify(name, probe, top_k=1000), grpc.StatusCode.INVALID_ARGUMENT)
        _refused(lambda: c.identify(name, probe, threshold=5.0), grpc.StatusCode.INVALID_ARGUMENT)
        _refused(lambda: c.list_subjects_page(name, page_token="nonsense"),
                 grpc.StatusCode.INVALID_ARGUMENT)
        _refused(lambda: c.update_metadata(name, "s1", {"k": "x" * 5000}),
                 grpc.StatusCode.INVALID_ARGUMENT)


def test_idempotency(service, stocked, att_inputs):
    name, _, _ = stocked
    with service.client("admin") as c:
        first = c.get_subject(name, "s1")
        again = c.enroll(name, "s1", [att_inputs[(1, i)] for i in (1, 2)], display_name="One",
                         metadata={"k": "v"}, idempotency_key="idem-1")
        assert again.replayed and list(again.sample_ids) == [s.sample_id for s in first.samples]
        for changed in (
            dict(samples=[att_inputs[(1, 1)]]),  # different content
            dict(samples=[att_inputs[(1, i)] for i in (1, 2)], display_name="Other"),
        ):
            kwargs = {"display_name": "One", "metadata": {"k": "v"}, **changed}
            samples = kwargs.pop("samples")
            _refused(lambda s=samples, k=kwargs: c.enroll(name, "s1", s, idempotency_key="idem-1",
                                                         **k),
                     grpc.StatusCode.ALREADY_EXISTS)


def test_oversized_message(service, stocked):
    name, _, _ = stocked
    big = b"PFPI" + bytes(MAX_MESSAGE + 1024)
    with service.client("admin") as c:
        _refused(lambda: c.identify(name, big), grpc.StatusCode.RESOURCE_EXHAUSTED)
        _refused(lambda: c.enroll(name, "x-big", [big]), grpc.StatusCode.RESOURCE_EXHAUSTED)


def test_batch_items_and_empty_batch(service, stocked, att_inputs, raw_wire):
    name, _, _ = stocked
    with service.client("enroll") as c:
        _refused(lambda: list(c.enroll_batch(iter([]))), grpc.StatusCode.INVALID_ARGUMENT,
                 "empty")
        requests = [
            c.enroll_request(name, "b-ok", [att_inputs[(3, 1)]]),
            c.enroll_request(name, "b-bad", [raw_wire(np.zeros((1, 27, 8, 8), np.float16))]),
            c.enroll_request("no-such-gallery", "b-nowhere", [att_inputs[(3, 2)]]),
            c.enroll_request(name, "b-none", []),
            c.enroll_request(name, "s2", [att_inputs[(3, 3)]]),  # exists
            c.enroll_request("bad-input-scope-test", "b-x", [att_inputs[(3, 4)]]),
            c.enroll_request(name, "b-ok2", [att_inputs[(4, 1)]]),
        ]
        results = list(c.enroll_batch(iter(requests)))
    assert [r.index for r in results] == list(range(len(requests)))
    got = [(r.subject_id, r.ok, r.status, r.reason) for r in results]
    assert got[0] == ("b-ok", True, "OK", "")
    assert got[1] == ("b-bad", False, "INVALID_ARGUMENT", "shape")
    assert got[2][1:3] == (False, "NOT_FOUND")
    assert got[3] == ("b-none", False, "INVALID_ARGUMENT", "empty")
    assert got[4][1:3] == (False, "ALREADY_EXISTS")
    assert got[5][1:3] == (False, "NOT_FOUND")
    assert got[6] == ("b-ok2", True, "OK", "")
    assert all(r.message for r in results if not r.ok)


def test_nothing_harmed_and_still_serving(service, stocked, att_inputs):
    """Runs after the bad-input tests of this module (file order)."""
    name, before, stats = stocked
    with service.client("admin") as c:
        after = c.identify(name, att_inputs[(1, 1)], top_k=10)
        scores = {x.subject_id: (x.sample_id, x.score) for x in after.candidates}
        for x in before.candidates:  # s1 and s2 answer exactly as before
            assert scores[x.subject_id][0] == x.sample_id
            assert scores[x.subject_id][1] == pytest.approx(x.score, abs=1e-5)
        s1 = c.get_subject(name, "s1")
        assert s1.display_name == "One" and dict(s1.metadata) == {"k": "v"}
        now = c.gallery_stats(name)
        # Exactly what was stored before, plus the two good items of the batch test.
        assert now.gallery.subject_count == stats.gallery.subject_count + 2
        assert now.indexed_samples == stats.indexed_samples + 2
        health = health_pb2_grpc.HealthStub(c.channel)
        assert health.Check(health_pb2.HealthCheckRequest()).status == (
            health_pb2.HealthCheckResponse.SERVING)
    assert before.decision in (pb.MATCH, pb.NO_MATCH)
