"""The checks every export passes before it is written: onnx.checker, onnxruntime-vs-PyTorch
agreement, and the readiness of the Q/DQ graph for the target's runtime, which is a gate.

A check that finds a problem decides something: an INT8 graph the target's runtime cannot run in
INT8 stops the export with one line naming the first offending nodes (``--allow-not-ready`` ships
it anyway, and the record says so). The other runtime's check is kept in the record as
information, not shown as an error: a TensorRT graph is *meant* to run in float on onnxruntime's
CPU provider.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from edgekd import ui
from edgekd.errors import EdgekdError
from edgekd.export.graph import QdqReport, show_report
from edgekd.export.to_onnx import has_fake_quant, without_quantizers
from edgekd.export.openvino_layout import check_openvino_int8, openvino_logits, openvino_missing
from edgekd.export.ort_layout import check_ort_cpu_fusion
from edgekd.export.tensorrt_layout import check_tensorrt_readiness
from edgekd.quantize.sensitivity import float_layers_of
from edgekd.export.logits import agreement, ort_logits, reference_logits

FIXES = {"tensorrt": "quantize the model for this target (edgekd quantize --layout tensorrt, or build --target with a TensorRT target)",
         "ort-cpu": "quantize the model for this target (edgekd quantize --layout ort-cpu)",
         "openvino": "quantize the model for this target (edgekd quantize --layout openvino) with OpenVINO installed (pip install 'edgekd[openvino]')"}
READINESS_TITLES = {"tensorrt": "TensorRT readiness", "ort-cpu": "onnxruntime CPU integer kernels", "openvino": "OpenVINO CPU integer kernels"}


def readiness_gate(rep: QdqReport, layout: str, path: Path, allow_not_ready: bool) -> dict[str, Any]:
    """Stop on a graph the target's runtime cannot run in INT8, unless the user said to ship it."""
    verdict = {"layout": layout, "ok": rep.ok, "errors": len(rep.errors), "allowed_not_ready": False}
    if rep.ok:
        return verdict
    first = "; ".join(rep.errors[:3])
    if not allow_not_ready:
        raise EdgekdError(f"{path.name} is not ready for {layout}: {len(rep.errors)} problem(s), first: {first}",
                          f"{FIXES[layout]}; or pass --allow-not-ready to ship it anyway (recorded in the manifest and bundle)")
    ui.warn(f"{path.name} is NOT ready for {layout} ({len(rep.errors)} problems, first: {rep.errors[0]}); shipping it because --allow-not-ready was given")
    verdict["allowed_not_ready"] = True
    return verdict


def run_checks(model: nn.Module, path: Path, x: torch.Tensor, labels: np.ndarray | None, precision: str, layout: str,
               allow_not_ready: bool = False) -> dict[str, Any]:
    """onnx.checker, ORT-vs-PyTorch agreement, and for INT8 both runtimes' readiness, the target
    layout's as a gate (:func:`readiness_gate`)."""
    import onnx

    checks: dict[str, Any] = {}
    try:
        onnx.checker.check_model(str(path), full_check=True)
        checks["onnx_checker"] = "ok"
    except Exception as exc:  # noqa: BLE001 - checker raises several types
        raise EdgekdError(f"exported ONNX fails onnx.checker: {str(exc).splitlines()[0][:200]}", "report this as an edgekd bug") from exc
    ref_model = without_quantizers(model) if precision != "int8" and has_fake_quant(model) else model
    exact = precision == "int8" and layout in ("tensorrt", "openvino")
    on_openvino = precision == "int8" and layout == "openvino" and openvino_missing() is None
    logits = openvino_logits(path, x.numpy()) if on_openvino else ort_logits(path, x.numpy(), exact_qdq=exact)
    checks["agreement"] = agreement(reference_logits(ref_model, x), logits, labels)
    checks["agreement"]["onnxruntime"] = ("not used: OpenVINO CPU, integer kernels" if on_openvino else
                                          "Q/DQ run as written (the target runtime's arithmetic)" if exact else "optimized, integer kernels")
    if checks["agreement"]["top1_agreement"] < 0.99:
        ui.warn(f"{path.name}: {'OpenVINO' if on_openvino else 'onnxruntime'} agrees with the PyTorch model on only {checks['agreement']['top1_agreement']:.2%} of top-1 predictions "
                f"(max |diff| {checks['agreement']['max_abs_diff']:.3g}): the shipped artifact drifts from what was trained")
    if precision == "int8":
        proto = onnx.load(str(path))
        floats = float_layers_of(model)
        trt = check_tensorrt_readiness(proto, floats)
        ortc = check_ort_cpu_fusion(path, floats)
        checks["tensorrt_readiness"] = trt.to_dict()
        checks["ort_cpu_fusion"] = ortc.to_dict()
        reports = {"tensorrt": trt, "ort-cpu": ortc}
        if layout == "openvino":  # a real OpenVINO compile: only where it is the target's runtime
            reports["openvino"] = check_openvino_int8(path, floats)
            checks["openvino_int8"] = reports["openvino"].to_dict()
        mine = reports[layout]
        show_report(mine, f"{READINESS_TITLES[layout]}: {path.name}")
        checks["gate"] = readiness_gate(mine, layout, path, allow_not_ready)
    return checks
