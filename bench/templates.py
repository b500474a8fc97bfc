"""Realistic galleries for the index benchmarks: real protected templates plus distractors.

Recall of an approximate index depends on how the data is spread far more than on the index
(issue 5: HNSW reached recall@10 0.91 on random clustered vectors, yet that says little about
face templates). So the benchmark galleries are built from **real** templates and filled up
with **synthetic distractors drawn to match them**:

* Real templates: every LFW image, embedded by the shipped model (``--source model``) or,
  until a model exists, the dlib teacher descriptors of the aligned-face cache
  (``--source teacher``), then protected exactly as the service does it: PolyProtect
  (``enrollment.identity_mapping``, m = 5, overlap 2, one key for the gallery) and L2
  normalisation. A 512-d embedding gives a 170-d template, a 128-d teacher descriptor 42-d.
* Distractors: a Gaussian mixture fitted to the real templates. Identity centres are
  grouped into (up to) 32 clusters by k-means on the real identity means; a synthetic
  identity picks a cluster (by its share of identities) and draws its centre
  ``c ~ N(mu_k, a_b^2 t^2 S_b,k)``, its samples ``x = c + N(0, a_w^2 t'^2 S_w)``, normalised.
  ``S_w`` is the pooled within-identity covariance, ``S_b,k`` the covariance of the
  cluster's identity means minus the part the within-identity noise contributes to them,
  shrunk 30% towards the global shape; all full-rank (at d <= 512 the ~13k LFW templates
  determine them; a low-rank model understates the tail directions). ``t``, ``t'`` are
  log-normal factors with E[t^2] = 1 (faces are heteroscedastic). The scales ``a_b, a_w``
  and the log-normal spreads are calibrated so the median and the 1-99% width of the intra-
  and inter-identity cosines match the real ones. The mixture matters: a single Gaussian
  matched those distributions but left real probes' nearest synthetic neighbours too far
  (best non-mated score 0.736 vs 0.781 real on 170-d templates), which would flatter ANN
  recall; with 32 clusters 0.779. :func:`compare` prints both distributions' statistics
  and the nearest-neighbour scores. Samples per synthetic identity follow LFW's
  images-per-identity distribution (capped like the real gallery).
* Probes: one held-out real image of every LFW identity with >= 2 images (mated: its other
  images are enrolled) and whole held-out single-image identities (non-mated).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from enrollment import identity_mapping as im

ROOT = Path(__file__).resolve().parents[1]
LFW = ROOT.parent / "shared" / "data" / "lfw" / "lfw-deepfunneled"
CACHE = Path(os.environ.get("PRIVFACE_BENCH_CACHE", "/work/cache"))
MODEL = ROOT / "enrollment" / "weights" / "partialface-paper.pt"
BENCH_SECRET = b"privface-benchmark-gallery-key-not-a-secret"
MAX_PER_SUBJECT = 10  # samples enrolled per subject, real and synthetic


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def protect(embeddings: np.ndarray) -> np.ndarray:
    """What the service stores: the gallery's PolyProtect mapping, then unit length."""
    key = im.derive_key(BENCH_SECRET, "gallery:bench:tmap-1")
    return unit(im.protect(unit(embeddings), key))


# ------------------------------------------------------------------------------- real data


def real_templates(
    source: str = "auto", cache_dir: Path = CACHE, model: Path = MODEL, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, str]:
    """(templates, identity labels, description) of every LFW image.

    ``auto`` uses the shipped model when its weights exist, else the teacher descriptors.
    Model embeddings take minutes on one CPU thread, so they are cached next to the faces.
    """
    from enrollment.face_cache import build_cache

    if source == "auto":
        source = "model" if Path(model).exists() else "teacher"
    cache = build_cache(LFW, cache_dir, progress=True)
    if source == "teacher":
        return protect(cache.teacher), cache.labels, "LFW, dlib teacher 128-d -> PolyProtect"
    if source != "model":
        raise ValueError(f"unknown template source {source!r}")
    digest = hashlib.sha256(Path(model).read_bytes()).hexdigest()[:12]
    memo = Path(cache_dir) / f"bench-lfw-embeddings-{digest}-s{seed}.npy"
    if memo.exists():
        emb = np.load(memo)
    else:
        import torch

        from enrollment.evaluation import model_embedder

        torch.set_num_threads(1)
        print(f"embedding {len(cache.labels)} LFW faces with {model} (1 thread, cached) ...")
        emb = model_embedder(model, cache, seed)(np.arange(len(cache.labels)))
        np.save(memo, emb.astype(np.float32))
    return protect(emb), cache.labels, f"LFW, model {Path(model).name} -> PolyProtect"


# ------------------------------------------------------------------------------- statistics


def _pairs(labels: np.ndarray, rng: np.random.Generator, n: int) -> tuple[np.ndarray, ...]:
    """Random same-identity and different-identity index pairs."""
    order = np.argsort(labels, kind="stable")
    ls = labels[order]
    starts = np.flatnonzero(np.r_[True, ls[1:] != ls[:-1]])
    sizes = np.diff(np.r_[starts, len(ls)])
    multi = np.flatnonzero(sizes >= 2)
    # Same identity: a random identity (weighted by its pair count would favour Bush), two
    # distinct members of it.
    g = rng.choice(multi, n)
    i = rng.integers(0, sizes[g])
    j = (i + 1 + rng.integers(0, sizes[g] - 1)) % sizes[g]
    same = (order[starts[g] + i], order[starts[g] + j])
    a, b = rng.integers(0, len(labels), (2, 2 * n))
    keep = labels[a] != labels[b]
    diff = (a[keep][:n], b[keep][:n])
    return same, diff


def cosine_stats(x: np.ndarray, labels: np.ndarray, seed: int = 0, n: int = 20_000) -> dict:
    """Intra- and inter-identity cosine distributions (mean, std, quantiles)."""
    same, diff = _pairs(labels, np.random.default_rng(seed), n)
    out = {}
    for name, (a, b) in (("intra", same), ("inter", diff)):
        c = np.sum(x[a].astype(np.float64) * x[b], axis=1)
        q = np.quantile(c, [0.001, 0.01, 0.5, 0.99, 0.999])
        out[name] = {
            "mean": float(c.mean()),
            "std": float(c.std()),
            **{f"q{p}": float(v) for p, v in zip((0.1, 1, 50, 99, 99.9), q, strict=True)},
        }
    return out


def nn_stats(gallery: np.ndarray, queries: np.ndarray, k: int = 10) -> dict:
    """Best, 10th-best and gap scores of queries against a gallery: what ANN recall feels."""
    s = queries.astype(np.float32) @ gallery.T.astype(np.float32)
    top = -np.sort(-np.partition(s, s.shape[1] - k, axis=1)[:, -k:], axis=1)
    return {
        "top1_mean": float(top[:, 0].mean()),
        "top10_mean": float(top[:, k - 1].mean()),
        "gap_1_10_mean": float((top[:, 0] - top[:, k - 1]).mean()),
        "gap_9_10_median": float(np.median(top[:, k - 2] - top[:, k - 1])),
    }


# ------------------------------------------------------------------------------- distractors


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return v * np.sqrt(np.clip(w, 0, None))


def _lognormal(rng: np.random.Generator, sigma: float, n: int) -> np.ndarray:
    """Positive factors with E[f^2] = 1, so a spread changes the tails, not the mean scale."""
    return np.exp(sigma * rng.standard_normal(n) - sigma**2)


@dataclass
class DistractorModel:
    """Gaussian-mixture model of protected templates; see the module docstring."""

    weights: np.ndarray  # (K,) share of identities per cluster
    centres: np.ndarray  # (K, d) cluster means of identity centres
    roots_b: np.ndarray  # (K, d, d): S_b,k = root @ root.T
    root_w: np.ndarray  # (d, d) within-identity covariance root
    sizes: np.ndarray  # samples per identity to draw from
    scale_b: float = 1.0
    scale_w: float = 1.0
    spread_b: float = 0.3  # log-normal sigma of a per-identity factor on the centre offset
    spread_w: float = 0.3  # ... and of a per-sample factor on the within-identity noise
    target: dict = field(default_factory=dict)

    @property
    def mu(self) -> np.ndarray:
        return self.weights @ self.centres

    @classmethod
    def fit(
        cls,
        x: np.ndarray,
        labels: np.ndarray,
        seed: int = 0,
        max_per: int = MAX_PER_SUBJECT,
        clusters: int = 32,
        shrink: float = 0.3,
    ) -> DistractorModel:
        """Fit to real templates; ``clusters`` groups of identity centres (k-means on the
        identity means), each with its own covariance shrunk towards the global one."""
        import faiss

        x = x.astype(np.float64)
        d = x.shape[1]
        ids, inv, counts = np.unique(labels, return_inverse=True, return_counts=True)
        means = np.zeros((len(ids), d))
        np.add.at(means, inv, x)
        means /= counts[:, None]
        resid = x - means[inv]
        s_w = resid.T @ resid / max(1, len(x) - len(ids))

        def between(sel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            m = means[sel]
            mu = m.mean(0)
            dm = m - mu
            return mu, dm.T @ dm / len(m) - np.mean(1.0 / counts[sel]) * s_w

        _, s_glob = between(np.ones(len(ids), bool))
        k = max(1, min(clusters, len(ids) // 50))
        assign = np.zeros(len(ids), np.int64)
        if k > 1:
            km = faiss.Kmeans(d, k, niter=25, seed=seed + 3)
            km.train(means.astype(np.float32))
            assign = km.index.search(means.astype(np.float32), 1)[1][:, 0]
        weights, centres, roots = [], [], []
        for j in range(k):
            sel = assign == j
            if sel.sum() < 2:
                continue
            mu, s_b = between(sel)
            scale = max(np.trace(s_b), 0.0) / max(np.trace(s_glob), 1e-12)
            s_b = (1 - shrink) * s_b + shrink * scale * s_glob if k > 1 else s_b
            weights.append(sel.mean())
            centres.append(mu)
            roots.append(_sqrt_psd(s_b))
        w = np.asarray(weights)
        model = cls(
            w / w.sum(), np.stack(centres), np.stack(roots), _sqrt_psd(s_w),
            np.minimum(counts, max_per),
        )  # fmt: skip
        model.target = cosine_stats(unit(x), labels, seed)
        model._calibrate(seed)
        return model

    def sample(
        self, n: int, rng: np.random.Generator, first_label: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        """``n`` unit templates and their identity labels (first_label, first_label + 1, ...)."""
        reps = rng.choice(self.sizes, size=n // max(1, int(self.sizes.min())) + 1)
        ends = np.cumsum(reps)
        n_ids = int(np.searchsorted(ends, n) + 1)
        labels = np.repeat(np.arange(n_ids), reps[:n_ids])[:n]
        d = self.centres.shape[1]
        cluster = rng.choice(len(self.weights), n_ids, p=self.weights)
        t_b = self.scale_b * _lognormal(rng, self.spread_b, n_ids)
        z = rng.standard_normal((n_ids, d))
        centres = np.empty((n_ids, d))
        for j in range(len(self.weights)):
            sel = cluster == j
            centres[sel] = self.centres[j] + t_b[sel, None] * (z[sel] @ self.roots_b[j].T)
        out = np.empty((n, d), np.float32)
        chunk = 1 << 16
        for i in range(0, n, chunk):
            lab = labels[i : i + chunk]
            t_w = self.scale_w * _lognormal(rng, self.spread_w, len(lab))
            noise = t_w[:, None] * (rng.standard_normal((len(lab), d)) @ self.root_w.T)
            out[i : i + chunk] = unit(centres[lab] + noise)
        return out, labels + first_label

    def _calibrate(self, seed: int, rounds: int = 30) -> None:
        """Damped fixed-point fit: the scales to the median intra / inter cosines
        (1 - cos ~ scale^2), the log-normal spreads to the width between their 1% and 99%
        quantiles. Robust statistics: the mean and std of real intra-identity scores are
        pulled by a few mislabelled or unusable pictures, and fitting them made the model
        degenerate (near-duplicate clusters) on a weaker model's templates."""
        rng = np.random.default_rng(seed + 1)
        tgt = self.target

        def width(s: dict) -> float:
            return max(s["q99"] - s["q1"], 1e-6)

        for _ in range(rounds):
            x, lab = self.sample(20_000, rng)
            got = cosine_stats(x, lab, seed)
            self.scale_w *= np.sqrt((1 - tgt["intra"]["q50"]) / (1 - got["intra"]["q50"]))
            # The inter distance holds both scales; move the between part by what is left.
            b_want = max(tgt["intra"]["q50"] - tgt["inter"]["q50"], 1e-6)
            b_got = max(got["intra"]["q50"] - got["inter"]["q50"], 1e-6)
            self.scale_b *= np.sqrt(b_want / b_got)
            self.spread_w *= (width(tgt["intra"]) / width(got["intra"])) ** 0.5
            self.spread_b *= (width(tgt["inter"]) / width(got["inter"])) ** 0.5


def compare(real: np.ndarray, real_labels: np.ndarray, model: DistractorModel, seed: int = 0):
    """Statistics of real vs synthetic templates, as rows of a table (and a dict)."""
    rng = np.random.default_rng(seed + 2)
    syn, syn_labels = model.sample(len(real), rng)
    r, s = cosine_stats(real, real_labels, seed), cosine_stats(syn, syn_labels, seed)
    # Non-mated queries: every image of a queried identity leaves the real gallery, so both
    # galleries hold only other people (the synthetic one never holds a mate).
    q = rng.choice(len(real), 500, replace=False)
    keep = ~np.isin(real_labels, real_labels[q])
    nn_r = nn_stats(real[keep], real[q])
    nn_s = nn_stats(syn[: int(keep.sum())], real[q])
    return {"real": {**r, "nn": nn_r}, "synthetic": {**s, "nn": nn_s}}


def format_compare(c: dict) -> str:
    lines = [f"{'':22s}{'real':>10s}{'synthetic':>11s}"]
    for kind in ("intra", "inter"):
        for stat in c["real"][kind]:
            lines.append(
                f"{kind + ' ' + stat:22s}{c['real'][kind][stat]:10.4f}"
                f"{c['synthetic'][kind][stat]:11.4f}"
            )
    for stat in c["real"]["nn"]:
        lines.append(
            f"{'nn ' + stat:22s}{c['real']['nn'][stat]:10.4f}{c['synthetic']['nn'][stat]:11.4f}"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------- galleries


@dataclass
class BenchGallery:
    """One benchmark gallery: templates with sample ids and subjects, and probes."""

    x: np.ndarray  # (N, d) unit float32
    sample_ids: np.ndarray  # (N,) int64, unique
    subjects: np.ndarray  # (N,) int64; real LFW identities < 1_000_000 <= synthetic ones
    probes: np.ndarray  # (P, d)
    probe_subject: np.ndarray  # (P,) the mate's subject, -1 for a non-mated probe
    n_real: int
    source: str

    @property
    def d(self) -> int:
        return self.x.shape[1]


SYNTHETIC_BASE = 1_000_000


def split_real(
    labels: np.ndarray, seed: int = 0, non_mated: int = 500, max_per: int = MAX_PER_SUBJECT
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(enrolled rows, mated probe rows, non-mated probe rows) of the real templates."""
    rng = np.random.default_rng(seed)
    enrolled, mated, singles = [], [], []
    for ident in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == ident))
        if len(rows) >= 2:
            mated.append(rows[0])
            enrolled.extend(rows[1 : 1 + max_per].tolist())
        else:
            singles.append(rows[0])
    singles = rng.permutation(np.asarray(singles))
    enrolled.extend(singles[non_mated:].tolist())
    return np.asarray(enrolled), np.asarray(mated), singles[:non_mated]


def build_gallery(
    real: np.ndarray,
    labels: np.ndarray,
    size: int,
    model: DistractorModel,
    source: str = "",
    seed: int = 0,
) -> BenchGallery:
    """``size`` templates: the real enrolled ones (fewer if size is smaller) + distractors."""
    enrolled, mated, non_mated = split_real(labels, seed)
    rng = np.random.default_rng(seed + 10)
    if size < len(enrolled):
        # Keep every mate of a kept probe; drop whole real identities at random.
        idents = rng.permutation(np.unique(labels[enrolled]))
        per = {i: 0 for i in idents.tolist()}
        for lab in labels[enrolled].tolist():
            per[lab] += 1
        kept, total = set(), 0
        for i in idents.tolist():
            if total + per[i] > size:
                continue
            kept.add(i)
            total += per[i]
        enrolled = enrolled[np.isin(labels[enrolled], list(kept))]
        probe_ok = np.isin(labels[mated], list(kept))
        mated = mated[probe_ok]
    n_syn = size - len(enrolled)
    syn, syn_lab = model.sample(n_syn, rng, SYNTHETIC_BASE) if n_syn > 0 else (None, None)
    x = real[enrolled] if syn is None else np.concatenate([real[enrolled], syn])
    subjects = labels[enrolled] if syn is None else np.concatenate([labels[enrolled], syn_lab])
    order = rng.permutation(len(x))  # real templates must not all sit at the start
    probes = np.concatenate([real[mated], real[non_mated]])
    probe_subject = np.concatenate([labels[mated], np.full(len(non_mated), -1)])
    return BenchGallery(
        x=np.ascontiguousarray(x[order]),
        sample_ids=np.arange(len(x), dtype=np.int64) + 1,
        subjects=subjects[order].astype(np.int64),
        probes=np.ascontiguousarray(probes),
        probe_subject=probe_subject.astype(np.int64),
        n_real=len(enrolled),
        source=source,
    )


if __name__ == "__main__":
    import argparse
    import json

    ap = argparse.ArgumentParser(description="Fit the distractor model and compare statistics.")
    ap.add_argument("--source", default="auto", choices=["auto", "teacher", "model"])
    ap.add_argument("--model", type=Path, default=MODEL, help="model file for --source model")
    ap.add_argument("--json")
    args = ap.parse_args()
    x, lab, desc = real_templates(args.source, model=args.model)
    m = DistractorModel.fit(x, lab)
    c = compare(x, lab, m)
    print(f"{desc}: {x.shape[0]} templates, d = {x.shape[1]}")
    print(
        f"{len(m.weights)} clusters; scales between {m.scale_b:.3f}, within {m.scale_w:.3f}; "
        f"spreads {m.spread_b:.3f}, {m.spread_w:.3f}"
    )
    print(format_compare(c))
    if args.json:
        Path(args.json).write_text(json.dumps(c, indent=2))
