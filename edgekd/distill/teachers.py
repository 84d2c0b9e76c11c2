"""Teachers: load one from its checkpoint, run it, measure it on validation (accuracy and how flat its
soft targets are), and warn when it cannot teach (flat soft targets, weaker than the student).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from edgekd import ui
from edgekd.config import DistillConfig
from edgekd.data import DataSet, Preprocess
from edgekd.errors import EdgekdError
from edgekd.atomic import sha256_file
from edgekd.models import load_checkpoint, model_from_checkpoint
from edgekd.distill.hooks import FeatureHook
from edgekd.train import predict_logits


@dataclass
class Teacher:
    """A frozen teacher: its model in eval mode, its own preprocessing and its checkpoint checksum."""

    model: nn.Module
    preprocess: Preprocess
    path: Path
    sha256: str
    name: str
    classes: list[str]
    spec: dict
    hook: FeatureHook | None = None

    def describe(self) -> dict:
        return {"path": str(self.path), "sha256": self.sha256, "model": self.name, "input_size": self.preprocess.input_size}


def load_teacher(path: str | Path) -> Teacher:
    """Load an edgekd checkpoint as a frozen teacher (weights_only load, eval mode, no gradients)."""
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt)
    model.eval().requires_grad_(False)
    return Teacher(model, model.preprocess, Path(path), sha256_file(path), ckpt["model"]["name"], list(ckpt["classes"]), dict(ckpt["model"]))


def check_teachers(teachers: list[Teacher], data: DataSet) -> None:
    """Every teacher must predict exactly the dataset's classes; a different count is a hard error."""
    for t in teachers:
        if len(t.classes) != data.num_classes:
            raise EdgekdError(
                f"teacher {t.path} predicts {len(t.classes)} classes but dataset {data.name} has {data.num_classes}",
                "distil on the dataset the teacher was fine-tuned on, or fine-tune a teacher on this one (edgekd finetune)",
            )
        if t.classes != data.classes:
            ui.warn(f"teacher {t.path} class names {t.classes[:3]}... differ from the dataset's {data.classes[:3]}...; assuming the same order")


def teacher_forward(teacher: Teacher, images_u8: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    """Teacher logits (and hooked feature map) for a uint8 batch, under inference_mode, as normal tensors."""
    with torch.inference_mode():
        logits = teacher.model(teacher.preprocess(images_u8).to(device))
        feature = teacher.hook.output if teacher.hook is not None else None
    out = {"logits": logits.float().clone()}
    if feature is not None:
        out["feature"] = feature.float().clone()
    return out


FLAT_SOFT_TARGETS = 0.9  # mean entropy of softmax(z_t / T), as a fraction of log(classes), above which KD teaches little


def measure_teachers(teachers: list[Teacher], data: DataSet, temperature: float) -> list[dict]:
    """One pass of each teacher over validation, before training: its top-1 (compared with the
    student's at the end) and how flat its soft targets are at the distillation temperature.

    Flat targets are a trap measured here (benchmarks/distill_results.md): the 94.1% EfficientNet-Lite0
    teacher, fine-tuned with label smoothing 0.1, gives targets at T=4 with 96% of the maximum entropy
    (p(true class) 0.25 on average). Label smoothing erases the logit structure KD feeds on (Mueller
    et al. 2019, "When does label smoothing help?"), so a lower temperature is what such a teacher needs.
    """
    if len(data.val) == 0:
        return [{} for _ in teachers]
    records = []
    for teacher in teachers:
        logits = predict_logits(teacher.model, data.val, teacher.preprocess)
        p = (logits / temperature).softmax(1)
        entropy = -(p * p.clamp_min(1e-12).log()).sum(1).mean().item() / math.log(logits.shape[1])
        records.append({"val_top1": (logits.argmax(1) == data.val.labels).float().mean().item(),
                        f"soft_target_entropy_T{temperature:g}": round(entropy, 4)})
    return records


def warn_flat_soft_targets(teachers: list[Teacher], records: list[dict], cfg: DistillConfig) -> None:
    """Warn before training when a teacher's soft targets at ``cfg.temperature`` are nearly uniform."""
    if "kd" not in cfg.losses or cfg.alpha == 0:
        return
    for teacher, record in zip(teachers, records):
        entropy = record.get(f"soft_target_entropy_T{cfg.temperature:g}")
        if entropy is not None and entropy > FLAT_SOFT_TARGETS:
            ui.warn(f"teacher {teacher.name}'s soft targets at T={cfg.temperature:g} are nearly uniform ({entropy:.0%} of the maximum entropy "
                    "on validation), so KD will teach little beyond 'be unsure'. Lower distill.temperature (e.g. 1 or 2); teachers "
                    "fine-tuned with label smoothing give flat targets")


def check_teachers_stronger(records: list[dict], metrics: dict, born_again: bool = False) -> None:
    """Warn when the student ended up more accurate on validation than its teacher(s).

    Soft targets from a teacher weaker than the student pull it toward the teacher's mistakes.
    Measured here (benchmarks/distill_results.md): nano_cnn trained alone for 8 epochs reached 93.0%
    test top-1, and 91.8% with KD (alpha 0.9) from a 91.5% teacher. ``records`` come from
    ``measure_teachers``; they go into the metrics either way. A born-again student is meant to
    overtake its teacher, so it is not warned about.
    """
    for teacher_metrics, record in zip(metrics["teachers"], records):
        teacher_metrics.update(record)
    student_val = metrics["val"].get("top1")
    if born_again or student_val is None or not all(records):
        return
    best_teacher = max(r["val_top1"] for r in records)
    metrics["teacher_weaker_than_student"] = best_teacher < student_val
    if metrics["teacher_weaker_than_student"]:
        ui.warn(f"the student ({student_val:.4f} val top-1) ended up more accurate than its best teacher ({best_teacher:.4f}): the teacher's "
                "soft targets were probably holding it back. Train a stronger teacher (e.g. recipes/teacher-fmnist.yaml, more epochs), "
                "or lower distill.alpha (0 = hard labels only)")
