"""CLI command for the teacher stage: ``edgekd finetune``, a thin wrapper over :func:`edgekd.finetune.run_finetune`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from edgekd import ui
from edgekd.cli_options import ConfigOpt, SetOpt, emit, output_folder
from edgekd.commands import TRAINING_OPTIONS, RunOptions, TrainOptions, run_options, train_options
from edgekd.config import TeacherConfig

_DEFAULTS = TeacherConfig()  # the help shows the recipe's defaults, so they cannot drift apart
QUICK = ["data.train_subset=2000", "data.test_subset=1000", "teacher.train.epochs=1", "teacher.input_size=48"]


@run_options(*TRAINING_OPTIONS, out=Path("runs/teacher"),
             quick_help="A first look in about a minute: 2,000 images, 1 epoch, 48 px (below ~40 px the frozen ImageNet features collapse).")
@train_options("teacher", "epochs", "batch_size", "lr")
def finetune(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    model: Annotated[Optional[str], typer.Option(help=f"Teacher backbone (any timm name). \\[default: {_DEFAULTS.model}]")] = None,
    pretrained: Annotated[Optional[str], typer.Option(help=f"'auto' (offline package, else timm download), 'timm', 'offline', 'none', or a weights file. \\[default: {_DEFAULTS.pretrained}]")] = None,
    mode: Annotated[Optional[str], typer.Option(help=f"'full' fine-tune or 'linear-probe' (frozen backbone). \\[default: {_DEFAULTS.mode}]")] = None,
    input_size: Annotated[Optional[int], typer.Option(help=f"Input side in pixels. \\[default: {_DEFAULTS.input_size}]")] = None,
    *,
    train: TrainOptions,
    optimizer: Annotated[Optional[str], typer.Option(help=f"'adamw' or 'sgd'. \\[default: {_DEFAULTS.train.optimizer}]")] = None,
    label_smoothing: Annotated[Optional[float], typer.Option(help=f"Label smoothing (none by default: a smoothed teacher's soft targets are flatter). \\[default: {_DEFAULTS.train.label_smoothing:g}]")] = None,
    run: RunOptions,
) -> None:
    """Fine-tune a pretrained backbone into the teacher (build stage: teacher).

    Example: edgekd finetune --epochs 4 --input-size 64 --out runs/teacher
    """
    from edgekd.data import load_data  # lazy: `edgekd --help` imports no torch
    from edgekd.finetune import run_finetune  # lazy: torch, timm
    from edgekd.models import check_model_name  # lazy: torch

    recipe = run.recipe(config, set_, {
        "teacher.model": model, "teacher.pretrained": pretrained, "teacher.mode": mode, "teacher.input_size": input_size,
        **train.overrides(), "teacher.train.optimizer": optimizer, "teacher.train.label_smoothing": label_smoothing,
    }, QUICK)
    check_model_name("teacher", recipe.teacher.model)  # before the data set is loaded
    with output_folder(run.out):
        data = load_data(recipe.data, recipe.seed, store_size=max(64, recipe.teacher.input_size) if recipe.data.dataset == "imagefolder" else 64)
        result = run_finetune(recipe.teacher, data, run.out, run.context(recipe))
    m = result["metrics"]
    ui.show(ui.table("teacher fine-tune", ["model", "params", "val top-1", "test top-1", "train s", "img/s", "checkpoint"],
                     [[recipe.teacher.model, f"{m['params']:,}", m["val"]["top1"], m["test"]["top1"], m["train_seconds"], m["images_per_second"], result["checkpoint"]]]))
    emit({"checkpoint": result["checkpoint"], "metrics_file": result["metrics_file"], "val_top1": m["val"]["top1"], "test_top1": m["test"]["top1"],
          "params": m["params"], "train_seconds": m["train_seconds"], "images_per_second": m["images_per_second"]}, run.as_json)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the edgekd app."""
    app.command("finetune")(finetune)
