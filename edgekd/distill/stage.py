"""Stage: distill. One or more teachers into a small student (:func:`run_distill`).

Losses (each a small ``nn.Module`` whose docstring gives its formula and paper):

- :class:`KDLoss`: soft targets at temperature T (Hinton, Vinyals & Dean 2015, "Distilling the
  Knowledge in a Neural Network"); several teachers are averaged with weights (:func:`soft_targets`).
- :class:`HintLoss`: FitNets hints (Romero et al. 2015) with a learned 1x1 adapter.
- :class:`RKDLoss`: relational KD, distance + angle (Park et al. 2019, "Relational Knowledge Distillation").
- :class:`AttentionTransferLoss`: activation-based attention transfer (Zagoruyko & Komodakis 2017).
- Born-again self-distillation (Furlanello et al. 2018): ``run_distill(..., self_distill=True)``.
- Teacher-assistant chains (Mirzadeh et al. 2020, ``assistant.py``) and Deep Mutual Learning
  (Zhang et al. 2018, :class:`MutualLoss`, ``mutual.py``): ``distill.mode``, see :func:`run_distill_mode`.
- Cross-resolution (the image case of cross-modal distillation): the teacher sees the image at its
  own, larger input size and the student at the size the device affords; logits need no alignment
  and the feature losses pool the larger map to the smaller (:func:`match_spatial`).

Features are found by module path through forward hooks (:class:`FeatureHook`, torchdistill's way),
so no model code changes. :class:`DistillLoss` is the weighted sum of named terms and keeps each
term's running mean for logging. :func:`build_distill_loss` builds it for any (student, teachers,
DistillConfig); the quantization-aware distillation stage reuses it.

Speed: teachers run in ``eval()`` under ``torch.inference_mode()``. When augmentation is
deterministic ('none': one view per image, 'flip': two views) the teacher's outputs are computed
once and cached on disk (:class:`TeacherCache`), keyed by teacher checksum + data fingerprint +
teacher preprocessing + augmentation, so later epochs and later students cost only the student.
'crop-flip' has random crops: the teacher then runs online, and the log says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn as nn

from edgekd import ui
from edgekd.config import DataConfig, DistillConfig, StudentConfig, TrainConfig
from edgekd.data import DataSet
from edgekd.errors import EdgekdError
from edgekd.models import count_params, create_model, create_student, is_known_model, list_students, load_checkpoint, model_from_checkpoint, safe_torch_load
from edgekd.distill.loss import build_distill_loss, teacher_weights
from edgekd.distill.teachers import Teacher, check_teachers_stronger, load_teacher, measure_teachers, warn_flat_soft_targets


def check_student_name(name: str) -> None:
    """Fail before any data is loaded when the student name is neither an edgekd student nor a timm model."""
    if is_known_model(name):
        return
    raise EdgekdError(f"unknown student '{name}'", f"pick one of {', '.join(s.name for s in list_students())} (see `edgekd models`) or a timm model name")


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


@dataclass
class DistillOptions:
    """How a distillation run is seeded, resumed and fed (the ``run_distill`` keywords)."""

    seed: int = 0
    deterministic: bool = False
    resume: bool = True  # continue from ``last.pt`` in the output folder
    data: DataSet | None = None  # already loaded (a build shares one copy); default: load ``data_cfg``
    self_distill: bool = False  # born-again: a copy of the one teacher's architecture (see DistillConfig.born_again_init)
    cache_dir: str | Path | None = None  # where teacher outputs are cached (default: beside the output)


def _check_teachers(teachers: list[str | Path], student_cfg: StudentConfig, opts: DistillOptions) -> None:
    if not teachers:
        raise EdgekdError("distillation needs at least one teacher", "pass --teacher PATH (a checkpoint from `edgekd finetune`)")
    if opts.self_distill and len(teachers) != 1:
        raise EdgekdError(f"self-distillation takes exactly one teacher, got {len(teachers)}", "pass one --teacher: the trained student to teach a fresh copy of itself")
    if not opts.self_distill:
        check_student_name(student_cfg.model)


def within_stage_limit(train_cfg: TrainConfig, started: float, share: float = 1.0) -> TrainConfig:
    """``share`` of the training time limit less what the stage already spent since ``started``
    (teacher-output cache, teacher measurements, an assistant link): a build's time share covers
    the whole stage, not only its epochs."""
    if not train_cfg.time_limit_s:
        return train_cfg
    left = max(10.0, (train_cfg.time_limit_s - (time.time() - started)) * share)
    return train_cfg.model_copy(update={"time_limit_s": round(left, 1)})


def run_distill(teachers: list[str | Path], student_cfg: StudentConfig, distill_cfg: DistillConfig, data_cfg: DataConfig, out_dir: str | Path,
                **options: Any) -> dict:
    """Distil ``teachers`` into a student; writes ``best.pt``, ``last.pt`` and ``metrics.json`` into ``out_dir``.

    ``options`` are :class:`DistillOptions` fields. With ``self_distill`` (born-again networks,
    Furlanello et al. 2018) the single teacher must be a trained student and the new student is a
    copy of its architecture, starting from its weights or fresh (``distill_cfg.born_again_init``).
    """
    from edgekd.finetune import load_data
    from edgekd.train import device as train_device, seed_everything

    opts, started = DistillOptions(**options), time.time()
    _check_teachers(teachers, student_cfg, opts)
    seed_everything(opts.seed, opts.deterministic)
    loaded = [load_teacher(p) for p in teachers]
    teacher_weights(distill_cfg, len(loaded))
    data = opts.data or load_data(data_cfg, opts.seed)
    if opts.self_distill and student_cfg.model != loaded[0].spec["name"]:
        ui.log(f"self-distillation: the student is a fresh {loaded[0].spec['name']} like the teacher (student.model={student_cfg.model} is ignored)")
    student = make_student(student_cfg, data, loaded, opts.self_distill, distill_cfg.born_again_init)
    dev = train_device()
    student.to(dev)
    loss_fn, adapters = build_distill_loss(student, loaded, distill_cfg, data, opts.cache_dir, data_cfg.augment, dev)  # validates, then caches
    teacher_records = measure_teachers(loaded, data, distill_cfg.temperature)
    warn_flat_soft_targets(loaded, teacher_records, distill_cfg)
    ui.log(f"student {student.edgekd_spec['name']}{born_again_note(opts.self_distill, distill_cfg.born_again_init)}: {count_params(student):,} params at "
           f"{student.preprocess.input_size} px; teachers {', '.join(t.name for t in loaded)}; losses {'+'.join(distill_cfg.losses)}; "
           f"data {data.name}: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test")
    extra = {"config": {"student": student_cfg.model_dump(), "distill": distill_cfg.model_dump(), "data": data_cfg.model_dump(), "seed": opts.seed,
                        "self_distill": opts.self_distill},
             "teachers": [t.describe() for t in loaded]}
    train_cfg = within_stage_limit(student_cfg.train, started)
    result = _train_student(student, adapters, loss_fn, train_cfg, data, out_dir, extra, opts)
    return _finish(result, loss_fn, loaded, teacher_records, distill_cfg, data, opts.self_distill)


def _train_student(student: nn.Module, adapters: nn.Module, loss_fn: Any, train_cfg: TrainConfig, data: DataSet, out_dir: str | Path, extra: dict,
                   opts: DistillOptions) -> Any:
    """``fit`` the student with the distillation loss; refuses to resume another distillation's
    ``last.pt`` (``extra`` is what every checkpoint records: configs and teachers)."""
    from edgekd.train import fit

    trainable = nn.ModuleDict({"student": student, "distill": adapters}) if len(adapters) else None
    if opts.resume:
        check_resume_matches(Path(out_dir) / "last.pt", extra)
    try:
        return fit(student, data, train_cfg, out_dir, loss_fn, student.preprocess, augment=extra["config"]["data"]["augment"], seed=opts.seed,
                   kind="student", resume=opts.resume, ckpt_extra=extra, trainable=trainable, description=f"distill {student.edgekd_spec['name']}")
    finally:
        loss_fn.close()


def _finish(result: Any, loss_fn: Any, loaded: list[Teacher], teacher_records: list, distill_cfg: DistillConfig, data: DataSet, self_distill: bool) -> dict:
    """Metrics of the best checkpoint (val, test, loss parts, teachers) and the stage's outputs."""
    from edgekd.train import final_metrics

    best = model_from_checkpoint(load_checkpoint(result.best_path))
    teacher_mode = ["cached" if c is not None else "online" for c in loss_fn.caches]
    metrics = final_metrics(best, data, best.preprocess, result, {
        "params": count_params(best), "model": best.edgekd_spec["name"], "losses": list(distill_cfg.losses), "loss_parts": loss_fn.parts(),
        "self_distill": self_distill, "teachers": [{**t.describe(), "outputs": m} for t, m in zip(loaded, teacher_mode)],
        "teacher_cache_seconds": round(sum(c.seconds for c in loss_fn.caches if c is not None), 2),
    })
    check_teachers_stronger(teacher_records, metrics, born_again=self_distill)
    return {"checkpoint": str(result.best_path), "last": str(result.last_path), "metrics_file": str(result.metrics_path), "metrics": metrics}


def run_distill_mode(teachers: list[str | Path], student_cfg: StudentConfig, distill_cfg: DistillConfig, data_cfg: DataConfig, out_dir: str | Path,
                     **options: Any) -> dict:
    """The distill stage in ``distill.mode``: 'teacher' (:func:`run_distill`; cross-resolution when
    the teacher's input is larger), 'assistant' (teacher -> assistant -> student) or 'mutual'
    (peers, no teacher). Same outputs in every mode: ``best.pt``, ``last.pt``, ``metrics.json``."""
    if distill_cfg.mode == "assistant":
        from edgekd.distill.assistant import run_assistant_chain

        return run_assistant_chain(teachers, student_cfg, distill_cfg, data_cfg, out_dir, **options)
    if distill_cfg.mode == "mutual":
        from edgekd.distill.mutual import run_mutual

        options.pop("self_distill", None)
        return run_mutual(student_cfg, distill_cfg, data_cfg, out_dir, **options)
    return run_distill(teachers, student_cfg, distill_cfg, data_cfg, out_dir, **options)
