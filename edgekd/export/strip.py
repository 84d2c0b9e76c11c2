"""Strip the Q/DQ pairs off an exported fake-quant graph, keeping every tensor name, and read off the
scales training gave each tensor: the bridge from the trained model to any other Q/DQ layout."""

from __future__ import annotations

from typing import Any

import numpy as np


def strip_qdq(proto) -> tuple[Any, dict[str, float], dict[str, np.ndarray]]:
    """Remove every QuantizeLinear -> DequantizeLinear pair; returns (float graph, activation amax
    by tensor, per-channel weight scale by initializer). Tensor names are kept. An unsigned
    activation (uint8 zero point: a ReLU output quantized for ort-cpu) gets a *negative* amax,
    -scale * 255, so the caller knows its grid is 0..255 codes of ``scale``."""
    import onnx
    from onnx import numpy_helper

    _drop_identity_nodes(proto)
    g = proto.graph
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = numpy_helper.to_array(a.t)
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    rename: dict[str, str] = {}
    drop = set()
    act_amax: dict[str, float] = {}
    weight_scale: dict[str, np.ndarray] = {}
    for q in [n for n in g.node if n.op_type == "QuantizeLinear"]:
        src, scale = rename.get(q.input[0], q.input[0]), consts.get(q.input[1])
        dqs = consumers.get(q.output[0], [])
        if scale is None or not dqs or any(d.op_type != "DequantizeLinear" for d in dqs):
            continue
        if src in consts and np.asarray(consts[src]).ndim > 1:
            weight_scale[src] = np.asarray(scale, dtype=np.float32).reshape(-1)
        else:
            zp = consts.get(q.input[2]) if len(q.input) > 2 else None
            unsigned = zp is not None and np.asarray(zp).dtype == np.uint8
            act_amax[src] = -float(np.max(scale)) * 255.0 if unsigned else max(float(np.max(scale)) * 127.0, act_amax.get(src, 0.0))
        drop.add(id(q))
        for d in dqs:
            drop.add(id(d))
            rename[d.output[0]] = src
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    del out.graph.node[:]
    for n in g.node:
        if id(n) in drop:
            continue
        m = out.graph.node.add()
        m.CopyFrom(n)
        for k, name in enumerate(m.input):
            if name in rename:
                m.input[k] = rename[name]
    for o in out.graph.output:
        if o.name in rename:  # a graph output behind Q/DQ: re-route through Identity so the name stays
            ident = out.graph.node.add()
            ident.op_type, ident.name = "Identity", f"{o.name}_identity"
            ident.input.append(rename[o.name])  # noqa
            ident.output.append(o.name)
    _name_compute_nodes(out)
    return _drop_unused(out), act_amax, weight_scale


def _name_compute_nodes(proto) -> None:
    """Name each Conv/Gemm after its layer's module path (``blocks.5.0.conv_pw``): the TorchScript
    exporter repeats names such as ``/conv_pw/Conv``, and onnxruntime excludes nodes by name."""
    taken: set[str] = set()
    for n in proto.graph.node:
        weight = n.input[1] if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(n.input) > 1 else ""
        if weight.endswith(".weight") and weight[: -len(".weight")] not in taken:
            n.name = weight[: -len(".weight")]
            taken.add(n.name)


def _drop_identity_nodes(proto) -> None:
    """Bypass Identity nodes in place (the TorchScript exporter puts them on shared weights), so a
    weight's QuantizeLinear reads the initializer itself."""
    outputs = {o.name for o in proto.graph.output}
    alias = {n.output[0]: n.input[0] for n in proto.graph.node if n.op_type == "Identity" and n.output[0] not in outputs}
    keep = [n for n in proto.graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for n in keep:
        for k, name in enumerate(n.input):
            while name in alias:
                name = alias[name]
            n.input[k] = name
    del proto.graph.node[:]
    proto.graph.node.extend(keep)


def _drop_unused(proto):
    """Remove Constant nodes and initializers nothing reads any more (the Q/DQ scales)."""
    used = {i for n in proto.graph.node for i in n.input} | {o.name for o in proto.graph.output}
    keep = [n for n in proto.graph.node if not (n.op_type == "Constant" and n.output[0] not in used)]
    del proto.graph.node[:]
    proto.graph.node.extend(keep)
    inits = [i for i in proto.graph.initializer if i.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(inits)
    return proto
