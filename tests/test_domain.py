"""Deployment-domain data and losses (issue 31): the MMD estimator, unlabeled batches, gradual
unfreezing's schedule, target calibration, the errors, and a tiny build with --unlabeled."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import assert_one_line_error, json_out, run_inprocess, tiny_build
from edgekd.config import DistillConfig, MMDConfig, QuantizeConfig
from edgekd.data import DataSet, Split
from edgekd.data.store import Storage
from edgekd.data.unlabeled import UNLABELED, load_target_test, load_unlabeled
from edgekd.distill.domain import class_conditional_mmd2, mmd2
from edgekd.errors import EdgekdError
from needs import needs_fmnist

BANDS = [0.5, 1.0, 2.0]


def direct_mmd2(x: np.ndarray, y: np.ndarray, bands: list[float]) -> float:
    """Gretton et al. 2012 eq. 5 with loops, the width the mean squared distance over distinct pairs of x and y together."""
    z = np.concatenate([x, y])
    d2 = [float(((a - b) ** 2).sum()) for i, a in enumerate(z) for j, b in enumerate(z) if i != j]
    sigma2 = sum(d2) / len(d2)

    def k(a, b):
        return sum(np.exp(-((a - b) ** 2).sum() / (s * sigma2)) for s in bands) / len(bands)

    m, n = len(x), len(y)
    kxx = sum(k(a, b) for a in x for b in x) / m**2
    kyy = sum(k(a, b) for a in y for b in y) / n**2
    kxy = sum(k(a, b) for a in x for b in y) / (m * n)
    return kxx + kyy - 2 * kxy


def test_mmd_matches_a_direct_computation_and_is_zero_for_identical_samples():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 4)), rng.normal(loc=0.8, size=(9, 4))
    got = float(mmd2(torch.tensor(x), torch.tensor(y), BANDS))
    assert got == pytest.approx(direct_mmd2(x, y, BANDS), rel=1e-5)
    assert got > 0.01
    assert float(mmd2(torch.tensor(x), torch.tensor(x), BANDS)) == pytest.approx(0.0, abs=1e-7)
    near = float(mmd2(torch.tensor(x), torch.tensor(x + 0.01), BANDS))
    assert near < got / 100  # a shift of 0.8 is far, of 0.01 near


def test_class_conditional_mmd_is_the_mean_of_per_class_mmds():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(12, 3)), rng.normal(size=(10, 3)) + 0.5
    lx, ly = np.array([0] * 6 + [1] * 6), np.array([0] * 5 + [1] * 4 + [2])  # class 2: one target image, left out
    got = float(class_conditional_mmd2(torch.tensor(x), torch.tensor(y), torch.tensor(lx), torch.tensor(ly), BANDS))
    sigma2 = float(np.mean([((a - b) ** 2).sum() for i, a in enumerate(np.concatenate([x, y])) for j, b in enumerate(np.concatenate([x, y])) if i != j]))
    zx, zy = torch.tensor(x), torch.tensor(y)
    per = [float(mmd2(zx[torch.tensor(lx == c)], zy[torch.tensor(ly == c)], BANDS, torch.tensor(sigma2))) for c in (0, 1)]
    assert got == pytest.approx(np.mean(per), rel=1e-5)


# ----------------------------------------------------------------------------- unlabeled batches
def _tiny_teacher(tmp_path: Path) -> Path:
    from edgekd.models import create_model, save_checkpoint

    torch.manual_seed(0)
    model = create_model("pico_cnn", 10)
    return save_checkpoint(tmp_path / "teacher.pt", model, [str(i) for i in range(10)], "teacher", {})


def _dataset(n: int = 64) -> DataSet:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g)
    split = Split(images, torch.arange(n) % 10)
    data = DataSet("random", [str(i) for i in range(10)], split, split, split)
    data.unlabeled = Split(255 - images, torch.full((n,), UNLABELED))
    return data


def _loss_parts(tmp_path: Path, cfg: DistillConfig, data: DataSet) -> tuple[dict, torch.Tensor, object]:
    from edgekd.data import iterate
    from edgekd.distill import build_distill_loss, load_teacher
    from edgekd.models import create_model

    torch.manual_seed(0)
    student = create_model("pico_cnn", 10).eval()  # eval: BatchNorm does not mix the two halves of the pass
    loss_fn, _ = build_distill_loss(student, [load_teacher(_tiny_teacher(tmp_path))], cfg, data, tmp_path / "cache", "flip")
    batch = next(iterate(data.train, 16))
    total, _ = loss_fn(student, batch, student.preprocess(batch.images))
    parts = dict(loss_fn.sums)
    loss_fn.close()
    return parts, total, loss_fn


def test_unlabeled_batches_carry_no_label_loss(tmp_path):
    data = _dataset()
    parts, total, loss_fn = _loss_parts(tmp_path, DistillConfig(unlabeled_weight=0.7), data)
    assert set(parts) == {"kd", "ce", "kd_unlabeled"}
    assert total.item() == pytest.approx(sum(parts.values()), rel=1e-5)
    # the unlabeled term reads no label: the same loss whatever labels the unlabeled split holds
    data.unlabeled = Split(data.unlabeled.source, torch.full((len(data.unlabeled),), 3))
    again, _, _ = _loss_parts(tmp_path, DistillConfig(unlabeled_weight=0.7), data)
    assert again["kd_unlabeled"] == pytest.approx(parts["kd_unlabeled"], rel=1e-6)
    # and the labeled terms are what they are without unlabeled images
    data.unlabeled = None
    alone, _, _ = _loss_parts(tmp_path, DistillConfig(unlabeled_weight=0.7), data)
    assert set(alone) == {"kd", "ce"} and alone["ce"] == pytest.approx(parts["ce"], rel=1e-5)


def test_mmd_term_joins_the_loss_and_needs_unlabeled_images(tmp_path):
    data = _dataset()
    cfg = DistillConfig(unlabeled_weight=0.0, mmd=MMDConfig(weight=2.0, conditional=True))
    parts, _, _ = _loss_parts(tmp_path, cfg, data)
    assert set(parts) == {"kd", "ce", "mmd", "mmd_class"} and parts["mmd"] > 0
    data.unlabeled = None
    with pytest.raises(EdgekdError, match="distill.mmd needs unlabeled images"):
        _loss_parts(tmp_path, cfg, data)


# ----------------------------------------------------------------------------- gradual unfreezing
def test_unfreezing_schedule():
    from edgekd.transfer import unfrozen_groups

    assert [unfrozen_groups(p, 4) for p in (0.0, 0.2, 0.25, 0.5, 0.74, 0.75, 0.99, 1.0, 1.5)] == [1, 1, 2, 3, 3, 4, 4, 4, 4]
    assert unfrozen_groups(0.0, 1) == 1


def test_gradual_unfreezing_opens_timm_stages_from_the_top():
    from edgekd.models import create_model
    from edgekd.transfer import GradualUnfreezing

    model = create_model("efficientnet_lite0", 10, pretrained="none", input_size=32)
    unfreeze = GradualUnfreezing(model, total_steps=100, time_limit_s=None, frozen=set())
    groups = unfreeze.groups
    assert len(groups) >= 4  # stem, stages..., head (timm's group_matcher)
    head = {id(p) for p in model.get_classifier().parameters()}
    unfreeze.step()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert head <= {id(p) for p in trainable} and all(p.requires_grad for p in groups[-1])
    assert not any(p.requires_grad for g in groups[:-1] for p in g)
    for _ in range(99):
        unfreeze.step()
    assert all(p.requires_grad for p in model.parameters())
    ks = [k for _, k in unfreeze.history]
    assert ks == list(range(1, len(groups) + 1))  # one more group each time, none skipped


# ----------------------------------------------------------------------------- folders and errors
def _png(path: Path, side: int = 28, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(path)))
    shape = (side, side) if mode == "L" else (side, side, 3)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


def test_unlabeled_folder_any_layout_and_converted_channels(tmp_path, capsys):
    root = tmp_path / "u"
    _png(root / "a.png")
    _png(root / "deep" / "er" / "b.png", mode="RGB")
    _png(root / "c.png", side=40, mode="RGB")
    split = load_unlabeled(root, Storage(28, cache_dir=str(tmp_path / "cache"), workers=1), channels=1)
    assert len(split) == 3 and split.image_shape == (1, 28, 28) and (split.labels == UNLABELED).all()
    err = capsys.readouterr().err
    assert err.count("converted to grey") == 1


@needs_fmnist
def test_unlabeled_folder_without_readable_images_is_one_line(tmp_path):
    storage = Storage(28, cache_dir=str(tmp_path / "cache"), workers=1)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(EdgekdError, match="has no images"):
        load_unlabeled(tmp_path / "empty", storage, 1)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not a png")
    with pytest.raises(EdgekdError, match="none of its 1 image file"):
        load_unlabeled(tmp_path / "bad", storage, 1)
    proc = run_inprocess("finetune", "--unlabeled", str(tmp_path / "bad"), "--train-subset", "200", "--out", str(tmp_path / "o"),
                         "--set", f"data.cache_dir={tmp_path / 'cache'}")
    assert_one_line_error(proc, "image file(s) could be read")


def test_target_test_folder_with_other_classes_is_refused(tmp_path):
    storage = Storage(28, cache_dir=str(tmp_path / "cache"), workers=1)
    classes = ["T-shirt/top", "Trouser"]
    _png(tmp_path / "ok" / "T-shirt_top" / "a.png")
    _png(tmp_path / "ok" / "Trouser" / "b.png")
    split = load_target_test(tmp_path / "ok", classes, storage, 1)
    assert sorted(split.labels.tolist()) == [0, 1]
    _png(tmp_path / "bad" / "Trouser" / "a.png")
    _png(tmp_path / "bad" / "Sandal" / "b.png")
    with pytest.raises(EdgekdError, match="Sandal that are not training classes"):
        load_target_test(tmp_path / "bad", classes, storage, 1)


def test_target_calibration_uses_the_unlabeled_images_and_needs_them():
    from edgekd.quantize.ptq import calibration_split

    data = _dataset()
    assert calibration_split(QuantizeConfig(calibration="target"), data) is data.unlabeled
    assert calibration_split(QuantizeConfig(), data) is data.train
    data.unlabeled = None
    with pytest.raises(EdgekdError, match="calibration=target needs unlabeled images"):
        calibration_split(QuantizeConfig(calibration="target"), data)


# ----------------------------------------------------------------------------- a tiny build
TINY = tiny_build({"teacher.train.epochs": 1, "student.train.epochs": 1, "data.train_subset": 800, "data.test_subset": 300, "quantize.calib_images": 64,
                   "bench.runs": 10, "bench.warmup": 1, "bench.batches": "[1]", "export.check_batch": 64, "time_budget_s": 0})


@pytest.mark.slow
@needs_fmnist
def test_tiny_build_with_unlabeled_images_reports_both_domains(tmp_path):
    from edgekd.data import fashion_mnist_root, load_fashion_mnist_split
    from edgekd.data.unlabeled import folder_class_name
    from edgekd.data import FASHION_MNIST_CLASSES

    test = load_fashion_mnist_split(fashion_mnist_root(None), "test")
    for i in range(300):
        img = Image.fromarray(255 - test.images[i, 0].numpy())
        if i < 150:
            _save(img, tmp_path / "unlabeled" / f"{i % 3}" / f"{i}.png")
        else:
            _save(img, tmp_path / "target" / folder_class_name(FASHION_MNIST_CLASSES[int(test.labels[i])]) / f"{i}.png")
    out = tmp_path / "run"
    res = json_out(run_inprocess("build", "--target", "x86-cpu", *TINY, "--unlabeled", str(tmp_path / "unlabeled"), "--target-test", str(tmp_path / "target"),
                                 "--set", "distill.mmd.weight=0.5", "--set", "quantize.calibration=target", "--out", str(out), "--json", "--until", "report"))
    rows = {r["step"]: r for r in res["report"]["accuracy"]}
    assert all("target_top1" in r for r in rows.values()), rows
    assert "target_change" in rows[next(s for s in rows if s.startswith("distilled"))]
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    parts = json.loads((out / "student" / "metrics.json").read_text())["loss_parts"]
    assert {"kd_unlabeled", "mmd"} <= set(parts)
    assert stages["evaluate"]["metrics"]["target_n"] == 150
    qad = json.loads((out / "qad" / "metrics.json").read_text())
    assert qad["calibration"] == "target"


def _save(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def test_target_calibration_scores_agreement_with_fp32_on_target_images(tmp_path):
    """'auto' on target images has no labels to score with: it scores top-1 agreement with the FP32 student there."""
    from edgekd.models import load_checkpoint
    from edgekd.quantize.ptq import calibration_score

    data = _dataset()
    ckpt = load_checkpoint(_tiny_teacher(tmp_path))
    score, reference = calibration_score(ckpt, QuantizeConfig(calibration="target", calib_images=32), data, 0, None)
    from edgekd.models import model_from_checkpoint

    assert reference == 1.0 and score(model_from_checkpoint(ckpt)) == 1.0  # the FP32 model agrees with itself
    _, val_reference = calibration_score(ckpt, QuantizeConfig(calib_images=32), data, 0, 0.5)
    assert val_reference == 0.5


@pytest.mark.slow
@needs_fmnist
def test_progressive_fine_tuning_unfreezes_during_the_run(tmp_path):
    """teacher.mode=progressive through the real fine-tuning stage: every group trains by the end;
    a model without timm stages is refused in one line."""
    from edgekd.config import load_recipe
    from edgekd.data import load_data
    from edgekd.finetune import run_finetune
    from edgekd.stage_context import StageContext

    rc = load_recipe(None, ["teacher.mode=progressive", "teacher.pretrained=none", "teacher.input_size=32", "teacher.train.epochs=1",
                            "teacher.train.batch_size=32", "data.train_subset=320", "data.test_subset=64"])
    m = run_finetune(rc.teacher, load_data(rc.data, 0), tmp_path / "t", StageContext(data_cfg=rc.data))["metrics"]
    groups = [k for _, k in m["unfreezing"]]
    assert groups[0] == 1 and groups == sorted(groups) and len(groups) > 2
    proc = run_inprocess("finetune", "--set", "teacher.model=pico_cnn", "--set", "teacher.mode=progressive", "--set", "teacher.pretrained=none",
                         "--train-subset", "200", "--out", str(tmp_path / "p"))
    assert_one_line_error(proc, "teacher.mode=progressive needs a timm backbone")
