"""Stage: export. Load a checkpoint, write the ONNX file in the target runtime's layout, check it.

Everything is written into a staging folder inside ``out_dir`` and moved into place only after every
check has passed, so a failed gate (or a crash, or Ctrl-C) leaves no half-written ``model.onnx``
that a later stage or a user could mistake for a good one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from edgekd import ui
from edgekd.config import ExportConfig, QuantizeConfig
from edgekd.data import DataSet, Preprocess, calibration_images
from edgekd.errors import EdgekdError
from edgekd.export.checks import run_checks
from edgekd.export.logits import ort_logits
from edgekd.export.mixed import float_layer_costs
from edgekd.export.ort_layout import export_int8_ort_closest
from edgekd.export.openvino_layout import export_int8_openvino, openvino_logits, openvino_missing
from edgekd.export.tensorrt_layout import export_int8_tensorrt
from edgekd.export.to_onnx import export_fp16, export_fp32, stamp_metadata
from edgekd.manifest import versions
from edgekd.atomic import write_json_atomic
from edgekd.export.confirm import confirm_on_export
from edgekd.models import load_checkpoint, model_from_checkpoint
from edgekd.quantize import calibrate, for_target, is_quantized, load_quantized, search_float_layers, set_float_layers, top1_on
from edgekd.quantize.placement import LAYOUTS
from edgekd.quantize.sensitivity import float_layers_of, score_without_quantizers
from edgekd.stage_context import StageContext
from edgekd.targets import get_target, host_arch
from edgekd.runners.timing import median_latency_ms

PRECISIONS = ("int8", "fp16", "fp32")


def resolve_layout(target: str | None, layout: str | None, precision: str | None) -> tuple[str, str]:
    """Explicit --layout/--precision win over the target's; 'auto' or None means 'the target's'."""
    t = get_target(target) if target else None
    layout = layout if layout not in (None, "auto") else (t.layout if t else None)
    precision = precision or (t.precision if t else None) or "int8"
    if precision not in PRECISIONS:
        raise EdgekdError(f"unknown precision '{precision}'", f"use one of {', '.join(PRECISIONS)}")
    if precision == "int8" and layout not in LAYOUTS:
        raise EdgekdError("INT8 export needs a Q/DQ layout", "pass --target NAME or --layout tensorrt|ort-cpu|openvino")
    return layout or "none", precision


def load_for_export(checkpoint: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """FP32 or quantized student from an edgekd checkpoint."""
    ckpt = load_checkpoint(checkpoint)
    model = load_quantized(ckpt) if ckpt.get("quantize") else model_from_checkpoint(ckpt)
    return model.eval(), ckpt


@dataclass
class ExportRequest:
    """What to export and how: the stage's inputs beside the model itself."""

    precision: str
    layout: str
    classes: list[str]
    check_u8: torch.Tensor
    check_labels: torch.Tensor | None = None
    calib_u8: torch.Tensor | None = None
    target: str | None = None
    opset: int = 17
    allow_not_ready: bool = False
    accuracy_tolerance: float = 0.003
    time_runs: int = 30
    fp32_model: nn.Module | None = None  # the FP32 student an INT8 model was calibrated from here (PTQ), for model.fp32.onnx


def _write_onnx(model: nn.Module, req: ExportRequest, stage_dir: Path, x: torch.Tensor) -> dict[str, Any]:
    """The ONNX file(s) for the requested precision / layout, in ``stage_dir``."""
    pre: Preprocess = model.preprocess
    path, fp32_path = stage_dir / "model.onnx", stage_dir / "model.fp32.onnx"
    record: dict[str, Any] = {}
    if req.precision == "fp32":
        export_fp32(model, path, pre, req.opset)
    elif req.precision == "fp16":
        export_fp16(model, path, pre, req.opset)
    else:
        # The FP32 twin INT8 is compared with: the student itself where the export calibrated it
        # (PTQ); from a QAD checkpoint, the same network with its INT8 weights and float activations.
        # (Baked 7-bit weights hid that PTQ of RepVGG-A0 lost 14 points: both files scored 68%.)
        export_fp32(req.fp32_model if req.fp32_model is not None else model, fp32_path, pre, req.opset)
        record["fp32_reference"] = "student" if req.fp32_model is not None else "int8 weights, float activations"
        if req.layout == "tensorrt":
            export_int8_tensorrt(model, path, pre, req.opset)
        elif req.layout == "openvino":
            export_int8_openvino(model, path, pre, req.opset)
        else:
            if req.calib_u8 is None:
                raise EdgekdError("the ort-cpu layout needs calibration images for tensors without a trained scale", "pass calib_u8")
            record.update(export_int8_ort_closest(model, path, pre, req.calib_u8, x, req.opset))
            if record["untrained_tensors"]:
                ui.warn(f"{len(record['untrained_tensors'])} activation(s) got a scale calibrated at export, not trained in QAD "
                        f"(the model was quantized for another layout, {getattr(model, 'edgekd_quant', {}).get('layout')}): "
                        "quantize for ort-cpu so training sees every quantizer onnxruntime runs")
    return record


def export_model(model: nn.Module, out_dir: str | Path, req: ExportRequest) -> dict[str, Any]:
    """Write ``model.onnx`` (+ ``model.fp32.onnx`` for INT8) into ``out_dir`` once it passed every check; returns the record.

    ``model`` must already be fake-quantized for INT8. The record holds every check, so the
    pipeline can put it in the manifest; INT8 that is slower or less accurate than FP32 warns loudly.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pre: Preprocess = model.preprocess
    x = pre(req.check_u8)
    labels = req.check_labels.numpy() if req.check_labels is not None else None
    stage_dir = Path(tempfile.mkdtemp(prefix=".export-", suffix=".tmp", dir=out))  # ".*.tmp": a killed run's is cleaned up
    try:
        record = {"precision": req.precision, "layout": req.layout if req.precision == "int8" else "none", "target": req.target, "opset": req.opset,
                  **_write_onnx(model, req, stage_dir, x)}
        meta = {"edgekd_version": versions().get("edgekd", "unknown"), "classes": list(req.classes), "preprocessing": pre.to_dict(),
                "target": req.target or "", "layout": record["layout"], "precision": req.precision, "model": getattr(model, "edgekd_spec", {}),
                "quantize": getattr(model, "edgekd_quant", {}), "untrained_tensors": record.get("untrained_tensors", []),
                "float_layers": float_layers_of(model)}
        stamp_metadata(stage_dir / "model.onnx", meta)
        record["checks"] = run_checks(model, stage_dir / "model.onnx", x, labels, req.precision, req.layout, req.allow_not_ready)
        if req.precision == "int8":
            record["comparison"] = compare_with_fp32(stage_dir / "model.onnx", stage_dir / "model.fp32.onnx", x.numpy(), labels, req, pre)
            if float_layers_of(model):
                record["mixed_precision"] = float_layer_costs(model, req, stage_dir)
        for name in ("model.fp32.onnx", "model.onnx"):  # model.onnx last: its presence means the export finished
            if (stage_dir / name).is_file():
                os.replace(stage_dir / name, out / name)
    finally:
        shutil.rmtree(stage_dir, ignore_errors=True)
    record["path"] = str(out / "model.onnx")
    if req.precision == "int8":
        record["fp32_path"] = str(out / "model.fp32.onnx")
    write_json_atomic(out / "export.json", record)
    return record


def compare_with_fp32(path: Path, fp32_path: Path, x: np.ndarray, labels: np.ndarray | None, req: ExportRequest, pre: Preprocess) -> dict[str, Any]:
    """INT8 vs FP32 export: accuracy on the check images, and CPU latency on the layout's runtime (onnxruntime for ort-cpu, OpenVINO for openvino)."""
    out: dict[str, Any] = {}
    on_openvino = req.layout == "openvino" and openvino_missing() is None
    if labels is not None:
        int8_logits = openvino_logits(path, x) if on_openvino else ort_logits(path, x, exact_qdq=req.layout in ("tensorrt", "openvino"))
        out["int8_top1"] = float((int8_logits.argmax(1) == labels).mean())
        out["fp32_top1"] = float((ort_logits(fp32_path, x).argmax(1) == labels).mean())
        out["n"] = int(len(labels))
        if out["int8_top1"] < out["fp32_top1"] - max(req.accuracy_tolerance, 1.5 / len(labels)):  # one image is not evidence
            ui.warn(f"INT8 is less accurate than FP32 on {len(labels)} held images: {out['int8_top1']:.4f} vs {out['fp32_top1']:.4f}")
    if req.layout not in ("ort-cpu", "openvino") or (req.layout == "openvino" and not on_openvino):
        out["latency"] = f"{req.layout} layout: time it on the target (edgekd bench); onnxruntime CPU does not run it in its integer kernels"
        return out
    shape = (pre.channels, pre.input_size, pre.input_size)
    runtime = out["latency_runtime"] = "openvino" if on_openvino else "ort-cpu"
    for batch in (1, 64):
        i8, f32 = (median_latency_ms(runtime, p, batch, shape, req.time_runs) for p in (path, fp32_path))
        out[f"batch{batch}"] = {"int8_ms": i8, "fp32_ms": f32, "speedup": f32 / i8 if i8 > 0 else None}
    slower = [b for b in (1, 64) if out[f"batch{b}"]["int8_ms"] > out[f"batch{b}"]["fp32_ms"]]
    target_arch = get_target(req.target).arch if req.target else host_arch()
    if slower and target_arch != host_arch():  # this CPU is not the target's: its speed decides nothing for the device
        out["latency"] = f"timed on this {host_arch()} CPU, not the {target_arch} target: measure on the device (edgekd deploy)"
        ui.log(f"INT8 vs FP32 timed on this {host_arch()} CPU only (the target is {target_arch}): measure on the device (edgekd deploy)")
    elif slower:
        times = ", ".join(f"{out['batch%d' % b]['int8_ms']:.3f} vs {out['batch%d' % b]['fp32_ms']:.3f} ms" for b in slower)
        ui.warn(f"INT8 is not faster than FP32 on this CPU at batch {', '.join(map(str, slower))} ({times}): "
                "small, depthwise or squeeze-excite networks are overhead-bound in onnxruntime's integer kernels here; "
                "for this CPU export with --precision fp32 (or fp16), or pick a wider network")
    out["int8_not_faster_at"] = slower
    return out


def choose_float_layers(model: nn.Module, cfg: QuantizeConfig, data: DataSet, out_dir: Path) -> dict[str, Any] | None:
    """``--exclude`` adds layers to those the checkpoint already keeps in float; ``--max-accuracy-drop``
    searches for the fewest that fit the budget on validation (no retraining here: `edgekd quantize`
    with the same option trains QAD again with them excluded)."""
    if cfg.exclude:
        set_float_layers(model, dict.fromkeys([*float_layers_of(model), *cfg.exclude]))
    if cfg.max_accuracy_drop is None:
        return None

    def top1(m: nn.Module) -> float:
        return top1_on(m, data.val, data.classes)

    fp32, int8 = score_without_quantizers(model, top1), top1(model)
    if 100 * (fp32 - int8) <= cfg.max_accuracy_drop:
        return {"budget_points": cfg.max_accuracy_drop, "met": True, "val_drop_points": round(100 * (fp32 - int8), 3), "float_layers": float_layers_of(model)}
    cfg = cfg.model_copy(update={"exclude": float_layers_of(model)})
    budget = search_float_layers(model, cfg, data, out_dir, fp32, confirm_on_export)
    if not budget["met"]:
        ui.warn(f"accuracy budget not met: the best found loses {budget['val_drop_points']:.2f} points (budget {cfg.max_accuracy_drop:g}) on validation "
                f"with {len(budget['float_layers'])} layer(s) in float; `edgekd quantize --max-accuracy-drop` also retrains them")
    return budget


@dataclass(frozen=True)
class ExportJob:
    """The export stage's job: which checkpoint, in which precision and layout, and (for an FP32
    checkpoint asked for INT8, or an accuracy budget) how to quantize it."""

    export: ExportConfig  # precision and layout resolved (:func:`resolve_layout`)
    quantize: QuantizeConfig
    checkpoint: Path


def _calibrate_here(ckpt: dict[str, Any], job: ExportJob, data: DataSet, ctx: StageContext) -> tuple[nn.Module, dict[str, Any]]:
    """PTQ of an FP32 checkpoint asked for INT8, for the export's layout and the target's CPU."""
    ui.log(f"{job.checkpoint} is an FP32 checkpoint: calibrating INT8 ranges on {job.quantize.calib_images} images")
    layout = job.export.layout
    cfg = for_target(job.quantize.model_copy(update={"layout": layout}), layout, get_target(ctx.target).arch if ctx.target else host_arch())
    model, tried = calibrate(ckpt, cfg, data, ctx.seed)
    return model, {"calibrator": model.edgekd_quant["calibrator"], "calibrators_tried": tried}


def run_export(job: ExportJob, data: DataSet, out_dir: str | Path, ctx: StageContext) -> dict[str, Any]:
    """Stage entry: load a checkpoint, quantize it by calibration if INT8 is asked of an FP32 one, export, check."""
    model, ckpt = load_for_export(job.checkpoint)
    fp32_model, ptq, budget = None, None, None
    precision, layout = job.export.precision, job.export.layout
    calib = calibration_images(data.train, job.quantize.calib_images, ctx.seed)
    if precision == "int8" and not is_quantized(model):
        fp32_model = model  # calibrate quantizes fresh copies of the checkpoint: this one stays the FP32 student
        model, ptq = _calibrate_here(ckpt, job, data, ctx)
    if precision == "int8":
        budget = choose_float_layers(model, job.quantize, data, Path(out_dir))
    check = data.test.subset(job.export.check_batch)
    req = ExportRequest(precision, layout, ckpt["classes"], check.images, check.labels, calib, ctx.target, job.export.opset,
                        job.export.allow_not_ready, fp32_model=fp32_model)
    record = export_model(model, out_dir, req)
    if ptq:  # said once the file is written: an export that fails (a bad --exclude, the readiness gate) says only its own one line
        ui.warn(f"{job.checkpoint} was quantized by post-training quantization only (calibration, no QAD); run `edgekd quantize` first for "
                "quantization-aware distillation")
    record["checkpoint"] = str(job.checkpoint)
    if ptq:
        record["ptq_calibration"] = ptq
    if precision == "int8":
        record["accuracy_budget"] = budget
    write_json_atomic(Path(out_dir) / "export.json", record)
    return record
