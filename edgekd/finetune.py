"""The teacher stage: fine-tune a pretrained backbone into the teacher (transfer learning).

Two modes: ``full`` (every weight trains; best accuracy; ``frozen_stages`` keeps the stem and the
first stages as pretrained, for cheaper steps) and ``linear-probe`` (the backbone is frozen, only
the new classifier head trains; minutes instead of hours, and a sanity check that the pretrained
features are real); ``progressive`` unfreezes the backbone stage by stage from the top
(gradual unfreezing, :mod:`edgekd.transfer`). With unlabeled deployment-domain images,
``teacher.mmd`` aligns the teacher's features on both domains.
"""

from __future__ import annotations

from pathlib import Path

from edgekd import ui
from edgekd.config import TeacherConfig
from edgekd.data import DataSet
from edgekd.stage_context import StageContext
from edgekd.models import count_params, create_model, load_checkpoint, model_from_checkpoint, set_trainable
from edgekd.train import final_metrics, fit, FitOptions, seed_everything
from edgekd.transfer import GradualUnfreezing, planned_steps, teacher_loss


def run_finetune(cfg: TeacherConfig, data: DataSet, out_dir: str | Path, ctx: StageContext) -> dict:
    """Train the teacher; writes ``best.pt``, ``last.pt`` and ``metrics.json`` into ``out_dir``."""
    seed_everything(ctx.seed, ctx.deterministic)
    model = create_model(cfg.model, data.num_classes, pretrained=cfg.pretrained, input_size=cfg.input_size)
    trainable = set_trainable(model, cfg.mode, cfg.frozen_stages)  # frozen_stages applies to modes full and progressive
    if cfg.mode == "linear-probe" and not cfg.train.freeze_bn:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"freeze_bn": True})})  # a frozen backbone keeps its BN statistics too
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    unfreeze = GradualUnfreezing(model, planned_steps(cfg.train, len(data.train)), cfg.train.time_limit_s, frozen) if cfg.mode == "progressive" else None
    ui.log(f"teacher {cfg.model}: {count_params(model):,} params ({trainable:,} trainable, {cfg.mode}), weights {model.weights_source}, "
           f"data {data.name}: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test")
    extra = {"config": {"teacher": cfg.model_dump(), "data": ctx.data_cfg.model_dump(), "seed": ctx.seed}, "weights_source": model.weights_source}
    loss_fn, hook = teacher_loss(model, cfg, data, unfreeze)
    try:
        result = fit(model, data, cfg.train, out_dir, loss_fn, model.preprocess, FitOptions(augment=ctx.augment, seed=ctx.seed, kind="teacher", resume=ctx.resume, ckpt_extra=extra, description=f"fine-tune {cfg.model}"))
    finally:
        if hook is not None:
            hook.remove()
    best = model_from_checkpoint(load_checkpoint(result.best_path))
    metrics = final_metrics(best, data, best.preprocess, result, {"params": count_params(best), "model": cfg.model, "mode": cfg.mode, "weights_source": model.weights_source,
                                                                  "unfreezing": unfreeze.history if unfreeze else None})
    return {"checkpoint": str(result.best_path), "last": str(result.last_path), "metrics_file": str(result.metrics_path), "metrics": metrics}
