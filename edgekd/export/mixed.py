"""What each layer kept in higher precision costs in latency (the accuracy budget's trade, shown).

For the ``ort-cpu`` layout the cost is measured here with onnxruntime's CPU provider: the same
trained graph exported with the first k float layers (in the order the budget search added them)
for k = 0 (full INT8) .. all, each timed at batch 1 and 64 beside the FP32 file. TensorRT runs the
kept layers in FP16 on the device; this machine has no TensorRT, so that cost is left to
``edgekd bench`` on the target and the record says so.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch.nn as nn

from edgekd.runners.timing import interleaved_latency_ms
from edgekd.export.ort_layout import ort_quantize_static, ort_source, trained_overrides
from edgekd.quantize.sensitivity import float_layers_of

MAX_PREFIXES = 6  # timing every prefix of a long list buys little: the first few, then the full set
ROUNDS = 5


def _prefix_sizes(n: int) -> list[int]:
    return list(range(n + 1)) if n < MAX_PREFIXES else [*range(MAX_PREFIXES - 1), n]


def float_layer_costs(model: nn.Module, req: Any, stage_dir: Path) -> dict[str, Any]:
    """Latency of full INT8, each cumulative set of float layers, and FP32 (``model.fp32.onnx`` in
    ``stage_dir``), p50 ms on onnxruntime CPU; ``req`` is the export's :class:`ExportRequest`."""
    layers = float_layers_of(model)
    record: dict[str, Any] = {"float_layers": layers}
    if req.layout != "ort-cpu":
        record["latency"] = "TensorRT runs these layers in FP16 (the engine is built with --int8 --fp16): time it on the target with edgekd bench"
        return record
    pre = model.preprocess
    shape = (pre.channels, pre.input_size, pre.input_size)
    with tempfile.TemporaryDirectory(dir=stage_dir) as td:
        src = ort_source(model, Path(td), pre, req.opset)
        overrides = trained_overrides(src.stripped, src.act_amax, src.weight_scale)
        files: dict[Any, Path] = {"fp32": stage_dir / "model.fp32.onnx"}
        for k in _prefix_sizes(len(layers)):
            files[k] = Path(td) / f"float{k}.onnx"
            ort_quantize_static(src.float_path, files[k], req.calib_u8, pre, overrides, exclude=layers[:k])
        p50 = {b: {key: statistics.median(times) for key, times in interleaved_latency_ms(files, b, shape, max(10, req.time_runs // ROUNDS), ROUNDS).items()}
               for b in (1, 64)}
    rows = [{"float_layers": k, "added": layers[k - 1] if k else None, **{f"batch{b}_ms": p50[b][k] for b in p50}} for k in files if k != "fp32"]
    record.update(steps=rows, fp32={f"batch{b}_ms": p50[b]["fp32"] for b in p50}, timing=f"median of {ROUNDS} interleaved rounds")
    return record

