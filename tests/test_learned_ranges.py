"""Learned activation ranges in QAD (LSQ): the training fake-quant is modelopt's own arithmetic,
its gradient reaches the range, and QAD ships the ranges it trained (real pico_cnn, real data)."""

from __future__ import annotations

import copy

import pytest
import torch

from edgekd.config import DataConfig, QuantizeConfig, TrainConfig
from edgekd.data import calibration_images
from edgekd.data import load_data
from edgekd.quantize.modelopt_api import tensor_quantizer_cls
from edgekd.quantize import activation_quantizers, for_target, load_quantized, QadJob, quantize_model, run_qad
from edgekd.quantize.ranges import LearnedRanges, learning_ranges
from edgekd.train import cross_entropy_loss
from pathlib import Path
from edgekd.targets import host_arch
from edgekd.stage_context import StageContext
from needs import skip_without_fmnist


def _quantizer(amax: float, unsigned: bool = False):
    from modelopt.torch.quantization.config import QuantizerAttributeConfig

    return tensor_quantizer_cls()(QuantizerAttributeConfig(num_bits=8, axis=None, unsigned=unsigned), amax=amax)


@pytest.mark.parametrize("unsigned", [False, True])
def test_learned_fake_quant_is_modelopts_arithmetic(unsigned):
    torch.manual_seed(0)
    x = torch.randn(4, 8, 5, 5) * 3
    x = x.abs() if unsigned else x
    q = _quantizer(4.0, unsigned)  # clips the tail: both the clamp and the rounding are compared
    expected = q(x)
    ranges = LearnedRanges({"q": q}, lr_scale=1.0)
    with learning_ranges(ranges):
        got = q(x)
    assert q.backend is None and "_amax" in dict(q.named_buffers()), "after training the quantizer is modelopt's again"
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("start,direction", [(60.0, "narrows"), (0.3, "widens")])
def test_range_learns_toward_less_quantization_error(start, direction):
    """A range far too wide wastes the grid (rounding error), one far too narrow clips: the LSQ
    gradient moves each toward less error, and the quantizer holds the trained range afterwards."""
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((4096,))
    q = _quantizer(start)
    ranges = LearnedRanges({"q": q}, lr_scale=1.0)
    opt = torch.optim.Adam(ranges.parameters(), lr=0.05)
    with learning_ranges(ranges):
        with torch.no_grad():
            before = float(((q(x) - x) ** 2).mean())
        for _ in range(150):
            loss = ((q(x) - x) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            after = float(((q(x) - x) ** 2).mean())
    amax = float(q.amax)
    assert after < 0.5 * before
    assert (amax < start) if direction == "narrows" else (amax > start)
    assert amax == pytest.approx(float(ranges.log_amax[0].detach().exp()), rel=1e-6)


@pytest.fixture(scope="module")
def small():
    skip_without_fmnist()
    return load_data(DataConfig(train_subset=512, test_subset=128), 0)


def _qad(ckpt, small, out, learn: bool):
    cfg = QuantizeConfig(calib_images=128, calibrator="max", learn_ranges=learn, range_lr=0.05,
                         train=TrainConfig(epochs=1, batch_size=64, lr=1e-4, weight_decay=0.0, warmup_epochs=0.0))
    return run_qad(QadJob(for_target(cfg, "tensorrt", host_arch()), Path(ckpt), lambda model: (cross_entropy_loss(), None)), small, out, StageContext(data_cfg=DataConfig(augment="none")))


def test_qad_ships_the_ranges_it_trained(pico_2000_ckpt, small, tmp_path):
    from edgekd.models import model_from_checkpoint

    fp32 = model_from_checkpoint(pico_2000_ckpt)
    calibrated = quantize_model(copy.deepcopy(fp32), QuantizeConfig(calib_images=128, calibrator="max", layout="tensorrt"), calibration_images(small.train, 128, 0), fp32.preprocess)
    calib_amax = {n: float(q.amax) for n, q in activation_quantizers(calibrated).items()}

    learned = _qad(pico_2000_ckpt, small, tmp_path / "learned", learn=True)
    fixed = _qad(pico_2000_ckpt, small, tmp_path / "fixed", learn=False)
    assert learned["metrics"]["result"] == "QAD", "the test needs a QAD epoch that beats calibration"

    shipped = {n: float(q.amax) for n, q in activation_quantizers(load_quantized(learned["checkpoint"])).items()}
    kept = {n: float(q.amax) for n, q in activation_quantizers(load_quantized(fixed["checkpoint"])).items()}
    assert shipped.keys() == calib_amax.keys() == kept.keys()
    assert kept == pytest.approx(calib_amax, rel=1e-6), "without learn_ranges the calibrated ranges stay"
    moved = [n for n in calib_amax if abs(shipped[n] / calib_amax[n] - 1) > 0.01]
    assert len(moved) >= len(calib_amax) // 2, f"only {moved} of {list(calib_amax)} moved"
    record = learned["metrics"]["learned_ranges"]
    assert record["quantizers"] == len(calib_amax)
    assert record["lowest_ratio"] == pytest.approx(min(shipped[n] / calib_amax[n] for n in calib_amax), abs=1e-4)
    assert fixed["metrics"]["learned_ranges"] is None


def test_a_range_stops_at_its_inputs_upper_bound():
    """Data up to 12 wants a wider range, but the quantizer reads a ReLU6: its range stops at 6,
    where onnxruntime's file (which folds the ReLU6 into the Q after it) clips too."""
    x = torch.linspace(0, 12, 4096)
    q = _quantizer(5.0, unsigned=True)
    ranges = LearnedRanges({"q": q}, lr_scale=1.0, upper_bounds={"q": 6.0})
    opt = torch.optim.Adam(ranges.parameters(), lr=0.05)
    with learning_ranges(ranges):
        for _ in range(60):
            loss = ((q(x) - x) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert float(q(x).detach().max()) == pytest.approx(6.0)
    assert float(q.amax) == pytest.approx(6.0) and float(ranges.log_amax[0].detach().exp()) > 6.0


def test_placement_records_the_upper_bound_of_every_relu6_and_sigmoid_input(small):
    """EfficientNet-Lite0's inverted residuals end in ReLU6 (bound 6); MobileNetV3's SE gates are
    hard-sigmoids (bound 1). The bounds follow the quantizer's input, through pooling."""
    from edgekd.models import create_model

    for name, bound in (("efficientnet_lite0", 6.0), ("mobilenetv3_large_100", 1.0)):
        m = create_model(name, 10, input_size=32).eval()
        q = quantize_model(m, QuantizeConfig(layout="ort-cpu"), None, m.preprocess)
        mods = dict(q.named_modules())
        bounds = q.edgekd_placement["upper_bounds"]
        fed_by = {n.target: n.args[0] for n in q.graph.nodes if n.op == "call_module" and n.target.startswith("edgekd_act.")}
        bounded = {t for t, src in fed_by.items() if src.op == "call_module" and isinstance(mods[src.target], (torch.nn.ReLU6, torch.nn.Hardsigmoid))}
        assert bounded and all(bounds[t] == bound for t in bounded), name
        assert all(bounds.get(t) is None for t, src in fed_by.items() if src.op == "call_module" and isinstance(mods[src.target], torch.nn.Conv2d))
