"""CLI commands for quantization-aware distillation and export (issue 4): ``edgekd quantize``, ``edgekd export``.

Thin wrappers: options become recipe overrides (validated once in edgekd/config.py), then one
stage function runs (:func:`edgekd.quantize.run_qad`, :func:`edgekd.export.run_export`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from edgekd import ui
from edgekd.cli_options import (AllowNotReadyOpt, ConfigOpt, DataRootOpt, DatasetOpt, JsonOpt, OutOpt, ResumeOpt, SeedOpt, SetOpt, TestSubsetOpt,
                                TrainSubsetOpt, emit, epochs_opt, lr_opt, output_folder, overrides)
from edgekd.errors import EdgekdError

CheckpointArg = Annotated[Path, typer.Argument(help="Student checkpoint (.pt from `edgekd distill` or `edgekd quantize`).")]
CalibratorOpt = Annotated[Optional[str], typer.Option(help="Activation-range calibrator: max, percentile, entropy, mse. \\[default: max]")]
CalibImagesOpt = Annotated[Optional[int], typer.Option(help="Training images used to calibrate activation ranges. \\[default: 512]")]


def quantize(
    checkpoint: CheckpointArg,
    teacher: Annotated[Optional[Path], typer.Option("--teacher", "-t", help="FP32 teacher checkpoint; without it QAD fine-tunes on hard labels.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    calibrator: CalibratorOpt = None,
    calib_images: CalibImagesOpt = None,
    fold_bn: Annotated[Optional[bool], typer.Option("--fold-bn/--no-fold-bn", help="Fold BatchNorm into convs before fake-quant. \\[default: fold]")] = None,
    layout: Annotated[Optional[str], typer.Option(help="Place quantizers for this runtime's Q/DQ layout: tensorrt or ort-cpu. \\[default: the recipe target's]")] = None,
    epochs: epochs_opt("quantize") = None,
    lr: lr_opt("quantize") = None,
    dataset: DatasetOpt = None,
    data_root: DataRootOpt = None,
    train_subset: TrainSubsetOpt = None,
    test_subset: TestSubsetOpt = None,
    seed: SeedOpt = None,
    quick: Annotated[bool, typer.Option("--quick", help="A first look: 2,000 images, 1 epoch.")] = False,
    out: OutOpt = Path("runs/quantized"),
    resume: ResumeOpt = True,
    as_json: JsonOpt = False,
) -> None:
    """Quantization-aware distillation: INT8 fake-quant in the student, FP32 teacher, fine-tune.

    Example: edgekd quantize runs/student/best.pt --teacher runs/teacher/best.pt --out runs/quantized
    """
    from edgekd.config import load_recipe
    from edgekd.finetune import load_data
    from edgekd.quantize import run_qad

    quick_set = ["data.train_subset=2000", "data.test_subset=1000", "quantize.train.epochs=1"] if quick else []
    opts = overrides({"quantize.calibrator": calibrator, "quantize.calib_images": calib_images, "quantize.fold_bn": fold_bn, "quantize.layout": layout,
                      "quantize.train.epochs": epochs, "quantize.train.lr": lr, "data.dataset": dataset, "data.root": data_root,
                      "data.train_subset": train_subset, "data.test_subset": test_subset, "seed": seed})
    recipe = load_recipe(config, quick_set + (set_ or []) + opts)
    if recipe.quantize.layout == "auto":
        from edgekd.targets import get_target

        recipe.quantize.layout = get_target(recipe.target).layout
    data = load_data(recipe.data, recipe.seed)
    augment = "flip" if recipe.data.augment != "none" else "none"
    with output_folder(out):
        result = run_qad(checkpoint, recipe.quantize, data, out, _loss_factory(teacher, recipe, data, augment), recipe.seed, augment, resume)
    m = result["metrics"]
    ui.show(ui.table("quantization-aware distillation", ["FP32 val", "PTQ val", "QAD val", "QAD test", "quantizers", "checkpoint"],
                     [[m["fp32_val_top1"], m["ptq_val_top1"], m["val"]["top1"], m["test"]["top1"], m["quantizers"], result["checkpoint"]]]))
    emit({"checkpoint": result["checkpoint"], "metrics_file": result["metrics_file"], "fp32_val_top1": m["fp32_val_top1"], "ptq_val_top1": m["ptq_val_top1"],
          "val_top1": m["val"]["top1"], "test_top1": m["test"]["top1"]}, as_json)


def _loss_factory(teacher: Path | None, recipe, data, augment: str):
    """QAD loss: the distillation loss from the FP32 teacher when given, else cross-entropy on labels."""
    from edgekd.train import cross_entropy_loss

    if teacher is None:
        ui.warn("no --teacher: quantization-aware fine-tuning uses hard labels only (pass the FP32 teacher for QAD)")
        return lambda model: (cross_entropy_loss(), None)
    from edgekd.distill import build_distill_loss, load_teacher

    t = load_teacher(teacher)
    return lambda model: build_distill_loss(model, [t], recipe.distill, data, augment=augment)


def export(
    checkpoint: CheckpointArg,
    target: Annotated[Optional[str], typer.Option("--target", help="Deployment target (see `edgekd targets list`); picks layout and precision.")] = None,
    precision: Annotated[Optional[str], typer.Option(help="int8, fp16 or fp32. \\[default: the target's, else int8]")] = None,
    layout: Annotated[Optional[str], typer.Option(help="INT8 Q/DQ layout: tensorrt or ort-cpu. \\[default: the target's]")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    calibrator: CalibratorOpt = None,
    calib_images: CalibImagesOpt = None,
    opset: Annotated[Optional[int], typer.Option(help="ONNX opset (>= 17). \\[default: 17]")] = None,
    check_batch: Annotated[Optional[int], typer.Option(help="Held test images for the ORT-vs-PyTorch agreement check. \\[default: 256]")] = None,
    allow_not_ready: AllowNotReadyOpt = False,
    dataset: DatasetOpt = None,
    data_root: DataRootOpt = None,
    seed: SeedOpt = None,
    out: OutOpt = Path("runs/export"),
    as_json: JsonOpt = False,
) -> None:
    """Export a student to ONNX in the Q/DQ layout its target runtime fuses, and check it.

    Examples: edgekd export runs/quantized/best.pt --target x86-cpu --out runs/export
              edgekd export runs/quantized/best.pt --layout tensorrt --out runs/export-trt
    """
    from edgekd.config import load_recipe
    from edgekd.export import resolve_layout, run_export
    from edgekd.finetune import load_data

    if target is None and layout is None and precision in (None, "int8"):
        raise EdgekdError("no target or layout given", "pass --target NAME (see `edgekd targets list`) or --layout tensorrt|ort-cpu")
    layout, precision = resolve_layout(target, layout, precision)
    opts = overrides({"target": target, "export.precision": precision, "export.layout": layout if layout != "none" else None,
                      "export.opset": opset, "export.check_batch": check_batch, "quantize.calibrator": calibrator,
                      "quantize.calib_images": calib_images, "data.dataset": dataset, "data.root": data_root, "seed": seed,
                      "export.allow_not_ready": True if allow_not_ready else None})
    recipe = load_recipe(config, (set_ or []) + opts)
    with output_folder(out):
        data = load_data(recipe.data, recipe.seed)
        record = run_export(checkpoint, out, data, recipe.export, recipe.quantize, target, recipe.seed)
    agree = record["checks"]["agreement"]
    rows = [[record["path"], precision, record["layout"], f"{agree['top1_agreement']:.4f}", f"{agree['max_abs_diff']:.3g}",
             record["checks"].get("tensorrt_readiness", {}).get("ok", "-"), record["checks"].get("ort_cpu_fusion", {}).get("ok", "-")]]
    ui.show(ui.table("export", ["onnx", "precision", "layout", "ORT~PyTorch top-1", "max |diff|", "TensorRT-ready", "ORT-CPU integer"], rows))
    emit(record, as_json)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the edgekd app."""
    app.command("quantize")(quantize)
    app.command("export")(export)
