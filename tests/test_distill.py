"""Distillation: the losses' maths, the teacher-output cache, the stage end to end and its errors.

Real Fashion-MNIST subsets and real (tiny, briefly trained) teachers; nothing is mocked.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cli_helpers import assert_one_line_error, json_out, run_cli, run_inprocess
from edgekd.config import DataConfig, DistillConfig, StudentConfig, TrainConfig
from edgekd.data import iterate
from edgekd.distill import (AttentionTransferLoss, FeatureHook, HintLoss, KDLoss, RKDLoss, build_distill_loss, load_teacher, run_distill, soft_targets,
                            teacher_forward)
from edgekd.errors import EdgekdError
from edgekd.atomic import sha256_file
from edgekd.models import create_model, load_checkpoint, save_checkpoint
from edgekd.distill import DistillJob
from edgekd.stage_context import StageContext
from needs import needs_fmnist



# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def teacher_path(teacher_32px):
    return teacher_32px


# ----------------------------------------------------------------------------- KD maths
def test_kd_matches_direct_computation():
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(8, 10, generator=g) * 3, torch.randn(8, 10, generator=g) * 3
    y = torch.randint(0, 10, (8,), generator=g)
    T, alpha = 3.0, 0.7
    s, t = zs.double().numpy(), zt.double().numpy()

    def log_softmax(a):
        a = a - a.max(1, keepdims=True)
        return a - np.log(np.exp(a).sum(1, keepdims=True))

    p_t = np.exp(log_softmax(t / T))
    kl = (p_t * (np.log(p_t) - log_softmax(s / T))).sum(1).mean()
    ce = -log_softmax(s)[np.arange(8), y.numpy()].mean()
    expected = alpha * T * T * kl + (1 - alpha) * ce
    got = KDLoss(T, alpha)(zs, F.softmax(zt / T, 1), y)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_kd_soft_gradient_is_T_times_probability_gap_and_T_independent_at_high_T():
    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g)
    zs, zt = zs - zs.mean(1, keepdim=True), zt - zt.mean(1, keepdim=True)
    grads = {}
    for T in (2.0, 100.0, 200.0):
        x = zs.clone().requires_grad_(True)
        KDLoss(T, alpha=1.0)(x, F.softmax(zt / T, 1), torch.zeros(4, dtype=torch.long)).backward()
        exact = T * (F.softmax(zs / T, 1) - F.softmax(zt / T, 1)) / 4
        torch.testing.assert_close(x.grad, exact, rtol=1e-3, atol=1e-6)
        grads[T] = x.grad
    # Hinton §2.1: for large T the gradient tends to (z_s - z_t) / (C * B): the T^2 factor makes it T-independent.
    limit = (zs - zt) / (10 * 4)
    torch.testing.assert_close(grads[200.0], limit, rtol=0.03, atol=2e-5)
    assert grads[100.0].norm() / grads[200.0].norm() == pytest.approx(1.0, abs=0.02)


def test_soft_targets_average_teachers_with_weights():
    z1, z2 = torch.randn(5, 10), torch.randn(5, 10)
    got = soft_targets([z1, z2], [3.0, 1.0], temperature=2.0)
    torch.testing.assert_close(got, 0.75 * F.softmax(z1 / 2, 1) + 0.25 * F.softmax(z2 / 2, 1))
    torch.testing.assert_close(got.sum(1), torch.ones(5))


# ----------------------------------------------------------------------------- RKD, AT, hints
def _huber(x):
    return np.where(np.abs(x) < 1, 0.5 * x * x, np.abs(x) - 0.5)


def _rkd_reference(s: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    n = len(s)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    ds = np.array([np.linalg.norm(s[i] - s[j]) for i, j in pairs])
    dt = np.array([np.linalg.norm(t[i] - t[j]) for i, j in pairs])
    dist = _huber(ds / ds.mean() - dt / dt.mean()).mean()

    def cos(e, i, j, k):
        u, v = e[i] - e[j], e[k] - e[j]
        nu, nv = np.linalg.norm(u), np.linalg.norm(v)
        return 0.0 if nu == 0 or nv == 0 else float(u @ v / (nu * nv))

    triples = list(itertools.product(range(n), repeat=3))
    ang = _huber(np.array([cos(s, i, j, k) - cos(t, i, j, k) for i, j, k in triples])).mean()
    return float(dist), float(ang)


def test_rkd_matches_loop_reference_and_is_scale_rotation_invariant():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(6, 3, generator=g), torch.randn(6, 5, generator=g)
    dist, ang = _rkd_reference(s.double().numpy(), t.double().numpy())
    assert RKDLoss.distance(s, t).item() == pytest.approx(dist, rel=1e-4)
    assert RKDLoss.angle(s, t).item() == pytest.approx(ang, rel=1e-4)
    assert RKDLoss()(s, t).item() == pytest.approx(dist + 2 * ang, rel=1e-4)
    assert dist > 0.01 and ang > 0.01
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g))
    assert RKDLoss()(s @ q * 7.0, s).item() < 1e-6


def test_attention_transfer_on_known_maps():
    s, t = torch.zeros(1, 3, 4, 4), torch.zeros(1, 5, 4, 4)
    s[..., 0, 0], t[..., 3, 3] = 1.0, 2.0
    # normalised attention maps are one-hot at different places: mean((e_0 - e_15)^2) = 2/16
    assert AttentionTransferLoss(beta=1000)(s, t).item() == pytest.approx(500 * 2 / 16)
    assert AttentionTransferLoss()(t.expand(1, 5, 4, 4) * 3, t).item() == pytest.approx(0.0, abs=1e-6)
    # different sizes: a teacher whose attention equals the pooled student attention (up to scale) costs nothing
    big = torch.rand(2, 1, 8, 8)
    small = (5 * F.adaptive_avg_pool2d(big.pow(2), 4)).sqrt()
    assert AttentionTransferLoss()(big, small).item() == pytest.approx(0.0, abs=1e-5)


def test_hint_loss_learns_an_adapter_across_widths_and_sizes():
    hint = HintLoss(8, 16)
    assert isinstance(hint.adapter, torch.nn.Conv2d)
    assert isinstance(HintLoss(16, 16).adapter, torch.nn.Identity)
    fs, ft = torch.randn(4, 8, 7, 7, requires_grad=True), torch.randn(4, 16, 2, 2)
    loss = hint(fs, ft)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert hint.adapter.weight.grad is not None and fs.grad is not None
    s_pooled = F.adaptive_avg_pool2d(hint.adapter(fs.detach()), 2)
    assert loss.item() == pytest.approx(F.mse_loss(s_pooled, ft).item(), rel=1e-5)


def test_feature_hook_finds_layers_by_path_and_rejects_unknown_ones():
    model = create_model("pico_cnn", 10)
    hook = FeatureHook(model, "features.2", "student")
    model(torch.zeros(2, 1, 28, 28))
    assert hook.output.shape == (2, 32, 14, 14)
    hook.remove()
    with pytest.raises(EdgekdError, match="student has no layer 'nope'"):
        FeatureHook(model, "nope", "student")


# ----------------------------------------------------------------------------- teacher cache
def test_cached_outputs_equal_online_teacher_for_both_flip_views(fmnist_600, teacher_path, tmp_path):
    student = create_model("nano_cnn", 10)
    teacher = load_teacher(teacher_path)
    loss, adapters = build_distill_loss(student, [teacher], DistillConfig(losses=["kd", "fitnet"]), fmnist_600, tmp_path, augment="flip", device=torch.device("cpu"))
    cache = loss.caches[0]
    assert cache is not None and not cache.hit and cache.path.is_file()
    assert cache.tables["logits"].shape == (len(fmnist_600.train), 2, 10)
    assert len(adapters) == 1  # 48 student channels -> 64 teacher channels
    batch = next(iterate(fmnist_600.train, 64, shuffle=True, seed=3, augment="flip"))
    assert batch.flipped.any() and (~batch.flipped).any()
    cached, online = cache.lookup(batch, torch.device("cpu")), teacher_forward(teacher, batch.images, torch.device("cpu"))
    torch.testing.assert_close(cached["logits"], online["logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached["feature"], online["feature"], rtol=2e-3, atol=2e-3)  # features stored as float16
    loss.close()


def test_cache_hit_miss_and_invalidation_when_teacher_changes(fmnist_600, teacher_path, tmp_path):
    own = tmp_path / "teacher.pt"
    shutil.copy(teacher_path, own)
    cfg = DistillConfig(losses=["kd"])

    def cache_for(path):
        loss, _ = build_distill_loss(create_model("pico_cnn", 10), [load_teacher(path)], cfg, fmnist_600, tmp_path / "cache", augment="none", device=torch.device("cpu"))
        return loss.caches[0]

    first, second = cache_for(own), cache_for(own)
    assert not first.hit and second.hit and first.key == second.key
    assert second.tables["logits"].shape == (len(fmnist_600.train), 1, 10)
    torch.testing.assert_close(first.tables["logits"], second.tables["logits"])
    ckpt = load_checkpoint(own)
    model = create_model("pico_cnn", 10, in_chans=1, input_size=32)
    model.load_state_dict(ckpt["state_dict"])
    with torch.no_grad():
        model.head.bias += 1.0
    save_checkpoint(own, model, ckpt["classes"], "teacher")
    third = cache_for(own)
    assert not third.hit and third.key != first.key
    assert not torch.allclose(third.tables["logits"], first.tables["logits"])
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2


def test_random_crops_make_the_teacher_run_online(fmnist_600, teacher_path, tmp_path):
    loss, _ = build_distill_loss(create_model("pico_cnn", 10), [load_teacher(teacher_path)], DistillConfig(), fmnist_600, tmp_path, augment="crop-flip", device=torch.device("cpu"))
    assert loss.caches == [None] and not list(tmp_path.glob("*.pt"))


def test_two_teachers_are_averaged_with_their_weights(fmnist_600, teacher_path, tmp_path):
    torch.manual_seed(5)
    other = create_model("nano_cnn", 10)
    save_checkpoint(tmp_path / "t2.pt", other, fmnist_600.classes, "teacher")
    teachers = [load_teacher(teacher_path), load_teacher(tmp_path / "t2.pt")]
    cfg = DistillConfig(losses=["kd"], teacher_weights=[3.0, 1.0], temperature=2.0, alpha=0.5)
    student = create_model("pico_cnn", 10)
    loss, _ = build_distill_loss(student, teachers, cfg, fmnist_600, tmp_path / "cache", augment="flip", device=torch.device("cpu"))
    batch = next(iterate(fmnist_600.train, 16, augment="flip"))
    x = student.preprocess(batch.images)
    total, logits = loss(student, batch, x)
    zt = [teacher_forward(t, batch.images, torch.device("cpu"))["logits"] for t in teachers]
    p = 0.75 * F.softmax(zt[0] / 2, 1) + 0.25 * F.softmax(zt[1] / 2, 1)
    assert total.item() == pytest.approx(KDLoss(2.0, 0.5)(logits, p, batch.labels).item(), rel=1e-5)
    with pytest.raises(EdgekdError, match="2 teachers"):
        build_distill_loss(student, teachers, DistillConfig(teacher_weights=[1.0]), fmnist_600, tmp_path / "cache", augment="flip")


def test_born_again_student_is_a_fresh_copy_of_the_teacher(fmnist_600, teacher_path, tmp_path):
    cfg = StudentConfig(model="nano_cnn", train=TrainConfig(epochs=1, batch_size=64, lr=3e-3))
    result = run_distill(DistillJob(cfg, DistillConfig(born_again_init="scratch"), (teacher_path,), self_distill=True), fmnist_600, tmp_path / "run", StageContext(data_cfg=DataConfig(augment="flip"), cache_dir=tmp_path / "cache"))
    ckpt = load_checkpoint(result["checkpoint"])
    teacher_ckpt = load_checkpoint(teacher_path)
    assert ckpt["kind"] == "student" and ckpt["model"] == teacher_ckpt["model"] and ckpt["preprocess"]["input_size"] == 32
    assert not torch.equal(ckpt["state_dict"]["head.weight"], teacher_ckpt["state_dict"]["head.weight"])
    assert ckpt["config"]["self_distill"] is True and ckpt["teachers"][0]["sha256"] == sha256_file(teacher_path)


def test_born_again_from_the_teachers_weights_starts_as_the_teacher(fmnist_600, teacher_path):
    from edgekd.distill.kd import make_student

    teacher = load_teacher(teacher_path)
    x = teacher.preprocess(fmnist_600.test.images[:16])
    cfg = StudentConfig(model="nano_cnn")
    continued, fresh = make_student(cfg, fmnist_600, [teacher], True, "teacher"), make_student(cfg, fmnist_600, [teacher], True, "scratch")
    with torch.no_grad():
        assert torch.equal(continued.eval()(x), teacher.model(x)) and not torch.allclose(fresh.eval()(x), teacher.model(x))
    assert all(p.requires_grad for p in continued.parameters())  # the teacher is frozen, its copy trains


# ----------------------------------------------------------------------------- CLI
def test_cli_distill_end_to_end(teacher_path, tmp_path):
    out = tmp_path / "student"
    summary = json_out(run_cli("distill", "--teacher", teacher_path, "--student", "pico_cnn", "--loss", "kd,fitnet", "--epochs", "2", "--batch-size", "32",
                               "--lr", "0.005", "--train-subset", "1000", "--test-subset", "300", "--augment", "flip", "--out", out,
                               "--cache-dir", tmp_path / "c", "--json"))
    for name in ("best.pt", "last.pt", "metrics.json"):
        assert (out / name).is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["n"] == 300 and 0.2 < metrics["test"]["top1"] <= 1.0  # 10 classes: chance is 0.1
    assert summary["test_top1"] == metrics["test"]["top1"] and len(metrics["history"]) == 2
    assert set(metrics["loss_parts"]) == {"kd", "ce", "fitnet"} and all(math.isfinite(v) for v in metrics["loss_parts"].values())
    assert metrics["teachers"][0]["outputs"] == "cached" and metrics["images_per_second"] > 0
    ckpt = load_checkpoint(out / "best.pt")
    assert ckpt["kind"] == "student" and ckpt["teachers"][0]["sha256"] == sha256_file(teacher_path)
    assert ckpt["config"]["distill"]["losses"] == ["kd", "fitnet"]


@needs_fmnist
def test_cli_error_when_teacher_has_other_class_count(tmp_path):
    bad = create_model("pico_cnn", 5)
    save_checkpoint(tmp_path / "five.pt", bad, ["a", "b", "c", "d", "e"], "teacher")
    proc = run_inprocess("distill", "--teacher", tmp_path / "five.pt", "--train-subset", "200", "--out", tmp_path / "o")
    assert_one_line_error(proc, "predicts 5 classes")
    assert "has 10" in proc.stderr


def test_cli_error_for_unknown_layer(teacher_path, tmp_path):
    proc = run_inprocess("distill", "--teacher", teacher_path, "--student", "pico_cnn", "--loss", "kd,fitnet", "--student-layer", "body.9",
                         "--train-subset", "200", "--augment", "flip", "--out", tmp_path / "o")
    assert_one_line_error(proc, "student has no layer 'body.9'")
    assert "features" in proc.stderr


def test_cli_error_for_unknown_student(teacher_path, tmp_path):
    proc = run_inprocess("distill", "--teacher", teacher_path, "--student", "mega_cnn_xl", "--out", tmp_path / "o")
    assert_one_line_error(proc, "unknown student model 'mega_cnn_xl'")
    assert "nano_cnn" in proc.stderr


def test_logits_only_run_reuses_the_logits_a_feature_run_cached(fmnist_600, teacher_path, tmp_path):
    def cache_for(losses):
        loss, _ = build_distill_loss(create_model("pico_cnn", 10), [load_teacher(teacher_path)], DistillConfig(losses=losses), fmnist_600, tmp_path, augment="flip", device=torch.device("cpu"))
        loss.close()
        return loss.caches[0]

    with_features = cache_for(["kd", "at"])
    logits_only = cache_for(["kd"])
    assert not with_features.hit and logits_only.hit and set(logits_only.tables) == {"logits"}
    assert logits_only.path == with_features.path and with_features.paths["feature"] != with_features.path


def test_resume_refuses_a_run_with_other_losses(fmnist_600, teacher_path, tmp_path):
    cfg = StudentConfig(model="pico_cnn", train=TrainConfig(epochs=1, batch_size=64))
    run_distill(DistillJob(cfg, DistillConfig(losses=["kd"]), (teacher_path,)), fmnist_600, tmp_path / "run", StageContext(data_cfg=DataConfig(augment="flip"), cache_dir=tmp_path / "c"))
    with pytest.raises(EdgekdError, match="other losses, teachers or data"):
        run_distill(DistillJob(cfg, DistillConfig(losses=["kd", "at"]), (teacher_path,)), fmnist_600, tmp_path / "run", StageContext(data_cfg=DataConfig(augment="flip"), cache_dir=tmp_path / "c"))


def test_a_teacher_weaker_than_its_student_is_reported(fmnist_600, teacher_path, tmp_path, monkeypatch):
    """An untrained teacher (~10% top-1) teaching with alpha 0.5: the student still learns from the
    hard labels, ends up far above the teacher, and the run says so (metrics + a warning)."""
    from edgekd import ui

    warnings_seen: list[str] = []
    monkeypatch.setattr(ui, "warn", warnings_seen.append)
    torch.manual_seed(1)
    weak = create_model("pico_cnn", fmnist_600.num_classes, in_chans=1, input_size=28)
    weak_path = save_checkpoint(tmp_path / "weak.pt", weak, fmnist_600.classes, "teacher")
    cfg = StudentConfig(model="pico_cnn", train=TrainConfig(epochs=2, batch_size=32, lr=5e-3, warmup_epochs=0.0))
    m = run_distill(DistillJob(cfg, DistillConfig(losses=["kd"], alpha=0.5), (weak_path,)), fmnist_600, tmp_path / "run", StageContext(data_cfg=DataConfig(augment="flip"), cache_dir=tmp_path / "c"))["metrics"]
    assert m["teachers"][0]["val_top1"] < 0.3 < m["val"]["top1"]
    assert m["teacher_weaker_than_student"] is True
    assert any("more accurate than its best teacher" in w for w in warnings_seen)
    # a trained teacher, better than the student it teaches: no flag, no warning
    warnings_seen.clear()
    m2 = run_distill(DistillJob(cfg, DistillConfig(losses=["kd"]), (teacher_path,)), fmnist_600, tmp_path / "run2", StageContext(data_cfg=DataConfig(augment="flip"), cache_dir=tmp_path / "c"))["metrics"]
    assert m2["teachers"][0]["val_top1"] > m2["val"]["top1"], (m2["teachers"], m2["val"])
    assert m2["teacher_weaker_than_student"] is False
    assert not any("more accurate than its best teacher" in w for w in warnings_seen)


def test_flat_soft_targets_are_warned_about_before_training(fmnist_600, teacher_path, tmp_path, monkeypatch):
    """At a high temperature every teacher's soft targets are close to uniform: the run warns before
    it trains and records the entropy; at T=1 the same teacher is sharp enough and nothing is said."""
    from edgekd import ui

    warnings_seen: list[str] = []
    monkeypatch.setattr(ui, "warn", warnings_seen.append)
    cfg = StudentConfig(model="pico_cnn", train=TrainConfig(epochs=1, batch_size=64))
    m = run_distill(DistillJob(cfg, DistillConfig(losses=["kd"], temperature=1000), (teacher_path,)), fmnist_600, tmp_path / "hot", StageContext(data_cfg=DataConfig(augment="flip"), cache_dir=tmp_path / "c"))["metrics"]
    assert m["teachers"][0]["soft_target_entropy_T1000"] > 0.99
    assert sum("nearly uniform" in w for w in warnings_seen) == 1
    warnings_seen.clear()
    m = run_distill(DistillJob(cfg, DistillConfig(losses=["kd"], temperature=1), (teacher_path,)), fmnist_600, tmp_path / "cool", StageContext(data_cfg=DataConfig(augment="flip"), cache_dir=tmp_path / "c"))["metrics"]
    assert m["teachers"][0]["soft_target_entropy_T1"] < 0.9
    assert not any("nearly uniform" in w for w in warnings_seen)
