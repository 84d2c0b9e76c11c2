"""One distillation run: teachers (checkpoints) into a fresh student with the recipe's losses
(:func:`run_distill`), and what every distillation mode shares (the job, the student's name check,
the stage's time limit). The losses and the teacher-output cache: :mod:`edgekd.distill.stage`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn as nn

from edgekd import ui
from edgekd.config import DistillConfig, StudentConfig, TrainConfig
from edgekd.data import DataSet
from edgekd.distill.objective import build_distill_loss, teacher_weights
from edgekd.distill.teachers import Teacher, check_teachers_stronger, load_teacher, measure_teachers, warn_flat_soft_targets
from edgekd.errors import EdgekdError
from edgekd.models import check_model_name, count_params, create_model, create_student, load_checkpoint, model_from_checkpoint, safe_torch_load
from edgekd.stage_context import StageContext
from edgekd.train import device as train_device, final_metrics, fit, FitOptions, seed_everything


def make_student(student_cfg: StudentConfig, data: DataSet, teachers: list[Teacher], self_distill: bool, init: str) -> nn.Module:
    """A fresh student: the configured one at the dataset's channels, or (born-again) a copy of the
    teacher's architecture, freshly initialised or (``init="teacher"``) starting from its weights."""
    if self_distill:
        t = teachers[0]
        model = create_model(t.spec["name"], data.num_classes, "none", in_chans=t.spec["in_chans"], width=t.spec.get("width", 1.0), input_size=t.preprocess.input_size)
        model.preprocess = t.preprocess
        if init == "teacher":
            model.load_state_dict(t.model.state_dict())
        return model
    return create_student(student_cfg.model, data.num_classes, data.channels, student_cfg.input_size, student_cfg.width, student_cfg.pretrained)


def born_again_note(self_distill: bool, init: str) -> str:
    if not self_distill:
        return ""
    return " (born-again copy of the teacher, from its weights)" if init == "teacher" else " (born-again copy of the teacher, fresh init)"


def check_resume_matches(last: Path, extra: dict) -> None:
    """Refuse to resume a run that distilled with other losses, teachers or data settings (fit only checks the optimiser settings)."""
    if not last.is_file():
        return
    ckpt = safe_torch_load(last, "resume checkpoint")
    old = ckpt.get("config", {}) if isinstance(ckpt, dict) else {}
    same = (old.get("distill") == extra["config"]["distill"] and old.get("data") == extra["config"]["data"]
            and [t.get("sha256") for t in ckpt.get("teachers", [])] == [t["sha256"] for t in extra["teachers"]])
    if not same:
        raise EdgekdError(f"{last} was written by a distillation with other losses, teachers or data", "use a fresh --out folder, or pass --no-resume to start over")


@dataclass(frozen=True)
class DistillJob:
    """The distill stage's job: the student to train, how, and from which teachers (checkpoints)."""

    student: StudentConfig
    distill: DistillConfig
    teachers: tuple[Path, ...] = ()
    self_distill: bool = False  # born-again: a copy of the one teacher's architecture (see DistillConfig.born_again_init)


def _check_teachers(job: DistillJob) -> None:
    if not job.teachers:
        raise EdgekdError("distillation needs at least one teacher", "pass --teacher PATH (a checkpoint from `edgekd finetune`)")
    if job.self_distill and len(job.teachers) != 1:
        raise EdgekdError(f"self-distillation takes exactly one teacher, got {len(job.teachers)}", "pass one --teacher: the trained student to teach a fresh copy of itself")
    if not job.self_distill:
        check_model_name("student", job.student.model)


def within_stage_limit(train_cfg: TrainConfig, started: float, share: float = 1.0) -> TrainConfig:
    """``share`` of the training time limit less what the stage already spent since ``started``
    (teacher-output cache, teacher measurements, an assistant link): a build's time share covers
    the whole stage, not only its epochs."""
    if not train_cfg.time_limit_s:
        return train_cfg
    left = max(10.0, (train_cfg.time_limit_s - (time.time() - started)) * share)
    return train_cfg.model_copy(update={"time_limit_s": round(left, 1)})


def run_distill(job: DistillJob, data: DataSet, out_dir: str | Path, ctx: StageContext) -> dict:
    """Distil ``job.teachers`` into a student; writes ``best.pt``, ``last.pt`` and ``metrics.json`` into ``out_dir``.

    With ``job.self_distill`` (born-again networks, Furlanello et al. 2018) the single teacher must
    be a trained student and the new student is a copy of its architecture, starting from its
    weights or fresh (``distill.born_again_init``).
    """
    student_cfg, distill_cfg, started = job.student, job.distill, time.time()
    _check_teachers(job)
    seed_everything(ctx.seed, ctx.deterministic)
    loaded = [load_teacher(p) for p in job.teachers]
    teacher_weights(distill_cfg, len(loaded))
    if job.self_distill and student_cfg.model != loaded[0].spec["name"]:
        ui.log(f"self-distillation: the student is a fresh {loaded[0].spec['name']} like the teacher (student.model={student_cfg.model} is ignored)")
    student = make_student(student_cfg, data, loaded, job.self_distill, distill_cfg.born_again_init)
    dev = train_device()
    student.to(dev)
    loss_fn, adapters = build_distill_loss(student, loaded, distill_cfg, data, ctx.cache_dir, ctx.augment, dev)  # validates, then caches
    teacher_records = measure_teachers(loaded, data, distill_cfg.temperature)
    warn_flat_soft_targets(loaded, teacher_records, distill_cfg)
    ui.log(f"student {student.edgekd_spec['name']}{born_again_note(job.self_distill, distill_cfg.born_again_init)}: {count_params(student):,} params at "
           f"{student.preprocess.input_size} px; teachers {', '.join(t.name for t in loaded)}; losses {'+'.join(distill_cfg.losses)}; "
           f"data {data.name}: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test")
    extra = {"config": {"student": student_cfg.model_dump(), "distill": distill_cfg.model_dump(), "data": ctx.data_cfg.model_dump(), "seed": ctx.seed,
                        "self_distill": job.self_distill},
             "teachers": [t.describe() for t in loaded]}
    train_cfg = within_stage_limit(student_cfg.train, started)
    result = _train_student(student, adapters, loss_fn, train_cfg, data, out_dir, extra, ctx)
    return _finish(result, loss_fn, loaded, teacher_records, distill_cfg, data, job.self_distill)


def _train_student(student: nn.Module, adapters: nn.Module, loss_fn: Any, train_cfg: TrainConfig, data: DataSet, out_dir: str | Path, extra: dict,
                   ctx: StageContext) -> Any:
    """``fit`` the student with the distillation loss; refuses to resume another distillation's
    ``last.pt`` (``extra`` is what every checkpoint records: configs and teachers)."""
    trainable = nn.ModuleDict({"student": student, "distill": adapters}) if len(adapters) else None
    if ctx.resume:
        check_resume_matches(Path(out_dir) / "last.pt", extra)
    try:
        return fit(student, data, train_cfg, out_dir, loss_fn, student.preprocess, FitOptions(augment=ctx.augment, seed=ctx.seed, kind="student", resume=ctx.resume, ckpt_extra=extra, trainable=trainable, description=f"distill {student.edgekd_spec['name']}"))
    finally:
        loss_fn.close()


def _finish(result: Any, loss_fn: Any, loaded: list[Teacher], teacher_records: list, distill_cfg: DistillConfig, data: DataSet, self_distill: bool) -> dict:
    """Metrics of the best checkpoint (val, test, loss parts, teachers) and the stage's outputs."""
    best = model_from_checkpoint(load_checkpoint(result.best_path))
    teacher_mode = ["cached" if c is not None else "online" for c in loss_fn.caches]
    metrics = final_metrics(best, data, best.preprocess, result, {
        "params": count_params(best), "model": best.edgekd_spec["name"], "losses": list(distill_cfg.losses), "loss_parts": loss_fn.parts(),
        "self_distill": self_distill, "teachers": [{**t.describe(), "outputs": m} for t, m in zip(loaded, teacher_mode)],
        "teacher_cache_seconds": round(sum(c.seconds for c in loss_fn.caches if c is not None), 2),
    })
    check_teachers_stronger(teacher_records, metrics, born_again=self_distill)
    return {"checkpoint": str(result.best_path), "last": str(result.last_path), "metrics_file": str(result.metrics_path), "metrics": metrics}
