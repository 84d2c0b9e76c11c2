"""torch -> ONNX: one exporter call for every format, metadata stamped into the file, FP32/FP16 exports.

The TorchScript exporter (``dynamo=False``) is used for everything: the dynamo exporter drops
modelopt's fake-quant (no QuantizeLinear comes out), a trap users of the anchor tools hit.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from edgekd.data import Preprocess
from edgekd.errors import EdgekdError
from edgekd.atomic import atomic_path
from edgekd.quantize import enabled_quantizers
from edgekd.quantize.bias import bias_hooks, file_amax, snap_biases

INPUT_NAME, OUTPUT_NAME = "input", "logits"


def has_fake_quant(model: nn.Module) -> bool:
    return bool(enabled_quantizers(model))


def on_int8_grid(model: nn.Module) -> nn.Module:
    """``model`` as the file must compute it (a copy; the model itself when nothing changes): every
    narrower weight quantizer written as an INT8 one, and biases on onnxruntime's int32 grid.

    ONNX Q/DQ and modelopt's exporter are 8-bit only. A 7-bit grid (step amax/63) is the 8-bit grid
    of a quantizer with amax * 127/63 holding weights that never go past code 63: the weights are
    snapped to their 7-bit values first, so the file computes exactly what QAD trained. Biases that
    QAD rounded in a hook (ort-cpu layout, :mod:`edgekd.quantize.bias`) are written rounded.
    """
    narrow = [n for n, q in enabled_quantizers(model).items() if n.endswith("weight_quantizer") and q.num_bits < 8]
    if not narrow and not bias_hooks(model):
        return model
    model = copy.deepcopy(model)
    snap_biases(model)
    for name in narrow:
        layer, quantizer = model.get_submodule(name.rpartition(".")[0]), model.get_submodule(name)
        with torch.no_grad():
            layer.weight.copy_(quantizer(layer.weight))
        quantizer.amax = file_amax(quantizer)
        quantizer.num_bits = 8
    return model


def torch_to_onnx(model: nn.Module, path: str | Path, preprocess: Preprocess, opset: int = 17, dynamo: bool = False) -> "onnx.ModelProto":  # noqa: F821
    """Export with a dynamic batch axis, input 'input', output 'logits'; returns the loaded proto.

    The dynamo exporter drops modelopt's fake-quant (no QuantizeLinear comes out), so a quantized
    model with ``dynamo=True`` is refused, and the graph is checked for Q/DQ afterwards anyway.
    """
    import onnx

    quantized = has_fake_quant(model)
    if quantized and dynamo:
        raise EdgekdError("the dynamo ONNX exporter breaks fake-quant (no Q/DQ nodes come out)",
                          "edgekd exports quantized models with the TorchScript exporter (dynamo=False)")
    model = on_int8_grid(model).eval() if quantized else model.eval()
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


def without_quantizers(model: nn.Module) -> nn.Module:
    """A copy with fake-quant weights baked in and every quantizer switched off (an FP32 network)."""
    from edgekd.quantize.modelopt_api import tensor_quantizer_cls  # modelopt takes seconds to import: only for a fake-quant model

    m = copy.deepcopy(model).eval()
    TQ = tensor_quantizer_cls()
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
    torch_to_onnx(without_quantizers(model) if has_fake_quant(model) else model, path, preprocess, opset)
    return Path(path)


def export_fp16(model: nn.Module, path: str | Path, preprocess: Preprocess, opset: int = 17) -> Path:
    base = without_quantizers(model) if has_fake_quant(model) else copy.deepcopy(model)
    torch_to_onnx(_Fp16(base.eval()), path, preprocess, opset)
    return Path(path)
