"""The routes users take that the tiny default build does not: the README's `build --quick`, a
wall-time budget with no epochs set, their own teacher, no control, float builds, an arm64 target,
and the stage commands (`quantize --teacher --layout`, `export` of its checkpoint, `distill
--self-distill` and several teachers). Real Fashion-MNIST, real runs, shrunk to seconds."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from cli_helpers import json_out, run_inprocess, tiny_build
from edgekd.atomic import sha256_file
from edgekd.manifest import Manifest
from edgekd.models import load_checkpoint
from needs import needs_fmnist

pytestmark = needs_fmnist

SMALL = {"data.train_subset": 600, "data.test_subset": 200, "student.train.epochs": 1, "quantize.calib_images": 64, "bench.runs": 10, "bench.warmup": 1,
         "bench.batches": "[1]", "export.check_batch": 64}


def _build(out, *args: str) -> tuple[dict, str]:
    proc = run_inprocess("build", *args, "--out", out, "--json")
    return json_out(proc), proc.stderr


def _onnx_ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


@pytest.mark.slow
def test_quick_build_runs_every_stage_from_the_pretrained_teacher(tmp_path):
    """The README's first look: --quick's settings (ImageNet-pretrained EfficientNet-Lite0 at 48 px,
    one teacher epoch, three student epochs) under the user's own --set, which wins."""
    res, _ = _build(tmp_path / "q", "--quick", "--set", "data.train_subset=300", "--set", "data.test_subset=200", "--set", "bench.runs=10")
    assert all(s["status"] == "done" for s in res["stages"].values()) and list(res["stages"])[0] == "teacher" and "bundle" in res["stages"]
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    rc = manifest["recipe"]
    assert (rc["data"]["train_subset"], rc["teacher"]["input_size"], rc["teacher"]["train"]["epochs"], rc["student"]["train"]["epochs"],
            rc["quantize"]["calib_images"]) == (300, 48, 1, 3, 256)  # the user's subset, --quick's everything else
    teacher = json.loads((tmp_path / "q" / "teacher" / "metrics.json").read_text())
    assert teacher["model"] == "efficientnet_lite0" and teacher["weights_source"].startswith("offline:") and teacher["test"]["n"] == 200
    assert res["precision"] == "int8" and "QuantizeLinear" in _onnx_ops(res["onnx"]) and 0.3 < res["accuracy"] <= 1.0
    assert Manifest(tmp_path / "q").verify() == []


@pytest.mark.slow
def test_time_budget_caps_each_training_stage_when_no_epochs_are_set(tmp_path):
    """--time-budget 20s with the recipe's own epochs (sized from the data): each training stage gets
    a share (10 s at least) and stops at it; --no-control leaves the control stage out. The teacher
    (fine-tune loop) and distill (distillation loop) stages run; every training stage takes its limit
    from the same ``BuildContext.limited``, and ``fit``'s own time limit is tested in test_budget_report."""
    sets = tiny_build({"teacher.train.epochs": None, "student.train.epochs": None, "quantize.train.epochs": None, "data.train_subset": 1500,
                       "data.test_subset": 300})
    res, _ = _build(tmp_path / "tb", "--time-budget", "20s", "--no-control", "--until", "distill", *sets)
    assert res["time_budget_s"] == 20 and list(res["stages"]) == ["teacher", "distill"]
    m = Manifest(tmp_path / "tb")
    stopped = {}
    for stage in ("teacher", "distill"):
        metrics, limit = m.stage(stage)["metrics"], res["stages"][stage]["budget_s"]
        plan = metrics["plan"]
        assert limit >= 10.0 and plan["time_limit_s"] is not None and plan["time_limit_s"] <= limit, (stage, plan)
        epoch_s = metrics["train_seconds"] / plan["epochs_run"]
        assert metrics["train_seconds"] <= plan["time_limit_s"] + 2 * epoch_s + 2.0, (stage, metrics["train_seconds"], plan)  # checked every epoch
        stopped[stage] = metrics["stopped"]
    assert "time" in stopped.values(), stopped  # the budget, not the epoch count, ended at least one stage
    assert m.stage("distill")["metrics"]["distilled_from"] == "teacher"  # with no control there is nothing else to learn from


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_float_builds_from_a_given_teacher_ship_a_float_file(precision, pico_2000_ckpt, tmp_path):
    res, _ = _build(tmp_path / precision, "--teacher", str(pico_2000_ckpt), *tiny_build({**SMALL, "export.precision": precision}))
    assert "qad" not in res["stages"] and res["precision"] == precision and res["layout"] == "none"
    teacher = Manifest(tmp_path / precision).stage("teacher")
    assert teacher["metrics"]["provided"] and teacher["artifacts"]["checkpoint"]["sha256"] == sha256_file(pico_2000_ckpt)  # used, not retrained
    assert not (tmp_path / precision / "teacher" / "best.pt").exists()
    model = onnx.load(res["onnx"])
    assert not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in model.graph.node}
    dtypes = {numpy_helper.to_array(i).dtype for i in model.graph.initializer if numpy_helper.to_array(i).ndim >= 2}
    assert dtypes == {np.dtype(np.float16 if precision == "fp16" else np.float32)}, dtypes
    assert res["checks"]["agreement"] >= 0.98 and (tmp_path / precision / "bundle.tar.gz").is_file()


@pytest.mark.slow
def test_arm64_target_ships_8_bit_weights_and_does_not_judge_its_speed_on_this_cpu(pico_2000_ckpt, tmp_path):
    """arm64-cpu from an x86 machine: onnxruntime's layout with the full 8-bit weight grid (the 7-bit
    one is an x86 AVX2 workaround); the host's timings are information, not a verdict."""
    res, stderr = _build(tmp_path / "a", "--target", "arm64-cpu", "--teacher", str(pico_2000_ckpt), "--no-control", *tiny_build(SMALL))
    assert res["target"] == "arm64-cpu" and res["layout"] == "ort-cpu" and res["precision"] == "int8"
    export = json.loads((tmp_path / "a" / "export" / "export.json").read_text())
    assert export["weight_bits"] == 8
    codes = [numpy_helper.to_array(i) for i in onnx.load(res["onnx"]).graph.initializer if numpy_helper.to_array(i).dtype == np.int8]
    assert codes and max(int(np.abs(c.astype(np.int32)).max()) for c in codes) > 63  # beyond the 7-bit grid
    bench = Manifest(tmp_path / "a").stage("bench")["metrics"]
    if res["latency"]["on_target_runtime"] is False:  # every machine but an arm64 one
        assert "aarch64" in bench["reason"] and "within_budget" not in bench
        assert "slower than fp32" not in stderr.lower() and "not faster than fp32" not in stderr.lower(), stderr
    assert json.loads((tmp_path / "a" / "bundle" / "bundle.json").read_text())["target"]["name"] == "arm64-cpu"


@pytest.mark.slow
def test_cli_quantize_with_teacher_and_layout_then_export_its_checkpoint(pico_2000_ckpt, tmp_path):
    """`edgekd quantize --teacher --layout tensorrt` on the x86 default target, then `edgekd export` of
    what it wrote: the file is the QAD model itself (its trained ranges, not a new calibration)."""
    from edgekd.data import load_dataset
    from edgekd.export import ort_logits
    from edgekd.quantize import load_quantized

    small = ["--train-subset", "600", "--test-subset", "200", "--calib-images", "64", "--epochs", "1"]
    q = json_out(run_inprocess("quantize", str(pico_2000_ckpt), "--teacher", str(pico_2000_ckpt), "--layout", "tensorrt", *small,
                               "--out", tmp_path / "q", "--json"))
    assert q["layout"] == "tensorrt" and q["weight_bits"] == 8 and q["teacher"]["sha256"] == sha256_file(pico_2000_ckpt)
    model = load_quantized(q["checkpoint"])
    assert model.edgekd_quant["layout"] == "tensorrt"
    proc = run_inprocess("export", q["checkpoint"], "--layout", "tensorrt", "--check-batch", "64", "--out", tmp_path / "e", "--json")
    rec = json_out(proc)
    assert "post-training quantization only" not in proc.stderr and "ptq_calibration" not in rec  # not calibrated again
    images = load_dataset("fashion-mnist", test_subset=64).test.images
    x = model.preprocess(images)
    import torch

    with torch.no_grad():
        ref = model(x).numpy()
    got = ort_logits(rec["path"], x.numpy(), exact_qdq=True)
    assert np.abs(ref - got).max() < 1e-3 * np.abs(ref).max() + 1e-4, np.abs(ref - got).max()


@pytest.mark.slow
def test_cli_self_distill_and_two_teachers(pico_2000_ckpt, teacher_32px, tmp_path):
    small = ["--student", "pico_cnn", "--epochs", "1", "--train-subset", "600", "--test-subset", "200"]
    born = json_out(run_inprocess("distill", "--self-distill", "--teacher", str(pico_2000_ckpt), *small, "--out", tmp_path / "s", "--json"))
    ckpt = load_checkpoint(born["checkpoint"])
    assert ckpt["config"]["self_distill"] is True and [t["sha256"] for t in ckpt["teachers"]] == [sha256_file(pico_2000_ckpt)]
    two = json_out(run_inprocess("distill", "--teacher", str(pico_2000_ckpt), "--teacher", str(teacher_32px), "--teacher-weights", "0.7,0.3", *small,
                                 "--out", tmp_path / "t", "--json"))
    ckpt = load_checkpoint(two["checkpoint"])
    assert [t["sha256"] for t in ckpt["teachers"]] == [sha256_file(pico_2000_ckpt), sha256_file(teacher_32px)]
    assert len(two["teachers"]) == 2 and two["loss_parts"]["kd"] > 0
