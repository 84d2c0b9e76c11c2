"""Quantization-aware distillation and per-runtime INT8 ONNX export (issue 4), on real data and real onnxruntime sessions.

Tiny students (pico_cnn, small_resnet at width 0.25) and Fashion-MNIST subsets keep every test in seconds.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import numpy_helper

from edgekd.config import DataConfig, QuantizeConfig, TrainConfig
from edgekd.errors import EdgekdError
from edgekd.export import (ExportRequest, check_ort_cpu_fusion, check_tensorrt_readiness, export_int8_tensorrt, export_model, read_metadata, resolve_layout,
                           torch_to_onnx)
from edgekd.data import load_data
from edgekd.models import create_model
from edgekd.data import calibration_images
from edgekd.quantize import (enabled_quantizers, fold_batchnorm, load_quantized, quantize_model, run_qad, save_quantized)
from edgekd.quantize.placement import ACT_PREFIX, input_quantizers
from edgekd.train import cross_entropy_loss
from edgekd.quantize import for_target, QadJob
from edgekd.targets import host_arch
from edgekd.export import ExportJob
from edgekd.stage_context import StageContext
from needs import needs_fmnist

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def trained_pico(pico_2000_ckpt):
    """pico_cnn trained two epochs on 2,000 real images (enough margin for agreement checks)."""
    from edgekd.models import model_from_checkpoint

    return model_from_checkpoint(pico_2000_ckpt), pico_2000_ckpt


@pytest.fixture(scope="module")
def quant_pico(trained_pico, fmnist_2000):
    q = copy.deepcopy(trained_pico[0])
    q.edgekd_spec, q.preprocess = trained_pico[0].edgekd_spec, trained_pico[0].preprocess
    return quantize_model(q, QuantizeConfig(layout="tensorrt"), fmnist_2000.train.images[:256], q.preprocess)


def _randomize_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.copy_(torch.rand(mod.num_features, generator=g) - 0.5)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
            mod.weight.data.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
            mod.bias.data.copy_(torch.rand(mod.num_features, generator=g) - 0.5)


def _quant_resnet(fmnist_2000) -> nn.Module:
    torch.manual_seed(0)
    m = create_model("small_resnet", 10, width=0.25).eval()
    _randomize_bn(m)
    return quantize_model(m, QuantizeConfig(layout="tensorrt"), fmnist_2000.train.images[:128], m.preprocess)


# ----------------------------------------------------------------------------- quantize.py
def test_fold_batchnorm_keeps_outputs_and_removes_bn(fmnist_2000):
    m = create_model("small_resnet", 10, width=0.25).eval()
    _randomize_bn(m)
    x = m.preprocess(fmnist_2000.test.images[:32])
    ref = m(x)
    assert fold_batchnorm(m) == 9  # stem + 2 per block x 3 + 2 shortcut convs
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in m.modules())
    assert torch.allclose(m(x), ref, atol=1e-4)


def test_quantize_inserts_per_channel_weights_and_residual_quantizers(fmnist_2000):
    m = _quant_resnet(fmnist_2000)
    qs = enabled_quantizers(m)
    w = qs["stem.0.weight_quantizer"]
    assert w.axis == 0 and w.amax.numel() == m.get_submodule("stem.0").out_channels
    assert input_quantizers(m)["stem.0"].amax.numel() == 1
    adds = [n for n in m.graph.nodes if n.op == "call_function" and n.target.__name__ == "add"]
    assert len(adds) == 3
    for add in adds:  # TensorRT placement: the identity input comes through a quantizer, the conv branch straight from its conv
        quantized = [a.op == "call_module" and a.target.startswith(ACT_PREFIX + ".") for a in add.args]
        assert quantized.count(True) == 1, add.args
        branch = add.args[quantized.index(False)]
        assert branch.op == "call_module" and isinstance(m.get_submodule(branch.target), nn.Conv2d), add.args
    assert all(q.amax.numel() == 1 for n, q in qs.items() if n.startswith(ACT_PREFIX))


def test_histogram_calibrator_clips_below_max(trained_pico, fmnist_2000):
    calib = fmnist_2000.train.images[:256]
    amax = {}
    for cal in ("max", "percentile"):
        q = quantize_model(copy.deepcopy(trained_pico[0]), QuantizeConfig(calibrator=cal, percentile=99.0, layout="tensorrt"), calib, trained_pico[0].preprocess)
        amax[cal] = float(input_quantizers(q)["features.2.0"].amax)
    assert 0 < amax["percentile"] < amax["max"]


@pytest.mark.parametrize("calibrator", ["max", "percentile", "mse"])
def test_every_calibrator_keeps_the_trained_accuracy(trained_pico, fmnist_2000, calibrator):
    """Each recipe option calibrates ranges that work. (modelopt 0.47's own MSE search returned
    about 6% of the range for every quantizer, and MobileNetV3-Large fell to 9% top-1.) Entropy is
    not held to this: it clips hardest (-6 points here; on MobileNetV3-Large it was the best: 62.7%
    vs FP32 62.9%). Its search is checked against modelopt's below."""
    model = trained_pico[0]
    x, labels = model.preprocess(fmnist_2000.test.images), fmnist_2000.test.labels
    with torch.no_grad():
        fp32 = float((model(x).argmax(1) == labels).float().mean())
        q = quantize_model(copy.deepcopy(model), QuantizeConfig(calibrator=calibrator, layout="ort-cpu"), fmnist_2000.train.images[:256], model.preprocess)
        int8 = float((q(x).argmax(1) == labels).float().mean())
    assert int8 >= fp32 - 0.03, (calibrator, fp32, int8)


def test_mse_amax_has_less_error_than_the_max_and_the_first_candidate():
    from modelopt.torch.quantization.tensor_quant import fake_tensor_quant

    from edgekd.quantize.calibrate import amax_with_least_squared_error

    values = torch.cat([torch.randn(200_000, generator=torch.Generator().manual_seed(0)).abs(), torch.tensor([40.0])])  # one outlier
    hist, edges = np.histogram(values.numpy(), bins=2048)
    amax = float(amax_with_least_squared_error(hist, edges, 8, False))

    def error(a: float) -> float:
        return float(((fake_tensor_quant(values, torch.tensor(a), None, 8, False) - values) ** 2).sum())

    first = float((edges[128] + edges[129]) / 2)
    assert first < amax < 40 and error(amax) < error(40.0) and error(amax) < error(first), (amax, first)



@pytest.mark.parametrize("unsigned", [False, True])
def test_entropy_amax_is_modelopts_own_choice(unsigned):
    """The numpy KL search returns exactly what modelopt's per-bin Python loop returns (in a
    fraction of the time), on a light-tailed, a heavy-tailed and a ReLU-like histogram. (1,024 bins,
    not calibration's 2,048: modelopt's loop takes ~2.5 s per 2,048-bin histogram; the search is the
    same at any bin count above its 128-bin start.)"""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from modelopt.torch.quantization.calib.histogram import _compute_amax_entropy

    from edgekd.quantize.calibrate import amax_with_least_kl_divergence

    rng = np.random.default_rng(0)
    for values in (np.abs(rng.standard_normal(50_000)), np.abs(rng.standard_t(3, 50_000)), np.maximum(3 * rng.standard_normal(50_000) + 1, 0)):
        hist, edges = np.histogram(values, bins=1024)
        ours = float(amax_with_least_kl_divergence(hist, edges, 8, unsigned))
        assert ours == float(_compute_amax_entropy(hist.copy(), edges, 8, unsigned)) and 0 < ours <= edges[-1]


def test_percentile_amax_is_modelopts_own_choice():
    """edgekd reads the percentile from the same histogram as MSE and entropy (one pass for all three):
    it equals what modelopt's percentile calibrator computes."""
    from types import SimpleNamespace

    from edgekd.quantize.calibrate import amax_at_percentile
    from edgekd.quantize.modelopt_api import calibration_histogram, start_histogram_calibration, tensor_quantizer_cls

    q = tensor_quantizer_cls()()
    start_histogram_calibration(q)
    for batch in torch.randn(4, 10_000, generator=torch.Generator().manual_seed(0)) * torch.tensor([[1.0], [2.0], [1.5], [3.0]]):
        q._calibrator.collect(batch)
    for pct in (99.0, 99.9, 99.99):
        assert float(amax_at_percentile(*calibration_histogram(q), pct)) == float(q._calibrator.compute_amax("percentile", percentile=pct))
    assert calibration_histogram(SimpleNamespace(_calibrator=q._calibrator))[1] is q._calibrator._calib_bin_edges  # consistent edges pass through


def test_histogram_edges_match_the_counts_after_modelopt_widens_the_range():
    """modelopt 0.47 re-bins a widened range with torch.histc over [0, last edge] but builds the edges with
    torch.arange, which can overshoot: two more edges than counts + 1 (MobileNetV3-Large at 224 px, where
    the MSE search then failed on the shapes). The edges edgekd reads are those the counts were binned with."""
    import warnings
    from types import SimpleNamespace

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from modelopt.torch.quantization.calib import HistogramCalibrator

    from edgekd.quantize.calibrate import amax_at_percentile
    from edgekd.quantize.modelopt_api import calibration_histogram

    calibrator = HistogramCalibrator(num_bits=8, axis=None, unsigned=False)
    calibrator.collect(torch.tensor([0.0, 0.07057428359985352]))
    calibrator.collect(torch.tensor([0.0, 18.17422342300415]))  # found by a search over random ranges
    assert len(calibrator._calib_bin_edges) == len(calibrator._calib_hist) + 2, "modelopt no longer overshoots: this case is gone"
    hist, edges = calibration_histogram(SimpleNamespace(_calibrator=calibrator))
    assert len(edges) == len(hist) + 1 and edges[0] == 0 and edges[-1] == calibrator._calib_bin_edges[-1]
    assert 18.0 < float(amax_at_percentile(hist, edges, 100.0)) <= float(edges[-1])


def test_quantized_checkpoint_loads_weights_only_and_reproduces_outputs(quant_pico, fmnist_2000, tmp_path):
    path = save_quantized(tmp_path / "q.pt", quant_pico, fmnist_2000.classes)
    raw = torch.load(path, weights_only=True)
    assert raw["quantize"]["fold_bn"] is True and any(k.endswith("_amax") for k in raw["state_dict"])
    back = load_quantized(path)
    x = quant_pico.preprocess(fmnist_2000.test.images[:64])
    assert torch.equal(back(x), quant_pico(x))


def test_non_quantizable_model_is_a_clear_error():
    m = nn.Sequential(nn.Flatten(), nn.ReLU())
    from edgekd.data import Preprocess

    with pytest.raises(EdgekdError, match="no layer INT8 can quantize"):
        quantize_model(m, QuantizeConfig(fold_bn=False, layout="tensorrt"), torch.zeros(4, 1, 28, 28, dtype=torch.uint8), Preprocess(28, 1, (0.5,), (0.5,)))


def test_fp32_checkpoint_is_refused_by_load_quantized(trained_pico):
    with pytest.raises(EdgekdError, match="not a quantized"):
        load_quantized(trained_pico[1])


def test_run_qad_with_kd_from_fp32_teacher(trained_pico, fmnist_2000, tmp_path):
    from edgekd.config import DistillConfig
    from edgekd.distill import build_distill_loss, load_teacher

    teacher = load_teacher(trained_pico[1])  # the FP32 model teaches its own INT8 copy, through the loss the CLI uses
    small = load_data(DataConfig(train_subset=512, test_subset=128), 0)
    cfg = QuantizeConfig(calib_images=128, train=TrainConfig(epochs=1, batch_size=64, lr=1e-4, weight_decay=0.0, warmup_epochs=0.0))
    teacher_batches, losses = [], []
    teacher.model.register_forward_hook(lambda mod, inp, out: teacher_batches.append(len(inp[0])))

    def kd_loss(model):
        losses.append(build_distill_loss(model, [teacher], DistillConfig(), small, augment="none"))
        return losses[-1]

    res = run_qad(QadJob(for_target(cfg, "tensorrt", host_arch()), Path(trained_pico[1]), kd_loss), small, tmp_path, StageContext(data_cfg=DataConfig(augment="none")))
    m = res["metrics"]
    # the teacher saw every training image of the epoch, and the soft-target term carried weight
    assert sum(teacher_batches) >= len(small.train), (sum(teacher_batches), len(small.train))
    parts = losses[0][0].parts()
    assert parts.keys() == {"kd", "ce"} and parts["kd"] > 0, parts
    assert m["quantizers"] == len(enabled_quantizers(load_quantized(res["checkpoint"])))
    assert m["test"]["top1"] > 0.3 and m["fp32_val_top1"] > 0.3
    with pytest.raises(EdgekdError, match="already quantized"):
        run_qad(QadJob(for_target(cfg, "tensorrt", host_arch()), Path(res["checkpoint"]), lambda model: (cross_entropy_loss(), None)), small, tmp_path / "again", StageContext(data_cfg=DataConfig(augment="flip")))


def test_auto_calibrator_keeps_max_within_a_point_else_the_best_of_four_on_validation(trained_pico, tmp_path, monkeypatch):
    from edgekd.quantize import ptq

    small = load_data(DataConfig(train_subset=512, test_subset=128), 0)
    cfg = QuantizeConfig(calib_images=128, train=TrainConfig(epochs=1, batch_size=64, lr=1e-4, weight_decay=0.0, warmup_epochs=0.0))
    assert cfg.calibrator == "auto"
    m = run_qad(QadJob(for_target(cfg, "tensorrt", host_arch()), Path(trained_pico[1]), lambda model: (cross_entropy_loss(), None)), small, tmp_path / "a", StageContext(data_cfg=DataConfig(augment="none")))["metrics"]
    assert 100 * (m["fp32_val_top1"] - m["calibrators_tried"]["max"]) <= 1.0, "the test needs a network max calibrates within a point"
    assert m["calibrators_tried"].keys() == {"max"} and m["calibrator"] == "max"
    monkeypatch.setattr(ptq, "AUTO_TOLERANCE_POINTS", -100.0)  # as if max had lost: every method is tried
    res = run_qad(QadJob(for_target(cfg, "tensorrt", host_arch()), Path(trained_pico[1]), lambda model: (cross_entropy_loss(), None)), small, tmp_path / "b", StageContext(data_cfg=DataConfig(augment="none")))
    tried, chosen = res["metrics"]["calibrators_tried"], res["metrics"]["calibrator"]
    assert list(tried) == ["max", "mse", "percentile", "entropy"] and chosen == max(tried, key=tried.get)
    assert res["metrics"]["ptq_val_top1"] == tried[chosen]
    assert load_quantized(res["checkpoint"]).edgekd_quant["calibrator"] == chosen

def test_qad_that_makes_things_worse_keeps_the_calibrated_model(trained_pico, fmnist_2000, tmp_path):
    """A learning rate far too high wrecks the quantized student in one epoch: best.pt must then be
    the calibrated (PTQ) model it started from, not the wreck, and the metrics say so."""
    small = load_data(DataConfig(train_subset=512, test_subset=128), 0)
    cfg = QuantizeConfig(calib_images=128, train=TrainConfig(epochs=1, batch_size=64, lr=5.0, optimizer="sgd", weight_decay=0.0, warmup_epochs=0.0))
    res = run_qad(QadJob(for_target(cfg, "tensorrt", host_arch()), Path(trained_pico[1]), lambda model: (cross_entropy_loss(), None)), small, tmp_path, StageContext(data_cfg=DataConfig(augment="none")))
    m = res["metrics"]
    assert m["history"][0]["val_top1"] < m["ptq_val_top1"], "the test needs a QAD epoch that hurts"
    assert m["result"] == "calibrated (PTQ)" and m["val"]["top1"] == pytest.approx(m["ptq_val_top1"])
    calibrated = quantize_model(copy.deepcopy(trained_pico[0]), QuantizeConfig(calib_images=128, layout="tensorrt"), calibration_images(small.train, 128, 0),
                                trained_pico[0].preprocess)
    kept = load_quantized(res["checkpoint"])
    for k, v in calibrated.state_dict().items():
        assert torch.equal(v, kept.state_dict()[k]), k


# ----------------------------------------------------------------------------- export formats
@pytest.mark.parametrize("precision,layout,min_agreement", [("fp32", "none", 1.0), ("fp16", "none", 0.99), ("int8", "tensorrt", 0.99), ("int8", "ort-cpu", 0.95)])
def test_each_export_loads_in_onnxruntime_and_agrees_with_pytorch(quant_pico, trained_pico, fmnist_2000, tmp_path, precision, layout, min_agreement):
    model = quant_pico if precision == "int8" else trained_pico[0]
    rec = export_model(model, tmp_path, ExportRequest(precision, layout, fmnist_2000.classes, fmnist_2000.test.images[:256], fmnist_2000.test.labels[:256],
                                                      fmnist_2000.train.images[:256], target="x86-cpu", time_runs=3, allow_not_ready=True))
    agree = rec["checks"]["agreement"]
    assert rec["checks"]["onnx_checker"] == "ok"
    assert agree["top1_agreement"] >= min_agreement, agree
    proto = onnx.load(rec["path"])
    assert opset_of(proto) >= 17
    assert [i.name for i in proto.graph.input] == ["input"] and [o.name for o in proto.graph.output] == ["logits"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch axis
    meta = read_metadata(rec["path"])
    assert meta["classes"] == fmnist_2000.classes and meta["preprocessing"]["input_size"] == 28 and meta["precision"] == precision
    assert meta["layout"] == (layout if precision == "int8" else "none") and meta["target"] == "x86-cpu" and "edgekd_version" in meta
    if precision == "int8":
        trt, ortc = rec["checks"]["tensorrt_readiness"], rec["checks"]["ort_cpu_fusion"]
        assert trt["ok"] == (layout == "tensorrt")
        assert ortc["ok"] == (layout == "ort-cpu")
        assert {"int8_top1", "fp32_top1"} <= set(rec["comparison"])
    if precision == "int8" and layout == "ort-cpu":  # both ReLU code ranges were measured; the closer one shipped
        tried = rec["relu_codes_tried"]
        assert set(tried) == {"127", "255"} and rec["relu_codes"] in (127, 255)
        assert tried[str(rec["relu_codes"])]["mean_abs_diff"] == min(t["mean_abs_diff"] for t in tried.values())


def opset_of(proto) -> int:
    return max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def test_ort_layout_runs_in_integer_kernels_and_keeps_trained_scales(quant_pico, fmnist_2000, tmp_path):
    rec = export_model(quant_pico, tmp_path, ExportRequest("int8", "ort-cpu", fmnist_2000.classes, fmnist_2000.test.images[:64], None, fmnist_2000.train.images[:128], time_runs=3))
    fusion = rec["checks"]["ort_cpu_fusion"]
    assert fusion["counts"]["integer_ops"] >= 3 and fusion["ok"] and fusion["counts"]["float_compute_ops"] == 0
    g = onnx.load(rec["path"]).graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    amax = float(input_quantizers(quant_pico)["features.2.0"].amax)
    scales = [float(inits[n.input[1]]) for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits]
    assert any(abs(s - amax / rec["relu_codes"]) < 1e-6 * max(1.0, amax) for s in scales)  # the trained grid (ReLU output: codes 0..127 or 0..255)


def _weight_codes(path: Path) -> list[np.ndarray]:
    """The integer weights of an onnxruntime QDQ file (the int8/uint8 initializers its DequantizeLinear nodes read), centred on their zero point."""
    g = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    codes = []
    for n in g.node:
        w = inits.get(n.input[0]) if n.op_type == "DequantizeLinear" else None
        if w is not None and w.ndim >= 2 and w.dtype in (np.int8, np.uint8):
            zp = inits[n.input[2]].astype(np.int32).reshape(-1, *[1] * (w.ndim - 1)) if len(n.input) > 2 else 0
            codes.append(w.astype(np.int32) - zp)
    return codes


def test_x86_ort_layout_trains_and_ships_7_bit_weights(trained_pico, fmnist_2000, tmp_path):
    """onnxruntime's AVX2 u8 x s8 kernel cannot saturate on 7-bit weights: QAD trains that grid, the file ships it, exactly."""
    from edgekd.quantize import default_weight_bits, for_target

    assert default_weight_bits("ort-cpu", "x86_64") == 7 and default_weight_bits("ort-cpu", "aarch64") == 8 and default_weight_bits("tensorrt", "x86_64") == 8
    assert for_target(QuantizeConfig(), "ort-cpu", "x86_64").weight_bits == 7
    assert for_target(QuantizeConfig(weight_bits=8), "ort-cpu", "x86_64").weight_bits == 8  # an explicit setting wins
    files = {}
    for bits in (7, 8):
        q = copy.deepcopy(trained_pico[0])
        q.edgekd_spec, q.preprocess = trained_pico[0].edgekd_spec, trained_pico[0].preprocess
        qm = quantize_model(q, QuantizeConfig(weight_bits=bits, layout="ort-cpu"), fmnist_2000.train.images[:256], q.preprocess)
        rec = export_model(qm, tmp_path / str(bits), ExportRequest("int8", "ort-cpu", fmnist_2000.classes, fmnist_2000.test.images[:256], None, fmnist_2000.train.images[:256], time_runs=3))
        assert rec["weight_bits"] == bits and rec["checks"]["agreement"]["top1_agreement"] >= 0.99, rec["checks"]["agreement"]
        files[bits] = (rec, _weight_codes(Path(rec["path"])), qm)
    rec7, codes7, qm7 = files[7]
    assert codes7 and rec7["u8_weights"] == "none" and set(rec7["variants_tried"]) == {"127", "255"}
    assert max(int(np.abs(c).max()) for c in codes7) == 63  # every layer on the 7-bit grid, its largest weight at code 63
    assert max(int(np.abs(c).max()) for c in files[8][1]) == 127
    back = load_quantized(save_quantized(tmp_path / "q7.pt", qm7, fmnist_2000.classes))  # the checkpoint carries its grid
    x = qm7.preprocess(fmnist_2000.test.images[:64])
    assert back.edgekd_quant["weight_bits"] == 7 and torch.equal(back(x), qm7(x))


# ----------------------------------------------------------------------------- TensorRT readiness
@pytest.fixture(scope="module")
def trt_resnet_proto(fmnist_2000, tmp_path_factory):
    path = tmp_path_factory.mktemp("trt") / "resnet.onnx"
    export_int8_tensorrt(_quant_resnet(fmnist_2000), path, create_model("small_resnet", 10).preprocess)
    return onnx.load(str(path))


def test_readiness_accepts_good_tensorrt_graph(trt_resnet_proto):
    rep = check_tensorrt_readiness(trt_resnet_proto)
    assert rep.ok, rep.errors
    assert len(rep.quantized_ops) == 10 and not rep.float_ops  # 9 convs + head
    assert len(rep.residual_adds) == 3 and all(a["layout"] == "identity-only" and sum(a["inputs_quantized"]) == 1 for a in rep.residual_adds)
    assert all(op["weight_axis"] == 0 for op in rep.quantized_ops)


def _node(proto, op: str, contains: str = ""):
    return next(n for n in proto.graph.node if n.op_type == op and contains in n.name)


def _set_const(proto, tensor: str, value: np.ndarray) -> None:
    for n in proto.graph.node:
        if n.op_type == "Constant" and n.output[0] == tensor:
            n.attribute[0].t.CopyFrom(numpy_helper.from_array(value))
            return
    for i in proto.graph.initializer:
        if i.name == tensor:
            i.CopyFrom(numpy_helper.from_array(value, tensor))
            return
    raise AssertionError(f"no constant {tensor}")


def test_readiness_rejects_nonzero_zero_point(trt_resnet_proto):
    p = copy.deepcopy(trt_resnet_proto)
    inits = {i.name for i in p.graph.initializer}
    q = next(n for n in p.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits)  # an activation
    _set_const(p, q.input[2], np.array(3, dtype=np.int8))
    rep = check_tensorrt_readiness(p)
    assert not rep.ok and any("zero point 3" in e for e in rep.errors)


def test_readiness_rejects_missing_weight_qdq(trt_resnet_proto):
    p = copy.deepcopy(trt_resnet_proto)
    conv = _node(p, "Conv", "conv2")
    wdq = next(n for n in p.graph.node if n.output[0] == conv.input[1])
    wq = next(n for n in p.graph.node if n.output[0] == wdq.input[0])
    conv.input[1] = wq.input[0]  # feed the float weight straight in
    rep = check_tensorrt_readiness(p)
    assert not rep.ok and any("weight has no Q/DQ" in e for e in rep.errors)


def test_readiness_warns_on_per_tensor_weight_scale(trt_resnet_proto):
    p = copy.deepcopy(trt_resnet_proto)
    conv = _node(p, "Conv", "conv1")
    wdq = next(n for n in p.graph.node if n.output[0] == conv.input[1])
    wq = next(n for n in p.graph.node if n.output[0] == wdq.input[0])
    for n in (wq, wdq):
        _set_const(p, n.input[1], np.array(0.01, dtype=np.float32))
        _set_const(p, n.input[2], np.array(0, dtype=np.int8))
        del n.attribute[:]
    rep = check_tensorrt_readiness(p)
    assert rep.ok and any("conv1" in w and "per-tensor weight scale" in w for w in rep.warnings)  # legal in TensorRT, less accurate


def test_readiness_rejects_skipped_residual_quantizer(trt_resnet_proto):
    p = copy.deepcopy(trt_resnet_proto)
    add = _node(p, "Add")
    slot = next(i for i, t in enumerate(add.input) if any(n.output[0] == t and n.op_type == "DequantizeLinear" for n in p.graph.node))
    dq = next(n for n in p.graph.node if n.output[0] == add.input[slot])
    q = next(n for n in p.graph.node if n.output[0] == dq.input[0])
    add.input[slot] = q.input[0]  # the identity input bypasses its Q/DQ: neither input quantized
    rep = check_tensorrt_readiness(p)
    assert not rep.ok and any("residual Add has 2 unquantized input" in e for e in rep.errors)


def test_readiness_rejects_float_graph_and_ort_layout(quant_pico, fmnist_2000, tmp_path):
    fp = torch_to_onnx(create_model("pico_cnn", 10).eval(), tmp_path / "f.onnx", quant_pico.preprocess)
    assert any("not an explicitly quantized" in e for e in check_tensorrt_readiness(fp).errors)
    rec = export_model(quant_pico, tmp_path / "ort", ExportRequest("int8", "ort-cpu", fmnist_2000.classes, fmnist_2000.test.images[:32], None, fmnist_2000.train.images[:64], time_runs=2))
    rep = check_tensorrt_readiness(onnx.load(rec["path"]))
    assert not rep.ok and any("uint8" in e for e in rep.errors)


def test_tensorrt_layout_on_ort_cpu_is_reported_as_float(tmp_path, quant_pico):
    path = export_int8_tensorrt(quant_pico, tmp_path / "trt.onnx", quant_pico.preprocess)
    rep = check_ort_cpu_fusion(path)
    assert not rep.ok and rep.counts["integer_ops"] == 0 and rep.counts["float_compute_ops"] == 4
    assert "run in float" in rep.errors[0]


# ----------------------------------------------------------------------------- traps and bad input
def test_dynamo_exporter_trap(quant_pico, tmp_path):
    """The trap: dynamo=True does not emit modelopt's Q/DQ (or fails outright); edgekd refuses it up
    front with one error, and the TorchScript exporter it uses instead does emit them."""
    with pytest.raises(EdgekdError, match="dynamo"):
        torch_to_onnx(quant_pico, tmp_path / "x.onnx", quant_pico.preprocess, dynamo=True)
    assert not (tmp_path / "x.onnx").exists()
    torch_to_onnx(quant_pico, tmp_path / "ts.onnx", quant_pico.preprocess)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "ts.onnx")).graph.node]
    assert ops.count("QuantizeLinear") >= 2 and ops.count("DequantizeLinear") >= ops.count("QuantizeLinear")


def test_unknown_target_and_missing_layout_are_clear_errors():
    with pytest.raises(EdgekdError, match="unknown target"):
        resolve_layout("toaster-9000", None, None)
    with pytest.raises(EdgekdError, match="layout"):
        resolve_layout(None, None, "int8")
    assert resolve_layout("x86-cpu", None, None) == ("ort-cpu", "int8")
    assert resolve_layout("jetson-orin-nano", None, None)[0] == "tensorrt"
    assert resolve_layout("x86-cpu", "tensorrt", None) == ("tensorrt", "int8")


@needs_fmnist
def test_cli_corrupt_checkpoint_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    r = subprocess.run([sys.executable, "-m", "edgekd.cli", "export", str(bad), "--target", "x86-cpu", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2
    assert "corrupt" in r.stderr and "Traceback" not in r.stderr


def test_cli_export_fp32_checkpoint_calibrates_and_writes_record(trained_pico, tmp_path):
    r = subprocess.run([sys.executable, "-m", "edgekd.cli", "-q", "export", str(trained_pico[1]), "--layout", "tensorrt", "--check-batch", "64",
                        "--calib-images", "64", "--out", str(tmp_path / "o"), "--json"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "post-training quantization" in r.stderr  # loud: no QAD happened
    import json

    rec = json.loads(r.stdout.strip().splitlines()[-1])
    assert rec["checks"]["tensorrt_readiness"]["ok"] and Path(rec["path"]).is_file()
    # INT8 is compared with the FP32 student itself, not with its INT8 weights in float
    model = trained_pico[0]
    x = model.preprocess(torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))
    from edgekd.export import ort_logits

    with torch.no_grad():
        assert rec["fp32_reference"] == "student" and np.abs(ort_logits(rec["fp32_path"], x.numpy()) - model.eval()(x).numpy()).max() < 1e-4
    ptq = json.loads((tmp_path / "o" / "export.json").read_text())["ptq_calibration"]
    assert ptq == {"calibrator": "max", "calibrators_tried": {"max": ptq["calibrators_tried"]["max"]}}  # max was within a point: the only one tried


def test_export_of_an_fp32_checkpoint_calibrates_like_qad(trained_pico, fmnist_2000, tmp_path, monkeypatch):
    """PTQ at export takes the calibrator 'auto' too: when max loses more than a point on validation,
    the best of the four methods on validation is the one shipped."""
    from edgekd.config import ExportConfig
    from edgekd.export import run_export
    from edgekd.quantize import ptq

    monkeypatch.setattr(ptq, "AUTO_TOLERANCE_POINTS", -100.0)  # as if max had lost: every method is tried
    rec = run_export(ExportJob(ExportConfig(precision="int8", layout="tensorrt", check_batch=64), QuantizeConfig(calib_images=64), Path(trained_pico[1])), fmnist_2000, tmp_path / "o", StageContext())
    tried = rec["ptq_calibration"]["calibrators_tried"]
    assert list(tried) == ["max", "mse", "percentile", "entropy"] and rec["ptq_calibration"]["calibrator"] == max(tried, key=tried.get)


def test_entropy_skips_candidates_that_have_no_distribution():
    """An activation that never comes near zero leaves the first bins empty: the KL search's candidates
    clipped there have no distribution at all (0/0, a nan divergence). modelopt's argmin takes one of
    them, a range below every value (4.998 for values in [5, 6]); edgekd skips them, and warns nothing."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from modelopt.torch.quantization.calib.histogram import _compute_amax_entropy

    from edgekd.quantize.calibrate import amax_with_least_kl_divergence

    values = np.random.default_rng(0).uniform(5.0, 6.0, 50_000)
    hist, edges = np.histogram(np.concatenate([[0.0], values]), bins=2048)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        amax = float(amax_with_least_kl_divergence(hist, edges, 8, True))
    assert float(_compute_amax_entropy(hist.copy(), edges, 8, True)) < 5.0 <= amax, amax
