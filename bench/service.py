"""End to end over gRPC: the running service (embedded PostgreSQL, model, gallery index).

* **Enrol**: faces per second from protected input to committed, searchable sample (model
  + identity mapping + PostgreSQL commit + index), one ``Enroll`` call per face and one
  ``EnrollBatch`` stream; the client-side protection cost is reported apart.
* **Identify**: protected probe -> model -> search -> answer; p50 / p99 of single calls and
  throughput with concurrent clients, at each gallery size.
* **Restart to serving**: stop the whole service (server, embedded PostgreSQL), start it
  again and time until the first identify is answered: once building every index from
  PostgreSQL (no snapshot), once from the encrypted index snapshot written at shutdown.

Real LFW faces are enrolled through the API. Larger galleries are filled with synthetic
protected templates written straight into PostgreSQL with the storage API (the model
cannot enrol a million faces within a benchmark), drawn from ``bench.templates``'
distractor model fitted to the templates the service itself made for the enrolled faces.

    python bench/service.py --sizes 10000 --json bench/results/service.json
    python bench/service.py --sizes 10000 100000 1000000 --enroll 2000   # full run

Without the shipped model (``enrollment/weights/partialface-balanced.pt``) pass ``--model``
or ``--untrained-model`` (random weights of the training run's architecture: the same
speed, meaningless matches; the JSON says so).
"""

from __future__ import annotations

import _threads  # first: sets the BLAS thread count before numpy is imported

THREADS = _threads.THREADS

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os
import shutil  # noqa: E402
import sys
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import faiss  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import templates as tpl  # noqa: E402
from privface.embedding import RUNTIMES, SERVING_PRECISIONS  # noqa: E402

faiss.omp_set_num_threads(THREADS)
GALLERY = "bench"
K = 10
RUNS = Path("/work/runs/main/config.json")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def untrained_model(path: Path) -> Path:
    """Random weights in the architecture of the training run (or the default one)."""
    import torch

    from enrollment.backbone import Backbone, BackboneConfig
    from enrollment.model_io import save_model

    cfg = BackboneConfig()
    if RUNS.exists():
        cfg = BackboneConfig.from_dict(json.loads(RUNS.read_text())["backbone"])
    torch.manual_seed(0)
    meta = {"threshold_far_1e-3": 0.5, "note": "untrained, for benchmarking speed only"}
    save_model(path, Backbone(cfg), "partialface", "partialface-paper", meta)
    return path


def start(settings):
    from privface.client import PrivfaceClient
    from privface.server import build_server

    running = build_server(settings)
    client = PrivfaceClient(running.address)
    client.wait_ready()
    return running, client


def pick_faces(cache, n_enroll: int, n_single: int, seed: int):
    """(single-sample subjects, batch subjects as lists of rows, mated probes, non-mated)."""
    rng = np.random.default_rng(seed)
    counts = np.bincount(cache.labels)
    multi = rng.permutation(np.flatnonzero(counts >= 2))
    singles = rng.permutation(np.flatnonzero(counts == 1))
    rows_of = {i: rng.permutation(np.flatnonzero(cache.labels == i)) for i in multi.tolist()}
    single, batch, probes, total = [], [], [], 0
    for ident in multi.tolist():
        rows = rows_of[ident]
        if len(single) < n_single:
            single.append((ident, [int(rows[1])]))
            probes.append((ident, int(rows[0])))
            total += 1
        elif total < n_enroll:
            take = [int(r) for r in rows[1 : 1 + tpl.MAX_PER_SUBJECT]]
            batch.append((ident, take))
            probes.append((ident, int(rows[0])))
            total += len(take)
        else:
            break
    non_mated = [(-1, int(cache.labels.tolist().index(i))) for i in singles[:200].tolist()]
    return single, batch, probes, non_mated


def fill(running, n_target: int, model: tpl.DistractorModel, seed: int) -> float:
    """Write synthetic subjects into PostgreSQL until the gallery holds n_target samples;
    templates written per second (0 when there was nothing to write)."""
    from storage import repository as repo
    from storage.database import make_engine, make_session_factory
    from storage.records import SampleInput

    eng = running.engine
    db = make_engine(running.database_url)
    sessions = make_session_factory(db)
    ring = eng.keys.get()
    key_id = eng.current_template_key_id()
    p = eng.card.profile
    with sessions() as s:
        have = repo.get_gallery(s, GALLERY).sample_count
    need = n_target - have
    if need <= 0:
        return 0.0
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed + have)
    x, lab = model.sample(need, rng)
    starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]])
    ends = np.r_[starts[1:], len(lab)]
    per_tx = 2000  # subjects per bulk import (one transaction each)
    bar = tqdm(total=need, desc=f"  fill PostgreSQL to {n_target:,}", unit="tmpl")
    for b in range(0, len(starts), per_tx):
        batch = [
            (
                f"syn-{have}-{lab[a]}",
                [
                    SampleInput(t, eng.card.model_version, p.name, str(p.version), key_id)
                    for t in x[a:e]
                ],
            )
            for a, e in zip(starts[b : b + per_tx], ends[b : b + per_tx], strict=True)
        ]
        with sessions.begin() as s:
            repo.import_subjects(s, ring, GALLERY, batch)
        bar.update(sum(len(samples) for _, samples in batch))
    bar.close()
    db.dispose()
    return need / (time.perf_counter() - t0)


def fitted_model(running, seed: int) -> tpl.DistractorModel:
    """Distractor model of the templates the service made for the enrolled LFW faces."""
    from storage import repository as repo
    from storage.database import make_engine, make_session_factory

    db = make_engine(running.database_url)
    sessions = make_session_factory(db)
    xs, labels = [], []
    with sessions() as s:
        for chunk in repo.iter_gallery_templates(s, running.engine.keys.get(), GALLERY):
            for r in chunk:
                xs.append(r.template)
                labels.append(r.subject_row_id)
    db.dispose()
    x, lab = tpl.unit(np.stack(xs)), np.asarray(labels)
    model = tpl.DistractorModel.fit(x, lab, seed=seed)
    return model


def timed_calls(fn, items) -> np.ndarray:
    out = np.empty(len(items))
    for i, it in enumerate(items):
        t = time.perf_counter()
        fn(it)
        out[i] = time.perf_counter() - t
    return out


def throughput(address: str, probes: list[bytes], clients: int, seconds: float) -> float:
    from privface.client import PrivfaceClient

    stop = threading.Event()
    counts = [0] * clients
    errors: list[BaseException] = []

    def run(c: int) -> None:
        try:
            with PrivfaceClient(address) as cl:
                i = c
                while not stop.is_set():
                    cl.identify(GALLERY, probes[i % len(probes)], top_k=K)
                    counts[c] += 1
                    i += clients
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    time.sleep(seconds)
    stop.set()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    return sum(counts) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000])
    ap.add_argument("--enroll", type=int, default=300, help="LFW faces enrolled via the API")
    ap.add_argument("--single", type=int, default=50, help="of which one Enroll call each")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--views", type=int, choices=[1, 2], default=2,
                    help="views per protected input: face + mirror (the CLI's default) or face")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=THREADS, help="torch / FAISS / BLAS threads")
    ap.add_argument("--precision", choices=SERVING_PRECISIONS, default="fp32",
                    help="the server's model_precision")
    ap.add_argument("--runtime", choices=RUNTIMES, default="auto",
                    help="the server's model_runtime (auto: ONNX Runtime for fp32)")
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--untrained-model", action="store_true")
    ap.add_argument("--json", type=Path, default=Path("bench/results/service.json"))
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from enrollment.face_cache import build_cache
    from enrollment.model_io import DEFAULT_MODEL
    from privface.client import protect_many
    from privface.config import Settings

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="privface-service-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.chmod(workdir, 0o777)
    model_path = args.model or DEFAULT_MODEL
    untrained = False
    if not Path(model_path).exists():
        if not args.untrained_model:
            raise SystemExit(f"no model at {model_path}: pass --model or --untrained-model")
        model_path = untrained_model(workdir / "untrained.pt")
        untrained = True
    settings = Settings(
        data_dir=str(workdir / "data"),
        listen="127.0.0.1:0",
        model_path=str(model_path),
        torch_threads=THREADS,
        model_precision=args.precision,
        model_runtime=args.runtime,
        workers=8,
        sync_interval=0,
        key_file="",
    )
    result: dict = {
        "meta": {
            "model": str(model_path),
            "untrained_model": untrained,
            "threads": THREADS,
            "views_per_input": args.views,
            "model_precision": args.precision,
            "model_runtime": args.runtime,
            "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "note": "end to end over gRPC on one machine (client, server, embedded "
            "PostgreSQL share the CPUs); galleries beyond the enrolled LFW faces are "
            "synthetic templates written to PostgreSQL",
        },
        "runs": {},
    }
    try:
        log(f"starting the service (workdir {workdir}, {THREADS} thread(s))")
        t = time.perf_counter()
        running, client = start(settings)
        result["meta"]["cold_start_s"] = time.perf_counter() - t
        profile = client.profile()
        cache = build_cache(tpl.LFW, tpl.CACHE, progress=True)
        single, batch, probes, non_mated = pick_faces(cache, args.enroll, args.single, args.seed)

        # ---- client side: protect every face once (not part of the server's numbers)
        rows = [r for _, rs in single + batch for r in rs] + [r for _, r in probes + non_mated]
        t = time.perf_counter()
        blobs = protect_many(cache.images[rows], profile, flip=args.views == 2,
                             rng=np.random.default_rng(args.seed))
        protect_ms = (time.perf_counter() - t) / len(rows) * 1e3
        blob_of = dict(zip(rows, blobs, strict=True))
        log(f"client-side protection: {protect_ms:.1f} ms per face (batched)")

        # ---- enrolment
        client.create_gallery(GALLERY)
        t = time.perf_counter()
        for ident, rs in single:
            client.enroll(GALLERY, f"lfw-{ident}", [blob_of[rs[0]]])
        single_s = time.perf_counter() - t
        requests = [
            client.enroll_request(GALLERY, f"lfw-{ident}", [blob_of[r] for r in rs])
            for ident, rs in batch
        ]
        n_batch = sum(len(rs) for _, rs in batch)
        t = time.perf_counter()
        results = list(client.enroll_batch(iter(requests)))
        batch_s = time.perf_counter() - t
        failed = [r for r in results if not r.ok]
        result["enroll"] = {
            "client_protect_ms_per_face": protect_ms,
            "single_faces": len(single),
            "single_faces_per_s": len(single) / single_s,
            "batch_faces": n_batch,
            "batch_faces_per_s": n_batch / batch_s,
            "batch_failed": len(failed),
            "gallery_size_while_enrolling": len(single) + n_batch,
        }
        log(
            f"enrol: single {result['enroll']['single_faces_per_s']:.1f} faces/s, "
            f"batch {result['enroll']['batch_faces_per_s']:.1f} faces/s "
            f"({len(failed)} failed)"
        )
        model = fitted_model(running, args.seed)
        probe_blobs = [blob_of[r] for _, r in probes + non_mated]
        probe_subject = [f"lfw-{i}" if i >= 0 else "" for i, _ in probes + non_mated]

        for n in sorted(args.sizes):
            log(f"=== gallery of {n:,} templates ===")
            fill_rate = fill(running, n, model, args.seed)
            running.stop()
            snaps = Path(settings.data_dir) / "snapshots"
            shutil.rmtree(snaps, ignore_errors=True)  # first start: build from PostgreSQL
            t = time.perf_counter()
            running, client = start(settings)
            client.identify(GALLERY, probe_blobs[0], top_k=K)
            build_s = time.perf_counter() - t
            log(f"start building the index from PostgreSQL: {build_s:.1f} s")
            t = time.perf_counter()
            running.stop()  # writes the encrypted index snapshot
            stop_s = time.perf_counter() - t
            snap_bytes = sum(f.stat().st_size for f in snaps.glob("*"))
            t = time.perf_counter()
            running, client = start(settings)
            client.identify(GALLERY, probe_blobs[0], top_k=K)
            restart_s = time.perf_counter() - t
            log(f"restart to serving from the snapshot: {restart_s:.1f} s (shutdown with "
                f"snapshot {stop_s:.1f} s, {snap_bytes / 2**20:.0f} MiB)")
            qs = probe_blobs[: args.queries]
            for q in qs[:10]:
                client.identify(GALLERY, q, top_k=K)
            times = timed_calls(lambda q, c=client: c.identify(GALLERY, q, top_k=K), qs)
            answers = [client.identify(GALLERY, q, top_k=K) for q in probe_blobs]
            mated = [i for i, s in enumerate(probe_subject) if s]
            rank1 = np.mean(
                [
                    bool(answers[i].candidates)
                    and answers[i].candidates[0].subject_id == probe_subject[i]
                    for i in mated
                ]
            )
            per = {c: throughput(running.address, qs, c, args.duration) for c in args.clients}
            run = {
                "size": n,
                "restart_to_serving_s": restart_s,
                "start_building_from_postgres_s": build_s,
                "shutdown_with_snapshot_s": stop_s,
                "snapshot_bytes": snap_bytes,
                "p50_ms": float(np.percentile(times, 50) * 1e3),
                "p99_ms": float(np.percentile(times, 99) * 1e3),
                "qps_by_clients": {str(c): q for c, q in per.items()},
                "qps": max(per.values()),
                "mate_rank1": float(rank1),
                "index": client.gallery_stats(GALLERY).index_type,
                "fill_templates_per_s": fill_rate,  # synthetic, via import_subjects
            }
            result["runs"][str(n)] = run
            log(
                f"identify at {n:,}: p50 {run['p50_ms']:.1f} ms, p99 {run['p99_ms']:.1f} ms, "
                f"{run['qps']:.1f} qps, mate rank-1 {rank1:.3f}, index {run['index']}"
            )
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2))
        running.stop()
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
