"""Stage: the control, the student trained alone on hard labels with the distilled student's budget.

Distillation is only worth its teacher if the distilled student beats this control, trained
from the same initialisation, seed, data order, augmentation and schedule. ``build`` reports the
difference and, by default, ships the better of the two on validation (``distill.ship``).
"""

from __future__ import annotations

from pathlib import Path

from edgekd import ui
from edgekd.config import StudentConfig
from edgekd.data import DataSet
from edgekd.models import count_params, create_student, load_checkpoint, model_from_checkpoint
from edgekd.stage_context import StageContext
from edgekd.train import cross_entropy_loss, final_metrics, fit, FitOptions, seed_everything


def run_control(student_cfg: StudentConfig, data: DataSet, out_dir: str | Path, ctx: StageContext) -> dict:
    """Train ``student_cfg``'s model on hard labels; writes best.pt/last.pt/metrics.json into ``out_dir``."""
    seed_everything(ctx.seed, ctx.deterministic)  # the same seed as distillation: the same initial weights and batches
    model = create_student(student_cfg.model, data.num_classes, data.channels, student_cfg.input_size, student_cfg.width, student_cfg.pretrained)
    ui.log(f"control: {student_cfg.model} alone on hard labels, {count_params(model):,} params at {student_cfg.input_size} px, weights {model.weights_source}")
    extra = {"config": {"student": student_cfg.model_dump(), "data": ctx.data_cfg.model_dump(), "seed": ctx.seed, "control": True}}
    result = fit(model, data, student_cfg.train, out_dir, cross_entropy_loss(student_cfg.train.label_smoothing), model.preprocess, FitOptions(augment=ctx.augment, seed=ctx.seed, kind="student", resume=ctx.resume, ckpt_extra=extra, description=f"control {student_cfg.model}"))
    best = model_from_checkpoint(load_checkpoint(result.best_path))
    metrics = final_metrics(best, data, best.preprocess, result, {"params": count_params(best), "model": student_cfg.model, "losses": ["ce"]})
    return {"checkpoint": str(result.best_path), "metrics_file": str(result.metrics_path), "metrics": metrics}
