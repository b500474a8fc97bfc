"""A gallery's own threshold (privface.threshold_calibration, ``privface calibrate``):
the pure calibration against brute force, and the operator command against a real
server's gallery in PostgreSQL, checked with the templates read back independently."""

from __future__ import annotations

import json

import numpy as np
import pytest

from privface import threshold_calibration as tc


def _group(rng, subjects: int, per: int, dim: int = 16, centred: bool = False) -> tc.Group:
    centres = rng.normal(size=(subjects, dim))
    t = np.repeat(centres, per, axis=0) + 0.8 * rng.normal(size=(subjects * per, dim))
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    names = np.repeat([f"p{i}" for i in range(subjects)], per)
    means = rng.uniform(0.2, 0.6, len(t)) if centred else np.zeros(len(t))
    return tc.Group(t, names, means)


def _brute(groups):
    impostor, genuine = [], []
    for g in groups:  # pairs within a group only: other template keys do not compare
        for i in range(len(g.subjects)):
            for j in range(i + 1, len(g.subjects)):
                s = g.templates[i] @ g.templates[j] - (g.means[i] + g.means[j]) / 2
                (genuine if g.subjects[i] == g.subjects[j] else impostor).append(s)
    return np.array(impostor), np.array(genuine)


@pytest.mark.parametrize("centred", [False, True])
def test_every_pair_scored_as_brute_force(centred):
    rng = np.random.default_rng(0)
    groups = [_group(rng, 25, 3, centred=centred), _group(rng, 10, 2, centred=centred)]
    impostor, genuine = _brute(groups)
    got_i, got_g, sampled = tc.pair_scores(groups)
    assert not sampled
    assert np.allclose(np.sort(got_i), np.sort(impostor))
    assert np.allclose(np.sort(got_g), np.sort(genuine))
    r = tc.calibrate(groups, far=0.01, current_threshold=0.5)
    assert (r.samples, r.subjects, r.genuine_pairs) == (95, 25, 25 * 3 + 10)
    assert r.impostor_pairs == len(impostor) == 75 * 74 // 2 - 75 + 20 * 19 // 2 - 10
    # at most 1% of the impostor pairs at or above it, and the smallest such threshold
    allowed = int(np.floor(0.01 * len(impostor)))
    assert np.sum(impostor >= r.threshold) <= allowed < np.sum(impostor >= r.threshold - 1e-6)
    assert r.true_match_rate == pytest.approx(np.mean(genuine >= r.threshold))
    assert r.false_match_rate_at_current == pytest.approx(np.mean(impostor >= 0.5))
    assert r.true_match_rate_at_current == pytest.approx(np.mean(genuine >= 0.5))


def test_sampled_impostor_pairs_when_there_are_too_many():
    rng = np.random.default_rng(1)
    groups = [_group(rng, 200, 2)]
    full = tc.calibrate(groups, far=0.01, current_threshold=0.5)
    part = tc.calibrate(groups, far=0.01, current_threshold=0.5, max_pairs=20_000)
    assert not full.sampled and part.sampled
    assert 19_000 < part.impostor_pairs <= 20_000
    assert part.genuine_pairs == full.genuine_pairs == 200  # genuine pairs: always all
    assert part.threshold == pytest.approx(full.threshold, abs=0.03)


def test_too_few_impostor_pairs_give_no_threshold():
    rng = np.random.default_rng(2)
    r = tc.calibrate([_group(rng, 10, 2)], far=1e-3, current_threshold=0.5)
    assert r.threshold is None and r.true_match_rate is None
    assert r.min_impostor_pairs == 10_000 and r.impostor_pairs == 20 * 19 // 2 - 10
    assert r.false_match_rate_at_current is not None  # what can be said, is
    empty = tc.calibrate([], far=0.01, current_threshold=0.5)
    assert (empty.impostor_pairs, empty.threshold, empty.false_match_rate_at_current) == (
        0, None, None)
    with pytest.raises(ValueError, match="far"):
        tc.calibrate([], far=0, current_threshold=0.5)


def test_calibrate_command_on_a_served_gallery(service, att_inputs, tmp_path, capsys):
    """Enrol 40 AT&T people (3 samples each) over gRPC; ``privface calibrate`` reads the
    gallery from PostgreSQL as an operator would, with the server's settings."""
    from privface.cli import main
    from storage import repository as repo

    g = "calibration"
    with service.client("admin") as c:
        c.create_gallery(g, "AT&T s1-s40, images 1-3")
        for s in range(1, 41):
            c.enroll(g, f"s{s}", [att_inputs[(s, i)] for i in (1, 2, 3)])
    st = service.settings
    cfg = tmp_path / "privface.toml"
    lines = [f'database_url = "{st.database_url}"', f'model_path = "{st.model_path}"',
             f'key_file = "{st.key_file}"', f'data_dir = "{st.data_dir}"']
    if st.threshold:
        lines.append(f"threshold = {st.threshold}")
    cfg.write_text("\n".join(lines) + "\n")
    out = tmp_path / "calibration.json"
    assert main(["calibrate", g, "--far", "0.002", "--config", str(cfg), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    with capsys.disabled():
        print(f"\n[privface calibrate] {printed}")
    r = json.loads(out.read_text())
    assert f"threshold = {r['threshold']:.4f}" in printed

    # independently: the gallery's templates read back, every pair's cosine
    with service.engine._sessions() as s:
        records = [r for chunk in repo.iter_gallery_templates(s, service.engine.keys.get(), g)
                   for r in chunk]
    t = np.stack([x.template for x in records]).astype(np.float64)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    who = np.array([x.subject_id for x in records])
    iu = np.triu_indices(len(t), 1)
    scores = (t @ t.T)[iu]
    same = who[iu[0]] == who[iu[1]]
    impostor = scores[~same]
    assert (r["samples"], r["subjects"], r["genuine_pairs"]) == (120, 40, 120)
    assert r["impostor_pairs"] == len(impostor) == 120 * 119 // 2 - 120
    allowed = int(np.floor(0.002 * len(impostor)))
    # the server scores in float32, this check in float64: a pair can sit within 1e-6 of it
    assert np.sum(impostor >= r["threshold"] + 1e-6) <= allowed < np.sum(
        impostor >= r["threshold"] - 1e-5)
    current = service.engine.card.threshold
    assert r["current_threshold"] == pytest.approx(current)
    assert r["false_match_rate_at_current"] == pytest.approx(np.mean(impostor >= current))
    assert r["true_match_rate_at_current"] == pytest.approx(np.mean(scores[same] >= current))

    # a FAR the gallery cannot pin: no threshold, exit status 1, and why
    assert main(["calibrate", g, "--far", "1e-4", "--config", str(cfg)]) == 1
    assert "too few impostor pairs" in capsys.readouterr().err
    assert main(["calibrate", "no-such-gallery", "--config", str(cfg)]) == 1
    with pytest.raises(SystemExit, match="far"):
        main(["calibrate", g, "--far", "0", "--config", str(cfg)])
