"""CLI commands for distill (issue 3): ``edgekd distill``, a thin wrapper over :func:`edgekd.distill.run_distill`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from edgekd import ui
from edgekd.cli_options import ConfigOpt, SetOpt, emit, output_folder
from edgekd.commands import TRAINING_OPTIONS, RunOptions, TrainOptions, run_options, train_options
from edgekd.config import DistillConfig
from edgekd.errors import EdgekdError

_DEFAULTS = DistillConfig()
QUICK = ["data.train_subset=2000", "data.test_subset=1000", "student.train.epochs=2"]

TeacherOpt = Annotated[Optional[list[Path]], typer.Option("--teacher", "-t", help="Teacher checkpoint from `edgekd finetune` (repeat for several teachers).")]


def _floats(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise EdgekdError(f"{what} '{text}' is not a comma-separated list of numbers", "write e.g. --teacher-weights 0.7,0.3") from exc


def _peers(text: str | None) -> int | list[str] | None:
    """--peers 3 (copies of the student) or --peers nano_cnn,small_cnn (named peers)."""
    if text is None:
        return None
    return int(text) if text.strip().isdigit() else _names(text)


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [x.strip() for x in text.split(",") if x.strip()]


@run_options(*TRAINING_OPTIONS, out=Path("runs/student"), quick_help="A first look in under a minute: 2,000 images, 2 epochs, flip augmentation.")
@train_options("student", "epochs", "batch_size", "lr")
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
    mode: Annotated[Optional[str], typer.Option(help="'teacher': learn from --teacher (cross-resolution when the teacher's input is larger: kd and rkd "
                                                      "need no alignment, fitnet and at pool the larger map to the smaller); 'assistant': teacher -> "
                                                      "--assistant -> student; 'mutual': --peers students learn from each other, no --teacher. "
                                                      "\\[default: teacher]")] = None,
    assistant: Annotated[Optional[str], typer.Option(help="--mode assistant: the intermediate network (a name, distilled from the teacher first) or its checkpoint .pt.")] = None,
    peers: Annotated[Optional[str], typer.Option(help="--mode mutual: how many copies of the student (e.g. 2), or the peers' names (e.g. nano_cnn,small_cnn). \\[default: 2]")] = None,
    self_distill: Annotated[bool, typer.Option("--self-distill", help="Born-again: the single --teacher is a trained student; train a copy of it that starts from its weights (--set distill.born_again_init=scratch: a fresh init).")] = False,
    cache: Annotated[Optional[bool], typer.Option("--cache/--no-cache", help="Cache teacher outputs when augmentation allows it ('none', 'flip'). \\[default: cache]")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Teacher-output cache folder. \\[default: $EDGEKD_CACHE_DIR or ~/.cache/edgekd/teacher-logits]")] = None,
    input_size: Annotated[Optional[int], typer.Option(help="Student input side in pixels. \\[default: 28]")] = None,
    width: Annotated[Optional[float], typer.Option(help="Width multiplier of edgekd students. \\[default: 1]")] = None,
    augment: Annotated[Optional[str], typer.Option(help="'none', 'flip' (teacher outputs cached) or 'crop-flip' (teacher runs online). \\[default: flip]")] = None,
    *,
    train: TrainOptions,
    run: RunOptions,
) -> None:
    """Distil one or more teachers into a small student (build stage: distill).

    Example: edgekd distill --teacher runs/teacher/best.pt --student nano_cnn --loss kd,fitnet --augment flip --out runs/student
    """
    from edgekd.data import load_data  # lazy: `edgekd --help` imports no torch
    from edgekd.distill import DistillJob, run_distill_mode  # lazy: torch, timm
    from edgekd.models import check_model_name  # lazy: torch

    recipe = run.recipe(config, set_, {
        "distill.mode": mode, "distill.assistant": assistant, "distill.peers": _peers(peers),
        "student.model": student, "student.input_size": input_size, "student.width": width, "student.augment": augment,
        **train.overrides(),
        "distill.losses": _names(loss), "distill.temperature": temperature, "distill.alpha": alpha, "distill.feature_weight": feature_weight,
        "distill.relation_weight": relation_weight, "distill.student_layer": student_layer, "distill.teacher_layer": teacher_layer,
        "distill.teacher_weights": _floats(teacher_weights, "--teacher-weights"), "distill.cache_teacher": cache,
    }, QUICK)
    if teacher and recipe.distill.mode == "mutual":
        ui.warn("--mode mutual trains its peers without a teacher: --teacher is not used")
    if not teacher and recipe.distill.mode != "mutual":
        raise EdgekdError("no teacher given", "pass --teacher PATH (a best.pt from `edgekd finetune`); repeat it for several teachers, or use --mode mutual")
    if recipe.distill.mode != "mutual":
        check_model_name("student", recipe.student.model)  # before the data set is loaded
    with output_folder(run.out):
        job = DistillJob(recipe.student, recipe.distill, tuple(teacher or ()), self_distill)
        ctx = run.context(recipe, recipe.student.augment, cache_dir=cache_dir)  # the student's augmentation, as in `edgekd build`
        result = run_distill_mode(job, load_data(recipe.data, recipe.seed), run.out, ctx)
    _report(result, run.as_json)


def _report(result: dict[str, Any], as_json: bool) -> None:
    """The student's row on the terminal and, with --json, its metrics on stdout."""
    m = result["metrics"]
    modes = ", ".join(t["outputs"] for t in m["teachers"])
    ui.show(ui.table("student distillation", ["student", "params", "losses", "teachers", "val top-1", "test top-1", "train s", "img/s", "checkpoint"],
                     [[m["model"], f"{m['params']:,}", "+".join(m["losses"]), modes, m["val"]["top1"], m["test"]["top1"], m["train_seconds"], m["images_per_second"], result["checkpoint"]]]))
    emit({"checkpoint": result["checkpoint"], "metrics_file": result["metrics_file"], "val_top1": m["val"]["top1"], "test_top1": m["test"]["top1"],
          "params": m["params"], "model": m["model"], "losses": m["losses"], "loss_parts": m["loss_parts"], "teachers": m["teachers"],
          "train_seconds": m["train_seconds"], "images_per_second": m["images_per_second"], "mode": m.get("mode", "teacher"),
          "assistant": m.get("assistant"), "peers": m.get("peers")}, as_json)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the edgekd app."""
    app.command("distill")(distill)
