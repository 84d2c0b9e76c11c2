"""The ``ort-cpu`` layout: onnxruntime's QDQ format with the scales QAD trained.

onnxruntime's CPU provider fuses only DQ -> op -> Q groups into integer kernels (QLinearConv,
QLinearAdd, ...), wants u8 activations and s8 per-channel weights on x86 (onnxruntime's
quantization guide, "Quantize ONNX models"), and folds a ReLU into the quantized op before it.

How the trained scales reach that layout, exactly and for any traceable network:
1. The fake-quant model is exported as is (TorchScript exporter): a Q/DQ graph whose every
   QuantizeLinear carries a trained scale on a named tensor.
2. :func:`strip_qdq` removes the Q/DQ pairs, keeping every tensor name, and reads off
   {tensor: amax} for activations and {weight: per-channel scales}. No name mapping by module
   path is involved, so nothing can land on the wrong layer.
3. onnxruntime's own ``quantize_static`` lays out its QDQ graph on the stripped FP32 graph with
   ``TensorQuantOverrides`` holding those scales: the runtime's placement rules, the trained grid
   (biases too: QAD rounds them to onnxruntime's int32 grid, :mod:`edgekd.quantize.bias`).
   Tensors it quantizes that training did not (the ``ort-cpu`` placement mirrors onnxruntime's, so
   normally none) are calibrated on images and counted in the export record.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn as nn

from edgekd import ui
from edgekd.data import Preprocess
from edgekd.errors import EdgekdError
from edgekd.export.graph import Graph, QdqReport
from edgekd.export.logits import agreement, ort_logits, reference_logits
from edgekd.export.to_onnx import INPUT_NAME, has_fake_quant, torch_to_onnx
from edgekd.export.strip import strip_qdq
from edgekd.atomic import atomic_path
from edgekd.quantize.sensitivity import float_layers_of
from edgekd.runtime.backends import ORT_DISABLED_OPTIMIZERS

INTEGER_OPS = {"QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
               "QLinearAdd", "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearConcat", "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu"}
COMPUTE_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
FLOAT_COMPUTE_OPS = COMPUTE_OPS | {"FusedConv", "FusedGemm", "FusedMatMul", "NhwcFusedConv"}
# ops through which a tensor keeps its quantization parameters (onnxruntime shares scales across them)
SCALE_PRESERVING = {"MaxPool", "Flatten", "Reshape", "Identity", "Transpose", "Squeeze", "Unsqueeze"}


def nonnegative_producer(tensor: str, producers: dict[str, Any], consts: dict[str, np.ndarray] | None = None) -> str | None:
    """'Relu' or 'Clip' (lower bound >= 0: ReLU6) when ``tensor`` comes out of one, through ops
    that keep the sign (pooling, reshapes); None otherwise."""
    node = producers.get(tensor)
    while node is not None and node.op_type in SCALE_PRESERVING | {"GlobalAveragePool", "AveragePool"}:
        node = producers.get(node.input[0])
    if node is None:
        return None
    if node.op_type == "Relu":
        return "Relu"
    if node.op_type == "Clip" and len(node.input) > 1 and node.input[1] and consts is not None:
        low = consts.get(node.input[1])
        return "Clip" if low is not None and float(np.min(low)) >= 0.0 else None
    return None


SIGNED_ZERO_POINT_FOR_U8_WEIGHTS = 64


def lower_bound(tensor: str, producers: dict[str, Any], amax: float) -> float:
    """The smallest value the op making ``tensor`` can produce: -0.375 for hard-swish
    (x * relu6(x + 3) / 6 has its minimum at x = -1.5), else the trained range's -amax."""
    node = producers.get(tensor)
    return max(-0.375, -amax) if node is not None and node.op_type == "HardSwish" else -amax


def trained_overrides(stripped, act_amax: dict[str, float], weight_scale: dict[str, np.ndarray], relu_codes: int = 127,
                      u8_weights: str = "image") -> dict[str, list[dict[str, Any]]]:
    """onnxruntime ``TensorQuantOverrides`` from the scales read off the trained Q/DQ graph.

    Activations: u8 on the trained grid (:func:`u8_params`). Weights: the trained per-channel
    scales, s8 with zero point 0, except for the ops ``u8_weights`` names, which get u8 weights with
    zero point 128 (the same grid, shifted): ``"none"`` (7-bit weights cannot saturate); ``"image"``, the ops that read the network's input;
    ``"signed"``, every op whose input is strongly signed (u8 zero point >= 64); ``"all"``, every
    op (unsigned ReLU6 outputs use codes up to 255 too). Why: onnxruntime's
    AVX2 u8 x s8 kernel adds pairs of products in 16 bits and saturates when neighbouring codes are
    large, as they are all over a normalised image (measured: the first conv of a grey-image CNN
    took top-1 agreement with the fake-quant model from 100% to 58%); its u8 x u8 kernel widens
    first and cannot saturate, but is slower on large convs (MobileNetV3-Large at batch 64: 27 ms
    with u8 weights on every signed input vs 16 ms), so deeper ops keep s8 unless the agreement
    check asks for more (:func:`export_int8_ort_closest`).
    """
    from onnxruntime.quantization import QuantType

    g = Graph(stripped)
    act_params: dict[str, tuple[float, int]] = {}
    for tensor, amax in act_amax.items():
        if amax < 0:  # trained unsigned: the u8 grid itself
            act_params[tensor] = (-amax / 255.0, 0)
            continue
        producer = nonnegative_producer(tensor, g.producers, g.consts)
        low = 0.0 if producer else (-128.0 * amax / 127.0 if u8_weights == "none" else lower_bound(tensor, g.producers, amax))
        # onnxruntime drops a Clip (ReLU6) into the Q before it, so the Q's range must end where the
        # clip does: 255 codes over [0, amax]; a Relu has no upper bound and may use either range.
        act_params[tensor] = u8_params(max(amax, 1e-12), low, 255 if producer == "Clip" else relu_codes)
    overrides: dict[str, list[dict[str, Any]]] = {}
    for tensor, (scale, zp) in act_params.items():
        entry = [{"scale": np.array(scale, dtype=np.float32), "zero_point": np.array(zp, dtype=np.uint8)}]
        overrides[tensor] = entry
        node = g.producers.get(tensor)  # onnxruntime gives MaxPool/Flatten/... outputs their input's scale: carry it back
        while node is not None and node.op_type in SCALE_PRESERVING and node.input[0] not in overrides and node.input[0] not in act_amax:
            overrides[node.input[0]] = entry
            node = g.producers.get(node.input[0])
    for node in g.nodes:  # ... and their outputs the scale of their input (a Flatten before the classifier)
        if node.op_type in SCALE_PRESERVING and node.input and node.input[0] in overrides and node.output[0] not in overrides:
            overrides[node.output[0]] = overrides[node.input[0]]
    graph_inputs = {i.name for i in stripped.graph.input}

    def wants_u8(node) -> bool:
        if u8_weights in ("none", "all"):
            return u8_weights == "all"
        if u8_weights == "signed":
            return act_params.get(node.input[0], (0, 128))[1] >= SIGNED_ZERO_POINT_FOR_U8_WEIGHTS
        return node.input[0] in graph_inputs

    signed_weights = {n.input[1] for n in g.nodes if n.op_type in COMPUTE_OPS and len(n.input) > 1 and wants_u8(n)}
    for weight, scales in weight_scale.items():
        if weight in signed_weights:
            zp: dict[str, Any] = {"zero_point": np.array(128, dtype=np.uint8), "quant_type": QuantType.QUInt8}
        else:
            zp = {"zero_point": np.array(0, dtype=np.int8)}
        overrides[weight] = [{"axis": 0, "scale": np.array(max(float(s), 1e-12), dtype=np.float32), **zp} for s in scales.tolist()]
    return overrides


def u8_params(amax: float, minimum: float, relu_codes: int = 127) -> tuple[float, int]:
    """u8 scale / zero point for a tensor whose trained quantizer is symmetric int8 with ``amax``
    and whose values cannot go below ``minimum`` (a bound of the op that makes it).

    - Non-negative (after ReLU / ReLU6 / sigmoid): zero point 0, which also lets onnxruntime drop a
      ReLU into the QLinearConv before it. ``relu_codes=127``: scale amax/127, the trained grid;
      codes 0..127 up to amax, so onnxruntime's x86 u8 x s8 kernel (``vpmaddubsw``, 16-bit pair
      sums) cannot saturate; values above amax clip at 2*amax. ``relu_codes=255``: amax/255.
    - Signed: scale amax/127 and the smallest zero point that holds ``minimum`` (at most 128). A
      tensor barely negative by construction (hard-swish: >= -0.375) keeps small codes, far from
      saturating; with 7-bit weights nothing saturates and ``minimum`` is the trained grid's own
      (-128 codes), so the zero point is 128 and the file clips exactly where training did.
    """
    if minimum >= 0:
        return amax / float(relu_codes), 0
    scale = amax / 127.0
    return scale, int(min(128, math.ceil(-minimum / scale - 1e-6)))


class _CalibReader:
    """onnxruntime CalibrationDataReader over preprocessed uint8 images."""

    def __init__(self, images_u8: torch.Tensor, preprocess: Preprocess, batch_size: int = 64):
        self.batches = [preprocess(images_u8[i : i + batch_size]).numpy() for i in range(0, len(images_u8), batch_size)]
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.feeds, None)

    def rewind(self) -> None:
        self.feeds = iter([{INPUT_NAME: b} for b in self.batches])


def ort_quantize_static(fp32_path: str | Path, path: str | Path, calib_u8: torch.Tensor, preprocess: Preprocess,
                        overrides: dict[str, list[dict[str, Any]]] | None = None, exclude: list[str] | None = None,
                        u8_weights: bool = False, reduce_range: bool = False) -> Path:
    """onnxruntime's QDQ quantizer: per-channel s8 weights, u8 activations (the x86 fast path).
    ``u8_weights`` (its U8U8 format) and ``reduce_range`` (7-bit weights) are onnxruntime's
    documented cures for AVX2 u8 x s8 saturation.

    With ``overrides`` the trained scales are used; tensors without one are calibrated by MinMax
    on ``calib_u8``. Without overrides this is plain post-training quantization (a baseline), after
    onnxruntime's recommended pre-processing (``quant_pre_process``: graph optimization + shapes);
    with overrides only shapes are inferred, so the tensor names the overrides refer to stay.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    extra = {"TensorQuantOverrides": overrides} if overrides else {}
    with tempfile.TemporaryDirectory() as td, atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pre = Path(td) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_optimization=bool(overrides), skip_symbolic_shape=True)
        quantize_static(str(pre), str(tmp), _CalibReader(calib_u8, preprocess), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QUInt8 if u8_weights else QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, reduce_range=reduce_range,
                        extra_options=extra, nodes_to_exclude=exclude or [])
    return Path(path)


def untrained_tensors(path: str | Path, overrides: dict[str, Any]) -> list[str]:
    """Activations onnxruntime quantized with a scale calibrated at export, not trained in QAD
    (e.g. op outputs a ``tensorrt``-placed model never quantized)."""
    import onnx

    proto = onnx.load(str(path))
    inits = {i.name for i in proto.graph.initializer}
    return sorted({n.input[0] for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits and n.input[0] not in overrides})


@dataclass
class OrtSource:
    """What every ort-cpu variant of one trained model is built from (computed once)."""

    float_path: Path
    stripped: Any
    act_amax: dict[str, float]
    weight_scale: dict[str, np.ndarray]
    float_layers: list[str]  # compute nodes left in float (named after their layer by strip_qdq)


def ort_source(qmodel: nn.Module, workdir: Path, preprocess: Preprocess, opset: int = 17) -> OrtSource:
    """Export the trained Q/DQ graph, strip it, read its scales."""
    import onnx

    if not has_fake_quant(qmodel):
        raise EdgekdError("model has no INT8 quantizers", "quantize it first (edgekd quantize)")
    qdq = torch_to_onnx(qmodel, workdir / "qdq.onnx", preprocess, opset)
    stripped, act_amax, weight_scale = strip_qdq(qdq)
    onnx.save(stripped, str(workdir / "float.onnx"))
    float_layers = float_layers_of(qmodel)
    missing = sorted(set(float_layers) - {n.name for n in stripped.graph.node})
    if missing:
        raise EdgekdError(f"layer '{missing[0]}' is to stay in float but has no node of that name in the exported graph", "report this as an edgekd bug")
    return OrtSource(workdir / "float.onnx", stripped, act_amax, weight_scale, float_layers)


def quantize_for_ort(src: OrtSource, path: str | Path, preprocess: Preprocess, calib_u8: torch.Tensor, relu_codes: int = 127,
                     u8_weights: str = "image") -> list[str]:
    """One ort-cpu file from ``src``; returns the activations calibrated here rather than trained."""
    overrides = trained_overrides(src.stripped, src.act_amax, src.weight_scale, relu_codes, u8_weights)
    ort_quantize_static(src.float_path, path, calib_u8, preprocess, overrides, exclude=src.float_layers)
    return untrained_tensors(path, overrides)


def base_u8_policy(qmodel: nn.Module) -> str:
    """The u8-weight policy of a model's fast file: 'none' on 7-bit weights (nothing can saturate), else 'image'."""
    return "none" if getattr(qmodel, "edgekd_quant", {}).get("weight_bits", 8) < 8 else "image"


def export_int8_ort(qmodel: nn.Module, path: str | Path, preprocess: Preprocess, calib_u8: torch.Tensor, opset: int = 17,
                    relu_codes: int = 127, u8_weights: str | None = None) -> tuple[Path, list[str]]:
    """The onnxruntime-CPU layout of a fake-quant model with its trained scales; returns the path and the activations calibrated here (:func:`untrained_tensors`)."""
    with tempfile.TemporaryDirectory() as td:
        src = ort_source(qmodel, Path(td), preprocess, opset)
        return Path(path), quantize_for_ort(src, path, preprocess, calib_u8, relu_codes, u8_weights or base_u8_policy(qmodel))


def export_int8_ort_closest(qmodel: nn.Module, path: Path, preprocess: Preprocess, calib_u8: torch.Tensor, check_x: torch.Tensor, opset: int,
                            min_agreement: float = 0.99) -> dict[str, Any]:
    """The ort-cpu export whose onnxruntime outputs agree best with the fake-quant model on the
    held check batch, among the ReLU code ranges (127 or 255, see :func:`u8_params`); if even the
    better one agrees on fewer than ``min_agreement`` of top-1 predictions, u8 weights on every
    strongly signed input (slower, no saturation, see :func:`trained_overrides`) are tried too.

    127 codes cannot saturate the AVX2 kernel but clip at 2*amax; 255 codes clip at amax as in
    training. Which one drifts less depends on the model (a well-trained one rarely exceeds amax; an
    under-trained one often does: on a 2-epoch nano_cnn the mean |logit difference| was 0.67 with
    127 codes and 0.13 with 255), so both are measured and the one with the smaller mean |logit
    difference| ships (a continuous measure: top-1 agreement on a few hundred images moves in steps
    of a few tenths of a percent). The record keeps every result.

    A model trained on 7-bit weights (the x86 default, :func:`edgekd.quantize.default_weight_bits`)
    cannot saturate, so its weights stay s8 everywhere (the fast kernels) and no u8 variant is tried.
    """
    reference = reference_logits(qmodel, check_x)
    tried: dict[str, dict[str, Any]] = {}
    untrained: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as td:
        src = ort_source(qmodel, Path(td), preprocess, opset)

        def attempt(codes: int, u8_weights: str) -> str:
            key = f"{codes}" if u8_weights in ("image", "none") else f"{codes}-{u8_weights}"
            untrained[key] = quantize_for_ort(src, Path(td) / f"{key}.onnx", preprocess, calib_u8, codes, u8_weights)
            logits = ort_logits(Path(td) / f"{key}.onnx", check_x.numpy())
            tried[key] = {**agreement(reference, logits), "mean_abs_diff": float(np.abs(reference - logits).mean())}
            return key

        base = base_u8_policy(qmodel)
        narrow = base == "none"
        for codes in (127, 255):
            attempt(codes, base)
        best = min(tried, key=lambda k: (round(tried[k]["mean_abs_diff"], 6), -tried[k]["top1_agreement"], k != "127"))
        for policy in ("signed", "all"):  # slower kernels, no saturation: only when the fast file drifts
            if narrow or tried[best]["top1_agreement"] >= min_agreement:
                break
            wider = attempt(int(best.partition("-")[0]), policy)
            best = wider if tried[wider]["mean_abs_diff"] < tried[best]["mean_abs_diff"] else best
        with atomic_path(path) as tmp:
            shutil.copyfile(Path(td) / f"{best}.onnx", tmp)
    codes, _, policy = best.partition("-")
    if policy:
        ui.warn(f"onnxruntime's u8 x s8 kernels saturate on this model (top-1 agreement with the trained model "
                f"{tried[codes]['top1_agreement']:.2%}); shipping u8 weights on {policy} ops instead: exact, but slower on CPUs without VNNI")
    return {"untrained_tensors": untrained[best], "relu_codes": int(codes), "u8_weights": policy or base,
            "weight_bits": 7 if narrow else 8, "relu_codes_tried": {k: v for k, v in tried.items() if "-" not in k}, "variants_tried": tried}


def check_ort_cpu_fusion(path: str | Path, float_layers: Iterable[str] = ()) -> QdqReport:
    """Ask onnxruntime itself: optimize the graph for the CPU provider and count integer vs float compute ops.

    onnxruntime fuses only DQ -> op -> Q groups into QLinear* kernels; a TensorRT-style graph
    (Q/DQ on inputs only) keeps float Conv/Gemm and runs in float (plus the Q/DQ overhead).
    Compute ops of ``float_layers`` (kept in float on purpose) are listed in ``kept_float``.
    """
    import onnx
    import onnxruntime as ort

    rep = QdqReport(runtime="onnxruntime-cpu")
    with tempfile.TemporaryDirectory() as td:
        opt = Path(td) / "opt.onnx"
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(opt)
        so.log_severity_level = 3
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"], disabled_optimizers=ORT_DISABLED_OPTIMIZERS)
        optimized = onnx.load(str(opt))
    ops = [n.op_type for n in optimized.graph.node]
    integer = [o for o in ops if o in INTEGER_OPS]
    kept = set(float_layers)
    float_compute = [n.name or n.op_type for n in optimized.graph.node if n.op_type in FLOAT_COMPUTE_OPS and _layer_of_fused(n.name) not in kept]
    rep.kept_float = [n.name for n in optimized.graph.node if n.op_type in FLOAT_COMPUTE_OPS and _layer_of_fused(n.name) in kept]
    rep.counts = {"integer_ops": len(integer), "float_compute_ops": len(float_compute),
                  "QuantizeLinear": ops.count("QuantizeLinear"), "DequantizeLinear": ops.count("DequantizeLinear")}
    rep.quantized_ops = [{"op": o} for o in integer]
    rep.float_ops = float_compute
    source = onnx.load(str(path))
    has_qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in source.graph.node)
    if has_qdq and float_compute:
        rep.errors.append(f"{len(float_compute)} of {len(float_compute) + len(integer)} compute ops stay float on onnxruntime CPU "
                          "(Q/DQ not in DQ -> op -> Q groups, e.g. a TensorRT-layout graph): they run in float, slower than FP32; use layout ort-cpu")
    g = Graph(source)
    s8_acts = [n.name for n in g.nodes if n.op_type == "QuantizeLinear" and (zp := g.const(n.input[2]) if len(n.input) > 2 else None) is not None
               and zp.dtype == np.int8 and g.const(n.input[0]) is None]
    if s8_acts:
        rep.warnings.append(f"{len(s8_acts)} activations are int8: onnxruntime's fast x86 kernels want uint8 activations")
    return rep


def _layer_of_fused(name: str) -> str:
    """onnxruntime names a fused node after the node it started from plus a suffix (``conv1_fused``...)."""
    for suffix in ("_fused", "_nchwc", "_token"):
        name = name.split(suffix)[0]
    return name
