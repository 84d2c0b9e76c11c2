"""The checks every export passes before it is written: onnx.checker, onnxruntime-vs-PyTorch
agreement, and the readiness of the Q/DQ graph for the target's runtime, which is a gate.

A check that finds a problem decides something: an INT8 graph the target's runtime cannot run in
INT8 stops the export with one line naming the first offending nodes (``--allow-not-ready`` ships
it anyway, and the record says so). The other runtime's check is kept in the record as
information, not shown as an error: a TensorRT graph is *meant* to run in float on onnxruntime's
CPU provider.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Mapping, TypeVar

import numpy as np
import torch
import torch.nn as nn

from edgekd import ui
from edgekd.errors import EdgekdError
from edgekd.export.graph import QdqReport, show_report
from edgekd.export.onnx import INPUT_NAME, has_fake_quant, without_quantizers
from edgekd.export.openvino_layout import check_openvino_int8, openvino_logits, openvino_missing
from edgekd.export.ort_layout import check_ort_cpu_fusion
from edgekd.export.tensorrt_layout import check_tensorrt_readiness
from edgekd.quantize.sensitivity import float_layers_of
from edgekd.runtime.backends import ORT_DISABLED_OPTIMIZERS

K = TypeVar("K")

FIXES = {"tensorrt": "quantize the model for this target (edgekd quantize --layout tensorrt, or build --target with a TensorRT target)",
         "ort-cpu": "quantize the model for this target (edgekd quantize --layout ort-cpu)",
         "openvino": "quantize the model for this target (edgekd quantize --layout openvino) with OpenVINO installed (pip install 'edgekd[openvino]')"}
READINESS_TITLES = {"tensorrt": "TensorRT readiness", "ort-cpu": "onnxruntime CPU integer kernels", "openvino": "OpenVINO CPU integer kernels"}


def ort_session(path: str | Path, threads: int | None = None, exact_qdq: bool = False):
    """An onnxruntime CPU session. ``exact_qdq`` turns graph optimisations off, so Q/DQ nodes run as
    written (quantize, dequantize, float op): the arithmetic TensorRT performs on a
    ``tensorrt``-layout graph. With optimisations on, onnxruntime fuses some DQ -> Conv -> Q groups
    of such a graph into its own s8 kernels, which saturate on AVX2 and are not what the device runs."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if exact_qdq:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"], disabled_optimizers=ORT_DISABLED_OPTIMIZERS)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises many exception types
        raise EdgekdError(f"onnxruntime cannot load {path}: {str(exc).splitlines()[0][:200]}", "the ONNX file is corrupt or uses unsupported ops") from exc


def ort_logits(path_or_session, x: np.ndarray, batch_size: int = 256, exact_qdq: bool = False) -> np.ndarray:
    sess = path_or_session if hasattr(path_or_session, "run") else ort_session(path_or_session, exact_qdq=exact_qdq)
    return np.concatenate([sess.run(None, {INPUT_NAME: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)])


def agreement(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None = None) -> dict[str, Any]:
    """Top-1 agreement and max abs logit difference of ``candidate`` vs ``reference`` (+ both accuracies)."""
    out = {"n": int(len(reference)), "top1_agreement": float((reference.argmax(1) == candidate.argmax(1)).mean()),
           "max_abs_diff": float(np.abs(reference - candidate).max())}
    if labels is not None:
        out["reference_top1"] = float((reference.argmax(1) == labels).mean())
        out["onnx_top1"] = float((candidate.argmax(1) == labels).mean())
    return out


def ort_latency_ms(path: str | Path, batch: int, shape: tuple[int, int, int], runs: int = 50, warmup: int = 5, threads: int | None = 2) -> float:
    """Median wall time of one ``session.run`` at ``batch`` (onnxruntime CPU provider)."""
    sess = ort_session(path, threads)
    x = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
    for _ in range(warmup):
        sess.run(None, {INPUT_NAME: x})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, {INPUT_NAME: x})
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def interleaved_latency_ms(files: Mapping[K, str | Path], batch: int, shape: tuple[int, int, int], runs: int, rounds: int) -> dict[K, list[float]]:
    """Each file's :func:`ort_latency_ms` once per round, every file in turn each round: on a shared
    or throttling CPU the speed drifts by tens of percent within a minute, and files timed one after
    the other would show that drift as a difference between them. Take the median of each list."""
    per: dict[K, list[float]] = {key: [] for key in files}
    for _ in range(rounds):
        for key, path in files.items():
            per[key].append(ort_latency_ms(path, batch, shape, runs))
    return per




def reference_logits(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([model(x[i : i + 256]) for i in range(0, len(x), 256)]).float().numpy()


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
