"""The fake-quant sensitivity ranking checked on the exported file: QAD's accuracy budget
(:mod:`edgekd.quantize.budget`) asks, through the ``confirm`` it is given, what each of its top
layers gains in float on the runtime's own arithmetic."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch.nn as nn

from edgekd.data import Split
from edgekd.export.logits import ort_logits
from edgekd.export.ort_layout import export_int8_ort
from edgekd.export.tensorrt_layout import export_int8_tensorrt
from edgekd.quantize.sensitivity import float_layers_of, set_float_layers


def confirm_on_export(model: nn.Module, layers: list[str], split: Split, workdir: Path) -> dict[str, float]:
    """Top-1 points gained on the *exported* file (onnxruntime) when each of ``layers`` alone runs
    in float: the fake-quant ranking checked against the runtime's own arithmetic."""
    layout = model.edgekd_quant["layout"]
    pre, labels, before = model.preprocess, split.labels.numpy(), float_layers_of(model)
    x = pre(split.images).numpy()

    def exported_top1(float_set: list[str]) -> float:
        set_float_layers(model, float_set)
        with tempfile.TemporaryDirectory(dir=workdir) as td:
            path = Path(td) / "m.onnx"
            if layout == "tensorrt":
                export_int8_tensorrt(model, path, pre)
            else:
                export_int8_ort(model, path, pre, split.images[:256])
            return float((ort_logits(path, x, exact_qdq=layout == "tensorrt").argmax(1) == labels).mean())

    try:
        base = exported_top1(before)
        return {layer: round(100 * (exported_top1([*before, layer]) - base), 3) for layer in layers}
    finally:
        set_float_layers(model, before)
