"""Stage 3: ONNX export with one Q/DQ layout per runtime, and the checks that prove it is right.

Follows the TensorRT developer guide ("Working with Quantized Types" / explicit quantization: Q/DQ
layer placement recommendations) for the ``tensorrt`` layout, and onnxruntime's quantization guide
("Quantize ONNX models": QDQ format, u8 activations / s8 per-channel weights on x86) for the
``ort-cpu`` layout. Why two layouts: the layout decides the speed (FACTS.md): a TensorRT-style
graph (Q/DQ on op inputs only) runs *in float* on onnxruntime's CPU provider, which fuses only
DQ -> op -> Q groups into integer kernels; TensorRT needs symmetric int8 with zero point 0.

- ``tensorrt``: the fake-quant student exported as is (TorchScript exporter, ``dynamo=False``):
  symmetric int8, zero point 0, per-channel weight scales on axis 0, per-tensor activations,
  Q/DQ on every Conv/Gemm input and on the residual input of each Add.
- ``ort-cpu``: the same student with its quantizers off exported as FP32, then
  ``onnxruntime.quantization.quantize_static`` (QDQ, per-channel s8 weights, u8 activations) with
  ``TensorQuantOverrides`` carrying the scales *learned in training* (from each quantizer's amax),
  so nothing is re-calibrated and the deployed grid is the trained one.
- ``fp32`` / ``fp16`` exports (fp16 keeps float32 input/output, casts inside).

Every export is checked: ``onnx.checker``, onnxruntime-vs-PyTorch agreement on held images, a
static TensorRT-readiness check of the Q/DQ graph (no GPU needed) and onnxruntime's own fusion
result (how many compute ops run in integer kernels on the CPU provider).
"""

from __future__ import annotations

import copy
import json
import shutil
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from edgekd import ui
from edgekd.data import DataSet, Preprocess, calibration_images
from edgekd.errors import EdgekdError
from edgekd.manifest import atomic_path, versions, write_json_atomic

LAYOUTS = ("tensorrt", "ort-cpu")
PRECISIONS = ("int8", "fp16", "fp32")
COMPUTE_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
INTEGER_OPS = {"QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
               "QLinearAdd", "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearConcat", "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu"}
FLOAT_COMPUTE_OPS = COMPUTE_OPS | {"FusedConv", "FusedGemm", "FusedMatMul", "NhwcFusedConv"}
# ops through which a tensor keeps its quantization parameters (onnxruntime shares scales across them)
SCALE_PRESERVING = {"MaxPool", "Flatten", "Reshape", "Identity", "Transpose", "Squeeze", "Unsqueeze"}
NONNEGATIVE_PRODUCERS = {"Relu"}
INPUT_NAME, OUTPUT_NAME = "input", "logits"


# ----------------------------------------------------------------------------- targets -> layout
_FALLBACK_TARGETS = {"x86-cpu": "ort-cpu", "arm64-cpu": "ort-cpu", "x86-cuda": "tensorrt"}


def layout_for_target(target: str) -> tuple[str, str]:
    """(layout, precision) the target's runtime wants; from edgekd.targets when present."""
    try:
        from edgekd.targets import get_target
    except ImportError:  # targets module absent: a small built-in map
        if target.startswith("jetson"):
            return "tensorrt", "int8"
        if target in _FALLBACK_TARGETS:
            return _FALLBACK_TARGETS[target], "int8"
        raise EdgekdError(f"unknown target '{target}'", f"use one of: jetson-*, {', '.join(_FALLBACK_TARGETS)}, or pass --layout") from None
    t = get_target(target)
    return t.layout, t.precision


def resolve_layout(target: str | None, layout: str | None, precision: str | None) -> tuple[str, str]:
    """Explicit --layout/--precision win over the target's; 'auto' or None means 'the target's'."""
    t_layout, t_precision = layout_for_target(target) if target else (None, None)
    layout = layout if layout not in (None, "auto") else t_layout
    precision = precision or t_precision or "int8"
    if precision not in PRECISIONS:
        raise EdgekdError(f"unknown precision '{precision}'", f"use one of {', '.join(PRECISIONS)}")
    if precision == "int8" and layout not in LAYOUTS:
        raise EdgekdError("INT8 export needs a Q/DQ layout", "pass --target NAME or --layout tensorrt|ort-cpu")
    return layout or "none", precision


# ----------------------------------------------------------------------------- torch -> ONNX
def _has_fake_quant(model: nn.Module) -> bool:
    from edgekd.quantize import enabled_quantizers

    return bool(enabled_quantizers(model))


def torch_to_onnx(model: nn.Module, path: str | Path, preprocess: Preprocess, opset: int = 17, dynamo: bool = False) -> "onnx.ModelProto":  # noqa: F821
    """Export with a dynamic batch axis, input 'input', output 'logits'; returns the loaded proto.

    The dynamo exporter drops modelopt's fake-quant (no QuantizeLinear comes out), so a quantized
    model with ``dynamo=True`` is refused, and the graph is checked for Q/DQ afterwards anyway.
    """
    import onnx

    quantized = _has_fake_quant(model)
    if quantized and dynamo:
        raise EdgekdError("the dynamo ONNX exporter breaks fake-quant (no Q/DQ nodes come out)",
                          "edgekd exports quantized models with the TorchScript exporter (dynamo=False)")
    model.eval()
    example = torch.zeros(2, preprocess.channels, preprocess.input_size, preprocess.input_size)
    with atomic_path(path) as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (example,), str(tmp), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, opset_version=opset,
                              dynamo=dynamo, do_constant_folding=True)
        except Exception as exc:  # noqa: BLE001 - exporter failures of any kind become one line
            raise EdgekdError(f"ONNX export failed: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}",
                              "check the model uses ONNX-exportable layers (timm: exportable=True)") from exc
    proto = onnx.load(str(path))
    if quantized and not any(n.op_type == "QuantizeLinear" for n in proto.graph.node):
        raise EdgekdError("the exported graph has no QuantizeLinear although the model is fake-quantized",
                          "export with dynamo=False; the dynamo exporter drops modelopt quantizers")
    return proto


def stamp_metadata(path: str | Path, meta: dict[str, Any]) -> None:
    """Write ``metadata_props`` (JSON for non-strings) so the file knows how to feed itself."""
    import onnx

    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key = key
        entry.value = value if isinstance(value, str) else json.dumps(value)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))


def read_metadata(path: str | Path) -> dict[str, Any]:
    import onnx

    out = {}
    for p in onnx.load(str(path), load_external_data=False).metadata_props:
        try:
            out[p.key] = json.loads(p.value)
        except json.JSONDecodeError:
            out[p.key] = p.value
    return out


# ----------------------------------------------------------------------------- per-format exports
def without_quantizers(model: nn.Module) -> nn.Module:
    """A copy with fake-quant weights baked in and every quantizer switched off (an FP32 network)."""
    from edgekd.quantize import _tensor_quantizer_cls

    m = copy.deepcopy(model).eval()
    TQ = _tensor_quantizer_cls()
    with torch.no_grad():
        for mod in m.modules():
            wq = getattr(mod, "weight_quantizer", None)
            if isinstance(wq, TQ) and wq.is_enabled and getattr(mod, "weight", None) is not None:
                mod.weight.copy_(wq(mod.weight))
        for mod in m.modules():
            if isinstance(mod, TQ):
                mod.disable()
    return m


class _Fp16(nn.Module):
    """float32 in/out, float16 inside: callers keep feeding float32 arrays."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.half()).float()


def export_fp32(model: nn.Module, path: str | Path, preprocess: Preprocess, opset: int = 17) -> Path:
    torch_to_onnx(without_quantizers(model) if _has_fake_quant(model) else model, path, preprocess, opset)
    return Path(path)


def export_fp16(model: nn.Module, path: str | Path, preprocess: Preprocess, opset: int = 17) -> Path:
    base = without_quantizers(model) if _has_fake_quant(model) else copy.deepcopy(model)
    torch_to_onnx(_Fp16(base.eval()), path, preprocess, opset)
    return Path(path)


def export_int8_tensorrt(qmodel: nn.Module, path: str | Path, preprocess: Preprocess, opset: int = 17) -> Path:
    """The fake-quant model as explicit Q/DQ: TensorRT builds an INT8 engine from it without a calibration cache."""
    if not _has_fake_quant(qmodel):
        raise EdgekdError("model has no INT8 quantizers", "quantize it first (edgekd quantize, or export an FP32 checkpoint with --precision int8 to calibrate)")
    torch_to_onnx(qmodel, path, preprocess, opset)
    return Path(path)


def _module_of(node_name: str) -> str:
    """'/features/features.0/features.0.0/Conv' -> 'features.0.0' (TorchScript exporter scope names)."""
    parts = [p for p in node_name.split("/") if p]
    return parts[-2] if len(parts) >= 2 else ""


def _graph_index(graph) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    producers, consumers = {}, {}
    for n in graph.node:
        for o in n.output:
            producers[o] = n
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return producers, consumers


def _is_nonnegative(tensor: str, producers: dict[str, Any]) -> bool:
    node = producers.get(tensor)
    while node is not None and node.op_type in SCALE_PRESERVING | {"GlobalAveragePool", "AveragePool"}:
        node = producers.get(node.input[0])
    return node is not None and node.op_type in NONNEGATIVE_PRODUCERS


def u8_params(amax: float, nonnegative: bool, relu_codes: int = 127) -> tuple[float, int]:
    """u8 scale/zero point from a symmetric int8 amax learned in training.

    Non-negative tensors (after ReLU) get zero point 0, which also lets onnxruntime drop the ReLU
    and fuse Conv+ReLU into QLinearConv (it cannot before a Q with zero point 128):
    - ``relu_codes=127`` (default): scale = amax/127, exactly the trained grid (k * amax/127).
      Values up to amax use codes 0..127, so the u8 x s8 products of onnxruntime's x86 kernels
      (``vpmaddubsw`` without VNNI) cannot saturate (2 * 127 * 127 < 32767); values above amax
      clip at 2*amax instead of amax (rare after max calibration).
    - ``relu_codes=255``: scale = amax/255, the trained clipping range [0, amax] on a grid twice as
      fine; drifts more from the fake-quant model (benchmarks/quantization_results.md: ORT-vs-PyTorch
      top-1 agreement 99.07% vs 99.59% on nano_cnn) and codes up to 255 can saturate.
    Signed tensors: scale = amax/127, zero point 128 (codes 1..255 hold -amax..amax, the trained
    grid); they feed only ops without a u8 x s8 dot product (Add), see :func:`saturating_nodes`.
    """
    if nonnegative:
        return amax / float(relu_codes), 0
    return amax / 127.0, 128


def saturating_nodes(fp32_proto) -> list[str]:
    """Conv/Gemm/MatMul whose activation input can be negative (e.g. the first conv on a normalised image).

    With zero point 128 their u8 codes reach 255, and pairs of 255 x 127 products overflow the
    16-bit intermediate of onnxruntime's AVX2 u8 x s8 kernel (measured here: top-1 agreement with
    the fake-quant model fell from 99% to 85% on pico_cnn). Such ops are left in float: it is
    usually the first conv on a 1- or 3-channel image, a small share of the compute.
    """
    producers, _ = _graph_index(fp32_proto.graph)
    inits = {i.name for i in fp32_proto.graph.initializer}
    return [n.name for n in fp32_proto.graph.node if n.op_type in COMPUTE_OPS and n.input[0] not in inits and not _is_nonnegative(n.input[0], producers)]


def trained_overrides(qmodel: nn.Module, fp32_proto, relu_codes: int = 127) -> dict[str, list[dict[str, Any]]]:
    """onnxruntime ``TensorQuantOverrides`` from the model's quantizers: activations and weights.

    Node scope names in the TorchScript export carry the module path, which maps each Conv/Gemm to
    its ``input_quantizer`` / ``weight_quantizer`` and each residual Add to its block's
    ``residual_input_quantizer``. A tensor feeding two quantizers gets the larger amax.
    """
    from edgekd.quantize import enabled_quantizers

    quantizers = enabled_quantizers(qmodel)
    producers, _ = _graph_index(fp32_proto.graph)
    initializers = {i.name for i in fp32_proto.graph.initializer}
    act_amax: dict[str, float] = {}
    overrides: dict[str, list[dict[str, Any]]] = {}

    def note(tensor: str, amax: float) -> None:
        act_amax[tensor] = max(amax, act_amax.get(tensor, 0.0))

    for node in fp32_proto.graph.node:
        mod = _module_of(node.name)
        if node.op_type in COMPUTE_OPS:
            iq, wq = quantizers.get(f"{mod}.input_quantizer"), quantizers.get(f"{mod}.weight_quantizer")
            if iq is not None:
                note(node.input[0], float(iq.amax.max()))
            if wq is not None and len(node.input) > 1 and node.input[1] in initializers:
                amax = wq.amax.detach().float().flatten()
                overrides[node.input[1]] = [{"axis": 0, "scale": np.array(max(a, 1e-12) / 127.0, dtype=np.float32), "zero_point": np.array(0, dtype=np.int8)}
                                      for a in amax.tolist()]
        elif node.op_type == "Add":
            rq = quantizers.get(f"{mod}.residual_input_quantizer")
            if rq is not None and len(node.input) == 2:
                note(node.input[1], float(rq.amax.max()))
    for tensor, amax in act_amax.items():
        scale, zp = u8_params(max(amax, 1e-12), _is_nonnegative(tensor, producers), relu_codes)
        entry = [{"scale": np.array(scale, dtype=np.float32), "zero_point": np.array(zp, dtype=np.uint8)}]
        overrides[tensor] = entry
        node = producers.get(tensor)
        while node is not None and node.op_type in SCALE_PRESERVING and node.input[0] not in overrides:
            overrides[node.input[0]] = entry
            node = producers.get(node.input[0])
    return overrides


class _CalibReader:
    """onnxruntime CalibrationDataReader over preprocessed uint8 images."""

    def __init__(self, images_u8: torch.Tensor, preprocess: Preprocess, batch_size: int = 64):
        self.batches = [preprocess(images_u8[i : i + batch_size]).numpy() for i in range(0, len(images_u8), batch_size)]
        self.i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return {INPUT_NAME: self.batches[self.i - 1]}

    def rewind(self) -> None:
        self.i = 0


def ort_quantize_static(fp32_path: str | Path, path: str | Path, calib_u8: torch.Tensor, preprocess: Preprocess,
                        overrides: dict[str, list[dict[str, Any]]] | None = None, exclude: list[str] | None = None) -> Path:
    """onnxruntime's QDQ quantizer: per-channel s8 weights, u8 activations (the x86 fast path).

    With ``overrides`` the trained scales are used; tensors without one are calibrated by MinMax
    on ``calib_u8``. Without overrides this is plain post-training quantization (a baseline).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    extra = {"TensorQuantOverrides": overrides} if overrides else {}
    with tempfile.TemporaryDirectory() as td, atomic_path(path) as tmp:
        pre = Path(td) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_optimization=False, skip_symbolic_shape=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_static(str(pre), str(tmp), _CalibReader(calib_u8, preprocess), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                            extra_options=extra, nodes_to_exclude=exclude or [])
    return Path(path)


def export_int8_ort(qmodel: nn.Module, path: str | Path, preprocess: Preprocess, calib_u8: torch.Tensor, opset: int = 17,
                    fp32_path: str | Path | None = None, relu_codes: int = 127) -> tuple[Path, list[str]]:
    """The onnxruntime-CPU layout from a trained fake-quant model, keeping its learned scales.

    Returns the path and the compute nodes deliberately left in float (see :func:`saturating_nodes`).
    """
    import onnx

    if not _has_fake_quant(qmodel):
        raise EdgekdError("model has no INT8 quantizers", "quantize it first (edgekd quantize)")
    with tempfile.TemporaryDirectory() as td:
        fp32 = Path(fp32_path) if fp32_path else Path(td) / "fp32.onnx"
        if not fp32.is_file():
            export_fp32(qmodel, fp32, preprocess, opset)
        proto = onnx.load(str(fp32))
        keep_float = saturating_nodes(proto)
        ort_quantize_static(fp32, path, calib_u8, preprocess, trained_overrides(qmodel, proto, relu_codes), keep_float)
    return Path(path), keep_float


def export_int8_ort_closest(qmodel: nn.Module, path: Path, preprocess: Preprocess, calib_u8: torch.Tensor, check_x: torch.Tensor, opset: int,
                            fp32_path: Path) -> dict[str, Any]:
    """The ort-cpu export with the ReLU code range (127 or 255, see :func:`u8_params`) whose
    onnxruntime outputs agree best with the fake-quant model on the held check batch.

    127 codes cannot saturate the AVX2 kernel but clip at 2*amax; 255 codes clip at amax as in
    training. Which one drifts less depends on the model (a well-trained one rarely exceeds amax; an
    under-trained one often does: on a 2-epoch nano_cnn the mean |logit difference| was 0.67 with
    127 codes and 0.13 with 255), so both are built and measured on the check batch and the one
    with the smaller mean |logit difference| ships (a continuous measure: top-1 agreement on a few
    hundred images moves in steps of a few tenths of a percent). The record keeps both results.
    """
    reference = _reference_logits(qmodel, check_x)
    tried: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as td:
        for codes in (127, 255):
            candidate = Path(td) / f"relu{codes}.onnx"
            _, float_nodes = export_int8_ort(qmodel, candidate, preprocess, calib_u8, opset, fp32_path, relu_codes=codes)
            logits = ort_logits(candidate, check_x.numpy())
            tried[codes] = {**agreement(reference, logits), "mean_abs_diff": float(np.abs(reference - logits).mean())}
        best = min(tried, key=lambda c: (round(tried[c]["mean_abs_diff"], 6), -tried[c]["top1_agreement"], c != 127))
        with atomic_path(path) as tmp:
            shutil.copyfile(Path(td) / f"relu{best}.onnx", tmp)
    return {"float_nodes": float_nodes, "relu_codes": best, "relu_codes_tried": {str(c): v for c, v in tried.items()}}


# ----------------------------------------------------------------------------- static Q/DQ analysis
@dataclass
class QdqReport:
    """What a Q/DQ graph quantizes, and whether TensorRT / onnxruntime-CPU can run it in INT8."""

    runtime: str
    quantized_ops: list[dict[str, Any]] = field(default_factory=list)
    float_ops: list[str] = field(default_factory=list)
    residual_adds: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


class _Graph:
    def __init__(self, proto):
        from onnx import numpy_helper

        self.proto = proto
        self.nodes = list(proto.graph.node)
        self.producers, self.consumers = _graph_index(proto.graph)
        self.consts = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
        for n in self.nodes:
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value":
                        self.consts[n.output[0]] = numpy_helper.to_array(a.t)
        self.outputs = {o.name for o in proto.graph.output}

    def producer(self, tensor: str):
        return self.producers.get(tensor)

    def skip_casts(self, tensor: str):
        """Producer of ``tensor``, looking through no-op Cast/Identity nodes the exporter leaves."""
        node = self.producers.get(tensor)
        while node is not None and node.op_type in ("Cast", "Identity") and node.input and node.input[0] not in self.consts:
            node = self.producers.get(node.input[0])
        return node

    def const(self, tensor: str) -> np.ndarray | None:
        if tensor in self.consts:
            return self.consts[tensor]
        node = self.producers.get(tensor)
        if node is not None and node.op_type in ("Identity", "Cast") and node.input:
            return self.const(node.input[0])
        return None

    def attr(self, node, name: str, default: Any = None) -> Any:
        from onnx import helper

        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default


def _qdq_params(g: _Graph, node) -> tuple[np.ndarray | None, np.ndarray | None, int | None]:
    scale = g.const(node.input[1]) if len(node.input) > 1 else None
    zp = g.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    return scale, zp, g.attr(node, "axis", 1)


def _weight_out_axis(g: _Graph, node) -> int:
    """Axis of the output channels in the op's weight: 0 for Conv and Gemm(transB=1), 1 for MatMul / Gemm(transB=0)."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if g.attr(node, "transB", 0) else 1
    return 1


def check_tensorrt_readiness(proto) -> QdqReport:
    """Static check of a Q/DQ graph against TensorRT's explicit-quantization rules (no GPU needed).

    Errors: no Q/DQ at all; a zero point that is not int8 0 (TensorRT is symmetric-only);
    non-positive or non-finite scales; a Conv/Gemm/MatMul whose activation or weight is not fed by
    DQ; per-tensor weight scales (TensorRT's guide: per-channel on the output-channel axis, axis 0
    for Conv) or a wrong axis; per-channel activation scales; a residual Add with no quantized
    input (TensorRT then cannot fuse it into the conv and runs it in float); a Q whose output
    feeds anything but DQ, or a Q -> DQ pair whose scales differ.
    """
    g = _Graph(proto)
    rep = QdqReport(runtime="tensorrt")
    qs = [n for n in g.nodes if n.op_type == "QuantizeLinear"]
    dqs = [n for n in g.nodes if n.op_type == "DequantizeLinear"]
    rep.counts = {"QuantizeLinear": len(qs), "DequantizeLinear": len(dqs)}
    if not qs and not dqs:
        rep.errors.append("no QuantizeLinear/DequantizeLinear nodes: not an explicitly quantized (INT8) graph")
        return rep
    for n in qs + dqs:
        scale, zp, _ = _qdq_params(g, n)
        if scale is None:
            rep.errors.append(f"{n.name}: scale is not a constant")
        elif not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            rep.errors.append(f"{n.name}: scale must be positive and finite (min {float(np.min(scale)):.3g})")
        if zp is None:
            rep.errors.append(f"{n.name}: no zero point, so uint8: TensorRT supports only symmetric int8 (zero point 0)")
        elif zp.dtype != np.int8:
            rep.errors.append(f"{n.name}: zero point is {zp.dtype}, TensorRT supports only int8 (zero point 0)")
        elif np.any(zp != 0):
            rep.errors.append(f"{n.name}: zero point {int(np.max(np.abs(zp)))} is not 0: TensorRT supports only symmetric quantization")
    for q in qs:
        users = g.consumers.get(q.output[0], [])
        if any(u.op_type != "DequantizeLinear" for u in users) or q.output[0] in g.outputs:
            rep.errors.append(f"{q.name}: Q output feeds {', '.join(sorted({u.op_type for u in users if u.op_type != 'DequantizeLinear'})) or 'a graph output'}, "
                              "not only DequantizeLinear: TensorRT cannot fuse it")
        for u in users:
            if u.op_type == "DequantizeLinear":
                s1, s2 = g.const(q.input[1]), g.const(u.input[1])
                if s1 is not None and s2 is not None and (s1.shape != s2.shape or not np.allclose(s1, s2)):
                    rep.errors.append(f"{q.name} -> {u.name}: Q and DQ scales differ (requantization TensorRT cannot fold)")
    for node in g.nodes:
        if node.op_type in COMPUTE_OPS:
            _check_compute_op(g, node, rep)
        elif node.op_type == "Add":
            _check_residual_add(g, node, rep)
    return rep


def _dq_of(g: _Graph, tensor: str):
    node = g.skip_casts(tensor)
    return node if node is not None and node.op_type == "DequantizeLinear" else None


def _check_compute_op(g: _Graph, node, rep: QdqReport) -> None:
    act_dq = _dq_of(g, node.input[0])
    w_dq = _dq_of(g, node.input[1]) if len(node.input) > 1 else None
    w_is_const = len(node.input) > 1 and (g.const(node.input[1]) is not None or w_dq is not None)
    row = {"node": node.name, "op": node.op_type, "activation": act_dq is not None, "weight": w_dq is not None, "weight_axis": None, "weight_channels": None}
    if act_dq is None and w_dq is None:
        rep.float_ops.append(node.name)
        rep.errors.append(f"{node.name} ({node.op_type}): neither input is quantized: it runs in float")
        return
    if act_dq is None:
        rep.errors.append(f"{node.name} ({node.op_type}): activation input has no Q/DQ: TensorRT cannot run it in INT8")
    else:
        scale = g.const(act_dq.input[1])
        if scale is not None and scale.size != 1:
            rep.errors.append(f"{node.name}: activation scale has {scale.size} values: TensorRT needs per-tensor activation scales")
    if w_is_const and w_dq is None:
        rep.errors.append(f"{node.name} ({node.op_type}): weight has no Q/DQ: TensorRT needs quantized weights for an INT8 {node.op_type}")
    elif w_dq is not None:
        scale, _, axis = _qdq_params(g, w_dq)
        want_axis = _weight_out_axis(g, node)
        weight = g.const(w_dq.input[0]) if g.skip_casts(w_dq.input[0]) is None or g.skip_casts(w_dq.input[0]).op_type != "QuantizeLinear" \
            else g.const(g.skip_casts(w_dq.input[0]).input[0])
        channels = int(weight.shape[want_axis]) if weight is not None and weight.ndim > want_axis else None
        row["weight_axis"], row["weight_channels"] = (axis if scale is not None and scale.size > 1 else None), (int(scale.size) if scale is not None else None)
        if scale is not None and scale.size == 1 and (channels or 0) > 1:
            rep.errors.append(f"{node.name}: per-tensor weight scale where per-channel (axis {want_axis}, {channels} channels) is required")
        elif scale is not None and scale.size > 1:
            ndim = weight.ndim if weight is not None else 4
            if (axis % ndim) != want_axis:
                rep.errors.append(f"{node.name}: weight scales on axis {axis}, TensorRT needs the output-channel axis {want_axis}")
            if channels is not None and scale.size != channels:
                rep.errors.append(f"{node.name}: {scale.size} weight scales for {channels} output channels")
    rep.quantized_ops.append(row)


def _check_residual_add(g: _Graph, node, rep: QdqReport) -> None:
    """An Add of two activations (a residual): at least the shortcut input must be quantized."""
    if len(node.input) != 2 or any(g.const(i) is not None for i in node.input):
        return
    quantized = [_dq_of(g, i) is not None for i in node.input]
    rep.residual_adds.append({"node": node.name, "inputs_quantized": quantized})
    if not any(quantized):
        rep.errors.append(f"{node.name}: residual Add has no quantized input (skipped residual quantizer): "
                          "TensorRT cannot fuse it with the conv and runs the add in float")


def check_ort_cpu_fusion(path: str | Path, float_on_purpose: int = 0) -> QdqReport:
    """Ask onnxruntime itself: optimize the graph for the CPU provider and count integer vs float compute ops.

    onnxruntime fuses only DQ -> op -> Q groups into QLinear* kernels; a TensorRT-style graph
    (Q/DQ on inputs only) keeps float Conv/Gemm and runs in float (plus the Q/DQ overhead).
    ``float_on_purpose`` compute ops may stay float (left out of quantization by the exporter).
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
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        optimized = onnx.load(str(opt))
    ops = [n.op_type for n in optimized.graph.node]
    integer = [o for o in ops if o in INTEGER_OPS]
    float_compute = [n.name or n.op_type for n in optimized.graph.node if n.op_type in FLOAT_COMPUTE_OPS]
    rep.counts = {"integer_ops": len(integer), "float_compute_ops": len(float_compute),
                  "QuantizeLinear": ops.count("QuantizeLinear"), "DequantizeLinear": ops.count("DequantizeLinear")}
    rep.quantized_ops = [{"op": o} for o in integer]
    rep.float_ops = float_compute
    source = onnx.load(str(path))
    has_qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in source.graph.node)
    if float_compute and len(float_compute) <= float_on_purpose and integer:
        rep.warnings.append(f"{len(float_compute)} compute op(s) left in float on purpose (signed input would saturate u8 x s8 kernels)")
    elif has_qdq and float_compute:
        rep.errors.append(f"{len(float_compute)} of {len(float_compute) + len(integer)} compute ops stay float on onnxruntime CPU "
                          "(Q/DQ not in DQ -> op -> Q groups, e.g. a TensorRT-layout graph): they run in float, slower than FP32; use layout ort-cpu")
    g = _Graph(source)
    s8_acts = [n.name for n in g.nodes if n.op_type == "QuantizeLinear" and (zp := g.const(n.input[2]) if len(n.input) > 2 else None) is not None
               and zp.dtype == np.int8 and g.const(n.input[0]) is None]
    if s8_acts:
        rep.warnings.append(f"{len(s8_acts)} activations are int8: onnxruntime's fast x86 kernels want uint8 activations")
    return rep


def show_report(rep: QdqReport, title: str) -> None:
    """Print what the check found: counts, then each error/warning, as one rich table."""
    rows = [["counts", ", ".join(f"{k} {v}" for k, v in rep.counts.items())],
            ["quantized ops", str(len(rep.quantized_ops))], ["float compute ops", str(len(rep.float_ops))]]
    if rep.residual_adds:
        rows.append(["residual adds", ", ".join(f"{a['node']}:{sum(a['inputs_quantized'])}/2 quantized" for a in rep.residual_adds)])
    rows += [["ERROR", e] for e in rep.errors[:20]] + [["warning", w] for w in rep.warnings]
    rows.append(["verdict", "ready" if rep.ok else f"NOT ready ({len(rep.errors)} problems)"])
    ui.show(ui.table(title, ["check", "finding"], rows))


# ----------------------------------------------------------------------------- runtime checks
def ort_session(path: str | Path, threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises many exception types
        raise EdgekdError(f"onnxruntime cannot load {path}: {str(exc).splitlines()[0][:200]}", "the ONNX file is corrupt or uses unsupported ops") from exc


def ort_logits(path_or_session, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    sess = path_or_session if hasattr(path_or_session, "run") else ort_session(path_or_session)
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


# ----------------------------------------------------------------------------- stage
def load_for_export(checkpoint: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """FP32 or quantized student from an edgekd checkpoint."""
    from edgekd.models import load_checkpoint, model_from_checkpoint
    from edgekd.quantize import load_quantized

    ckpt = load_checkpoint(checkpoint)
    model = load_quantized(ckpt) if ckpt.get("quantize") else model_from_checkpoint(ckpt)
    return model.eval(), ckpt


def _reference_logits(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([model(x[i : i + 256]) for i in range(0, len(x), 256)]).float().numpy()


def export_model(
    model: nn.Module,
    out_dir: str | Path,
    precision: str,
    layout: str,
    classes: list[str],
    check_u8: torch.Tensor,
    check_labels: torch.Tensor | None = None,
    calib_u8: torch.Tensor | None = None,
    target: str | None = None,
    opset: int = 17,
    accuracy_tolerance: float = 0.003,
    time_runs: int = 30,
) -> dict[str, Any]:
    """Write ``model.onnx`` (+ ``model.fp32.onnx`` for INT8) into ``out_dir`` and check it; returns the record.

    ``model`` must already be fake-quantized for INT8. The record holds every check, so the
    pipeline can put it in the manifest; INT8 that is slower or less accurate than FP32 warns loudly.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pre: Preprocess = model.preprocess
    path = out / "model.onnx"
    x = pre(check_u8)
    labels = check_labels.numpy() if check_labels is not None else None
    record: dict[str, Any] = {"path": str(path), "precision": precision, "layout": layout if precision == "int8" else "none", "target": target, "opset": opset}
    fp32_path = out / "model.fp32.onnx"
    if precision == "fp32":
        export_fp32(model, path, pre, opset)
    elif precision == "fp16":
        export_fp16(model, path, pre, opset)
    else:
        export_fp32(model, fp32_path, pre, opset)
        if layout == "tensorrt":
            export_int8_tensorrt(model, path, pre, opset)
        else:
            if calib_u8 is None:
                raise EdgekdError("the ort-cpu layout needs calibration images for tensors without a trained scale", "pass calib_u8")
            record.update(export_int8_ort_closest(model, path, pre, calib_u8, x, opset, fp32_path))
        record["fp32_path"] = str(fp32_path)
    meta = {"edgekd_version": versions().get("edgekd", "unknown"), "classes": list(classes), "preprocessing": pre.to_dict(), "target": target or "",
            "layout": record["layout"], "precision": precision, "model": getattr(model, "edgekd_spec", {}), "quantize": getattr(model, "edgekd_quant", {}),
            "float_nodes": record.get("float_nodes", [])}
    stamp_metadata(path, meta)
    record["checks"] = run_checks(model, path, x, labels, precision, layout, len(record.get("float_nodes", [])))
    if precision == "int8":
        record["comparison"] = compare_with_fp32(path, fp32_path, x.numpy(), labels, layout, pre, accuracy_tolerance, time_runs)
    write_json_atomic(out / "export.json", record)
    return record


def run_checks(model: nn.Module, path: Path, x: torch.Tensor, labels: np.ndarray | None, precision: str, layout: str, float_on_purpose: int = 0) -> dict[str, Any]:
    """onnx.checker, ORT-vs-PyTorch agreement, and for INT8 the TensorRT / onnxruntime-CPU readiness."""
    import onnx

    checks: dict[str, Any] = {}
    try:
        onnx.checker.check_model(str(path), full_check=True)
        checks["onnx_checker"] = "ok"
    except Exception as exc:  # noqa: BLE001 - checker raises several types
        raise EdgekdError(f"exported ONNX fails onnx.checker: {str(exc).splitlines()[0][:200]}", "report this as an edgekd bug") from exc
    ref_model = without_quantizers(model) if precision != "int8" and _has_fake_quant(model) else model
    checks["agreement"] = agreement(_reference_logits(ref_model, x), ort_logits(path, x.numpy()), labels)
    if checks["agreement"]["top1_agreement"] < 0.99:
        ui.warn(f"{path.name}: onnxruntime agrees with the PyTorch model on only {checks['agreement']['top1_agreement']:.2%} of top-1 predictions "
                f"(max |diff| {checks['agreement']['max_abs_diff']:.3g}): the shipped artifact drifts from what was trained")
    if precision == "int8":
        proto = onnx.load(str(path))
        trt = check_tensorrt_readiness(proto)
        ortc = check_ort_cpu_fusion(path, float_on_purpose)
        checks["tensorrt_readiness"] = trt.to_dict()
        checks["ort_cpu_fusion"] = ortc.to_dict()
        if layout == "tensorrt":
            show_report(trt, f"TensorRT readiness: {path.name}")
        show_report(ortc, f"onnxruntime CPU fusion: {path.name}")
        if layout == "tensorrt" and not trt.ok:
            ui.warn(f"{path.name} is not TensorRT-ready: {trt.errors[0]}")
        if layout == "ort-cpu" and not ortc.ok:
            ui.warn(f"{path.name}: {ortc.errors[0]}")
    return checks


def compare_with_fp32(path: Path, fp32_path: Path, x: np.ndarray, labels: np.ndarray | None, layout: str, pre: Preprocess,
                      tolerance: float, runs: int) -> dict[str, Any]:
    """INT8 vs FP32 export: accuracy on the check images, and onnxruntime-CPU latency for the ort-cpu layout."""
    out: dict[str, Any] = {}
    if labels is not None:
        out["int8_top1"] = float((ort_logits(path, x).argmax(1) == labels).mean())
        out["fp32_top1"] = float((ort_logits(fp32_path, x).argmax(1) == labels).mean())
        out["n"] = int(len(labels))
        if out["int8_top1"] < out["fp32_top1"] - max(tolerance, 1.5 / len(labels)):  # one image is not evidence
            ui.warn(f"INT8 is less accurate than FP32 on {len(labels)} held images: {out['int8_top1']:.4f} vs {out['fp32_top1']:.4f}")
    if layout == "ort-cpu":
        shape = (pre.channels, pre.input_size, pre.input_size)
        for batch in (1, 64):
            i8, f32 = ort_latency_ms(path, batch, shape, runs), ort_latency_ms(fp32_path, batch, shape, runs)
            out[f"batch{batch}"] = {"int8_ms": i8, "fp32_ms": f32, "speedup": f32 / i8 if i8 > 0 else None}
            if i8 > f32:
                ui.warn(f"INT8 is slower than FP32 on onnxruntime CPU at batch {batch}: {i8:.3f} ms vs {f32:.3f} ms "
                        "(a model this small is overhead-bound; a wider student gains from INT8)")
    else:
        out["latency"] = "TensorRT layout: time it on the target (edgekd bench); onnxruntime CPU would run it in float"
    return out


def run_export(
    checkpoint: str | Path,
    out_dir: str | Path,
    precision: str,
    layout: str,
    data: DataSet,
    calib_images: int = 512,
    calibrator: str = "max",
    check_batch: int = 256,
    target: str | None = None,
    opset: int = 17,
    seed: int = 0,
) -> dict[str, Any]:
    """Stage entry: load a checkpoint, quantize it by calibration if INT8 is asked of an FP32 one, export, check."""
    from edgekd.config import QuantizeConfig
    from edgekd.quantize import is_quantized, quantize_model

    model, ckpt = load_for_export(checkpoint)
    calib = calibration_images(data.train, calib_images, seed)
    if precision == "int8" and not is_quantized(model):
        ui.warn(f"{checkpoint} is an FP32 checkpoint: calibrating INT8 ranges on {len(calib)} images (post-training quantization, no QAD); "
                "run `edgekd quantize` first for quantization-aware distillation")
        quantize_model(model, QuantizeConfig(calibrator=calibrator, calib_images=max(16, calib_images)), calib, model.preprocess)
    check = data.test.subset(check_batch)
    record = export_model(model, out_dir, precision, layout, ckpt["classes"], check.images, check.labels, calib, target, opset)
    record["checkpoint"] = str(checkpoint)
    write_json_atomic(Path(out_dir) / "export.json", record)
    return record
