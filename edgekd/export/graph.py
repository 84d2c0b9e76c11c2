"""Reading ONNX Q/DQ graphs: producers, consumers, constants, and the report every check returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from edgekd import ui


def graph_index(graph) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    producers, consumers = {}, {}
    for n in graph.node:
        for o in n.output:
            producers[o] = n
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return producers, consumers


@dataclass
class QdqReport:
    """What a Q/DQ graph quantizes, and whether TensorRT / onnxruntime-CPU can run it in INT8."""

    runtime: str
    quantized_ops: list[dict[str, Any]] = field(default_factory=list)
    float_ops: list[str] = field(default_factory=list)
    kept_float: list[str] = field(default_factory=list)  # layers the accuracy budget (or --exclude) keeps in higher precision
    residual_adds: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


class Graph:
    def __init__(self, proto):
        from onnx import numpy_helper

        self.proto = proto
        self.nodes = list(proto.graph.node)
        self.producers, self.consumers = graph_index(proto.graph)
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

    def layer_name(self, node) -> str | None:
        """The module path of a Conv/Gemm's weight (``blocks.5.0.conv_pw`` for
        ``blocks.5.0.conv_pw.weight``), looking through its weight Q/DQ: how edgekd names layers."""
        if len(node.input) < 2:
            return None
        tensor = node.input[1]
        producer = self.skip_casts(tensor)
        while producer is not None and producer.op_type in ("QuantizeLinear", "DequantizeLinear"):
            tensor = producer.input[0]
            producer = self.skip_casts(tensor)
        return tensor[: -len(".weight")] if tensor.endswith(".weight") else None

    def attr(self, node, name: str, default: Any = None) -> Any:
        from onnx import helper

        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default


def show_report(rep: QdqReport, title: str) -> None:
    """Print what the check found: counts, then each error/warning, as one rich table."""
    rows = [["counts", ", ".join(f"{k} {v}" for k, v in rep.counts.items())],
            ["quantized ops", str(len(rep.quantized_ops))], ["float compute ops", str(len(rep.float_ops))]]
    if rep.kept_float:
        rows.append(["kept in higher precision", ", ".join(rep.kept_float[:8]) + (" ..." if len(rep.kept_float) > 8 else "")])
    if rep.residual_adds:
        rows.append(["residual adds", ", ".join(f"{a['node']}:{sum(a['inputs_quantized'])}/2 quantized" for a in rep.residual_adds)])
    rows += [["ERROR", e] for e in rep.errors[:20]] + [["warning", w] for w in rep.warnings]
    rows.append(["verdict", "ready" if rep.ok else f"NOT ready ({len(rep.errors)} problems)"])
    ui.show(ui.table(title, ["check", "finding"], rows))
