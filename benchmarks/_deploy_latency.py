"""Latency at deployment resolution (160-224 px), every CPU runtime, for one network: shared by
``openvino_benchmark.py`` and ``architectures.py --latency-only``.

Latency does not depend on the weights, so the network is random-init (seed 0) and calibrated on
random images; what is timed is exactly what edgekd's export writes for each runtime:

- ``fp32``: the FP32 ONNX file (onnxruntime and OpenVINO both run it);
- ``ort_int8``: edgekd's ``ort-cpu`` layout (onnxruntime's QDQ, 7-bit s8 weights as QAD trains them on x86);
- ``quantize_static``: onnxruntime's own ``quantize_static`` of the FP32 file (after ``quant_pre_process``);
- ``ov_int8``: edgekd's ``openvino`` layout (Q/DQ on Conv/Gemm and residual-Add inputs, u8 where non-negative);
- ``nncf``: NNCF's ``nncf.quantize`` of the FP32 file, OpenVINO's own PTQ (its IR, weights compressed to int8).

Each file is timed on its runtime with 2 threads, every file in turn per round (on a shared CPU the
speed drifts within a minute), p50 = median of the per-round medians.
"""

from __future__ import annotations

import copy
import functools
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgekd.config import QuantizeConfig
from edgekd.export import ort_quantize_static
from edgekd.runners.timing import median_latency_ms
from edgekd.export.to_onnx import export_fp32
from edgekd.export.openvino_layout import check_openvino_int8, export_int8_openvino
from edgekd.export.ort_layout import export_int8_ort
from edgekd.models import count_params, create_model
from edgekd.quantize.fakequant import quantize_model

ORT_FILES, OV_FILES = ("fp32", "ort_int8", "quantize_static"), ("fp32", "ov_int8", "nncf")


def nncf_ptq(fp32_onnx: Path, out_xml: Path, calib: np.ndarray, subset: int = 300) -> Path:
    """NNCF's post-training quantization of the FP32 file for OpenVINO (its defaults: the performance preset, MinMax ranges)."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(fp32_onnx))
    quantized = nncf.quantize(model, nncf.Dataset([calib[i : i + 1] for i in range(len(calib))]), subset_size=min(subset, len(calib)))
    ov.save_model(quantized, str(out_xml))
    return out_xml


def build_files(name: str, size: int, work: Path, calib_images: int = 64) -> tuple[dict[str, Path], dict[str, Any]]:
    """The five files of one network at ``size`` px (random init), and what was checked about them."""
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = create_model(name, 10, pretrained="none", in_chans=3, input_size=size).eval()
    pre = model.preprocess
    calib = torch.randint(0, 256, (calib_images, pre.channels, size, size), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    files = {"fp32": work / "fp32.onnx", "ort_int8": work / "ort_int8.onnx", "quantize_static": work / "quantize_static.onnx",
             "ov_int8": work / "ov_int8.onnx", "nncf": work / "nncf.xml"}
    info: dict[str, Any] = {"params": count_params(model), "seconds": {}}
    t0 = time.time()
    export_fp32(model, files["fp32"], pre)
    info["seconds"]["fp32"] = round(time.time() - t0, 1)
    t0 = time.time()
    q = quantize_model(copy.deepcopy(model), QuantizeConfig(weight_bits=7, calibrator="max", layout="ort-cpu"), calib, pre)
    export_int8_ort(q, files["ort_int8"], pre, calib)
    info["seconds"]["ort_int8"] = round(time.time() - t0, 1)
    ort_quantize_static(files["fp32"], files["quantize_static"], calib, pre)
    t0 = time.time()
    q = quantize_model(copy.deepcopy(model), QuantizeConfig(weight_bits=8, calibrator="max", layout="openvino"), calib, pre)
    export_int8_openvino(q, files["ov_int8"], pre)
    info["seconds"]["ov_int8"] = round(time.time() - t0, 1)
    t0 = time.time()
    nncf_ptq(files["fp32"], files["nncf"], pre(calib).numpy())
    info["seconds"]["nncf"] = round(time.time() - t0, 1)
    for key in ("ov_int8", "nncf"):
        rep = check_openvino_int8(files[key])
        info[f"{key}_integer_layers"] = f"{rep.counts.get('integer_ops', 0)}/{rep.counts.get('integer_ops', 0) + rep.counts.get('float_compute_ops', 0)}"
    info["shape"] = [pre.channels, size, size]
    return files, info


def time_files(files: dict[str, Path], shape: tuple[int, int, int], batches: dict[int, int], rounds: int) -> dict[str, float]:
    """{'<runtime>_<file>_b<batch>': p50 ms}: onnxruntime runs ORT_FILES, OpenVINO OV_FILES, all interleaved per round."""
    plan = [("ort", k, functools.partial(median_latency_ms, "ort-cpu")) for k in ORT_FILES] + [("ov", k, functools.partial(median_latency_ms, "openvino")) for k in OV_FILES]
    out: dict[str, float] = {}
    for batch, runs in batches.items():
        per: dict[str, list[float]] = {f"{rt}_{k}_b{batch}": [] for rt, k, _ in plan}
        for _ in range(rounds):
            for rt, key, fn in plan:
                per[f"{rt}_{key}_b{batch}"].append(fn(files[key], batch, shape, runs))
        out.update({k: round(statistics.median(v), 4) for k, v in per.items()})
    return out


def latency_row(name: str, size: int, work: Path, batches: dict[int, int] | None = None, rounds: int = 2) -> dict[str, Any]:
    """Build and time one network at ``size`` px; one JSON-able row."""
    files, info = build_files(name, size, work / f"{name}_{size}")
    row = {"network": name, "size": size, **info}
    row.update(time_files(files, tuple(info["shape"]), batches or {1: 30, 64: 6}, rounds))
    return row


def cpu_flags() -> str:
    """The CPU features that decide INT8 speed on x86 (VNNI, AMX, AVX-512), from /proc/cpuinfo."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown flags"
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    return ", ".join(f for f in wanted if f in flags) or "no AVX2"


def latency_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown: one line per network, size and batch; onnxruntime's three files and OpenVINO's three."""
    lines = ["| network | px | batch | ORT FP32 | ORT edgekd INT8 | ORT quantize_static | OV FP32 | OV edgekd INT8 | OV NNCF PTQ "
             "| OV edgekd / NNCF | OV edgekd vs OV FP32 | OV edgekd vs ORT edgekd | OV integer convs (edgekd / NNCF) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for b in (1, 64):
            g = lambda k: r[f"{k}_b{b}"]  # noqa: E731
            lines.append(f"| {r['network']} | {r['size']} | {b} | {g('ort_fp32'):.2f} | {g('ort_ort_int8'):.2f} | {g('ort_quantize_static'):.2f} "
                         f"| {g('ov_fp32'):.2f} | {g('ov_ov_int8'):.2f} | {g('ov_nncf'):.2f} | {g('ov_ov_int8') / g('ov_nncf'):.2f}x "
                         f"| {g('ov_fp32') / g('ov_ov_int8'):.2f}x faster | {g('ort_ort_int8') / g('ov_ov_int8'):.2f}x faster "
                         f"| {r['ov_int8_integer_layers']} / {r['nncf_integer_layers']} |")
    return lines
