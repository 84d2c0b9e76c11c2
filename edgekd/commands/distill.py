"""CLI commands for distill (issue 3): ``edgekd distill``, a thin wrapper over :func:`edgekd.distill.run_distill`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from edgekd import ui
from edgekd.cli_options import (ConfigOpt, DataRootOpt, DatasetOpt, JsonOpt, OutOpt, ResumeOpt, SeedOpt, SetOpt, TestSubsetOpt,
                                TrainSubsetOpt, batch_opt, emit, epochs_opt, lr_opt, output_folder, overrides)
from edgekd.config import DistillConfig
from edgekd.errors import EdgekdError

_DEFAULTS = DistillConfig()

TeacherOpt = Annotated[Optional[list[Path]], typer.Option("--teacher", "-t", help="Teacher checkpoint from `edgekd finetune` (repeat for several teachers).")]


def _floats(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise EdgekdError(f"{what} '{text}' is not a comma-separated list of numbers", "write e.g. --teacher-weights 0.7,0.3") from exc


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [x.strip() for x in text.split(",") if x.strip()]


def distill(
    teacher: TeacherOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    student: Annotated[Optional[str], typer.Option(help="Student model: an edgekd student (`edgekd models`) or a timm name. \\[default: nano_cnn]")] = None,
    loss: Annotated[Optional[str], typer.Option(help="Comma-separated loss terms: kd, fitnet, rkd, at. \\[default: kd]")] = None,
    temperature: Annotated[Optional[float], typer.Option(help=f"Softmax temperature T of the KD term. \\[default: {_DEFAULTS.temperature:g}]")] = None,
    alpha: Annotated[Optional[float], typer.Option(help=f"Weight of the soft-target term; 1-alpha goes to the hard labels. \\[default: {_DEFAULTS.alpha:g}]")] = None,
    feature_weight: Annotated[Optional[float], typer.Option(help="Weight of fitnet / attention-transfer terms. \\[default: 1]")] = None,
    relation_weight: Annotated[Optional[float], typer.Option(help="Weight of the RKD term. \\[default: 1]")] = None,
    student_layer: Annotated[Optional[str], typer.Option(help="Student module path hooked by feature losses. \\[default: the model's feature layer]")] = None,
    teacher_layer: Annotated[Optional[str], typer.Option(help="Teacher module path hooked by feature losses. \\[default: the model's feature layer]")] = None,
    teacher_weights: Annotated[Optional[str], typer.Option(help="One weight per --teacher for the averaged soft targets, e.g. 0.7,0.3. \\[default: equal]")] = None,
    self_distill: Annotated[bool, typer.Option("--self-distill", help="Born-again: the single --teacher is a trained student; train a fresh copy of it.")] = False,
    cache: Annotated[Optional[bool], typer.Option("--cache/--no-cache", help="Cache teacher outputs when augmentation allows it ('none', 'flip'). \\[default: cache]")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Teacher-output cache folder. \\[default: $EDGEKD_CACHE_DIR or ~/.cache/edgekd/teacher-logits]")] = None,
    input_size: Annotated[Optional[int], typer.Option(help="Student input side in pixels. \\[default: 28]")] = None,
    width: Annotated[Optional[float], typer.Option(help="Width multiplier of edgekd students. \\[default: 1]")] = None,
    augment: Annotated[Optional[str], typer.Option(help="'none', 'flip' (teacher outputs cached) or 'crop-flip' (teacher runs online). \\[default: flip]")] = None,
    epochs: epochs_opt("student") = None,
    batch_size: batch_opt("student") = None,
    lr: lr_opt("student") = None,
    dataset: DatasetOpt = None,
    data_root: DataRootOpt = None,
    train_subset: TrainSubsetOpt = None,
    test_subset: TestSubsetOpt = None,
    seed: SeedOpt = None,
    quick: Annotated[bool, typer.Option("--quick", help="A first look in under a minute: 2,000 images, 2 epochs, flip augmentation.")] = False,
    out: OutOpt = Path("runs/student"),
    resume: ResumeOpt = True,
    as_json: JsonOpt = False,
) -> None:
    """Stage 2: distil one or more teachers into a small student.

    Example: edgekd distill --teacher runs/teacher/best.pt --student nano_cnn --loss kd,fitnet --augment flip --out runs/student
    """
    from edgekd.config import load_recipe
    from edgekd.distill import run_distill

    if not teacher:
        raise EdgekdError("no teacher given", "pass --teacher PATH (a best.pt from `edgekd finetune`); repeat it for several teachers")
    quick_set = ["data.train_subset=2000", "data.test_subset=1000", "student.train.epochs=2"] if quick else []
    opts = overrides({
        "student.model": student, "student.input_size": input_size, "student.width": width,
        "student.train.epochs": epochs, "student.train.batch_size": batch_size, "student.train.lr": lr,
        "distill.losses": _names(loss), "distill.temperature": temperature, "distill.alpha": alpha, "distill.feature_weight": feature_weight,
        "distill.relation_weight": relation_weight, "distill.student_layer": student_layer, "distill.teacher_layer": teacher_layer,
        "distill.teacher_weights": _floats(teacher_weights, "--teacher-weights"), "distill.cache_teacher": cache,
        "data.dataset": dataset, "data.root": data_root, "data.train_subset": train_subset, "data.test_subset": test_subset, "student.augment": augment, "seed": seed,
    })
    recipe = load_recipe(config, quick_set + (set_ or []) + opts)
    data_cfg = recipe.data.model_copy(update={"augment": recipe.student.augment})  # the student's augmentation, as in `edgekd build`
    with output_folder(out):
        result = run_distill(list(teacher), recipe.student, recipe.distill, data_cfg, out, recipe.seed, recipe.deterministic, resume,
                             self_distill=self_distill, cache_dir=cache_dir)
    m = result["metrics"]
    modes = ", ".join(t["outputs"] for t in m["teachers"])
    ui.show(ui.table("student distillation", ["student", "params", "losses", "teachers", "val top-1", "test top-1", "train s", "img/s", "checkpoint"],
                     [[m["model"], f"{m['params']:,}", "+".join(m["losses"]), modes, m["val"]["top1"], m["test"]["top1"], m["train_seconds"], m["images_per_second"], result["checkpoint"]]]))
    emit({"checkpoint": result["checkpoint"], "metrics_file": result["metrics_file"], "val_top1": m["val"]["top1"], "test_top1": m["test"]["top1"],
          "params": m["params"], "model": m["model"], "losses": m["losses"], "loss_parts": m["loss_parts"], "teachers": m["teachers"],
          "train_seconds": m["train_seconds"], "images_per_second": m["images_per_second"]}, as_json)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the edgekd app."""
    app.command("distill")(distill)
