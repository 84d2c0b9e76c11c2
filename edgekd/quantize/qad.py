"""Quantization-aware distillation (QAD): one pass quantizes the FP32 student, calibrates it
(:mod:`edgekd.quantize.ptq`) and trains the fake-quant model with the distillation loss, its
activation ranges learned with the weights (:mod:`edgekd.quantize.ranges`). A pass never hands
back a model worse on validation than the calibration it started from."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from edgekd import ui
from edgekd.config import QuantizeConfig
from edgekd.data import DataSet, Split
from edgekd.models import model_from_checkpoint
from edgekd.quantize.fakequant import QUANTIZED_KIND, activation_quantizers, enabled_quantizers, load_quantized, save_quantized
from edgekd.quantize.ptq import calibrate, calibration_split, selection_split, top1_on
from edgekd.quantize.ranges import LearnedRanges, amax_values, learnable, learning_ranges, range_changes
from edgekd.stage_context import StageContext
from edgekd.train import fit, FitOptions, seed_everything
from edgekd.train.env import on_main

LossFactory = Callable[[nn.Module], tuple[Callable, nn.Module | None]]
# (model, layers, validation images, work folder) -> top-1 points each layer gains on the exported file in float
ExportConfirm = Callable[[nn.Module, list[str], Split, Path], dict[str, float]]


@dataclass
class QadRun:
    """One student's quantization in progress: what its passes share."""

    student_ckpt: dict[str, Any]
    source: str
    cfg: QuantizeConfig
    data: DataSet
    make_loss: LossFactory
    ctx: StageContext = dataclasses.field(default_factory=StageContext)
    confirm: ExportConfirm | None = None


@dataclass
class QadPass:
    """One calibrate-then-QAD run and its validation figures (top-1 in [0, 1])."""

    result: Any  # edgekd.train.FitResult
    model: nn.Module  # the best checkpoint, loaded
    fp32_val: float
    ptq_val: float
    ptq_test: float
    val: float
    kept_calibrated: bool
    calibrators: dict[str, float] = dataclasses.field(default_factory=dict)  # validation top-1 of each calibrator tried
    ranges: dict[str, float] = dataclasses.field(default_factory=dict)  # how far QAD moved the activation ranges (ranges.range_changes)
    ptq_target: float | None = None  # PTQ top-1 on the labeled target-domain test set, when there is one (report only)


def keep_calibrated_if_better(model: nn.Module, calibrated: dict[str, torch.Tensor], ptq_val: float, result: Any, classes: list[str],
                              extra: dict[str, Any]) -> bool:
    """QAD must never hand back a worse model than the calibration it started from. When no epoch
    beat the calibrated (PTQ) model on validation (too little data, a teacher weaker than the
    student, a learning rate too high for the folded weights), best.pt becomes the calibrated model
    and the user is told."""
    qad_val = max((h["val_top1"] for h in result.history if h.get("val_top1") is not None), default=-1.0)
    if qad_val >= ptq_val:
        return False
    model.load_state_dict(calibrated)
    on_main(lambda: save_quantized(result.best_path, model, classes, {**extra, "metrics": {"val": {"top1": ptq_val}, "epoch": -1}}))
    ui.warn(f"quantization-aware distillation did not beat the calibrated INT8 model on validation ({qad_val:.4f} vs {ptq_val:.4f}); "
            "keeping the calibrated one. More data or epochs, a lower quantize.train.lr, or a stronger teacher may help")
    return True


def checkpoint_extra(job: QadRun) -> dict[str, Any]:
    return {"source_checkpoint": job.source, "config": {"quantize": job.cfg.model_dump(), "seed": job.ctx.seed}}


def qad_pass(job: QadRun, out_dir: Path, float_layers: list[str]) -> QadPass:
    """Quantize the FP32 student (``float_layers`` kept in higher precision), calibrate, train."""
    seed_everything(job.ctx.seed)
    data, cfg = job.data, job.cfg
    fp32_val = top1_on(model_from_checkpoint(job.student_ckpt), data.val, data.classes)
    model, calibrators = calibrate(job.student_ckpt, cfg, data, job.ctx.seed, float_layers, fp32_val)
    pre = model.preprocess
    scored_all = cfg.calibration != "target" and len(selection_split(data.val, cfg)) == len(data.val)  # QAD is compared with PTQ on the whole validation split
    ptq_val = calibrators[model.edgekd_quant["calibrator"]] if scored_all else top1_on(model, data.val, data.classes)
    ptq_test = top1_on(model, data.test, data.classes)  # test: for the report's PTQ row, never to choose
    ptq_target = top1_on(model, data.target_test, data.classes) if data.target_test is not None else None
    floats = f", {len(float_layers)} layer(s) in higher precision" if float_layers else ""
    ui.log(f"INT8 fake-quant: {len(enabled_quantizers(model))} quantizers{floats}, calibrator {model.edgekd_quant['calibrator']} on {min(cfg.calib_images, len(calibration_split(cfg, data)))} {cfg.calibration} images; "
           f"val top-1 FP32 {fp32_val:.4f} -> PTQ {ptq_val:.4f}")
    extra = checkpoint_extra(job)
    calibrated = copy.deepcopy(model.state_dict())
    loss_fn, extra_trainable = job.make_loss(model)
    per_tensor = learnable(activation_quantizers(model))
    calibrated_ranges = amax_values(per_tensor)
    ranges = LearnedRanges(per_tensor, cfg.range_lr / cfg.train.lr, model.edgekd_placement["upper_bounds"]) if cfg.learn_ranges else None
    parts = {"student": model, "distill": extra_trainable, "ranges": ranges}
    parts = {k: v for k, v in parts.items() if v is not None and (k == "student" or any(True for _ in v.parameters()))}
    trainable = nn.ModuleDict(parts) if len(parts) > 1 else None
    with learning_ranges(ranges) if ranges is not None else contextlib.nullcontext():
        opts = FitOptions(augment=job.ctx.augment, seed=job.ctx.seed, kind=QUANTIZED_KIND, resume=job.ctx.resume,
                          save_fn=lambda p, m, e: save_quantized(p, m, data.classes, e), ckpt_extra=extra, trainable=trainable,
                          description="quantization-aware distillation")
        result = fit(model, data, cfg.train, out_dir, loss_fn, pre, opts)
    if hasattr(loss_fn, "close"):
        loss_fn.close()
    kept = keep_calibrated_if_better(model, calibrated, ptq_val, result, data.classes, extra)
    best = load_quantized(result.best_path)
    moved = range_changes(calibrated_ranges, amax_values(activation_quantizers(best)))
    if ranges is not None and moved["quantizers"]:
        ui.log(f"activation ranges learned in QAD ({moved['quantizers']} quantizers): trained / calibrated amax median {moved['median_ratio']:.3f}, "
               f"from {moved['lowest_ratio']:.3f} to {moved['highest_ratio']:.3f}")
    return QadPass(result, best, fp32_val, ptq_val, ptq_test, top1_on(best, data.val, data.classes), kept, calibrators, moved, ptq_target)
