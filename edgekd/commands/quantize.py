"""CLI command for quantization-aware distillation (issue 4): ``edgekd quantize``.

A thin wrapper: options become recipe overrides (validated once in edgekd/config.py), then
:func:`edgekd.quantize.run_qad` runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from edgekd import ui
from edgekd.atomic import sha256_file
from edgekd.cli_options import ConfigOpt, ExcludeOpt, MaxDropOpt, SetOpt, emit, layer_list, output_folder
from edgekd.commands import TRAINING_OPTIONS, CalibImagesOpt, CalibratorOpt, CheckpointArg, RunOptions, TrainOptions, run_options, train_options

QUICK = ["data.train_subset=2000", "data.test_subset=1000", "quantize.train.epochs=1"]


@run_options(*TRAINING_OPTIONS, out=Path("runs/quantized"), quick_help="A first look: 2,000 images, 1 epoch.")
@train_options("quantize", "epochs", "lr")
def quantize(
    checkpoint: CheckpointArg,
    teacher: Annotated[Optional[Path], typer.Option("--teacher", "-t", help="FP32 teacher checkpoint; without it QAD fine-tunes on hard labels.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    calibrator: CalibratorOpt = None,
    calib_images: CalibImagesOpt = None,
    fold_bn: Annotated[Optional[bool], typer.Option("--fold-bn/--no-fold-bn", help="Fold BatchNorm into convs before fake-quant. \\[default: fold]")] = None,
    learn_ranges: Annotated[Optional[bool], typer.Option("--learn-ranges/--fixed-ranges", help="Train the activation ranges with the weights (LSQ), "
                                                          "starting from calibration; or keep the calibrated ones. \\[default: learn]")] = None,
    layout: Annotated[Optional[str], typer.Option(help="Place quantizers for this runtime's Q/DQ layout: tensorrt, ort-cpu or openvino. \\[default: the recipe target's]")] = None,
    max_accuracy_drop: MaxDropOpt = None,
    exclude: ExcludeOpt = None,
    *,
    train: TrainOptions,
    run: RunOptions,
) -> None:
    """Quantization-aware distillation: INT8 fake-quant in the student, FP32 teacher, fine-tune.

    Example: edgekd quantize runs/student/best.pt --teacher runs/teacher/best.pt --out runs/quantized

    Accuracy-aware: --max-accuracy-drop 0.5 measures each layer's INT8 sensitivity when full INT8
    loses more than 0.5 points, keeps the most sensitive ones in higher precision until it fits,
    and writes sensitivity.json / sensitivity.png beside the checkpoint.
    """
    from edgekd.data import load_data  # lazy: `edgekd --help` imports no torch
    from edgekd.quantize import QadJob, for_target, run_qad  # lazy: torch, modelopt
    from edgekd.export import confirm_on_export  # lazy: onnx, onnxruntime
    from edgekd.models import load_checkpoint  # lazy: torch
    from edgekd.targets import get_target  # lazy: kept with the others of this command

    recipe = run.recipe(config, set_, {"quantize.calibrator": calibrator, "quantize.calib_images": calib_images, "quantize.fold_bn": fold_bn,
                                       "quantize.learn_ranges": learn_ranges, "quantize.layout": layout, "quantize.max_accuracy_drop": max_accuracy_drop,
                                       "quantize.exclude": layer_list(exclude), **train.overrides()}, QUICK)
    target = get_target(recipe.target)
    recipe.quantize = for_target(recipe.quantize, target.layout, target.arch)
    load_checkpoint(checkpoint)  # a bad checkpoint fails in one line before anything else is said or loaded
    data = load_data(recipe.data, recipe.seed)
    augment = "flip" if recipe.data.augment != "none" else "none"
    job = QadJob(recipe.quantize, checkpoint, _loss_factory(teacher, recipe, data, augment), confirm_on_export)
    with output_folder(run.out):
        result = run_qad(job, data, run.out, run.context(recipe, augment))
    m = result["metrics"]
    ui.show(ui.table("quantization-aware distillation", ["FP32 val", "PTQ val", "QAD val", "QAD test", "float layers", "checkpoint"],
                     [[m["fp32_val_top1"], m["ptq_val_top1"], m["val"]["top1"], m["test"]["top1"], len(m["float_layers"]), result["checkpoint"]]]))
    if m.get("accuracy_budget"):
        show_budget(m["accuracy_budget"])
    emit({"checkpoint": result["checkpoint"], "metrics_file": result["metrics_file"], "fp32_val_top1": m["fp32_val_top1"], "ptq_val_top1": m["ptq_val_top1"],
          "val_top1": m["val"]["top1"], "test_top1": m["test"]["top1"], "float_layers": m["float_layers"], "learned_ranges": m.get("learned_ranges"),
          "accuracy_budget": m.get("accuracy_budget"), "layout": recipe.quantize.layout, "weight_bits": recipe.quantize.weight_bits,
          "teacher": None if teacher is None else {"path": str(teacher), "sha256": sha256_file(teacher)}}, run.as_json)


def show_budget(budget: dict) -> None:
    """The sensitivity ranking (top 10) and what the accuracy budget kept in higher precision."""
    rows = [[r["layer"], r["float_gain"], r["alone_drop"], r["exported_gain"], "yes" if r["layer"] in budget["float_layers"] else ""]
            for r in budget.get("sensitivity", [])[:10]]
    if rows:
        ui.show(ui.table("per-layer INT8 sensitivity (top-1 points on validation)", ["layer", "float alone +", "INT8 alone -", "exported +", "kept"], rows))
    verdict = "met" if budget["met"] else "NOT met"
    ui.log(f"accuracy budget {budget['budget_points']:g} points {verdict}: INT8 {budget['val_drop_points']:.2f} points below FP32 on validation, "
           f"{len(budget['float_layers'])} layer(s) in higher precision")


def _loss_factory(teacher: Path | None, recipe, data, augment: str):
    """QAD loss: the distillation loss from the FP32 teacher when given, else cross-entropy on labels."""
    from edgekd.train import cross_entropy_loss  # lazy: torch

    if teacher is None:
        def hard_labels(model):  # warned when QAD starts: a checkpoint that cannot be quantized fails with its own one line first
            ui.warn("no --teacher: quantization-aware fine-tuning uses hard labels only (pass the FP32 teacher for QAD)")
            return cross_entropy_loss(), None

        return hard_labels
    from edgekd.distill import build_distill_loss, load_teacher  # lazy: torch, timm

    t = load_teacher(teacher)
    return lambda model: build_distill_loss(model, [t], recipe.distill, data, augment=augment)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the edgekd app."""
    app.command("quantize")(quantize)
