"""Stage: quantize. INT8 fake-quant on the distilled FP32 student, calibration (PTQ), then
quantization-aware distillation (QAD); with an accuracy budget, the most sensitive layers are kept
in higher precision and QAD runs again with them excluded (:mod:`edgekd.quantize.sensitivity`).

QAD never hands back a model worse than the calibration it started from, and the mixed-precision
pass never one worse than full INT8: each choice is made on validation, and recorded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekd.config import QuantizeConfig
from edgekd.data import DataSet
from edgekd.errors import EdgekdError
from edgekd.models import load_checkpoint
from edgekd.quantize.budget import meet_budget
from edgekd.quantize.fakequant import enabled_quantizers
from edgekd.quantize.ptq import top1_on
from edgekd.quantize.qad import ExportConfirm, LossFactory, QadRun, qad_pass
from edgekd.quantize.sensitivity import float_layers_of
from edgekd.stage_context import StageContext
from edgekd.train import final_metrics


@dataclass(frozen=True)
class QadJob:
    """The qad stage's job: the FP32 student to quantize, how, and with which loss."""

    quantize: QuantizeConfig  # resolved for a target (:func:`~edgekd.quantize.fakequant.for_target`): its layout is not 'auto'
    student: Path  # the FP32 student checkpoint (from distill)
    make_loss: LossFactory
    confirm: ExportConfirm | None = None  # checks an accuracy budget's ranking on the exported file (edgekd.export.confirm_on_export)


def check_resolved(cfg: QuantizeConfig) -> None:
    """The layout is decided once, for a target, before any quantizer is placed: never guessed here."""
    if cfg.layout == "auto" or cfg.weight_bits is None:
        raise EdgekdError("quantize.layout / weight_bits are not resolved for a target",
                          "call edgekd.quantize.for_target(cfg, layout, arch) first (the CLI does: --target or --layout)")


def run_qad(job: QadJob, data: DataSet, out_dir: str | Path, ctx: StageContext) -> dict[str, Any]:
    """Quantize a distilled FP32 student, calibrate, fine-tune; writes best.pt/last.pt (and with an
    accuracy budget that full INT8 misses, ``mixed/best.pt`` and ``sensitivity.json/.png``).

    ``job.make_loss(quantized_student) -> (loss_fn, extra_trainable or None)`` is called after the
    quantizers are in, so feature hooks attach to the quantized modules (e.g.
    ``edgekd.distill.build_distill_loss`` with the FP32 teacher).

    Returns the FP32 and fake-quant accuracies before and after fine-tuning, so the cost of
    INT8 and what QAD recovered are both on record.
    """
    cfg = job.quantize
    check_resolved(cfg)
    ckpt = load_checkpoint(job.student)
    if ckpt.get("quantize"):
        raise EdgekdError(f"{job.student} is already quantized", "pass the FP32 student from `edgekd distill`")
    out = Path(out_dir)
    run = QadRun(ckpt, str(job.student), cfg, data, job.make_loss, ctx, job.confirm)
    chosen = first = qad_pass(run, out, list(cfg.exclude))
    run.cfg = cfg.model_copy(update={"calibrator": first.model.edgekd_quant["calibrator"]})  # a second (mixed-precision) pass calibrates the same way
    budget = None
    if cfg.max_accuracy_drop is not None:
        chosen, budget = meet_budget(run, first, out)
    best = chosen.model
    extra = {"fp32_val_top1": first.fp32_val, "ptq_val_top1": first.ptq_val, "ptq_test_top1": first.ptq_test, "ptq_target_top1": first.ptq_target,
             "calibration": cfg.calibration, "calibrator": run.cfg.calibrator,
             "calibrators_tried": first.calibrators, "learned_ranges": chosen.ranges if cfg.learn_ranges else None,
             "quantizers": len(enabled_quantizers(best)), "result": "calibrated (PTQ)" if chosen.kept_calibrated else "QAD",
             "float_layers": float_layers_of(best), "accuracy_budget": budget}
    if chosen is not first:
        extra["full_int8_test_top1"] = top1_on(first.model, data.test, data.classes)
    metrics = final_metrics(best, data, best.preprocess, chosen.result, extra)
    return {"checkpoint": str(chosen.result.best_path), "last": str(chosen.result.last_path), "metrics_file": str(chosen.result.metrics_path), "metrics": metrics}
