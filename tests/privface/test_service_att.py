"""Accuracy through the whole service on AT&T (ORL), over gRPC, with the shipped model.

* 1:N: s1..s40 enrolled with images 1-5 (one Enroll call each), images 6-10 identified:
  rank-1 >= 95%.
* Non-enrolled people: s1..s30 enrolled with images 1-5 (one EnrollBatch stream), all ten
  images of s31..s40 identified: most must be answered NO_MATCH at the default threshold
  (the model card's, FAR = 1e-3). The rate is reported.

Only the real model is measured: the tiny stand-in model of the other tests would say
nothing about accuracy, so these tests skip (with the reason) until the shipped model exists.
"""

from __future__ import annotations

import json

import pytest

from enrollment.model_io import DEFAULT_MODEL
from privface.v1 import gallery_pb2 as pb

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_model(service_model):
    if not service_model.shipped:
        pytest.skip(f"accuracy is measured on the shipped model only, and {DEFAULT_MODEL} does "
                    "not exist yet (train and ship it, or set PRIVFACE_TEST_MODEL)")
    return service_model


def _report(capsys, name: str, figures: dict) -> None:
    with capsys.disabled():
        print(f"\n[service AT&T] {name}: {json.dumps(figures)}")


def test_att_rank1(real_model, service, att_inputs, capsys, record_property):
    g = "att40"
    with service.client("admin") as c:
        c.create_gallery(g, "AT&T s1-s40, images 1-5")
        for s in range(1, 41):
            r = c.enroll(g, f"s{s}", [att_inputs[(s, i)] for i in range(1, 6)])
            assert len(r.sample_ids) == 5
        assert c.gallery_stats(g).indexed_samples == 200
    with service.client("identify") as c:
        results = [(s, c.identify(g, att_inputs[(s, i)], top_k=5))
                   for s in range(1, 41) for i in range(6, 11)]
    rank1 = sum(r.candidates[0].subject_id == f"s{s}" for s, r in results) / len(results)
    rank5 = sum(f"s{s}" in [x.subject_id for x in r.candidates] for s, r in results) / len(results)
    matched = sum(r.decision == pb.MATCH and r.subject_id == f"s{s}"
                  for s, r in results) / len(results)
    wrong = sum(r.decision == pb.MATCH and r.subject_id != f"s{s}"
                for s, r in results) / len(results)
    figures = {"probes": len(results), "rank1": rank1, "rank5": rank5,
               "correct_match_at_threshold": matched, "wrong_match_at_threshold": wrong,
               "threshold": results[0][1].threshold}
    _report(capsys, "identify s1-s40 (images 6-10 against 1-5)", figures)
    for k, v in figures.items():
        record_property(k, v)
    assert rank1 >= 0.95, figures


def test_att_not_enrolled_answered_no_match(real_model, service, att_inputs, capsys,
                                            record_property):
    if real_model.card_threshold is None:
        pytest.fail(f"{real_model.path} has no calibrated threshold in its meta "
                    "('threshold_far_1e-3'): the default decision cannot be tested")
    g = "att30"
    with service.client("enroll") as c:
        requests = [c.enroll_request(g, f"s{s}", [att_inputs[(s, i)] for i in range(1, 6)],
                                     idempotency_key=f"att30-s{s}")
                    for s in range(1, 31)]
        with service.client("admin") as admin:
            admin.create_gallery(g, "AT&T s1-s30, images 1-5")
        results = list(c.enroll_batch(iter(requests)))
    assert [r.ok for r in results] == [True] * 30
    with service.client("identify") as c:
        impostors = [c.identify(g, att_inputs[(s, i)])
                     for s in range(31, 41) for i in range(1, 11)]
        genuine = [(s, c.identify(g, att_inputs[(s, i)]))
                   for s in range(1, 31) for i in range(6, 11)]
    no_match = sum(r.decision == pb.NO_MATCH for r in impostors) / len(impostors)
    tar = sum(r.decision == pb.MATCH and r.subject_id == f"s{s}"
              for s, r in genuine) / len(genuine)
    figures = {"non_enrolled_probes": len(impostors), "no_match_rate": no_match,
               "enrolled_probes": len(genuine), "correct_match_rate": tar,
               "threshold": impostors[0].threshold}
    _report(capsys, "s31-s40 against s1-s30 at the default threshold", figures)
    for k, v in figures.items():
        record_property(k, v)
    assert no_match > 0.5, figures


@pytest.fixture(scope="module")
def centred_service(real_model, tmp_path_factory, service_db):
    """A second server on the same database with score_centring on (the shipped model's
    cohort and its threshold for centred scores)."""
    from enrollment.model_io import load_model
    from privface.server import build_server
    from tests.privface.conftest import ServiceHandle, service_settings, write_keys, write_tokens

    if load_model(real_model.path)[1]["cohort"] is None:
        pytest.skip("the shipped model carries no score-centring cohort")
    root = tmp_path_factory.mktemp("centred-service")
    tokens = write_tokens(root / "tokens.json")
    write_keys(root / "keyring.json")
    settings = service_settings(root, service_db, real_model, score_centring=True)
    running = build_server(settings)
    yield ServiceHandle(running, tokens, settings)
    running.stop(0)


def test_identify_and_verify_score_alike_centred(centred_service, att_inputs):
    """With score_centring, identify (through the index's longer vectors) and verify (from
    the stored templates) give one score: the templates' cosine less half of either side's
    cohort mean, the cohort mapped under the gallery's template key
    (enrollment.score_centring)."""
    import numpy as np

    from enrollment import score_centring
    from enrollment.identity_mapping import protect
    from privface.keys import mapping_key

    engine = centred_service.engine
    cohort = engine.embedder.cohort
    g = "att-centring"
    with centred_service.client("admin") as c:
        c.create_gallery(g)
        for s in (1, 2, 3):
            c.enroll(g, f"s{s}", [att_inputs[(s, 1)]])
        probe = att_inputs[(1, 2)]
        found = c.identify(g, probe, top_k=3)
        checked = {s: c.verify(g, f"s{s}", probe).score for s in (1, 2, 3)}
        info = c.server_info()
    assert info.model_runtime.endswith(", whitened, score-centred")
    from enrollment.model_io import load_model

    meta = load_model(engine.card.path)[1]["meta"]
    assert info.threshold_source == "model"  # the file's threshold for centred scores
    assert info.default_threshold == pytest.approx(meta["threshold_far_1e-3_centred"])
    assert {x.subject_id: x.score for x in found.candidates} == pytest.approx(
        {f"s{s}": v for s, v in checked.items()}, abs=1e-5)
    key = mapping_key(engine.keys.get(), g, info.template_key_id, **engine.card.mapping)
    centroids = protect(cohort.centroids, key)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    q = engine.template_of(g, probe)
    for s in (1, 2, 3):
        t = engine.template_of(g, att_inputs[(s, 1)])
        m = score_centring.cohort_means(np.stack([q, t]), centroids, cohort.k)
        cosine = float(q @ t)
        assert checked[s] == pytest.approx(cosine - m.mean(), abs=1e-5)
        assert abs(checked[s] - cosine) > 0.05  # the centring is there to be seen
