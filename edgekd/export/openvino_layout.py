"""The ``openvino`` layout and the check that OpenVINO's CPU plugin really runs it in integer kernels.

OpenVINO reads a Q/DQ ONNX file directly: each QuantizeLinear -> DequantizeLinear pair becomes a
FakeQuantize, and the plugin's low-precision transformations (LPT) turn FakeQuantize -> Convolution
into an int8 convolution where the pattern fits its rules. The rules (the CPU plugin's
``Transformations::Lpt``, OpenVINO 2024-2026): Convolution / GroupConvolution take **u8**
activations (i8 only on AMX and AVX2-VNNI-2 CPUs: a signed tensor is shifted by a zero point) and
**i8 per-channel** weights, activations **per tensor**; MatMul takes u8 or i8 by i8. NNCF's own
``nncf.quantize`` of the same FP32 graph puts FakeQuantize on the inputs of every Convolution and
MatMul and of each residual Add, none on the squeeze-excite Multiply, unsigned where the tensor
cannot be negative. :mod:`edgekd.quantize.placement` places QAD's quantizers exactly there
(layout ``openvino``), so the fake-quant model is exported as is: the file carries the scales QAD
trained and nothing else.

The check does not guess from the graph: it compiles the file with OpenVINO on this CPU and reads
each Convolution's ``runtimePrecision`` from the compiled model's runtime info (u8/i8: an integer
kernel; f32: float).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch.nn as nn

from edgekd.data import Preprocess
from edgekd.errors import EdgekdError
from edgekd.export.graph import Graph, QdqReport
from edgekd.export.to_onnx import has_fake_quant, torch_to_onnx

INTEGER_PRECISIONS = {"I8", "U8", "I4", "U4"}
COMPUTE_LAYER_TYPES = {"Convolution", "Deconvolution", "FullyConnected", "MatMul"}
ONNX_COMPUTE_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def export_int8_openvino(qmodel: nn.Module, path: str | Path, preprocess: Preprocess, opset: int = 17) -> Path:
    """The fake-quant model (placed for ``openvino``) as explicit Q/DQ ONNX, which OpenVINO reads as FakeQuantize."""
    if not has_fake_quant(qmodel):
        raise EdgekdError("model has no INT8 quantizers", "quantize it first (edgekd quantize --layout openvino)")
    layout = getattr(qmodel, "edgekd_quant", {}).get("layout")
    if layout not in (None, "openvino"):
        raise EdgekdError(f"this model was quantized for the {layout} layout, not openvino",
                          "quantize it for this target (edgekd quantize --layout openvino): OpenVINO wants u8 conv inputs")
    torch_to_onnx(qmodel, path, preprocess, opset)
    return Path(path)


def openvino_missing() -> str | None:
    """None when OpenVINO can be imported here, else what to install."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "OpenVINO is not installed (pip install 'edgekd[openvino]')"
    return None


def compiled_layers(path: str | Path, device: str = "CPU") -> list[dict[str, str]]:
    """Every layer of the model as OpenVINO compiled it on ``device``: type, runtime precision, and the
    ONNX nodes it was made from (``originalLayersNames``)."""
    import openvino as ov

    core = ov.Core()
    try:
        compiled = core.compile_model(core.read_model(str(path)), device, {"INFERENCE_PRECISION_HINT": "f32"} if device == "CPU" else {})
    except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError with a long multi-line message
        raise EdgekdError(f"OpenVINO cannot compile {Path(path).name}: {str(exc).splitlines()[0][:200]}", "re-export the model") from exc
    rows = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        rt = op.get_rt_info()
        rows.append({key: str(rt[key].astype(str)) if key in rt else "" for key in ("layerType", "runtimePrecision", "originalLayersNames")} | {"name": op.get_friendly_name()})
    return rows


def check_openvino_int8(path: str | Path, float_layers: Iterable[str] = ()) -> QdqReport:
    """Compile ``path`` with OpenVINO's CPU plugin and count the Convolutions / FullyConnected it runs in
    integer kernels; any compute layer left in f32 (other than ``float_layers``, kept so on purpose) is an error."""
    rep = QdqReport(runtime="openvino-cpu")
    why = openvino_missing()
    if why:
        rep.errors.append(f"cannot check: {why}")
        return rep
    layer_of, quantizers = _source_layers(Path(path))
    kept = set(float_layers)
    has_qdq = quantizers > 0
    integer, floating = [], []
    for row in compiled_layers(path):
        if row["layerType"] not in COMPUTE_LAYER_TYPES:
            continue
        sources = [s for s in row["originalLayersNames"].split(",") if s in layer_of]
        layers = {layer_of[s] for s in sources}
        if row["runtimePrecision"].upper() in INTEGER_PRECISIONS:
            integer.append({"op": row["layerType"], "node": row["name"], "precision": row["runtimePrecision"]})
        elif layers and layers <= kept:
            rep.kept_float.append(sorted(layers)[0] or row["name"])
        else:
            floating.append(f"{row['name']} ({row['layerType']}, {row['runtimePrecision']})")
    rep.quantized_ops, rep.float_ops = integer, floating
    rep.counts = {"integer_ops": len(integer), "float_compute_ops": len(floating), "quantizers": quantizers}
    if has_qdq and floating:
        rep.errors.append(f"{len(floating)} of {len(floating) + len(integer)} compute layers run in float on OpenVINO's CPU plugin "
                          f"(first: {floating[0]}): quantize for the openvino layout")
    elif not has_qdq:
        rep.errors.append("no QuantizeLinear/DequantizeLinear nodes: not an INT8 graph")
    return rep


def _source_layers(path: Path) -> tuple[dict[str, str | None], int]:
    """{ONNX compute node: its layer (module path)} and the number of quantizers in the file: QuantizeLinear
    nodes of an ONNX file, FakeQuantize ops of an OpenVINO IR (e.g. NNCF's output, whose nodes have no edgekd layer names)."""
    if path.suffix == ".onnx":
        import onnx

        g = Graph(onnx.load(str(path)))
        return {n.name: g.layer_name(n) for n in g.nodes if n.op_type in ONNX_COMPUTE_OPS}, sum(n.op_type == "QuantizeLinear" for n in g.nodes)
    import openvino as ov

    return {}, sum(op.get_type_name() == "FakeQuantize" for op in ov.Core().read_model(str(path)).get_ops())


def openvino_logits(path: str | Path, x, batch_size: int = 64):
    """The file's logits as OpenVINO's CPU plugin computes them (its integer kernels), in chunks of ``batch_size``."""
    import numpy as np

    from edgekd.runners.openvino import OpenVinoRunner  # OpenVINO is optional: imported only for this layout

    runner = OpenVinoRunner(path)
    name = runner.input_specs()[0].name
    try:
        return np.concatenate([runner.outputs(runner.prepare({name: x[i : i + batch_size]}))[0] for i in range(0, len(x), batch_size)])
    finally:
        runner.close()
