"""Post-training quantization: the FP32 student's INT8 fake-quant, its activation ranges calibrated,
and for ``calibrator: auto`` the calibrator chosen on a bounded validation subset (or, with
``calibration: target``, on agreement with FP32 on the deployment domain's unlabeled images)."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from edgekd import ui
from edgekd.config import QuantizeConfig
from edgekd.data import DataSet, Split, calibration_images
from edgekd.errors import EdgekdError
from edgekd.models import model_from_checkpoint
from edgekd.quantize.bias import bias_hooks
from edgekd.quantize.calibrate import forward_loop_over, histogram_amaxes, set_amaxes
from edgekd.quantize.fakequant import activation_quantizers, quantize_model
from edgekd.train import evaluate, predict_logits

AUTO_CALIBRATORS = ("max", "mse", "percentile", "entropy")  # 'auto' tries the histogram ones only when max loses more than:
AUTO_TOLERANCE_POINTS = 1.0


def top1_on(model: nn.Module, split: Split, classes: list[str]) -> float:
    return evaluate(model, split, model.preprocess, classes)["top1"]


def calibrate(student_ckpt: dict[str, Any], cfg: QuantizeConfig, data: DataSet, seed: int = 0, float_layers: list[str] | None = None,
              fp32_val: float | None = None) -> tuple[nn.Module, dict[str, float]]:
    """INT8 fake-quant of the FP32 student, its activation ranges calibrated with ``cfg.calibrator``.
    'auto' starts with max (fast, never clips) and, when that loses more than a point of validation
    top-1 to ``fp32_val`` (measured when not given), also tries MSE, percentile and entropy and keeps
    the best on validation: networks with a few outlier activations (MobileNetV3's hard-swish and SE
    outputs) lose most of their accuracy to max ranges; QAD's learned ranges start from these, and a
    start that far down is a long way to travel in one epoch. Returns the model and each method's top-1.

    'auto' scores on ``cfg.select_images`` validation images (:func:`selection_split`):
    at 224 px each score on 6,000 images took minutes, four of them most of a quarter of an hour.
    ``fp32_val`` counts only when it was measured on that same split. The layout is ``cfg.layout``
    (resolved for a target: :func:`~edgekd.quantize.fakequant.for_target`)."""

    score, reference = calibration_score(student_ckpt, cfg, data, seed, fp32_val)
    calib = calibration_images(calibration_split(cfg, data), cfg.calib_images, seed)
    first = "max" if cfg.calibrator == "auto" else cfg.calibrator
    fp32 = model_from_checkpoint(student_ckpt)  # quantize_model folds and rounds in place: a fresh copy
    model = quantize_model(fp32, cfg.model_copy(update={"calibrator": first}), calib, fp32.preprocess, float_layers)
    tried = {first: score(model)}
    if cfg.calibrator != "auto" or 100 * (reference - tried["max"]) <= AUTO_TOLERANCE_POINTS:
        return model, tried
    _best_histogram_ranges(model, calib, cfg.percentile, score, tried)
    ui.log(f"calibrators on {'target agreement' if cfg.calibration == 'target' else 'validation'} (max lost more than a point): "
           + ", ".join(f"{k} {v:.4f}" for k, v in tried.items()) + f"; keeping {model.edgekd_quant['calibrator']}")
    return model, tried


def _best_histogram_ranges(model: nn.Module, calib_u8: torch.Tensor, percentile: float, score: Callable[[nn.Module], float], tried: dict[str, float]) -> None:
    """Score each histogram method's activation ranges on the max-calibrated ``model`` (one histogram
    pass for all three, :func:`histogram_amaxes`) and leave the model with the best of all ``tried``.
    Only the ranges differ between calibrators: weights, placement and bias rounding are the same."""
    quantizers = list(activation_quantizers(model).values())
    ranges = {"max": [q.amax.detach().clone() for q in quantizers]}
    rounding = [hook for _, hook in bias_hooks(model)]  # off while collecting, as during the max calibration (ort-cpu layout)
    for hook in rounding:
        hook.enabled = False
    try:
        ranges |= histogram_amaxes(quantizers, model, forward_loop_over(calib_u8, model.preprocess), AUTO_CALIBRATORS[1:], percentile)
    finally:
        for hook in rounding:
            hook.enabled = True
    for method in AUTO_CALIBRATORS[1:]:
        set_amaxes(quantizers, ranges[method])
        tried[method] = score(model)
    best = max(tried, key=tried.get)  # the first of equal scores: max before the histogram methods
    set_amaxes(quantizers, ranges[best])
    model.edgekd_quant["calibrator"] = best


def selection_split(val: Split, cfg: QuantizeConfig) -> Split:
    """The validation images calibrator selection scores on: all of them for a single calibrator; for 'auto',
    a fixed random ``cfg.select_images`` of them (not the first ones: an image folder's split is sorted by class)."""
    if cfg.calibrator != "auto" or len(val) <= cfg.select_images:
        return val
    idx = torch.randperm(len(val), generator=torch.Generator().manual_seed(0))[: cfg.select_images].sort().values
    return Split(val.images[idx], val.labels[idx])


def calibration_split(cfg: QuantizeConfig, data: DataSet) -> Split:
    """The images activation ranges are calibrated on: training images, or (``calibration: target``) the unlabeled target images."""
    if cfg.calibration != "target":
        return data.train
    if data.unlabeled is None:
        raise EdgekdError("quantize.calibration=target needs unlabeled images from the deployment domain", "pass --unlabeled DIR, or set quantize.calibration=source")
    return data.unlabeled


def calibration_score(student_ckpt: dict[str, Any], cfg: QuantizeConfig, data: DataSet, seed: int, fp32_val: float | None) -> tuple[Callable, float]:
    """(how a calibrated model is scored, what FP32 scores): validation top-1 against the FP32 student's; with target
    calibration, top-1 agreement with the FP32 student on unlabeled target images (no labels there), FP32 scoring 1."""
    if cfg.calibration == "target":
        probe = Split(calibration_images(calibration_split(cfg, data), cfg.calib_images, seed + 1), torch.full((min(cfg.calib_images, len(data.unlabeled)),), -1))
        fp32 = model_from_checkpoint(student_ckpt)
        ref = predict_logits(fp32, probe, fp32.preprocess).argmax(1)
        return (lambda m: float((predict_logits(m, probe, m.preprocess).argmax(1) == ref).float().mean())), 1.0
    split = selection_split(data.val, cfg)
    if fp32_val is None or len(split) < len(data.val):  # fp32_val counts only when measured on the same split
        fp32_val = top1_on(model_from_checkpoint(student_ckpt), split, data.classes) if cfg.calibrator == "auto" else 0.0
    return (lambda m: top1_on(m, split, data.classes)), fp32_val
