"""distill.mode: teacher-assistant chains, mutual learning (the loss maths and a tiny run of each),
and cross-resolution teacher/student pairs. Real Fashion-MNIST subsets, real tiny networks."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from cli_helpers import assert_one_line_error, json_out, run_inprocess
from edgekd.config import DataConfig, DistillConfig, StudentConfig, TrainConfig
from edgekd.distill import DistillJob, MutualLoss, run_distill_mode
from edgekd.atomic import sha256_file
from edgekd.models import load_checkpoint
from edgekd.stage_context import StageContext
from needs import needs_fmnist

ONE_EPOCH = TrainConfig(epochs=1, batch_size=32, lr=5e-3, warmup_epochs=0.0)


# ----------------------------------------------------------------------------- mutual loss maths
def test_mutual_loss_matches_the_papers_formula():
    g = torch.Generator().manual_seed(0)
    z = [torch.randn(6, 5, generator=g) for _ in range(3)]
    y = torch.randint(0, 5, (6,), generator=g)
    t, alpha = 2.0, 0.5
    got = MutualLoss(t, alpha).terms(z, y)
    p = [F.softmax(zk / t, 1) for zk in z]
    kl = sum((p[j] * (p[j].log() - p[i].log())).sum(1).mean() for i in range(3) for j in range(3) if i != j) * t * t / 2
    assert torch.allclose(got["mutual"], alpha * kl, atol=1e-6)
    assert torch.allclose(got["ce"], (1 - alpha) * sum(F.cross_entropy(zk, y) for zk in z), atol=1e-6)


def test_each_peer_gets_only_its_own_gradient():
    """Summed over peers, the loss must give peer k the gradient of its own L_k: the others'
    predictions are targets there, held constant (Zhang et al. 2018, eq. 1-2)."""
    g = torch.Generator().manual_seed(1)
    z1, z2 = (torch.randn(4, 3, generator=g, requires_grad=True) for _ in range(2))
    y = torch.tensor([0, 1, 2, 0])
    MutualLoss(1.0, 0.5)([z1, z2], y).backward()
    own = z1.detach().clone().requires_grad_(True)
    target = F.softmax(z2.detach(), 1)
    l1 = 0.5 * F.cross_entropy(own, y) + 0.5 * F.kl_div(F.log_softmax(own, 1), target, reduction="batchmean")
    l1.backward()
    assert torch.allclose(z1.grad, own.grad, atol=1e-6)


def test_mutual_needs_two_peers():
    with pytest.raises(ValueError, match="at least 2 peers"):
        DistillConfig(mode="mutual", peers=1)
    with pytest.raises(ValueError, match="at least 2 peers"):
        DistillConfig(mode="mutual", peers=["nano_cnn"])


# ----------------------------------------------------------------------------- tiny runs of each mode
@needs_fmnist
def test_assistant_chain_distils_the_assistant_first_then_the_student_from_it(fmnist_600, teacher_32px, tmp_path):
    student = StudentConfig(model="pico_cnn", train=ONE_EPOCH)
    cfg = DistillConfig(mode="assistant", assistant="pico_cnn")
    r = run_distill_mode(DistillJob(student, cfg, (teacher_32px,)), fmnist_600, tmp_path / "run", StageContext(data_cfg=DataConfig(augment="flip"), cache_dir=tmp_path / "c"))
    assistant = r["metrics"]["assistant"]
    assert assistant["trained_here"] and (tmp_path / "run" / "assistant" / "best.pt").is_file() and 0.0 < assistant["test_top1"]
    ckpt = load_checkpoint(r["checkpoint"])
    assert ckpt["teachers"][0]["sha256"] == sha256_file(tmp_path / "run" / "assistant" / "best.pt")  # the student learned from the assistant
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["mode"] == "assistant"
    # a given assistant checkpoint is used as it is: no second assistant is trained
    again = run_distill_mode(DistillJob(student, cfg.model_copy(update={"assistant": str(tmp_path / "run" / "assistant" / "best.pt")}), (teacher_32px,)), fmnist_600, tmp_path / "run2", StageContext(data_cfg=DataConfig(augment="flip"), cache_dir=tmp_path / "c"))
    assert not again["metrics"]["assistant"]["trained_here"] and not (tmp_path / "run2" / "assistant").exists()


@needs_fmnist
def test_mutual_learning_trains_peers_together_and_keeps_the_best(fmnist_600, tmp_path):
    student = StudentConfig(model="pico_cnn", train=TrainConfig(epochs=2, batch_size=32, lr=5e-3, warmup_epochs=0.0))
    r = run_distill_mode(DistillJob(student, DistillConfig(mode="mutual", peers=["pico_cnn", "nano_cnn"]), ()), fmnist_600, tmp_path / "run", StageContext(data_cfg=DataConfig(augment="flip")))
    m = r["metrics"]
    scores = [p["val_top1"] for p in m["peers"]]
    assert [p["model"] for p in m["peers"]] == ["pico_cnn", "nano_cnn"] and m["chosen_peer"] == scores.index(max(scores))
    assert m["val"]["top1"] == max(scores) and m["test"]["top1"] > 0.3  # 2 epochs on 600 images; chance is 0.1
    assert set(m["loss_parts"]) == {"mutual", "ce"} and m["loss_parts"]["mutual"] > 0
    ckpt = load_checkpoint(r["checkpoint"])  # a plain student checkpoint: QAD and export take it as any other
    assert ckpt["kind"] == "student" and ckpt["model"]["name"] == m["model"]
    assert (tmp_path / "run" / "peers" / "last.pt").is_file()


@needs_fmnist
def test_cross_resolution_feature_losses_pool_the_teachers_larger_maps(fmnist_600, teacher_32px, tmp_path, monkeypatch):
    """Teacher at 32 px, student at 28 px: logits need nothing, fitnet and attention transfer
    compare the maps after pooling the larger one to the smaller."""
    from edgekd.distill import losses

    matched = []  # (student map, teacher map) sizes going in, and the sizes compared

    def recording_match_spatial(a, b):
        pa, pb = losses_match_spatial(a, b)
        torch.testing.assert_close(pb, F.adaptive_avg_pool2d(b, pa.shape[-2:]))  # the teacher's map, average-pooled
        matched.append((tuple(a.shape[-2:]), tuple(b.shape[-2:]), tuple(pa.shape[-2:]), tuple(pb.shape[-2:])))
        return pa, pb

    losses_match_spatial = losses.match_spatial
    monkeypatch.setattr(losses, "match_spatial", recording_match_spatial)
    student = StudentConfig(model="pico_cnn", input_size=28, train=ONE_EPOCH)
    r = run_distill_mode(DistillJob(student, DistillConfig(losses=["kd", "fitnet", "at"]), (teacher_32px,)), fmnist_600, tmp_path / "run", StageContext(data_cfg=DataConfig(augment="flip"), cache_dir=tmp_path / "c"))
    assert load_checkpoint(teacher_32px)["preprocess"]["input_size"] == 32 and load_checkpoint(r["checkpoint"])["preprocess"]["input_size"] == 28
    parts = r["metrics"]["loss_parts"]
    assert set(parts) == {"kd", "ce", "fitnet", "at"} and all(0 < v < 1e3 for v in parts.values())
    assert len(matched) >= 2 * 2  # fitnet and at, every step of the epoch
    for student_hw, teacher_hw, compared_s, compared_t in matched:
        assert teacher_hw[0] > student_hw[0] and compared_s == compared_t == student_hw, matched[:2]


# ----------------------------------------------------------------------------- CLI
@needs_fmnist
def test_cli_mutual_needs_no_teacher_and_assistant_needs_an_assistant(tmp_path, teacher_32px):
    res = json_out(run_inprocess("distill", "--mode", "mutual", "--peers", "2", "--student", "pico_cnn", "--epochs", "1", "--train-subset", "300",
                                 "--test-subset", "100", "--out", tmp_path / "m", "--json"))
    assert res["mode"] == "mutual" and len(res["peers"]) == 2
    with_teacher = run_inprocess("distill", "--mode", "mutual", "--teacher", teacher_32px, "--student", "pico_cnn", "--epochs", "1",
                                 "--train-subset", "300", "--test-subset", "100", "--out", tmp_path / "m2", "--json")
    assert with_teacher.returncode == 0 and "--teacher is not used" in with_teacher.stderr.replace("\n", " ")
    assert_one_line_error(run_inprocess("distill", "--teacher", teacher_32px, "--mode", "assistant", "--train-subset", "300", "--out", tmp_path / "a"),
                          "distill.mode=assistant needs distill.assistant")
    assert_one_line_error(run_inprocess("distill", "--student", "pico_cnn", "--out", tmp_path / "n"), "no teacher given")


# ----------------------------------------------------------------------------- in `edgekd build`
@needs_fmnist
@pytest.mark.parametrize("mode", ["assistant", "mutual"])
def test_build_runs_each_mode_and_records_it(mode, tmp_path):
    from edgekd.manifest import Manifest

    sets = ["teacher.model=pico_cnn", "teacher.pretrained=none", "teacher.input_size=32", "teacher.train.epochs=1", "student.model=pico_cnn",
            "student.train.epochs=1", "data.train_subset=400", "data.test_subset=100", f"distill.mode={mode}", "distill.assistant=pico_cnn"]
    json_out(run_inprocess("build", "--target", "x86-cpu", *[x for s in sets for x in ("--set", s)], "--until", "distill", "--out", tmp_path / "run", "--json"))
    m = Manifest(tmp_path / "run").stage("distill")["metrics"]
    assert m["mode"] == mode and m["test_top1"] is not None
    assert (m["assistant"] or {}).get("trained_here") if mode == "assistant" else len(m["peers"]) == 2


def test_the_report_names_how_the_student_was_distilled():
    from edgekd.report import accuracy_rows

    stages = {"control": {"test_top1": 0.90}, "distill": {"test_top1": 0.91, "mode": "assistant",
                                                          "assistant": {"model": "small_cnn", "test_top1": 0.92, "train_seconds": 10}}}
    steps = [r["step"] for r in accuracy_rows(stages, 1000)]
    assert steps == ["assistant small_cnn", "student alone (control)", "distilled via assistant small_cnn"]
    mutual = accuracy_rows({"control": {"test_top1": 0.9}, "distill": {"test_top1": 0.91, "mode": "mutual", "peers": [{}, {}]}}, 1000)
    assert mutual[-1]["step"] == "mutual learning, 2 peers" and abs(mutual[-1]["change"] - 0.01) < 1e-9
