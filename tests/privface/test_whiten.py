"""Whitening and score centring in the model file: `privface whiten` fits both on
training-split faces only, the file's stale threshold goes, and the service and the
evaluation both apply them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from enrollment import evaluation as ev
from enrollment import score_centring, whitening
from enrollment.model_io import load_model, save_model, set_whitening
from enrollment.partialface import protect
from privface.cli import main
from privface.embedding import THRESHOLD_META_KEY, Embedder, model_version_of


@pytest.fixture
def model_file(small_backbone, tmp_path):
    path = tmp_path / "m.pt"
    save_model(path, small_backbone, "partialface", "partialface-paper",
               {THRESHOLD_META_KEY: 0.5, "lfw_accuracy": 0.9, "train": {"epochs": 1}})
    return path


def test_set_whitening_stores_it_and_drops_the_stale_threshold(model_file):
    rng = np.random.default_rng(0)
    cohort = rng.normal(size=(200, 64)) * np.geomspace(2, 0.2, 64)
    fitted = whitening.fit(cohort / np.linalg.norm(cohort, axis=1, keepdims=True), 16, 0.5)
    before = model_version_of(model_file)
    meta = set_whitening(model_file, fitted)
    assert THRESHOLD_META_KEY not in meta and "lfw_accuracy" not in meta
    assert meta["train"] == {"epochs": 1}  # the rest of the meta is kept
    assert meta["whitening"] == {"dims": 16, "power": 0.5, "cohort": 200}
    assert model_version_of(model_file) != before  # new scores, new model version
    _, info = load_model(model_file)
    np.testing.assert_array_equal(info["whitening"].directions, fitted.directions)
    with pytest.raises(ValueError, match="no calibrated threshold"):
        Embedder(model_file, threads=1)  # no service on a stale or missing threshold
    assert meta["score_centring"] is None and load_model(model_file)[1]["cohort"] is None
    cohort = score_centring.fit(whitening.apply(cohort / np.linalg.norm(
        cohort, axis=1, keepdims=True), fitted), n_centroids=20, k=3)
    meta = set_whitening(model_file, fitted, cohort)
    assert meta["score_centring"] == {"centroids": 20, "k": 3, "images": 200}
    stored = load_model(model_file)[1]["cohort"]
    np.testing.assert_allclose(stored.centroids, cohort.centroids, atol=2e-3)
    with pytest.raises(ValueError, match="threshold_far_1e-3_centred"):
        Embedder(model_file, threads=1, score_centring=True)  # no centred threshold yet
    set_whitening(model_file, None)
    assert load_model(model_file)[1]["whitening"] is None
    assert load_model(model_file)[1]["cohort"] is None
    with pytest.raises(ValueError, match="score-centring cohort"):
        Embedder(model_file, threads=1, threshold=0.5, score_centring=True)


def test_the_service_and_the_evaluation_whiten_alike(model_file, aligned_faces, tmp_path):
    raw = Embedder(model_file, threads=1, runtime="torch")
    assert not raw.whitened
    sent = [protect(aligned_faces[i : i + 1], [[i % 6, 0]]) for i in range(len(aligned_faces))]
    e_raw = raw.embed(sent)
    rng = np.random.default_rng(1)
    cohort = rng.normal(size=(300, 64))
    fitted = whitening.fit(cohort / np.linalg.norm(cohort, axis=1, keepdims=True), 8, 0.5)
    set_whitening(model_file, fitted)
    served = Embedder(model_file, threads=1, runtime="torch", threshold=0.5)
    assert served.whitened
    e = served.embed(sent)
    np.testing.assert_allclose(e, whitening.apply(e_raw, fitted), atol=1e-5)
    assert np.abs(e - e_raw).max() > 0.1
    assert served.cohort is None


def test_the_service_and_the_evaluation_centre_scores_alike(model_file, small_lfw, tmp_path):
    """The evaluation's pair scores are the service's verify scores would be: the cohort the
    model file carries, with the same top-k, on the same whitened embeddings."""
    root, _ = small_lfw
    cache = ev.lfw_cache(root / "lfw", tmp_path / "cache")
    rng = np.random.default_rng(2)
    cohort = rng.normal(size=(300, 64))
    cohort /= np.linalg.norm(cohort, axis=1, keepdims=True)
    fitted = whitening.fit(cohort, 8, 0.5)
    centring = score_centring.fit(whitening.apply(cohort, fitted), n_centroids=30, k=4)
    set_whitening(model_file, fitted, centring)
    assert Embedder(model_file, threads=1, runtime="torch", threshold=0.5).cohort is None
    served = Embedder(model_file, threads=1, runtime="torch", threshold=0.5,
                      score_centring=True)
    assert served.cohort.k == 4 and len(served.cohort.centroids) == 30
    embedder = ev.model_embedder(model_file, cache, 0, centre=True)
    assert ev.cohort_of(embedder) is not None
    assert ev.cohort_of(ev.model_embedder(model_file, cache, 0)) is None  # off by default
    assert ev.cohort_of(ev.model_embedder(model_file, cache, 0, whiten=False, centre=True)) \
        is None
    e = embedder(np.arange(6))
    s = ev.pair_scores(e[:3], e[3:], ev.cohort_of(embedder))
    m = score_centring.cohort_means(e, served.cohort.centroids, 4)
    np.testing.assert_allclose(s, np.sum(e[:3] * e[3:], 1) - (m[:3] + m[3:]) / 2, atol=1e-6)


def test_whiten_command_fits_on_training_split_people(small_lfw, model_file, tmp_path, capsys):
    root, n_train = small_lfw
    common = ["whiten", "--model", str(model_file), "--data", str(root), "--threads", "1",
              "--cache-dir", str(tmp_path / "cache"), "--dims", "4", "--centroids", "4",
              "--top-k", "2"]
    with pytest.raises(ValueError, match="training-split"):
        main([*common, "--images", str(n_train + 1)])
    capsys.readouterr()
    assert main(common) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["whitening"] == {"dims": 4, "power": 0.5, "cohort": n_train}
    assert out["score_centring"] == {"centroids": 4, "k": 2, "images": n_train}
    _, info = load_model(model_file)
    cache = ev.lfw_cache(root / "lfw", tmp_path / "cache")
    train = np.flatnonzero([not n.startswith(tuple(_test_people(root))) for n in cache.paths])
    assert len(train) == n_train
    # the fit is the cohort's: refit on the same embeddings (same seed, same draws)
    raw = ev.model_embedder(model_file, cache, 0, whiten=False)(train)
    np.testing.assert_allclose(info["whitening"].mean, raw.mean(axis=0), atol=1e-5)
    # the centroids are of the whitened cohort
    w = whitening.apply(raw, info["whitening"])
    assert (w @ info["cohort"].centroids.T).max(axis=1).mean() > 0.5
    assert main([*common[:-6], "--remove"]) == 0
    assert load_model(model_file)[1]["whitening"] is None
    assert load_model(model_file)[1]["cohort"] is None


def _test_people(root) -> set[str]:
    from enrollment.lfw_protocol import held_out_identities

    return {f"{n}/" for n in held_out_identities(root / "lfw" / "pairs.txt")}
