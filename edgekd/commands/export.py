"""CLI command for export (issue 4): ``edgekd export``.

A thin wrapper: options become recipe overrides (validated once in edgekd/config.py), then
:func:`edgekd.export.run_export` runs. ``edgekd quantize`` lives in edgekd/commands/quantize.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from edgekd import ui
from edgekd.cli_options import AllowNotReadyOpt, ConfigOpt, ExcludeOpt, SetOpt, emit, layer_list, output_folder
from edgekd.commands import CalibImagesOpt, CalibratorOpt, CheckpointArg, RunOptions, run_options
from edgekd.errors import EdgekdError


@run_options("dataset", "data_root", "seed", "out", "as_json", out=Path("runs/export"))
def export(
    checkpoint: CheckpointArg,
    target: Annotated[Optional[str], typer.Option("--target", help="Deployment target (see `edgekd targets list`); picks layout and precision.")] = None,
    precision: Annotated[Optional[str], typer.Option(help="int8, fp16 or fp32. \\[default: the target's, else int8]")] = None,
    layout: Annotated[Optional[str], typer.Option(help="INT8 Q/DQ layout: tensorrt, ort-cpu or openvino. \\[default: the target's]")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    calibrator: CalibratorOpt = None,
    calib_images: CalibImagesOpt = None,
    opset: Annotated[Optional[int], typer.Option(help="ONNX opset (>= 17). \\[default: 17]")] = None,
    check_batch: Annotated[Optional[int], typer.Option(help="Held test images for the ORT-vs-PyTorch agreement check. \\[default: 256]")] = None,
    allow_not_ready: AllowNotReadyOpt = False,
    max_accuracy_drop: Annotated[Optional[float], typer.Option("--max-accuracy-drop", help="Accuracy budget in top-1 points vs FP32 on validation: keep "
                                                               "the most sensitive layers in float until it fits (no retraining here; `edgekd quantize` with "
                                                               "the same option trains QAD again).")] = None,
    exclude: ExcludeOpt = None,
    *,
    run: RunOptions,
) -> None:
    """Export a student to ONNX in the Q/DQ layout its target runtime fuses, and check it.

    Examples: edgekd export runs/quantized/best.pt --target x86-cpu --out runs/export
              edgekd export runs/quantized/best.pt --layout tensorrt --out runs/export-trt
              edgekd export runs/student/best.pt --target x86-cpu --max-accuracy-drop 1.0   (calibrate, keep the sensitive layers in float)
    """
    from edgekd.data import load_data  # lazy: `edgekd --help` imports no torch
    from edgekd.export import ExportJob, resolve_layout, run_export  # lazy: torch, onnx, onnxruntime

    if target is None and layout is None and precision in (None, "int8"):
        raise EdgekdError("no target or layout given", "pass --target NAME (see `edgekd targets list`) or --layout tensorrt|ort-cpu|openvino")
    layout, precision = resolve_layout(target, layout, precision)
    recipe = run.recipe(config, set_, {"target": target, "export.precision": precision, "export.layout": layout if layout != "none" else None,
                                       "export.opset": opset, "export.check_batch": check_batch, "quantize.calibrator": calibrator,
                                       "quantize.calib_images": calib_images, "export.allow_not_ready": True if allow_not_ready else None,
                                       "quantize.max_accuracy_drop": max_accuracy_drop, "quantize.exclude": layer_list(exclude)})
    with output_folder(run.out):
        data = load_data(recipe.data, recipe.seed)
        record = run_export(ExportJob(recipe.export, recipe.quantize, checkpoint), data, run.out, run.context(recipe, target=target))
    agree = record["checks"]["agreement"]
    rows = [[record["path"], precision, record["layout"], f"{agree['top1_agreement']:.4f}", f"{agree['max_abs_diff']:.3g}",
             record["checks"].get("tensorrt_readiness", {}).get("ok", "-"), record["checks"].get("ort_cpu_fusion", {}).get("ok", "-")]]
    ui.show(ui.table("export", ["onnx", "precision", "layout", "ORT~PyTorch top-1", "max |diff|", "TensorRT-ready", "ORT-CPU integer"], rows))
    mixed = record.get("mixed_precision") or {}
    if mixed.get("steps"):
        steps = [[s["float_layers"], s["added"] or "(full INT8)", s["batch1_ms"], s["batch64_ms"]] for s in mixed["steps"]]
        steps.append(["FP32", "-", mixed["fp32"]["batch1_ms"], mixed["fp32"]["batch64_ms"]])
        ui.show(ui.table("what each layer kept in float costs (onnxruntime CPU p50 ms)", ["float layers", "added", "batch 1", "batch 64"], steps))
    emit(record, run.as_json)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the edgekd app."""
    app.command("export")(export)
