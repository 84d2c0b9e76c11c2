"""edgekd's TensorRT Q/DQ placement against NVIDIA Model Optimizer's ONNX PTQ, network by network.

For every network of benchmarks/architectures.py: edgekd quantizes it for the ``tensorrt`` layout
(calibrated on real Fashion-MNIST images) and exports the Q/DQ ONNX; the same prepared network
(branches fused, BatchNorm folded) is exported as FP32 ONNX and quantized by Model Optimizer's
``modelopt.onnx.quantization.quantize(quantize_mode="int8", calibration_eps=["cpu"])`` on the same
images. Placement depends on the graph, not on trained weights, so no training is needed. Per
network: which op inputs edgekd feeds through Q/DQ that Model Optimizer does not, and the other way
round; how each puts Q/DQ on residual Adds; and whether edgekd's TensorRT readiness check passes
Model Optimizer's file. The table goes into benchmarks/architectures_results.md.

    .venv/bin/python benchmarks/modelopt_placement.py            # needs the Model Optimizer ONNX venv (.ci/setup)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import machine  # noqa: E402
from architectures import STUDENTS  # noqa: E402

from edgekd.config import QuantizeConfig  # noqa: E402
from edgekd.data import load_dataset  # noqa: E402
from edgekd.export.modelopt_reference import modelopt_python, placement, placement_differences, quantize_with_modelopt  # noqa: E402
from edgekd.export.to_onnx import torch_to_onnx, without_quantizers  # noqa: E402
from edgekd.export.tensorrt_layout import check_tensorrt_readiness, export_int8_tensorrt  # noqa: E402
from edgekd.models import create_model  # noqa: E402
from edgekd.quantize import quantize_model  # noqa: E402

WORK = ROOT / "benchmarks" / "_work" / "modelopt_placement"
RESULTS = ROOT / "benchmarks" / "modelopt_placement_results.json"
TABLE = ROOT / "benchmarks" / "architectures_results.md"
BEGIN, END = "<!-- modelopt-placement:begin -->", "<!-- modelopt-placement:end -->"


def compare(name: str, images, calib: int) -> dict:
    out = WORK / name
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model = create_model(name, 10, pretrained="offline" if name == "efficientnet_lite0" else "none", input_size=32)
    q = quantize_model(model, QuantizeConfig(calibrator="max", layout="tensorrt"), images[:calib], model.preprocess)
    ours = export_int8_tensorrt(q, out / "edgekd.onnx", q.preprocess)
    torch_to_onnx(without_quantizers(q), out / "fp32.onnx", q.preprocess)  # the same prepared graph, in float
    theirs = quantize_with_modelopt(out / "fp32.onnx", out / "modelopt.onnx", q.preprocess(images[:calib]).numpy())
    p_ours, p_theirs = placement(onnx.load(str(ours))), placement(onnx.load(str(theirs)))
    rep_ours, rep_theirs = check_tensorrt_readiness(onnx.load(str(ours))), check_tensorrt_readiness(onnx.load(str(theirs)))

    def adds(rep):
        layouts = [a["layout"] for a in rep.residual_adds]
        return {k: layouts.count(k) for k in sorted(set(layouts))}

    return {"student": name, "seconds": round(time.time() - t0, 1), "diff": placement_differences(p_ours, p_theirs),
            "qdq_inputs": {"edgekd": sum(v for row in p_ours.values() for v in row.values()), "modelopt": sum(v for row in p_theirs.values() for v in row.values())},
            "residual_adds": {"edgekd": adds(rep_ours), "modelopt": adds(rep_theirs)},
            "readiness": {"edgekd": {"ok": rep_ours.ok, "errors": rep_ours.errors[:3], "warnings": len(rep_ours.warnings)},
                          "modelopt": {"ok": rep_theirs.ok, "errors": rep_theirs.errors[:3], "warnings": rep_theirs.warnings}},
            "modelopt_per_tensor_weights": sum("per-tensor weight scale" in w for w in rep_theirs.warnings)}


def _short(items: list[str]) -> str:
    """'/fc/Gemm <- /flatten/Flatten' -> 'fc/Gemm'; several merged, at most 4 shown."""
    names = [i.split(" <- ")[0].strip("/") for i in items]
    return ", ".join(names[:4]) + (f" (+{len(names) - 4})" if len(names) > 4 else "") if names else "none"


def table(rows: list[dict], command: str, seconds: float) -> str:
    lines = [BEGIN, "## Q/DQ placement vs NVIDIA Model Optimizer's ONNX PTQ (tensorrt layout)", "",
             f"- Date: {time.strftime('%Y-%m-%d')}; machine: {machine()}",
             f"- Command: `{command}` ({seconds / 60:.1f} min); Model Optimizer {_modelopt_version()} in its own venv, `quantize(quantize_mode=\"int8\", calibration_eps=[\"cpu\"])`",
             "- Both quantize the same prepared FP32 graph (branches fused, BatchNorm folded), untrained (placement depends on the graph), "
             "calibrated on the same 256 real Fashion-MNIST images at 32 px. An input counts as quantized when a DequantizeLinear feeds it "
             "(Conv weights excluded: both quantize every one).", "",
             "| student | op inputs through Q/DQ: edgekd / ModelOpt | only edgekd | only ModelOpt | residual Adds, edgekd | residual Adds, ModelOpt "
             "| edgekd's readiness check on ModelOpt's file | ModelOpt per-tensor weight scales |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mo = r["readiness"]["modelopt"]
        lines.append(f"| {r['student']} | {r['qdq_inputs']['edgekd']} / {r['qdq_inputs']['modelopt']} | {_short(r['diff']['only_ours'])} "
                     f"| {_short(r['diff']['only_theirs'])} | {_adds(r['residual_adds']['edgekd'])} | {_adds(r['residual_adds']['modelopt'])} "
                     f"| {'ready' if mo['ok'] else 'NOT ready: ' + '; '.join(mo['errors'])} ({len(mo['warnings'])} warnings) | {r['modelopt_per_tensor_weights']} |")
    lines += ["", EXPLANATION, END]
    return "\n".join(lines) + "\n"


EXPLANATION = """What the remaining differences are, and why none of them should leave a layer in float in edgekd's file:

- **Classifier Gemm (only edgekd)**: edgekd quantizes the head's input and weight, so TensorRT runs it in INT8; Model Optimizer
  leaves the final Gemm in float by default (TensorRT runs it in FP16). edgekd's accuracy budget keeps the head in float when INT8
  costs accuracy there (then it is listed in the model's `float_layers`).
- **MaxPool / GlobalAveragePool inputs (only ModelOpt)**: Model Optimizer quantizes the pooling input; edgekd quantizes the pooling
  output (the next Conv's or the head's input). TensorRT's Q/DQ propagation moves a Q backward across max pooling (max of
  quantized values = quantized max), so MaxPool runs in INT8 either way. For the global average pool before the head this
  is expected too (TensorRT lists average pooling among the ops Q/DQ commute with) but has not been seen on a device: the
  one difference left to confirm with `trtexec --exportLayerInfo` (benchmarks/gpu_check.sh, docs/jetson.md).
- **Squeeze-excite Muls**: both quantize both inputs (edgekd since issue 27; before, the gating Mul ran in FP16).
- **Residual Adds**: both put Q/DQ on the identity input only (the conv-branch input comes straight from its Conv, which TensorRT
  fuses with the Add); an Add that is no residual (no conv branch) gets both inputs quantized by both.
- **Per-tensor weight scales (ModelOpt)**: Model Optimizer picks per-tensor weight scales for some Convs; legal in TensorRT (edgekd's
  check warns), less accurate than edgekd's per-channel scales."""


def _adds(counts: dict) -> str:
    return ", ".join(f"{v} {k}" for k, v in counts.items()) or "none"


def _modelopt_version() -> str:
    py, _ = modelopt_python()
    run = subprocess.run([str(py), "-c", "import modelopt; print(modelopt.__version__)"], capture_output=True, text=True) if py else None
    return run.stdout.strip() if run and run.returncode == 0 else "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--students", nargs="*", default=STUDENTS)
    ap.add_argument("--calib", type=int, default=256)
    args = ap.parse_args()
    t0 = time.time()
    data = load_dataset("fashion-mnist", train_subset=args.calib, test_subset=16, seed=0)
    rows = []
    for name in args.students:
        rows.append(compare(name, data.train.images, args.calib))
        print(json.dumps({k: rows[-1][k] for k in ("student", "seconds", "qdq_inputs", "residual_adds")}), flush=True)
    RESULTS.write_text(json.dumps(rows, indent=1) + "\n")
    command = "python benchmarks/modelopt_placement.py" + (f" --students {' '.join(args.students)}" if args.students != STUDENTS else "")
    text = TABLE.read_text()
    block = table(rows, command, time.time() - t0)
    text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) + 1 :] if BEGIN in text else text.rstrip("\n") + "\n\n" + block
    TABLE.write_text(text)


if __name__ == "__main__":
    main()
