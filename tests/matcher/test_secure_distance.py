import numpy as np
import pytest

from matcher import secure_distance as sd

DIM = 512


def unit(n, d=DIM, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def mated(n_probe=4, n_gallery=40, seed=0):
    """Gallery of random templates where gallery row 3*i is a noisy copy of probe i."""
    rng = np.random.default_rng(seed)
    probes = unit(n_probe, seed=seed)
    gallery = unit(n_gallery, seed=seed + 1)
    for i in range(n_probe - 1):  # the last probe has no mate
        gallery[3 * i] = probes[i] + 0.4 * rng.standard_normal(DIM) / np.sqrt(DIM)
    return probes, sd.unit_rows(gallery)


def xor_open(bits):
    return (bits[0] ^ bits[1]).astype(bool)


def test_fixed_point_round_trip():
    x = np.array([0.0, 1.0, -1.0, 0.123456, -3.5, 1000.25])
    np.testing.assert_allclose(sd.decode(sd.encode(x)), x, atol=2**-17)
    assert sd.encode(-1.0) == np.uint64(2**64 - 2**16)
    with pytest.raises(ValueError):
        sd.encode(np.inf)


def test_secure_inner_products_equal_plaintext_in_one_round():
    probes, gallery = unit(5, seed=1), unit(60, seed=2)
    s = sd.Session.create(seed=0)
    x, y = s.input("client", probes), s.input("gallery", gallery)
    assert s.rounds == 0  # sharing inputs and dealer material is offline
    z = sd.inner_products(s, x, y)
    assert s.rounds == 1 and s.channel.online_messages == 2
    err = np.abs(sd.decode(sd.reconstruct(z)) - probes @ gallery.T)
    assert err.max() < 1e-3


def test_round_count_is_constant_in_batch_size():
    rounds, sizes = [], []
    for m, n in [(1, 1), (2, 7), (8, 300)]:
        s = sd.Session.create(seed=1)
        z = sd.inner_products(s, s.input("c", unit(m, seed=3)), s.input("g", unit(n, seed=4)))
        r_ip = s.rounds
        sd.decide(s, z, 0.3)
        rounds.append((r_ip, s.rounds))
        sizes.append(s.channel.online_bytes)
    assert rounds == [(1, 9)] * 3  # 1 for all products; 7 to compare + 1 to reveal
    assert sizes[0] < sizes[1] < sizes[2]  # bytes grow with the batch, rounds do not


def test_truncation_error_is_one_ulp():
    rng = np.random.default_rng(5)
    v = rng.uniform(-2, 2, 20_000)
    s = sd.Session.create(seed=2)
    z = sd.share(sd.encode(v, frac_bits=2 * sd.FRAC_BITS))
    t = sd.reconstruct(sd.truncate(s, z))
    exact = sd.encode(v, frac_bits=2 * sd.FRAC_BITS).view(np.int64) >> sd.FRAC_BITS
    assert np.abs(t.view(np.int64) - exact).max() <= 1


@pytest.mark.parametrize("threshold", [0.0, 0.35, -0.2, 500.0])
def test_secure_comparison_equals_plaintext(threshold):
    rng = np.random.default_rng(6)
    v = np.concatenate([rng.uniform(-1, 1, 2000), rng.uniform(-1e4, 1e4, 500)])
    v = np.concatenate([v, [threshold, threshold + 2**-16, threshold - 2**-16]])
    s = sd.Session.create(seed=3)
    bits = sd.greater_equal(s, sd.share(sd.encode(v)), threshold)
    assert s.rounds == 7
    got = xor_open(bits)
    assert np.array_equal(got, sd.encode(v).view(np.int64) >= sd.encode(threshold).view(np.int64))
    assert np.array_equal(got[:-3], v[:-3] >= threshold)
    assert got[-3] and got[-2] and not got[-1]  # ties count as >=


def test_secure_decisions_equal_plaintext_decisions():
    probes, gallery = mated(6, 50)
    plain = probes @ gallery.T
    for t in (0.0, 0.3, 0.6):
        decisions, s = sd.secure_verify(probes, gallery, t, seed=4)
        away = np.abs(plain - t) > 1e-3
        assert np.array_equal(decisions[away], (plain >= t)[away])
        assert s.rounds == 9


def test_secure_identify_reveals_best_or_no_match():
    probes, gallery = mated(4, 37)  # odd n exercises the tournament's bye
    best, s = sd.secure_identify(probes, gallery, 0.5, seed=5)
    assert best.tolist() == [0, 3, 6, -1]
    plain = probes @ gallery.T
    assert best[:3].tolist() == plain.argmax(1)[:3].tolist()
    levels = int(np.ceil(np.log2(37)))
    assert s.rounds == 1 + 9 * levels + 8 + 1


def test_argmax_ties_pick_the_lower_index():
    v = np.array([[0.1, 0.7, 0.7, 0.2, 0.7]])
    s = sd.Session.create(seed=6)
    best, idx = sd.argmax(s, sd.share(sd.encode(v)))
    assert sd.reconstruct(idx)[0] == 1
    assert sd.decode(sd.reconstruct(best))[0] == pytest.approx(0.7, abs=2**-16)


def test_shares_look_uniform():
    secret = sd.encode(np.full(4096, 0.5))
    a0, _ = sd.share(secret)
    b0, b1 = sd.share(secret)
    assert not np.array_equal(a0, b0)  # a party's share of a fixed secret changes every run
    for sh in (b0, b1):
        bits = np.unpackbits(sh.view(np.uint8))
        assert abs(bits.mean() - 0.5) < 0.01
        assert len(np.unique(sh)) == len(sh)
    # Sessions without a share seed draw from the OS, so reruns of a protocol differ too.
    views = [sd.Session.create(seed=7) for _ in range(2)]
    shares = [v.input("client", unit(1, seed=8))[1] for v in views]
    assert not np.array_equal(*shares)


def _encoded_plaintexts(probes, gallery):
    """Every plaintext a party must not see, as ring elements, with neighbours for rounding."""
    scores = probes @ gallery.T
    vals = [sd.encode(probes), sd.encode(gallery), sd.encode(scores)]
    vals.append(sd.encode(scores, frac_bits=2 * sd.FRAC_BITS))  # before truncation
    out = []
    for v in vals:
        v = v.ravel().view(np.int64)
        v = v[np.abs(v) > 64]  # tiny values could collide with bits or counters
        out.append(np.concatenate([v - 1, v, v + 1]).view(np.uint64))
    return np.concatenate(out)


@pytest.mark.parametrize("protocol", [sd.secure_verify, sd.secure_identify])
def test_party_views_hold_no_plaintext(protocol):
    probes, gallery = mated(3, 20)
    _, s = protocol(probes, gallery, 0.5, seed=9)
    secrets = _encoded_plaintexts(probes, gallery)
    for party in s.parties:
        tags = {tag.split(":")[0] for tag, _ in party.view}
        assert tags <= {"input", "dealer", "ip", "cmp", "and", "b2a", "mul", "decision", "argmax"}
        seen = np.concatenate([a.ravel().astype(np.uint64) for _, a in party.view])
        assert not np.isin(seen, secrets).any()
        inputs = [a for tag, a in party.view if tag.startswith("input")]
        assert all(a.dtype == np.uint64 for a in inputs)
    # Outputs are opened from shares of single bits (decisions) or of small indices.
    decisions = [m.payload for m in s.channel.messages if m.tag == "decision"]
    assert decisions and all(p.dtype == np.uint8 and p.max() <= 1 for p in decisions)


def test_message_accounting():
    _, s = sd.secure_verify(unit(2, seed=10), unit(5, seed=11), 0.2, seed=10)
    online = [m for m in s.channel.messages if m.round > 0]
    assert len(online) == 2 * s.rounds  # every round is a simultaneous exchange
    assert s.channel.online_bytes == sum(m.nbytes for m in online)
    assert {m.round for m in online} == set(range(1, s.rounds + 1))
    assert s.channel.offline_bytes > 0
