"""A tiny real training run, resumption, the identity exclusion, and evaluation plumbing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from enrollment import evaluation as ev
from enrollment.backbone import Backbone, BackboneConfig
from enrollment.face_cache import build_cache
from enrollment.lfw_protocol import held_out_identities, read_pairs
from enrollment.training import TrainConfig, load_training_data, train

TINY = BackboneConfig(
    widths=(8, 8, 16, 16), blocks=(1, 1, 1, 1), embedding_size=32, strides=(2, 2, 2, 2)
)


def test_backbone_shapes():
    import torch

    for stem, strides in [(2, (1, 2, 2, 2)), (1, (2, 2, 2, 2))]:
        cfg = BackboneConfig(widths=(8, 8, 8, 8), stem_stride=stem, strides=strides)
        model = Backbone(cfg).eval()
        assert model(torch.randn(2, 27, 112, 112)).shape == (2, 512)


def test_standardise_matches_numpy_and_keeps_gradients():
    import torch

    from enrollment.backbone import standardise

    x = np.random.default_rng(0).standard_normal((3, 5, 7, 9)) * [[[[40.0]]]] + 3.0
    want = (x - x.mean(axis=(2, 3), keepdims=True)) / (
        x.std(axis=(2, 3), ddof=1, keepdims=True) + 1e-6
    )
    got = standardise(torch.from_numpy(x.astype(np.float32)))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)
    leaf = torch.from_numpy(x.astype(np.float32)).requires_grad_()
    with_grad = standardise(leaf)
    np.testing.assert_allclose(with_grad.detach().numpy(), got.numpy(), rtol=1e-6, atol=1e-6)
    (with_grad * torch.arange(9.0)).sum().backward()  # autograd through the graph path
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()


def test_exclusion_of_test_identities(data_dir):
    pairs = data_dir / "lfw" / "pairs.txt"
    excluded = held_out_identities(pairs)
    assert len(excluded) == 2195
    assert len(read_pairs(pairs)) == 6000
    names = sorted(p.name for p in (data_dir / "lfw" / "lfw-deepfunneled").iterdir())
    train_names = [n for n in names if n not in excluded]
    assert len(train_names) == 3554


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_dir):
    """One epoch on the first identities of LFW (test identities excluded)."""
    root = tmp_path_factory.mktemp("run")
    config = TrainConfig(
        data=[str(data_dir / "lfw" / "lfw-deepfunneled")],
        pairs=str(data_dir / "lfw" / "pairs.txt"),
        out_dir=str(root / "out"),
        cache_dir=str(root / "cache"),
        backbone=TINY,
        epochs=1,
        uses_per_epoch=2,
        batch_size=8,
        warmup_steps=2,
        limit_identities=60,
        val_identities=3,
        arcface_weight=0.1,
        workers=1,
    )
    summary = train(config, progress=False)
    return config, summary


def test_tiny_training_run_writes_model_and_log(tiny_run):
    config, summary = tiny_run
    data, _ = load_training_data(config)
    excluded = held_out_identities(config.pairs)
    assert not {p.split("/")[0] for p in data.paths} & excluded
    log = [json.loads(line) for line in Path(config.out_dir, "log.jsonl").read_text().splitlines()]
    assert log[-1]["epoch"] == 1 and np.isfinite(log[-1]["loss"])
    assert 0.0 <= log[-1]["val_accuracy"] <= 1.0
    assert summary["train_images"] > 0


def test_resume_continues_from_checkpoint(tiny_run):
    config, _ = tiny_run
    config.epochs = 2
    train(config, progress=False)
    log = [json.loads(line) for line in Path(config.out_dir, "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    assert log[1]["step"] == 2 * log[0]["step"]


def test_warm_restart_starts_from_the_given_model(tiny_run, tmp_path):
    import dataclasses

    import torch

    from enrollment.model_io import load_model

    config, _ = tiny_run
    start, _ = load_model(Path(config.out_dir) / "model.pt")
    # lr 0: the run must end exactly where it started (BN statistics aside)
    warm = dataclasses.replace(config, out_dir=str(tmp_path / "warm"), epochs=1, lr=0.0,
                               init=str(Path(config.out_dir) / "model.pt"))
    train(warm, progress=False)
    end, _ = load_model(tmp_path / "warm" / "model.pt")
    for (name, a), b in zip(start.state_dict().items(), end.state_dict().values(), strict=True):
        if "running" not in name and "num_batches" not in name:
            torch.testing.assert_close(a, b, msg=name)
    other = dataclasses.replace(warm, out_dir=str(tmp_path / "other"),
                                backbone=dataclasses.replace(TINY, embedding_size=16))
    with pytest.raises(ValueError, match="architecture"):
        train(other, progress=False)


def test_evaluation_on_a_handful_of_pairs(tiny_run, tmp_path):
    config, _ = tiny_run
    cache = build_cache(config.data[0], config.cache_dir, limit_identities=60)
    paths = list(cache.paths)
    by_name: dict[str, list[str]] = {}
    for p in paths:
        by_name.setdefault(p.split("/")[0], []).append(p)
    multi = [n for n, ps in by_name.items() if len(ps) >= 2][:2]
    lines = ["10 1"]
    for fold in range(10):
        n = multi[fold % len(multi)]
        a, b = by_name[n][:2]
        lines.append(f"{n} {int(a[-8:-4])} {int(b[-8:-4])}")
        other = sorted(by_name)[fold]
        lines.append(f"{n} {int(a[-8:-4])} {other} {int(by_name[other][0][-8:-4])}")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("\n".join(lines) + "\n")
    model = f"{config.out_dir}/model.pt"
    for name, emb in ev.variants({"protected": model}, cache, seed=0, flip=True).items():
        r = ev.verification(emb, cache, str(pairs))
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["tar_at_far_1e-3"] <= 1, name
    teacher = ev.verification(ev.teacher_embedder(cache), cache, str(pairs))
    assert teacher["accuracy"] >= 0.8  # the dlib teacher gets these easy pairs right
    mapped = ev.verification(ev.teacher_embedder(cache), cache, str(pairs), mapping="gallery")
    assert mapped["accuracy"] >= 0.8  # one gallery key keeps who is who
    subject = ev.verification(ev.teacher_embedder(cache), cache, str(pairs), mapping="subject")
    assert subject["accuracy"] >= mapped["accuracy"]  # impostors under their own keys
    draws = ev.rank_draws(model, cache, str(pairs), [0, 1, 2])
    assert draws["seeds"] == [0, 1, 2] and len(draws["accuracy"]) == 3
    assert draws["mean"] == pytest.approx(np.mean(draws["accuracy"]))
    first = ev.verification(ev.model_embedder(model, cache, 0), cache, str(pairs))["accuracy"]
    assert draws["accuracy"][0] == first  # seed 0 is the plain protected variant
    assert ev.rank_draws(model, cache, str(pairs), [0, 1], known={0: 0.5})["accuracy"][0] == 0.5
    balance = ev.subset_draws(model, cache, str(pairs), [1, 4], [0, 1], known={4: {0: 0.5}})
    assert list(balance["subsets"]) == ["subset_1", "subset_4"]
    one = ev.verification(ev.model_embedder(model, cache, 1, subset=1), cache, str(pairs))
    assert balance["subsets"]["subset_1"]["accuracy"][1] == one["accuracy"]  # seed 1, subset 1
    assert balance["subsets"]["subset_4"]["accuracy"][0] == 0.5  # known, not measured again
    means = [d["mean"] for d in balance["subsets"].values()]
    assert balance["spread"] == pytest.approx(max(means) - min(means))


def test_precision_choice():
    import torch

    from enrollment.model_io import hardware_bf16, resolve_precision

    assert resolve_precision("fp32") == "fp32" and resolve_precision("bf16") == "bf16"
    assert hardware_bf16() == (torch.cpu._is_amx_tile_supported()
                               or torch.cpu._is_avx512_bf16_supported())
    assert resolve_precision("auto") == ("bf16" if hardware_bf16() else "fp32")
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp16")


def test_bf16_training_keeps_fp32_weights_and_learns(tiny_run, tmp_path):
    """bf16 autocast changes the arithmetic of the convolutions only: the weights, the
    optimiser and the saved model stay fp32/fp16 as before, and the run follows the fp32 run
    of the same seed.  (A tiny run's loss barely moves in 3 epochs — 0.99 -> 0.97 in fp32 —
    so "the loss falls" is noise here; the fp32 twin is the reference that can fail.)"""
    import dataclasses

    import torch

    config, _ = tiny_run
    logs = {}
    for precision in ("fp32", "bf16"):
        run = dataclasses.replace(config, out_dir=str(tmp_path / precision), epochs=3,
                                  precision=precision, lr=0.05)
        summary = train(run, progress=False)
        assert summary["precision"] == precision
        logs[precision] = [json.loads(line) for line in
                           Path(run.out_dir, "log.jsonl").read_text().splitlines()]
    bf16 = [r["distill"] for r in logs["bf16"]]
    fp32 = [r["distill"] for r in logs["fp32"]]
    assert all(np.isfinite(bf16)) and len(bf16) == len(fp32) == 3
    assert max(abs(a - b) for a, b in zip(bf16, fp32, strict=True)) < 0.04, (bf16, fp32)
    ckpt = torch.load(Path(run.out_dir) / "checkpoint.pt", weights_only=False)
    assert all(v.dtype in (torch.float32, torch.int64) for v in ckpt["model"].values())


def test_compiled_training_computes_what_eager_does(tiny_run, tmp_path, monkeypatch):
    """``--compile`` changes how the forward is executed (fused kernels), not what is
    computed: on one batch in training mode the compiled forward gives the eager embedding
    and the same gradients, and a compiled run saves a plain model (no compiled-module
    prefixes in its keys). (Compiled dropout draws its masks from its own generator unless
    told to use eager's, as here, so that both see the same masks.)"""
    import dataclasses

    import torch
    import torch._inductor.config

    from enrollment.model_io import load_model
    from enrollment.training import compiled_forward, model_forward

    config, _ = tiny_run
    with pytest.raises(ValueError, match="multiple of 16"):  # TINY's widths of 8 crash it
        train(dataclasses.replace(config, out_dir=str(tmp_path / "narrow"), compile=True),
              progress=False)
    assert not (tmp_path / "narrow").exists()  # refused before any data was loaded or written
    wide = dataclasses.replace(TINY, widths=(16, 16, 16, 16))
    run = dataclasses.replace(config, out_dir=str(tmp_path / "compiled"), epochs=1,
                              precision="fp32", compile=True, backbone=wide)
    train(run, progress=False)
    log = [json.loads(line) for line in Path(run.out_dir, "log.jsonl").read_text().splitlines()]
    assert np.isfinite(log[-1]["distill"])
    model, _ = load_model(Path(run.out_dir) / "model.pt")
    assert not any("_orig_mod" in k for k in model.state_dict())

    torch._dynamo.reset()  # the graph train() compiled must not be reused: new config below
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    model = model.float().train()
    x = torch.randn(8, 27, 112, 112) * torch.logspace(0, 3, 27)[None, :, None, None]
    results = []
    for forward in (model_forward(model), compiled_forward(model)):
        model.zero_grad()
        torch.manual_seed(0)
        feat, emb = forward(x, None)
        (emb * torch.linspace(-1, 1, emb.numel()).reshape(emb.shape)).sum().backward()
        results.append((emb.detach(), [p.grad.clone() for p in model.parameters()]))
    (e_emb, e_grads), (c_emb, c_grads) = results
    torch.testing.assert_close(c_emb, e_emb, rtol=1e-4, atol=1e-4)
    # gradients that are zero in exact arithmetic (a bias just before a batch-statistics BN)
    # are rounding noise in both; every other parameter's gradient must agree. The stem's
    # weight gradients sum over the most positions (8 x 56 x 56 per weight) of an input
    # spanning three decades, and fused kernels sum in another order: on a 2-core Intel Xeon
    # with AMX (family 6 model 167) they differ by 3e-3 (conv) and 1.0e-2 (its BN's bias),
    # every later layer's by ~2e-6 (on a Zen 4 all within 1e-3); a wrong gradient is off by
    # O(1)
    largest = max(g.norm() for g in e_grads)
    names = [name for name, _ in model.named_parameters()]
    for name, a, b in zip(names, c_grads, e_grads, strict=True):
        if b.norm() > 1e-3 * largest:
            tol = 3e-2 if name.startswith("stem.") else 1e-3
            assert (a - b).norm() <= tol * b.norm(), (name, (a - b).norm(), b.norm())
    later = [(a, b) for name, a, b in zip(names, c_grads, e_grads, strict=True)
             if not name.startswith("stem.")]
    everything = torch.cat([b.flatten() for _, b in later])
    difference = torch.cat([(a - b).flatten() for a, b in later])
    assert difference.norm() <= 1e-4 * everything.norm()


def test_vanilla_model_is_also_measured_on_its_own_rank(tiny_run, tmp_path):
    import dataclasses

    from enrollment.model_io import load_model

    config, _ = tiny_run
    run = dataclasses.replace(config, out_dir=str(tmp_path / "vanilla"), epochs=1,
                              fixed_rank=(2, 1), arcface_weight=0.0)
    train(run, progress=False)
    path = str(Path(run.out_dir) / "model.pt")
    _, info = load_model(path)
    assert tuple(info["meta"]["train"]["fixed_rank"]) == (2, 1)
    assert ev.fixed_rank_of(path) == (2, 1)
    assert ev.fixed_rank_of(f"{config.out_dir}/model.pt") is None
    cache = build_cache(config.data[0], config.cache_dir, limit_identities=60)
    names = set(ev.variants({"vanilla": path}, cache, seed=0, flip=False))
    assert names == {"vanilla", "vanilla_trained_rank", "teacher"}
    # on its own rank the embedding of a face is deterministic; on random ranks it is not
    own = ev.variants({"vanilla": path}, cache, seed=0, flip=False)["vanilla_trained_rank"]
    other = ev.variants({"vanilla": path}, cache, seed=1, flip=False)["vanilla_trained_rank"]
    idx = np.arange(4)
    np.testing.assert_allclose(own(idx), other(idx), atol=1e-5)


def test_fold_batchnorm_is_exact_in_eval_mode():
    import torch

    from enrollment.backbone import fold_batchnorm

    torch.manual_seed(0)
    model = Backbone(TINY)
    for m in model.modules():  # non-trivial running statistics and affine parameters
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    model.eval()
    folded = fold_batchnorm(model)
    x = torch.randn(4, 27, 112, 112) * 20
    with torch.no_grad():
        want, got = model(x), folded(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    n_bn = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert n_bn == len(TINY.blocks) and not folded.training  # only the units' leading BNs
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # copy, not in place


def test_channels_last_only_for_widths_it_trains_correctly():
    """torch 2.13 corrupts the heap training 8- or 12-channel stride-2 units channels-last
    on an AVX-512 CPU: those widths train in the default layout."""
    from enrollment.training import channels_last_trainable

    assert channels_last_trainable(BackboneConfig(widths=(32, 64, 128, 256)))
    assert not channels_last_trainable(TINY)
    assert not channels_last_trainable(BackboneConfig(widths=(12, 24, 48, 96)))


def test_similarity_warp_rotates_and_scales_about_the_centre():
    import torch

    from enrollment.training import similarity_warp

    x = torch.rand(2, 3, 112, 112)
    same = similarity_warp(x, np.zeros(2), np.ones(2))
    assert (same - x).abs().max() < 1e-4
    turned = similarity_warp(x, np.full(2, 90.0), np.ones(2))
    assert (turned - torch.rot90(x, 1, (2, 3))).abs().max() < 1e-4
    square = torch.zeros(1, 1, 112, 112)
    square[..., 40:72, 40:72] = 1
    shrunk = similarity_warp(square, np.zeros(1), np.full(1, 0.5))
    assert abs(float(shrunk.sum() / square.sum()) - 0.25) < 0.01
    assert shrunk[..., 56, 56] == 1 and shrunk[..., 40, 40] == 0  # centre kept, corner gone


def test_augment_jitters_only_when_asked(aligned_faces):
    import dataclasses

    from enrollment.training import augment

    base = TrainConfig(data=[], out_dir="", cache_dir="", greyscale_p=0.0, flip_p=0.0,
                       shift_px=0)
    faces = np.asarray(aligned_faces[:4])
    plain = augment(faces, base, np.random.default_rng(0))
    assert (plain.permute(0, 2, 3, 1).numpy() == faces).all()
    jittered = augment(faces, dataclasses.replace(base, affine_p=1.0), np.random.default_rng(0))
    assert jittered.shape == plain.shape
    assert ((jittered - plain).abs().mean(dim=(1, 2, 3)) > 1).all()  # every face moved


def test_subset_losses_are_the_group_means():
    import torch

    from enrollment.training import robust_mean, subset_losses

    rng = np.random.default_rng(3)
    per = rng.random(40)
    subsets = rng.integers(0, 5, 40)  # subset 5 never drawn
    means, present = subset_losses(torch.from_numpy(per), subsets, 6)
    for s in range(6):
        hit = subsets == s
        assert bool(present[s]) == hit.any()
        assert float(means[s]) == pytest.approx(per[hit].mean() if hit.any() else 0.0)
    equal = torch.full((6,), 1 / 6, dtype=torch.float64)
    assert float(robust_mean(means, present, equal)) == pytest.approx(
        np.mean([per[subsets == s].mean() for s in range(5)])
    )


def test_dro_step_moves_weight_to_the_hardest_present_subset():
    import torch

    from enrollment.training import dro_step, robust_mean

    w = torch.full((6,), 1 / 6, dtype=torch.float64)
    losses = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.4, 0.3], dtype=torch.float64)
    present = torch.tensor([True] * 5 + [False])
    for _ in range(50):
        w = dro_step(w, losses, present, eta=0.5)
    assert float(w.sum()) == pytest.approx(1.0)
    assert int(torch.argmax(w)) == 4
    # an absent subset keeps its unnormalised weight while the others grow
    assert float(w[5]) < float(w[0]) < float(w[4])
    assert float(robust_mean(losses, present, w)) > float(losses[present].mean())


def test_subset_dro_run_logs_the_subset_balance(tiny_run, tmp_path):
    import dataclasses

    import torch

    config, _ = tiny_run
    run = dataclasses.replace(config, out_dir=str(tmp_path / "dro"), subset_dro=0.5)
    train(run, progress=False)
    log = [json.loads(line) for line in Path(run.out_dir, "log.jsonl").read_text().splitlines()]
    rec = log[-1]
    assert len(rec["distill_by_subset"]) == len(rec["val_accuracy_by_subset"]) == 6
    assert sum(rec["dro_weights"]) == pytest.approx(1.0)
    assert max(rec["dro_weights"]) > 1 / 6 > min(rec["dro_weights"])
    ckpt = torch.load(Path(run.out_dir) / "checkpoint.pt", weights_only=False)
    assert ckpt["dro_weights"].tolist() == pytest.approx(rec["dro_weights"])


def test_subset_validation_runs_every_n_epochs_and_at_the_last(tiny_run, tmp_path):
    import dataclasses

    config, _ = tiny_run
    run = dataclasses.replace(config, out_dir=str(tmp_path / "every"), epochs=3, subset_val_every=2)
    train(run, progress=False)
    log = [json.loads(line) for line in Path(run.out_dir, "log.jsonl").read_text().splitlines()]
    assert ["val_accuracy_by_subset" in rec for rec in log] == [False, True, True]
    assert all(len(rec["distill_by_subset"]) == 6 for rec in log)


def test_feature_loss_is_one_minus_cosine_of_flattened_maps():
    import torch

    from enrollment.training import feature_loss

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 16, 2, 2, generator=g), torch.randn(4, 16, 2, 2, generator=g)
    x, y = a.flatten(1).numpy(), b.flatten(1).numpy()
    want = 1 - np.sum(x * y, 1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
    assert feature_loss(a, b).numpy() == pytest.approx(want, abs=1e-6)
    assert feature_loss(a, 3 * a).numpy() == pytest.approx(np.zeros(4), abs=1e-6)


def test_feature_distillation_from_an_rgb_model(tiny_run, tmp_path):
    """An RGB run of the tiny architecture, then a protected run that matches its features:
    the feature loss is logged, falls, and its adapter is checkpointed for a resume."""
    import dataclasses

    import torch

    from enrollment.training import load_feature_teacher

    config, _ = tiny_run
    rgb = dataclasses.replace(config, out_dir=str(tmp_path / "rgb"), kind="rgb")
    train(rgb, progress=False)
    teacher_path = str(Path(rgb.out_dir) / "model.pt")
    # the evaluation measures an RGB model under the service's default (permutation
    # averaging) as it is: there is nothing to permute
    cache = build_cache(config.data[0], config.cache_dir, limit_identities=60)
    np.testing.assert_array_equal(
        ev.model_embedder(teacher_path, cache, 0, all_permutations=True)(np.arange(4)),
        ev.model_embedder(teacher_path, cache, 0)(np.arange(4)))
    run = dataclasses.replace(
        config, out_dir=str(tmp_path / "feat"), epochs=3, feature_teacher=teacher_path,
        feature_weight=1.0, subset_val_every=0,
    )
    train(run, progress=False)
    log = [json.loads(line) for line in Path(run.out_dir, "log.jsonl").read_text().splitlines()]
    feature = [rec["feature"] for rec in log]
    assert all(0 < f < 2 for f in feature) and feature[-1] < feature[0]
    assert all(rec["loss"] > rec["distill"] for rec in log)  # the feature term is in the loss
    ckpt = torch.load(Path(run.out_dir) / "checkpoint.pt", weights_only=False)
    assert ckpt["adapter"]["weight"].shape == (TINY.widths[-1], TINY.widths[-1], 1, 1)
    # only an RGB model of a matching feature map is a feature teacher
    with pytest.raises(ValueError, match="not an RGB"):
        load_feature_teacher(str(Path(config.out_dir) / "model.pt"), TINY)
    wider = dataclasses.replace(TINY, widths=(8, 8, 16, 32))
    with pytest.raises(ValueError, match="differs"):
        load_feature_teacher(teacher_path, wider)
    with pytest.raises(ValueError, match="positive feature weight"):  # not silently off
        train(dataclasses.replace(run, feature_weight=0.0), progress=False)


def test_mix_faces_blends_pairs_of_the_batch():
    import torch

    from enrollment.training import mix_faces

    g = torch.Generator().manual_seed(0)
    faces = torch.rand(64, 3, 8, 8, generator=g) * 255
    out, mixed = mix_faces(faces, 0.5, np.random.default_rng(0))
    assert 16 < len(mixed) < 48
    untouched = np.setdiff1d(np.arange(64), mixed)
    assert torch.equal(out[untouched], faces[untouched]) and not torch.equal(out, faces)
    # every mixed face is lam * itself + (1 - lam) * one face of the batch, lam in [0, 1]
    flat, src = out.flatten(1).double(), faces.flatten(1).double()
    for i in mixed:
        fits = []
        for j in range(64):
            d = src[i] - src[j]
            lam = float(((flat[i] - src[j]) @ d) / (d @ d)) if j != i else 1.0
            fits.append((float((lam * src[i] + (1 - lam) * src[j] - flat[i]).abs().max()), lam))
        err, lam = min(fits)
        assert err < 1e-3 and -1e-6 <= lam <= 1 + 1e-6
    assert mix_faces(faces, 0.0, np.random.default_rng(0))[1].size == 0


def test_mixup_distillation_from_an_rgb_model(tiny_run, tmp_path):
    """A protected run whose mixed faces are labelled by an RGB model of its embedding space:
    about the asked share is mixed, their loss is logged apart from the real faces' and
    falls, and the teacher must be an RGB model of the student's embedding size."""
    import dataclasses

    from enrollment.training import load_mixup_teacher

    config, _ = tiny_run
    rgb = dataclasses.replace(config, out_dir=str(tmp_path / "rgb"), kind="rgb", epochs=2)
    train(rgb, progress=False)
    teacher_path = str(Path(rgb.out_dir) / "model.pt")
    run = dataclasses.replace(
        config, out_dir=str(tmp_path / "mix"), epochs=3, mixup_teacher=teacher_path,
        mixup_p=0.5, subset_val_every=0, arcface_weight=0.0,
    )
    train(run, progress=False)
    log = [json.loads(line) for line in Path(run.out_dir, "log.jsonl").read_text().splitlines()]
    assert all(0.35 < rec["mixed_share"] < 0.65 for rec in log)
    mixed = [rec["mixed_distill"] for rec in log]
    assert all(0 < m < 2 for m in mixed) and mixed[-1] < mixed[0]
    # the loss is over all samples, the logged distillation over the real faces only
    assert all(rec["loss"] != pytest.approx(rec["distill"], abs=1e-6) for rec in log)
    with pytest.raises(ValueError, match="not an RGB"):
        load_mixup_teacher(str(Path(config.out_dir) / "model.pt"), TINY.embedding_size)
    with pytest.raises(ValueError, match="64-d"):
        load_mixup_teacher(teacher_path, 64)
    with pytest.raises(ValueError, match="mixup needs"):  # not silently off
        train(dataclasses.replace(run, mixup_p=0.0), progress=False)


def test_teacher_labelled_mixtures(tiny_run, tmp_path):
    """privface mixtures blends only the run's training images (no test or held-out
    identity); a run draws about the asked share of its samples from them and logs their
    loss apart; a file that mixes in a test identity is refused."""
    import dataclasses

    from enrollment import mixtures
    from enrollment.training import (
        build_mixture_set,
        image_keys,
        mixture_pool,
        split_validation,
    )

    config, _ = tiny_run
    out = str(tmp_path / "mixtures.npz")
    build_mixture_set(config, 24, out, progress=False)
    made = mixtures.load(out)
    data, names = load_training_data(config)
    keys = image_keys(data, names)
    held = set(keys[split_validation(data.labels, config.val_identities, config.seed)])
    _, pool_keys, _ = mixture_pool(config)
    assert held and not held & set(pool_keys)
    assert set(made.keys_a) | set(made.keys_b) <= set(pool_keys)
    assert all(k.startswith("lfw-deepfunneled/") for k in made.keys_a)
    build_mixture_set(config, 24, str(tmp_path / "again.npz"), progress=False)
    build_mixture_set(config, 24, str(tmp_path / "other.npz"), draw_seed=5, progress=False)
    again, other = mixtures.load(tmp_path / "again.npz"), mixtures.load(tmp_path / "other.npz")
    assert np.array_equal(again.keys_a, made.keys_a) and np.array_equal(again.teacher, made.teacher)
    assert not np.array_equal(other.keys_a, made.keys_a)
    assert set(other.keys_a) | set(other.keys_b) <= set(pool_keys)

    run = dataclasses.replace(config, out_dir=str(tmp_path / "run"), epochs=2,
                              mixtures=out, mixtures_p=0.5, subset_val_every=0)
    summary = train(run, progress=False)
    assert summary["mixtures"] == 24
    log = [json.loads(line) for line in Path(run.out_dir, "log.jsonl").read_text().splitlines()]
    assert all(0.3 < rec["blend_share"] < 0.7 for rec in log)
    assert all(0 < rec["blend_distill"] < 2 for rec in log)
    assert all(rec["loss"] != pytest.approx(rec["distill"], abs=1e-6) for rec in log)
    with pytest.raises(ValueError, match="need both"):
        train(dataclasses.replace(run, mixtures_p=0.0), progress=False)

    excluded = sorted(held_out_identities(config.pairs))[0]
    leaked = dataclasses.replace(made, keys_b=np.array(
        [f"lfw-deepfunneled/{excluded}/{excluded}_0001.jpg"] * len(made.keys_b)))
    mixtures.save(leaked, tmp_path / "leaked.npz")
    with pytest.raises(ValueError, match="test identities"):
        train(dataclasses.replace(run, out_dir=str(tmp_path / "leak"),
                                  mixtures=str(tmp_path / "leaked.npz")), progress=False)


def test_subset_stems_warm_start_from_a_shared_stem_model(tiny_run, tmp_path):
    """--subset-stems with --init of a shared-stem model: the run starts from that model's
    function (every subset's stem = the shared one; lr 0 keeps it) and is evaluated as the
    server serves it, with the rank read off each view."""
    import dataclasses

    import torch

    from enrollment.model_io import load_model

    config, _ = tiny_run
    start, _ = load_model(Path(config.out_dir) / "model.pt")
    run = dataclasses.replace(
        config, out_dir=str(tmp_path / "stems"), epochs=1, lr=0.0,
        init=str(Path(config.out_dir) / "model.pt"),
        backbone=dataclasses.replace(TINY, subset_stems=6), subset_val_every=0,
    )
    train(run, progress=False)
    end, info = load_model(tmp_path / "stems" / "model.pt")
    assert end.config.subset_stems == 6 and info["meta"]["train"]["backbone"]["subset_stems"] == 6
    shared = start.stem[0].weight
    torch.testing.assert_close(end.stem[0].weight, shared.repeat(6, 1, 1, 1))
    cache = build_cache(config.data[0], config.cache_dir, limit_identities=60)
    e = ev.model_embedder(tmp_path / "stems" / "model.pt", cache, seed=0)(np.arange(6))
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="per-subset stems"):
        train(dataclasses.replace(run, out_dir=str(tmp_path / "fixed"), fixed_rank=(0, 0)),
              progress=False)


def test_widen_keeps_the_function_and_breaks_the_symmetry():
    """Net2WiderNet: the wider copy computes what the model computes (BN statistics, PReLU,
    shortcuts and the head included), yet a copied channel learns apart from its original."""
    import torch

    from enrollment.training import widen

    torch.manual_seed(0)
    cfg = BackboneConfig(widths=(8, 8, 16, 16), blocks=(1, 2, 1, 1), embedding_size=32,
                         strides=(2, 2, 2, 2), dropout=0.0)
    model = Backbone(cfg).train()
    with torch.no_grad():
        for _ in range(3):  # running statistics that are not the initial ones
            model(torch.randn(8, 27, 112, 112) * 3 + 1)
    model.eval()
    wide = widen(model, (16, 12, 24, 16))
    assert wide.config.widths == (16, 12, 24, 16) and wide.config.blocks == cfg.blocks
    x = torch.randn(4, 27, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(wide(x), model(x), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(wide.train()(x), model.train()(x), atol=1e-4, rtol=1e-3)
    # stem channel 8 copies one of channels 0-7; after one backward pass their gradients differ
    stem = wide.stem[0].weight
    original = next(k for k in range(8) if torch.equal(stem[8], stem[k]))
    wide.eval()(x).square().sum().backward()
    assert not torch.allclose(stem.grad[8], stem.grad[original])
    with pytest.raises(ValueError, match="do not widen"):
        widen(model, (4, 8, 16, 16))


def test_wider_warm_restart_starts_from_the_narrow_model(tiny_run, tmp_path):
    """--init of a narrower model with wider --widths widens it (same depth) and trains on."""
    import dataclasses

    import torch

    from enrollment.model_io import load_model

    config, _ = tiny_run
    start, _ = load_model(Path(config.out_dir) / "model.pt")
    run = dataclasses.replace(
        config, out_dir=str(tmp_path / "wide"), epochs=1, lr=0.0,
        init=str(Path(config.out_dir) / "model.pt"),
        backbone=dataclasses.replace(TINY, widths=(16, 16, 16, 32)),
    )
    train(run, progress=False)
    end, info = load_model(tmp_path / "wide" / "model.pt")
    assert end.config.widths == (16, 16, 16, 32)
    assert info["meta"]["train"]["backbone"]["widths"] == [16, 16, 16, 32]
    torch.testing.assert_close(end.stem[0].weight[:8], start.stem[0].weight)
