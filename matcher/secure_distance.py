"""Semi-honest two-party secure inner product and comparison (method.md §6).

Setting and assumptions
-----------------------
Two computing parties P0 and P1 (say, the privface server and an independent matching
service) that follow the protocol (semi-honest) and do not collude with each other or with
the dealer. A template owner (the client for a probe, enrolment for the gallery)
L2-normalises its vectors in the clear, so cosine equals inner product, encodes them as
fixed point in Z_2^64 with 16 fractional bits, and sends P0 a uniformly random share x0 and
P1 the share x1 = x - x0 (mod 2^64). Either share alone is uniform and independent of x.

An offline dealer hands each party its half of correlated randomness before any input is
known: Beaver triples (matrix and element-wise), AND triples on bits, comparison masks. Every
value a party receives online is an opening masked by fresh dealer randomness it does not
know (a one-time pad in Z_2^64 or GF(2)^64), so its view is uniform apart from the outputs
deliberately revealed: the decision bits (score >= threshold) or the winning index.

Protocol
--------
* ``inner_products``: all m x n probe-gallery products with one matrix Beaver triple
  (A, B, C = A B^T): each party opens E = X - A and F = Y - B in a single exchange; then
  Z_i = C_i + E B_i^T + A_i F^T (+ E F^T for P0). One round for the whole batch, and only
  (m + n) d ring elements on the wire instead of m n d.
* ``truncate``: the product has 32 fractional bits. SecureML's local truncation (Mohassel &
  Zhang, S&P 2017): P0 shifts its share right by 16, P1 computes -((-z1) >> 16). No
  communication. Error: the result is floor(z / 2^16) or one more, i.e. at most 2^-16
  (1.5e-5) off, except with probability about |z| / 2^63 where it is wildly wrong;
  |z| <= 2^32 for unit vectors, so that is < 2^-30 per score.
* ``greater_equal``: dealer-assisted comparison via bit decomposition of a mask. The dealer
  gives a random r both as arithmetic shares and as XOR shares of its 64 bits. The parties
  open c = (s - t) + r (uniform, hence harmless) in one round; then
  MSB(s - t) = c_63 xor r_63 xor [c mod 2^63 < r mod 2^63], and the comparison of the public
  c with the bit-shared r is a log-depth tree of (less-than, equal) pairs whose AND gates use
  Beaver bit triples. 64 bits are packed in one uint64 word, so the tree takes 6 rounds for
  any batch: 7 rounds and a few hundred bytes per compared value in all. Correct for
  |s - t| < 2^63, i.e. always for scores in [-1, 1].
* ``argmax``: a tournament of comparisons; the winner bit is converted to an arithmetic
  share (``b2a``, one round) and selects value and index with one Beaver multiplication.
  9 rounds per level, ceil(log2 n) levels, independent of the number of probes.

The dealer uses numpy's seeded Generator so tests are reproducible; that is not a
cryptographic generator, so a deployment must seed it from a CSPRNG (or use AES-CTR).
Input shares default to ``os.urandom``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike

FRAC_BITS = 16
SCALE = 1 << FRAC_BITS

_TOP = np.uint64(1 << 63)
_LOW63 = np.uint64((1 << 63) - 1)
_ONE = np.uint64(1)
_ALL = ~np.uint64(0)
_TREE_SHIFTS = tuple(np.uint64(1 << i) for i in range(6))  # 1, 2, ..., 32: 64-bit tree

Shared = tuple[np.ndarray, np.ndarray]
"""(share held by P0, share held by P1); a protocol step touches element i only through P_i."""


# ---------------------------------------------------------------------------- encoding


def random_ring(shape: int | tuple[int, ...], rng: np.random.Generator | None = None) -> np.ndarray:
    """Uniform elements of Z_2^64; from the OS CSPRNG unless a seeded generator is given."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if rng is None:
        n = int(np.prod(shape, dtype=np.int64))
        return np.frombuffer(os.urandom(8 * n), dtype=np.uint64).reshape(shape).copy()
    return rng.integers(0, np.iinfo(np.uint64).max, size=shape, dtype=np.uint64, endpoint=True)


def encode(x: ArrayLike, frac_bits: int = FRAC_BITS) -> np.ndarray:
    """Fixed point in Z_2^64; negatives wrap to the top half (two's complement)."""
    v = np.rint(np.asarray(x, dtype=np.float64) * 2.0**frac_bits)
    if not np.isfinite(v).all() or (np.abs(v) >= 2.0**62).any():
        raise ValueError("value outside the fixed-point range")
    return v.astype(np.int64).view(np.uint64)


def decode(v: ArrayLike, frac_bits: int = FRAC_BITS) -> np.ndarray:
    return np.asarray(v, dtype=np.uint64).view(np.int64) / 2.0**frac_bits


def share(secret: ArrayLike, rng: np.random.Generator | None = None) -> Shared:
    """Additive sharing: the first share is uniform, so each share alone is uniform."""
    s = np.asarray(secret, dtype=np.uint64)
    s0 = random_ring(s.shape, rng)
    return s0, s - s0


def reconstruct(x: Shared) -> np.ndarray:
    return x[0] + x[1]


def unit_rows(x: ArrayLike) -> np.ndarray:
    """Owner-side L2 normalisation, so the secure inner product is the cosine."""
    a = np.atleast_2d(np.asarray(x, dtype=np.float64))
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    if a.ndim != 2 or not np.isfinite(a).all() or (norms == 0).any():
        raise ValueError("templates must be finite, non-zero 2-D rows")
    return a / norms


# ---------------------------------------------------------------------------- parties


@dataclass(frozen=True)
class Message:
    """One transfer; round 0 marks offline deliveries (dealer material, input shares)."""

    round: int
    sender: str
    receiver: str
    tag: str
    payload: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.payload.nbytes


class Party:
    """One computing party: only local, communication-free steps on its own shares.

    ``view`` is everything the party ever received, in order - what a curious but honest
    party could analyse.
    """

    def __init__(self, idx: int) -> None:
        self.idx = idx
        self.name = f"P{idx}"
        self.view: list[tuple[str, np.ndarray]] = []

    def receive(self, tag: str, payload: np.ndarray) -> None:
        self.view.append((tag, payload))

    def add_public(self, x: np.ndarray, c: np.ndarray) -> np.ndarray:
        return x + c if self.idx == 0 else x.copy()

    def xor_public(self, x: np.ndarray, c: np.ndarray) -> np.ndarray:
        return x ^ c if self.idx == 0 else x.copy()

    def mul_finish(self, d, e, a, b, c) -> np.ndarray:
        z = c + d * b + e * a
        return z + d * e if self.idx == 0 else z

    def matmul_finish(self, E, F, A, B, C) -> np.ndarray:
        Z = C + E @ B.T + A @ F.T
        return Z + E @ F.T if self.idx == 0 else Z

    def and_finish(self, d, e, a, b, c) -> np.ndarray:
        z = c ^ (d & b) ^ (e & a)
        return z ^ (d & e) if self.idx == 0 else z

    def truncate(self, z: np.ndarray, bits: int) -> np.ndarray:
        s = np.uint64(bits)
        return z >> s if self.idx == 0 else -((-z) >> s)

    def b2a_finish(self, delta: np.ndarray, rho: np.ndarray) -> np.ndarray:
        # bit = delta xor rho = delta + rho - 2 delta rho: rho where delta = 0, 1 - rho else.
        flipped = (_ONE if self.idx == 0 else np.uint64(0)) - rho
        return np.where(delta.astype(bool), flipped, rho)


class Channel:
    """Carries and records every message; one ``exchange`` or ``send`` is one round."""

    def __init__(self, parties: tuple[Party, Party]) -> None:
        self.parties = parties
        self.messages: list[Message] = []
        self.rounds = 0

    def exchange(self, tag: str, out0: np.ndarray, out1: np.ndarray) -> tuple[np.ndarray, ...]:
        """Both parties send at once; returns (what P0 received, what P1 received)."""
        self.rounds += 1
        got1 = self._post(self.rounds, "P0", self.parties[1], tag, out0)
        got0 = self._post(self.rounds, "P1", self.parties[0], tag, out1)
        return got0, got1

    def send(self, tag: str, sender: int, payload: np.ndarray) -> np.ndarray:
        self.rounds += 1
        return self._post(self.rounds, f"P{sender}", self.parties[1 - sender], tag, payload)

    def deliver(self, tag: str, sender: str, party: Party, payload: np.ndarray) -> np.ndarray:
        return self._post(0, sender, party, tag, payload)

    def _post(self, rnd: int, sender: str, to: Party, tag: str, payload: np.ndarray):
        payload = np.array(payload, copy=True)  # the record must not change with the sender
        self.messages.append(Message(rnd, sender, to.name, tag, payload))
        to.receive(tag, payload)
        return payload

    @property
    def online_bytes(self) -> int:
        return sum(m.nbytes for m in self.messages if m.round > 0)

    @property
    def offline_bytes(self) -> int:
        return sum(m.nbytes for m in self.messages if m.round == 0)

    @property
    def online_messages(self) -> int:
        return sum(1 for m in self.messages if m.round > 0)


class Dealer:
    """Offline source of correlated randomness; each method returns (P0's part, P1's part)."""

    def __init__(self, seed: int | None = None) -> None:
        self.rng = np.random.default_rng(seed)

    def _ring(self, shape: tuple[int, ...]) -> np.ndarray:
        return random_ring(shape, self.rng)

    def _split(self, v: np.ndarray) -> Shared:
        v0 = self._ring(v.shape)
        return v0, v - v0

    def _xsplit(self, v: np.ndarray, bits: np.uint64 = _ALL) -> Shared:
        v0 = self._ring(v.shape) & bits
        return v0, v ^ v0

    def matmul_triple(self, m: int, n: int, d: int) -> tuple[tuple[np.ndarray, ...], ...]:
        A, B = self._ring((m, d)), self._ring((n, d))
        return tuple(zip(self._split(A), self._split(B), self._split(A @ B.T), strict=True))

    def mul_triple(self, shape: tuple[int, ...]) -> tuple[tuple[np.ndarray, ...], ...]:
        a, b = self._ring(shape), self._ring(shape)
        return tuple(zip(self._split(a), self._split(b), self._split(a * b), strict=True))

    def and_triple(self, shape: tuple[int, ...]) -> tuple[tuple[np.ndarray, ...], ...]:
        """64 independent AND triples per word."""
        a, b = self._ring(shape), self._ring(shape)
        return tuple(zip(self._xsplit(a), self._xsplit(b), self._xsplit(a & b), strict=True))

    def comparison_mask(self, shape: tuple[int, ...]) -> tuple[tuple[np.ndarray, ...], ...]:
        """A random r shared twice: arithmetically (to mask) and bitwise (to compare)."""
        r = self._ring(shape)
        return tuple(zip(self._split(r), self._xsplit(r), strict=True))

    def bit_mask(self, shape: tuple[int, ...]) -> tuple[tuple[np.ndarray, ...], ...]:
        """A random bit shared arithmetically and by XOR, for bit-to-arithmetic conversion."""
        rho = self._ring(shape) & _ONE
        return tuple(zip(self._split(rho), self._xsplit(rho, _ONE), strict=True))


@dataclass
class Session:
    """The protocol's world for one batch: two parties, their channel, the dealer."""

    parties: tuple[Party, Party]
    channel: Channel
    dealer: Dealer
    share_rng: np.random.Generator | None = field(default=None)

    @classmethod
    def create(cls, seed: int | None = None, share_seed: int | None = None) -> Session:
        parties = (Party(0), Party(1))
        rng = None if share_seed is None else np.random.default_rng(share_seed)
        return cls(parties, Channel(parties), Dealer(seed), rng)

    @property
    def rounds(self) -> int:
        return self.channel.rounds

    def material(self, tag: str, parts: tuple) -> tuple:
        """Hand each party its half of dealer randomness (offline, recorded in its view)."""
        for party, part in zip(self.parties, parts, strict=True):
            for j, arr in enumerate(part):
                self.channel.deliver(f"dealer:{tag}:{j}", "dealer", party, arr)
        return parts

    def input(self, owner: str, x: ArrayLike) -> Shared:
        """The owner normalises and encodes its templates, and gives one share to each party."""
        shared = share(encode(unit_rows(x)), self.share_rng)
        for party, part in zip(self.parties, shared, strict=True):
            self.channel.deliver(f"input:{owner}", owner, party, part)
        return shared


# ---------------------------------------------------------------------------- protocol


def _stack(*xs: Shared) -> Shared:
    return np.stack([x[0] for x in xs]), np.stack([x[1] for x in xs])


def open_shared(s: Session, tag: str, x: Shared) -> np.ndarray:
    """Reveal to both parties (one round); each adds what it received to its own share."""
    got0, got1 = s.channel.exchange(tag, x[0], x[1])
    return x[0] + got0  # == x[1] + got1, P1's own reconstruction


def open_bits(s: Session, tag: str, x: Shared) -> np.ndarray:
    """Reveal XOR-shared bits to both parties; sent as bytes since each is one bit."""
    got0, got1 = s.channel.exchange(tag, x[0].astype(np.uint8), x[1].astype(np.uint8))
    return (x[0].astype(np.uint8) ^ got0).astype(np.uint64)


def truncate(s: Session, z: Shared, bits: int = FRAC_BITS) -> Shared:
    """SecureML local truncation; error bound in the module docstring."""
    return s.parties[0].truncate(z[0], bits), s.parties[1].truncate(z[1], bits)


def inner_products(s: Session, x: Shared, y: Shared) -> Shared:
    """Shares of the (m, n) cosine matrix of probes x (m, d) and gallery y (n, d): one round."""
    m, d = x[0].shape
    n = y[0].shape[0]
    T = s.material("matmul", s.dealer.matmul_triple(m, n, d))
    out = [np.concatenate([x[i] - T[i][0], y[i] - T[i][1]]) for i in (0, 1)]
    got = s.channel.exchange("ip:masked", out[0], out[1])
    z = []
    for i, p in enumerate(s.parties):
        EF = out[i] + got[i]
        z.append(p.matmul_finish(EF[:m], EF[m:], *T[i]))
    return truncate(s, (z[0], z[1]))


def multiply(s: Session, x: Shared, y: Shared) -> Shared:
    """Element-wise product of two shared arrays (same scale rules as plaintext): one round."""
    T = s.material("mul", s.dealer.mul_triple(x[0].shape))
    out = [np.stack([x[i] - T[i][0], y[i] - T[i][1]]) for i in (0, 1)]
    got = s.channel.exchange("mul:masked", out[0], out[1])
    z = []
    for i, p in enumerate(s.parties):
        d, e = out[i] + got[i]
        z.append(p.mul_finish(d, e, *T[i]))
    return z[0], z[1]


def and_bits(s: Session, x: Shared, y: Shared) -> Shared:
    """Bitwise AND of XOR-shared words (64 gates per word): one round."""
    T = s.material("and", s.dealer.and_triple(x[0].shape))
    out = [np.stack([x[i] ^ T[i][0], y[i] ^ T[i][1]]) for i in (0, 1)]
    got = s.channel.exchange("and:masked", out[0], out[1])
    z = []
    for i, p in enumerate(s.parties):
        d, e = out[i] ^ got[i]
        z.append(p.and_finish(d, e, *T[i]))
    return z[0], z[1]


def greater_equal(s: Session, x: Shared, threshold: ArrayLike = 0.0) -> Shared:
    """XOR shares of the bits [x >= threshold]; x and threshold never revealed. 7 rounds."""
    shape = x[0].shape
    t = encode(np.broadcast_to(np.asarray(threshold, np.float64), shape))
    M = s.material("compare", s.dealer.comparison_mask(shape))
    (ra, rb) = zip(*M, strict=True)  # ra: arithmetic shares of r; rb: XOR shares of its bits
    masked = tuple(p.add_public(x[i], -t) + ra[i] for i, p in enumerate(s.parties))
    c = open_shared(s, "cmp:masked", masked)
    not_c = ~c & _LOW63
    # Per bit j < 63: lt_j = [c_j < r_j] = not c_j and r_j; eq_j = not (c_j xor r_j).
    # Bit 63 is made neutral (lt 0, eq 1) so the tree spans exactly the low 63 bits.
    lt = tuple(rb[i] & not_c for i in (0, 1))
    eq = tuple(p.xor_public(rb[i] & _LOW63, not_c | _TOP) for i, p in enumerate(s.parties))
    for k in _TREE_SHIFTS:
        # Merge each block with the block k bits above it: the higher block decides
        # unless it is equal. Both ANDs in one round.
        hi_lt = (lt[0] >> k, lt[1] >> k)
        hi_eq = (eq[0] >> k, eq[1] >> k)
        u = and_bits(s, _stack(hi_eq, hi_eq), _stack(lt, eq))
        lt = (hi_lt[0] ^ u[0][0], hi_lt[1] ^ u[1][0])
        eq = (u[0][1], u[1][1])
    # MSB(x - t) = c_63 xor r_63 xor [c mod 2^63 < r mod 2^63]; x >= t iff that MSB is 0.
    msb = tuple(((rb[i] >> np.uint64(63)) ^ lt[i]) & _ONE for i in (0, 1))
    flip = (c >> np.uint64(63)) ^ _ONE
    return s.parties[0].xor_public(msb[0], flip), s.parties[1].xor_public(msb[1], flip)


def b2a(s: Session, bits: Shared) -> Shared:
    """XOR-shared bits to arithmetic shares of 0/1 via a dealer bit: one round."""
    M = s.material("b2a", s.dealer.bit_mask(bits[0].shape))
    (rho_a, rho_b) = zip(*M, strict=True)
    delta = open_bits(s, "b2a:masked", (bits[0] ^ rho_b[0], bits[1] ^ rho_b[1]))
    return s.parties[0].b2a_finish(delta, rho_a[0]), s.parties[1].b2a_finish(delta, rho_a[1])


def argmax(s: Session, scores: Shared) -> tuple[Shared, Shared]:
    """Shares of the best score and its column index per row, by a comparison tournament."""
    m, n = scores[0].shape
    cols = np.broadcast_to(np.arange(n, dtype=np.uint64), (m, n))
    vals = scores
    idx = tuple(p.add_public(np.zeros((m, n), np.uint64), cols) for p in s.parties)
    while vals[0].shape[1] > 1:
        w = vals[0].shape[1]
        h = 2 * (w // 2)
        a = (vals[0][:, 0:h:2], vals[1][:, 0:h:2])
        b = (vals[0][:, 1:h:2], vals[1][:, 1:h:2])
        ia = (idx[0][:, 0:h:2], idx[1][:, 0:h:2])
        ib = (idx[0][:, 1:h:2], idx[1][:, 1:h:2])
        diff = (a[0] - b[0], a[1] - b[1])
        take_a = b2a(s, greater_equal(s, diff))  # ties go to the lower index
        prod = multiply(s, _stack(take_a, take_a), _stack(diff, (ia[0] - ib[0], ia[1] - ib[1])))
        new_v = [b[i] + prod[i][0] for i in (0, 1)]
        new_i = [ib[i] + prod[i][1] for i in (0, 1)]
        if w % 2:
            new_v = [np.concatenate([new_v[i], vals[i][:, -1:]], axis=1) for i in (0, 1)]
            new_i = [np.concatenate([new_i[i], idx[i][:, -1:]], axis=1) for i in (0, 1)]
        vals, idx = (new_v[0], new_v[1]), (new_i[0], new_i[1])
    return (vals[0][:, 0], vals[1][:, 0]), (idx[0][:, 0], idx[1][:, 0])


def decide(s: Session, scores: Shared, threshold: float) -> np.ndarray:
    """Reveal only [score >= threshold] for every shared score: 8 rounds for any batch."""
    return open_bits(s, "decision", greater_equal(s, scores, threshold)).astype(bool)


def identify(s: Session, scores: Shared, threshold: float) -> np.ndarray:
    """Per probe row, reveal the best column if its score passes the threshold, else -1.

    The index of a probe with no match is never opened; no score is opened at all.
    """
    best, idx = argmax(s, scores)
    ok = decide(s, best, threshold)
    out = np.full(len(ok), -1, np.int64)
    if ok.any():
        out[ok] = open_shared(s, "argmax", (idx[0][ok], idx[1][ok])).view(np.int64)
    return out


def secure_verify(
    probes: ArrayLike, gallery: ArrayLike, threshold: float, *, seed: int | None = None
) -> tuple[np.ndarray, Session]:
    """1:1 decisions for every probe x gallery pair; the session holds the transcript."""
    s = Session.create(seed)
    scores = inner_products(s, s.input("client", probes), s.input("gallery", gallery))
    return decide(s, scores, threshold), s


def secure_identify(
    probes: ArrayLike, gallery: ArrayLike, threshold: float, *, seed: int | None = None
) -> tuple[np.ndarray, Session]:
    """1:N: best gallery row per probe, or -1 below the threshold."""
    s = Session.create(seed)
    scores = inner_products(s, s.input("client", probes), s.input("gallery", gallery))
    return identify(s, scores, threshold), s
