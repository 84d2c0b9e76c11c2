"""NVIDIA's own Q/DQ placement as the reference for the ``tensorrt`` layout, as onnxruntime's
``quantize_static`` is for ``ort-cpu``: Model Optimizer's ONNX PTQ
(``modelopt.onnx.quantization.quantize(path, quantize_mode="int8", calibration_data=...,
calibration_eps=["cpu"])``), which calibrates with onnxruntime on the CPU.

``nvidia-modelopt[onnx]`` pulls onnxruntime-gpu (and cupy), which would replace the project's
onnxruntime, so it lives in a venv of its own and runs here as a subprocess: ``$EDGEKD_MODELOPT_ONNX_VENV``,
else ``~/.cache/edgekd/modelopt-onnx`` (``.ci/setup`` creates it). :func:`placement` and
:func:`placement_differences` compare two Q/DQ graphs of the same network op by op.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.errors import EdgekdError
from edgekd.export.graph import Graph

VENV_ENV = "EDGEKD_MODELOPT_ONNX_VENV"
# ops whose inputs either quantizer may put Q/DQ on
PLACED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "Concat", "MaxPool", "AveragePool", "GlobalAveragePool")
_RUN = """
import sys, numpy as np
from modelopt.onnx.quantization import quantize
quantize(sys.argv[1], quantize_mode="int8", calibration_data=np.load(sys.argv[2]), calibration_eps=["cpu"], output_path=sys.argv[3])
"""

_PROBE = """
import importlib.util, sys
missing = [m for m in ("modelopt", "onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
print(", ".join(missing))
sys.exit(1 if missing else 0)
"""


def modelopt_python() -> tuple[Path | None, str]:
    """(the venv's python, '') when Model Optimizer's ONNX PTQ is installed, else (None, why)."""
    venv = Path(os.environ.get(VENV_ENV) or Path.home() / ".cache" / "edgekd" / "modelopt-onnx")
    py = venv / "bin" / "python"
    if not py.is_file():
        return None, f"no Model Optimizer ONNX venv at {venv} (bash .ci/setup creates it; or set ${VENV_ENV})"
    # Finds the packages without importing them: importing modelopt.onnx takes ~12 s, and the PTQ run
    # imports it anyway (a broken install fails there, with its own last line, in quantize_with_modelopt).
    probe = subprocess.run([str(py), "-c", _PROBE], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        return None, f"{py} lacks {probe.stdout.strip() or (probe.stderr.strip().splitlines() or ['?'])[-1][:160]}"
    return py, ""


def quantize_with_modelopt(fp32_onnx: str | Path, out: str | Path, calibration: np.ndarray, timeout: int = 900) -> Path:
    """Model Optimizer's INT8 ONNX PTQ of ``fp32_onnx`` (calibrated on ``calibration``, NCHW float32) into ``out``."""
    py, why = modelopt_python()
    if py is None:
        raise EdgekdError(f"Model Optimizer's ONNX PTQ is not available: {why}", "bash .ci/setup, or pip install 'nvidia-modelopt[onnx]' in its own venv")
    with tempfile.TemporaryDirectory(prefix="edgekd-modelopt-") as tmp:
        calib = Path(tmp) / "calib.npy"
        np.save(calib, np.ascontiguousarray(calibration, dtype=np.float32))
        run = subprocess.run([str(py), "-c", _RUN, str(fp32_onnx), str(calib), str(out)], capture_output=True, text=True, timeout=timeout)
    if run.returncode != 0 or not Path(out).is_file():
        raise EdgekdError(f"Model Optimizer's ONNX PTQ failed on {fp32_onnx}: {(run.stderr.strip().splitlines() or ['?'])[-1][:200]}",
                          "read its log by running the same quantize() call by hand")
    return Path(out)


def _source(g: Graph, tensor: str, keys: dict[int, str]) -> str:
    """What feeds ``tensor`` once Q/DQ, casts and Identities are skipped: its producer's name, 'input' or 'const'."""
    node = g.skip_casts(tensor)
    while node is not None and node.op_type in ("QuantizeLinear", "DequantizeLinear", "Identity"):
        tensor = node.input[0]
        node = g.skip_casts(tensor)
    if node is None:
        return "input" if g.const(tensor) is None else "const"
    return keys[id(node)]


def placement(proto: Any) -> dict[str, dict[str, bool]]:
    """{op name: {input source: fed through a DQ?}} for every op in :data:`PLACED_OPS`, sources named by
    the node that produces them once Q/DQ are skipped. Model Optimizer keeps the FP32 file's node names
    (it re-sorts the nodes, so names, not positions, match), and edgekd's export names them the same way."""
    g = Graph(proto)
    keys = {id(n): n.name or f"{n.op_type}:{n.output[0]}" for n in g.nodes}  # both files name the nodes as the FP32 export did
    out: dict[str, dict[str, bool]] = {}
    for n in g.nodes:
        if n.op_type not in PLACED_OPS:
            continue
        row = {}
        for slot, tensor in enumerate(n.input[:2] if n.op_type not in ("Concat",) else n.input):
            if not tensor or (slot > 0 and n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and _source(g, tensor, keys) == "const"):
                continue  # weights are compared separately: both quantize every Conv weight per channel
            src = _source(g, tensor, keys)
            if src == "const":
                continue
            dq = g.skip_casts(tensor)
            row[f"{slot}:{src}"] = dq is not None and dq.op_type == "DequantizeLinear"
        out[keys[id(n)]] = row
    return out


def placement_differences(ours: dict[str, dict[str, bool]], theirs: dict[str, dict[str, bool]]) -> dict[str, list[str]]:
    """Inputs quantized by one file and not the other: {'only_ours': [...], 'only_theirs': [...], 'unmatched': [...]}."""
    diff: dict[str, list[str]] = {"only_ours": [], "only_theirs": [], "unmatched": []}
    for op in sorted(set(ours) | set(theirs)):
        if op not in ours or op not in theirs:
            diff["unmatched"].append(op)
            continue
        for inp in sorted(set(ours[op]) | set(theirs[op])):
            a, b = ours[op].get(inp), theirs[op].get(inp)
            if a and not b:
                diff["only_ours"].append(f"{op} <- {inp.split(':', 1)[1]}")
            elif b and not a:
                diff["only_theirs"].append(f"{op} <- {inp.split(':', 1)[1]}")
    return diff
