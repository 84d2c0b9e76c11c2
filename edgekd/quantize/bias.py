"""Conv / Gemm biases on onnxruntime's int32 grid, in training as in the file (``ort-cpu`` layout).

onnxruntime's integer kernels (QLinearConv, QGemm) add the bias as int32 with the scale
input_scale x weight_scale of each output channel: ``quantize_static`` rounds every float bias to
that grid. A fake-quant model adds its float bias. The difference is below 1% of an output step,
yet it flips rounding decisions that cascade through a deep network: on the architecture
benchmark's 2-epoch depthwise students, the ort-cpu file agreed with the fake-quant model on
68-94% of top-1 predictions with onnxruntime's rounded biases, and on 98.6-99.9% with that same
file's biases left in float (``benchmarks/architectures_results.md``).

So for the ort-cpu layout the fake-quant model rounds its biases the same way: a forward hook adds
(rounded - float) bias, detached, so gradients reach the float bias as before (straight-through,
as for the weights). The export writes the rounded bias (:func:`snap_biases`), which onnxruntime
then quantizes to exactly the integers training used. A channel whose weights are all zero gets
weight scale 1.0 in the file (modelopt's exporter substitutes ``maxbound`` for a zero amax), and
the same step here.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from edgekd.quantize.placement import input_quantizers


def file_amax(weight_quantizer: nn.Module) -> torch.Tensor:
    """The amax a weight quantizer has in the ONNX file: a 7-bit grid (step amax/63) is written as
    the 8-bit grid with the same step, amax x 127/63 (:func:`edgekd.export.to_onnx.on_int8_grid`)."""
    amax = weight_quantizer.amax
    return amax * 127.0 / weight_quantizer.maxbound if weight_quantizer.maxbound < 127 else amax


class IntBiasRounding:
    """Forward hook of one quantized Conv / Linear: its output as if its bias were on the int32 grid."""

    def __init__(self, input_quantizer: nn.Module):
        self.input_quantizer = input_quantizer
        self.enabled = True

    def step(self, layer: nn.Module) -> torch.Tensor | None:
        """input_scale x weight_scale per output channel, computed as the file's scales are (float32,
        a 7-bit weight grid written as 8-bit, zero amax as scale 1), or None where onnxruntime keeps
        the bias in float."""
        wq, aq = layer.weight_quantizer, self.input_quantizer
        if layer.bias is None or not wq.is_enabled or not aq.is_enabled or wq.amax is None or aq.amax is None:
            return None
        w_amax = file_amax(wq).detach().float().flatten()
        w_scale = torch.where(w_amax == 0, torch.ones_like(w_amax), w_amax / 127)
        return aq.amax.detach().float().flatten()[0] / aq.maxbound * w_scale

    def rounded_bias(self, layer: nn.Module) -> torch.Tensor | None:
        """round(bias / step) in float64, as onnxruntime's quantize_static does, times step in float32, as its DequantizeLinear does."""
        step = self.step(layer)
        return None if step is None else torch.round(layer.bias.detach().double() / step.double()).float() * step

    def __call__(self, layer: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if not self.enabled or output.dim() not in (2, 4) or (isinstance(layer, nn.Linear) and inputs[0].dim() != 2):
            return output  # a Linear on 3-D input exports as MatMul + Add: no int32 bias
        bias = self.rounded_bias(layer)
        if bias is None:
            return output
        return output + (bias - layer.bias.detach()).view(1, -1, *([1] * (output.dim() - 2)))


def round_biases_like_onnxruntime(qmodel: nn.Module) -> int:
    """Hook every quantized Conv / Linear that reads an activation quantizer; returns how many."""
    count = 0
    for path, quantizer in input_quantizers(qmodel).items():
        layer = qmodel.get_submodule(path)
        if isinstance(layer, (nn.Conv2d, nn.Linear)) and hasattr(layer, "weight_quantizer"):
            layer.register_forward_hook(IntBiasRounding(quantizer))
            count += 1
    return count


def bias_hooks(model: nn.Module) -> list[tuple[nn.Module, IntBiasRounding]]:
    return [(m, h) for m in model.modules() for h in m._forward_hooks.values() if isinstance(h, IntBiasRounding)]


def snap_biases(model: nn.Module) -> None:
    """Write each hooked layer's rounded bias into the layer and switch its hook off (in place: call
    on the export copy). The exported graph then carries biases already on onnxruntime's grid."""
    with torch.no_grad():
        for layer, hook in bias_hooks(model):
            bias = hook.rounded_bias(layer)
            if bias is not None:
                layer.bias.copy_(bias)
            hook.enabled = False
