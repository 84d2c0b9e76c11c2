"""Stage: quantize. INT8 fake-quant on the distilled FP32 student, calibration (PTQ), then
quantization-aware distillation (QAD); with an accuracy budget, the most sensitive layers are kept
in higher precision and QAD runs again with them excluded (:mod:`edgekd.quantize.sensitivity`).

QAD never hands back a model worse than the calibration it started from, and the mixed-precision
pass never one worse than full INT8: each choice is made on validation, and recorded.
"""

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
from edgekd.data import DataSet, Split, calibration_images
from edgekd.errors import EdgekdError
from edgekd.manifest import write_json_atomic
from edgekd.models import load_checkpoint
from edgekd.quantize.qad import QUANTIZED_KIND, activation_quantizers, enabled_quantizers, for_target, load_quantized, quantize_model, save_quantized
from edgekd.quantize.ranges import LearnedRanges, amax_values, learnable, learning_ranges, range_changes
from edgekd.quantize.sensitivity import (drop_unneeded, fit_accuracy_budget, float_layers_of, load_sensitivity, measure_sensitivity, refresh_weight_ranges,
                                         sensitivity_plot, set_float_layers)
from edgekd.targets import host_arch
from edgekd.train.env import on_main

LossFactory = Callable[[nn.Module], tuple[Callable, nn.Module | None]]
AUTO_CALIBRATORS = ("max", "mse", "percentile", "entropy")  # 'auto' tries the histogram ones only when max loses more than:
AUTO_TOLERANCE_POINTS = 1.0


@dataclass
class QadJob:
    """One student's quantization: everything the passes share."""

    student_ckpt: dict[str, Any]
    source: str
    cfg: QuantizeConfig
    data: DataSet
    make_loss: LossFactory
    seed: int = 0
    augment: str = "flip"
    resume: bool = True

    @property
    def layout(self) -> str:
        return self.cfg.layout if self.cfg.layout != "auto" else "tensorrt"


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


def top1_on(model: nn.Module, split: Split, classes: list[str]) -> float:
    from edgekd.train import evaluate

    return evaluate(model, split, model.preprocess, classes)["top1"]


def _checkpoint_extra(job: QadJob) -> dict[str, Any]:
    return {"source_checkpoint": job.source, "config": {"quantize": job.cfg.model_dump(), "seed": job.seed}}


def calibrate(student_ckpt: dict[str, Any], cfg: QuantizeConfig, data: DataSet, layout: str, seed: int = 0, float_layers: list[str] | None = None,
              fp32_val: float | None = None) -> tuple[nn.Module, dict[str, float]]:
    """INT8 fake-quant of the FP32 student, its activation ranges calibrated with ``cfg.calibrator``.
    'auto' starts with max (fast, never clips) and, when that loses more than a point of validation
    top-1 to ``fp32_val`` (measured when not given), also tries MSE, percentile and entropy and keeps
    the best on validation: networks with a few outlier activations (MobileNetV3's hard-swish and SE
    outputs) lose most of their accuracy to max ranges; QAD's learned ranges start from these, and a
    start that far down is a long way to travel in one epoch. Returns the model and each method's top-1.

    'auto' scores on ``cfg.select_images`` validation images (:func:`selection_split`):
    at 224 px each score on 6,000 images took minutes, four of them most of a quarter of an hour.
    ``fp32_val`` counts only when it was measured on that same split."""
    from edgekd.models import model_from_checkpoint

    score, reference = calibration_score(student_ckpt, cfg, data, seed, fp32_val)
    calib = calibration_images(calibration_split(cfg, data), cfg.calib_images, seed)
    tried: dict[str, float] = {}
    best = None
    for method in AUTO_CALIBRATORS if cfg.calibrator == "auto" else (cfg.calibrator,):
        fp32 = model_from_checkpoint(student_ckpt)  # quantize_model folds and rounds in place: a fresh copy each time
        model = quantize_model(fp32, cfg.model_copy(update={"calibrator": method}), calib, fp32.preprocess, layout, float_layers)
        tried[method] = score(model)
        if best is None or tried[method] > tried[best[0]]:
            best = (method, model)
        if method == "max" and 100 * (reference - tried[method]) <= AUTO_TOLERANCE_POINTS:
            break
    if len(tried) > 1:
        ui.log(f"calibrators on {'target agreement' if cfg.calibration == 'target' else 'validation'} (max lost more than a point): " + ", ".join(f"{k} {v:.4f}" for k, v in tried.items()) + f"; keeping {best[0]}")
    return best[1], tried


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
    from edgekd.models import model_from_checkpoint
    from edgekd.train import predict_logits

    if cfg.calibration == "target":
        probe = Split(calibration_images(calibration_split(cfg, data), cfg.calib_images, seed + 1), torch.full((min(cfg.calib_images, len(data.unlabeled)),), -1))
        fp32 = model_from_checkpoint(student_ckpt)
        ref = predict_logits(fp32, probe, fp32.preprocess).argmax(1)
        return (lambda m: float((predict_logits(m, probe, m.preprocess).argmax(1) == ref).float().mean())), 1.0
    split = selection_split(data.val, cfg)
    if fp32_val is None or len(split) < len(data.val):  # fp32_val counts only when measured on the same split
        fp32_val = top1_on(model_from_checkpoint(student_ckpt), split, data.classes) if cfg.calibrator == "auto" else 0.0
    return (lambda m: top1_on(m, split, data.classes)), fp32_val


def _qad_pass(job: QadJob, out_dir: Path, float_layers: list[str]) -> QadPass:
    """Quantize the FP32 student (``float_layers`` kept in higher precision), calibrate, train."""
    from edgekd.models import model_from_checkpoint
    from edgekd.train import fit, seed_everything

    seed_everything(job.seed)
    data, cfg = job.data, job.cfg
    fp32_val = top1_on(model_from_checkpoint(job.student_ckpt), data.val, data.classes)
    model, calibrators = calibrate(job.student_ckpt, cfg, data, job.layout, job.seed, float_layers, fp32_val)
    pre = model.preprocess
    scored_all = cfg.calibration != "target" and len(selection_split(data.val, cfg)) == len(data.val)  # QAD is compared with PTQ on the whole validation split
    ptq_val = calibrators[model.edgekd_quant["calibrator"]] if scored_all else top1_on(model, data.val, data.classes)
    ptq_test = top1_on(model, data.test, data.classes)  # test: for the report's PTQ row, never to choose
    ptq_target = top1_on(model, data.target_test, data.classes) if data.target_test is not None else None
    floats = f", {len(float_layers)} layer(s) in higher precision" if float_layers else ""
    ui.log(f"INT8 fake-quant: {len(enabled_quantizers(model))} quantizers{floats}, calibrator {model.edgekd_quant['calibrator']} on {min(cfg.calib_images, len(calibration_split(cfg, data)))} {cfg.calibration} images; "
           f"val top-1 FP32 {fp32_val:.4f} -> PTQ {ptq_val:.4f}")
    extra = _checkpoint_extra(job)
    calibrated = copy.deepcopy(model.state_dict())
    loss_fn, extra_trainable = job.make_loss(model)
    per_tensor = learnable(activation_quantizers(model))
    calibrated_ranges = amax_values(per_tensor)
    ranges = LearnedRanges(per_tensor, cfg.range_lr / cfg.train.lr, model.edgekd_placement["upper_bounds"]) if cfg.learn_ranges else None
    parts = {"student": model, "distill": extra_trainable, "ranges": ranges}
    parts = {k: v for k, v in parts.items() if v is not None and (k == "student" or any(True for _ in v.parameters()))}
    trainable = nn.ModuleDict(parts) if len(parts) > 1 else None
    with learning_ranges(ranges) if ranges is not None else contextlib.nullcontext():
        result = fit(model, data, cfg.train, out_dir, loss_fn, pre, augment=job.augment, seed=job.seed, kind=QUANTIZED_KIND, resume=job.resume,
                     save_fn=lambda p, m, e: save_quantized(p, m, data.classes, e), ckpt_extra=extra, trainable=trainable,
                     description="quantization-aware distillation")
    if hasattr(loss_fn, "close"):
        loss_fn.close()
    kept = keep_calibrated_if_better(model, calibrated, ptq_val, result, data.classes, extra)
    best = load_quantized(result.best_path)
    moved = range_changes(calibrated_ranges, amax_values(activation_quantizers(best)))
    if ranges is not None and moved["quantizers"]:
        ui.log(f"activation ranges learned in QAD ({moved['quantizers']} quantizers): trained / calibrated amax median {moved['median_ratio']:.3f}, "
               f"from {moved['lowest_ratio']:.3f} to {moved['highest_ratio']:.3f}")
    return QadPass(result, best, fp32_val, ptq_val, ptq_test, top1_on(best, data.val, data.classes), kept, calibrators, moved, ptq_target)


def confirm_on_export(model: nn.Module, layers: list[str], split: Split, layout: str, workdir: Path) -> dict[str, float]:
    """Top-1 points gained on the *exported* file (onnxruntime) when each of ``layers`` alone runs
    in float: the fake-quant ranking checked against the runtime's own arithmetic."""
    import tempfile

    from edgekd.export import export_int8_ort, export_int8_tensorrt, ort_logits  # the check needs the exporter: a deliberate back-reference

    pre, labels, before = model.preprocess, split.labels.numpy(), float_layers_of(model)
    x = pre(split.images).numpy()

    def exported_top1(float_set: list[str]) -> float:
        set_float_layers(model, float_set)
        with tempfile.TemporaryDirectory(dir=workdir) as td:
            path = Path(td) / "m.onnx"
            if layout == "tensorrt":
                export_int8_tensorrt(model, path, pre)
            else:
                export_int8_ort(model, path, pre, split.images[:256])
            return float((ort_logits(path, x, exact_qdq=layout == "tensorrt").argmax(1) == labels).mean())

    try:
        base = exported_top1(before)
        return {layer: round(100 * (exported_top1([*before, layer]) - base), 3) for layer in layers}
    finally:
        set_float_layers(model, before)


def search_float_layers(model: nn.Module, cfg: QuantizeConfig, data: DataSet, layout: str, out_dir: Path, fp32_val: float) -> dict[str, Any]:
    """Per-layer sensitivity on ``cfg.sensitivity_images`` validation images (the top 3 confirmed
    on the exported file), then the fewest layers in float that bring validation top-1 within
    ``cfg.max_accuracy_drop`` points of ``fp32_val``. Leaves ``model`` with that set; writes
    ``sensitivity.json`` and ``sensitivity.png`` into ``out_dir``; returns the record."""
    if cfg.sensitivity_file:
        sens = load_sensitivity(cfg.sensitivity_file, model)
        ui.log(f"per-layer sensitivity from {cfg.sensitivity_file} ({len(sens.layers)} layers, not measured again)")
    else:
        probe = data.val.subset(cfg.sensitivity_images)
        sens = measure_sensitivity(model, lambda m: top1_on(m, probe, data.classes), len(probe), cfg.exclude)
        for layer, gain in confirm_on_export(model, sens.ranking()[:3], probe, layout, out_dir).items():
            next(r for r in sens.layers if r.layer == layer).exported_gain = gain
    helpful = [r.layer for r in sens.layers if r.float_gain > 0]  # layers whose float copy lost nothing alone are not worth a try
    search = fit_accuracy_budget(model, helpful, lambda m: top1_on(m, data.val, data.classes), fp32_val, cfg.max_accuracy_drop, cfg.exclude)
    on_main(lambda: (write_json_atomic(out_dir / "sensitivity.json", {"sensitivity": sens.to_dict(), "search": search.to_dict()}),
                     sensitivity_plot(sens, out_dir / "sensitivity.png")))
    drop = round(100 * (fp32_val - search.top1), 3)
    return {"budget_points": cfg.max_accuracy_drop, "met": search.met, "val_drop_points": drop, "float_layers": search.float_layers,
            "sensitivity": [r.__dict__ for r in sens.layers[:20]], "search_steps": search.steps, "sensitivity_file": str(out_dir / "sensitivity.json")}


def _retry_in_int8(job: QadJob, mixed: QadPass) -> tuple[QadPass, list[dict[str, Any]]]:
    """QAD with the chosen layers in float retrains every other layer around them, so a layer the
    first pass needed may not be needed any more. Each goes back to INT8 in turn (its weight range
    from its retrained weights, its input's range from the calibration), the last added first, and
    stays in INT8 when validation still fits the budget: each float layer left costs a DQ/Q round
    trip (MobileNetV3-Large at budget 0.3: 6 float layers before, 2 after; benchmarks/mixed_precision_results.md).
    The checkpoint is rewritten when a layer went back; returns the pass and the steps tried."""
    model, before, steps = mixed.model, float_layers_of(mixed.model), []
    pinned = set(job.cfg.exclude)
    if not set(before) - pinned:
        return mixed, steps
    refresh_weight_ranges(model, before)
    data, fp32_top1 = job.data, mixed.fp32_val
    kept, top1 = drop_unneeded(model, before, mixed.val, pinned, lambda m: top1_on(m, data.val, data.classes), fp32_top1,
                               job.cfg.max_accuracy_drop, steps)
    set_float_layers(model, kept)
    if kept == before:
        return mixed, steps
    ui.log(f"after retraining, {len(before) - len(kept)} of the {len(before)} float layer(s) went back to INT8 within the budget "
           f"(val top-1 {mixed.val:.4f} -> {top1:.4f}); {len(kept)} stay in higher precision")
    on_main(lambda: save_quantized(mixed.result.best_path, model, data.classes, {**_checkpoint_extra(job), "metrics": {"val": {"top1": top1}, "epoch": -1}}))
    return dataclasses.replace(mixed, val=top1), steps


def _meet_budget(job: QadJob, first: QadPass, out_dir: Path) -> tuple[QadPass, dict[str, Any]]:
    """Keep the fewest, most sensitive layers in higher precision until INT8 is within the budget
    of FP32 on validation, then QAD again with them excluded (into ``out_dir/mixed``)."""
    budget, drop = job.cfg.max_accuracy_drop, 100 * (first.fp32_val - first.val)
    record: dict[str, Any] = {"budget_points": budget, "full_int8_val_drop_points": round(drop, 3)}
    if drop <= budget:
        ui.log(f"INT8 is within the accuracy budget: {drop:.2f} <= {budget:g} points below FP32 on validation; no layer needs higher precision")
        return first, {**record, "met": True, "val_drop_points": round(drop, 3), "float_layers": float_layers_of(first.model)}
    ui.log(f"INT8 loses {drop:.2f} points on validation, over the budget of {budget:g}: measuring per-layer sensitivity")
    pinned = float_layers_of(first.model)
    record.update(search_float_layers(first.model, job.cfg, job.data, job.layout, out_dir, first.fp32_val))
    set_float_layers(first.model, pinned)  # first.model stays what its checkpoint holds
    floats = record["float_layers_before_retraining"] = record["float_layers"]
    ui.log(f"keeping {len(floats)} layer(s) in higher precision ({', '.join(floats[:5])}{' ...' if len(floats) > 5 else ''}); "
           "quantization-aware distillation again with them excluded")
    second = _qad_pass(job, out_dir / "mixed", floats)
    second, record["after_retraining"] = _retry_in_int8(job, second)
    chosen = second if second.val >= first.val else first
    final_drop = 100 * (chosen.fp32_val - chosen.val)
    met = final_drop <= budget
    if not met:
        ui.warn(f"accuracy budget not met: the best found loses {final_drop:.2f} points (budget {budget:g}) on validation with "
                f"{len(float_layers_of(chosen.model))} layer(s) in higher precision; raise --max-accuracy-drop, train longer, or pin layers with --exclude")
    return chosen, {**record, "met": met, "val_drop_points": round(final_drop, 3), "float_layers": float_layers_of(chosen.model),
                    "mixed_val_top1": second.val, "full_int8_val_top1": first.val}


def run_qad(student_ckpt: str | Path, cfg: QuantizeConfig, data: DataSet, out_dir: str | Path, make_loss: LossFactory, seed: int = 0,
            augment: str = "flip", resume: bool = True) -> dict[str, Any]:
    """Quantize a distilled FP32 student, calibrate, fine-tune; writes best.pt/last.pt (and with an
    accuracy budget that full INT8 misses, ``mixed/best.pt`` and ``sensitivity.json/.png``).

    ``make_loss(quantized_student) -> (loss_fn, extra_trainable or None)`` is called after the
    quantizers are in, so feature hooks attach to the quantized modules (e.g.
    ``edgekd.distill.build_distill_loss`` with the FP32 teacher).

    Returns the FP32 and fake-quant accuracies before and after fine-tuning, so the cost of
    INT8 and what QAD recovered are both on record.
    """
    from edgekd.train import final_metrics

    ckpt = load_checkpoint(student_ckpt)
    if ckpt.get("quantize"):
        raise EdgekdError(f"{student_ckpt} is already quantized", "pass the FP32 student from `edgekd distill`")
    cfg = for_target(cfg, "tensorrt", host_arch())  # what a caller without a target left unset: this machine's
    out = Path(out_dir)
    job = QadJob(ckpt, str(student_ckpt), cfg, data, make_loss, seed, augment, resume)
    chosen = first = _qad_pass(job, out, list(cfg.exclude))
    job.cfg = cfg.model_copy(update={"calibrator": first.model.edgekd_quant["calibrator"]})  # a second (mixed-precision) pass calibrates the same way
    budget = None
    if cfg.max_accuracy_drop is not None:
        chosen, budget = _meet_budget(job, first, out)
    best = chosen.model
    extra = {"fp32_val_top1": first.fp32_val, "ptq_val_top1": first.ptq_val, "ptq_test_top1": first.ptq_test, "ptq_target_top1": first.ptq_target,
             "calibration": cfg.calibration, "calibrator": job.cfg.calibrator,
             "calibrators_tried": first.calibrators, "learned_ranges": chosen.ranges if cfg.learn_ranges else None,
             "quantizers": len(enabled_quantizers(best)), "result": "calibrated (PTQ)" if chosen.kept_calibrated else "QAD",
             "float_layers": float_layers_of(best), "accuracy_budget": budget}
    if chosen is not first:
        extra["full_int8_test_top1"] = top1_on(first.model, data.test, data.classes)
    metrics = final_metrics(best, data, best.preprocess, chosen.result, extra)
    return {"checkpoint": str(chosen.result.best_path), "last": str(chosen.result.last_path), "metrics_file": str(chosen.result.metrics_path), "metrics": metrics}
