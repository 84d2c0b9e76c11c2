"""The ``tensorrt`` layout and the static check that TensorRT can run it in INT8 (no GPU needed).

TensorRT developer guide, "Explicit quantization": symmetric int8 (zero point 0), per-tensor
activation scales, per-channel weight scales on the output-channel axis, Q/DQ on the inputs of
Conv/Gemm and on the identity input of a residual Add (the conv-branch input comes straight from
its Conv, so TensorRT fuses Conv + Add + ReLU in INT8: NVIDIA's layout, as Model Optimizer's ONNX
PTQ writes it). The fake-quant model, whose quantizers :mod:`edgekd.quantize.placement` put exactly
there, is exported as is. The check also accepts Q/DQ on both Add inputs (legal, fuses worse) and
per-tensor weight scales (legal, less accurate), each with a warning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import torch.nn as nn

from edgekd.data import Preprocess
from edgekd.errors import EdgekdError
from edgekd.export.graph import Graph, QdqReport
from edgekd.export.to_onnx import has_fake_quant, torch_to_onnx

COMPUTE_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def export_int8_tensorrt(qmodel: nn.Module, path: str | Path, preprocess: Preprocess, opset: int = 17) -> Path:
    """The fake-quant model as explicit Q/DQ: TensorRT builds an INT8 engine from it without a calibration cache."""
    if not has_fake_quant(qmodel):
        raise EdgekdError("model has no INT8 quantizers", "quantize it first (edgekd quantize, or export an FP32 checkpoint with --precision int8 to calibrate)")
    torch_to_onnx(qmodel, path, preprocess, opset)
    return Path(path)


def _qdq_params(g: Graph, node) -> tuple[np.ndarray | None, np.ndarray | None, int | None]:
    scale = g.const(node.input[1]) if len(node.input) > 1 else None
    zp = g.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    return scale, zp, g.attr(node, "axis", 1)


def _weight_out_axis(g: Graph, node) -> int:
    """Axis of the output channels in the op's weight: 0 for Conv and Gemm(transB=1), 1 for MatMul / Gemm(transB=0)."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if g.attr(node, "transB", 0) else 1
    return 1


def check_tensorrt_readiness(proto, float_layers: Iterable[str] = ()) -> QdqReport:
    """Static check of a Q/DQ graph against TensorRT's explicit-quantization rules (no GPU needed).

    Errors: no Q/DQ at all; a zero point that is not int8 0 (TensorRT is symmetric-only);
    non-positive or non-finite scales; a Conv/Gemm/MatMul whose activation or weight is not fed by
    DQ; weight scales on the wrong axis; per-channel activation scales; a residual Add with no
    quantized input, or whose one unquantized input does not come from a Conv (TensorRT then
    cannot fuse it and runs the add in float); a Q whose output feeds anything but DQ, or a
    Q -> DQ pair whose scales differ.

    Warnings (legal in TensorRT, not the best layout): per-tensor weight scales; residual Adds with
    both inputs quantized (Q/DQ on the identity only lets TensorRT fuse the add into the conv); a
    Gemm/MatMul with no Q/DQ at all (it runs in FP16; Model Optimizer keeps the head so by default).

    ``float_layers`` (module paths, e.g. from the accuracy budget) are meant to run in FP16: a
    compute op of one of them with no Q/DQ at all is listed in ``kept_float``, not an error.
    """
    g = Graph(proto)
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
    kept = set(float_layers)
    for node in g.nodes:
        if node.op_type in COMPUTE_OPS and kept and g.layer_name(node) in kept and _dq_of(g, node.input[0]) is None and _dq_of(g, node.input[1]) is None:
            rep.kept_float.append(g.layer_name(node))
        elif node.op_type in COMPUTE_OPS:
            _check_compute_op(g, node, rep)
        elif node.op_type == "Add":
            _check_residual_add(g, node, rep)
    _summarise_residual_layout(rep)
    return rep


def _dq_of(g: Graph, tensor: str):
    node = g.skip_casts(tensor)
    return node if node is not None and node.op_type == "DequantizeLinear" else None


def _check_compute_op(g: Graph, node, rep: QdqReport) -> None:
    act_dq = _dq_of(g, node.input[0])
    w_dq = _dq_of(g, node.input[1]) if len(node.input) > 1 else None
    w_is_const = len(node.input) > 1 and (g.const(node.input[1]) is not None or w_dq is not None)
    row = {"node": node.name, "op": node.op_type, "activation": act_dq is not None, "weight": w_dq is not None, "weight_axis": None, "weight_channels": None}
    if act_dq is None and w_dq is None:
        rep.float_ops.append(node.name)
        if node.op_type in ("Gemm", "MatMul"):  # a float classifier head: Model Optimizer's ONNX PTQ default
            rep.warnings.append(f"{node.name} ({node.op_type}): no Q/DQ: TensorRT runs it in FP16 (Model Optimizer's ONNX PTQ leaves it so by default)")
        else:
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
            rep.warnings.append(f"{node.name}: per-tensor weight scale; per-channel (axis {want_axis}, {channels} channels) keeps more accuracy")
        elif scale is not None and scale.size > 1:
            ndim = weight.ndim if weight is not None else 4
            if (axis % ndim) != want_axis:
                rep.errors.append(f"{node.name}: weight scales on axis {axis}, TensorRT needs the output-channel axis {want_axis}")
            if channels is not None and scale.size != channels:
                rep.errors.append(f"{node.name}: {scale.size} weight scales for {channels} output channels")
    rep.quantized_ops.append(row)


_FUSED_INTO_CONV = {"Relu", "BatchNormalization"}  # ops between a Conv and its Add that TensorRT fuses (as Model Optimizer's rule)


def _from_conv(g: Graph, tensor: str) -> bool:
    """``tensor`` comes from a Conv through only ops TensorRT fuses into it (no Q/DQ in between)."""
    node = g.skip_casts(tensor)
    while node is not None and node.op_type in _FUSED_INTO_CONV:
        node = g.skip_casts(node.input[0])
    return node is not None and node.op_type in ("Conv", "ConvTranspose")


def _check_residual_add(g: Graph, node, rep: QdqReport) -> None:
    """An Add of two activations (a residual). NVIDIA's layout quantizes the identity input only and
    feeds the other straight from its Conv (TensorRT fuses the add into that conv); Q/DQ on both
    inputs also runs in INT8 but fuses worse; an unquantized input that is no conv output runs in float."""
    if len(node.input) != 2 or any(g.const(i) is not None for i in node.input):
        return
    quantized = [_dq_of(g, i) is not None for i in node.input]
    layout = {2: "both", 0: "none"}.get(sum(quantized))
    if layout is None:
        layout = "identity-only" if _from_conv(g, node.input[quantized.index(False)]) else "unfusible"
    rep.residual_adds.append({"node": node.name, "inputs_quantized": quantized, "layout": layout})
    if layout in ("none", "unfusible"):
        rep.errors.append(f"{node.name}: residual Add has {quantized.count(False)} unquantized input(s)"
                          + (" and the unquantized one is no conv output" if layout == "unfusible" else "")
                          + ": TensorRT cannot fuse it with the conv and runs the add in float")


def _summarise_residual_layout(rep: QdqReport) -> None:
    both = [a["node"] for a in rep.residual_adds if a["layout"] == "both"]
    if both:
        rep.warnings.append(f"{len(both)} residual Add(s) quantize both inputs ({', '.join(both[:3])}{' ...' if len(both) > 3 else ''}): "
                            "TensorRT fuses better with Q/DQ on the identity input only (NVIDIA's layout; edgekd's export writes it)")
