"""Learned activation ranges during QAD (LSQ: Esser et al., "Learned Step Size Quantization", ICLR 2020).

Calibration fixes each activation quantizer's range (amax) once, from a few hundred images; QAD
then trains the weights under those ranges. Where the ranges themselves are the loss (MobileNetV3's
hard-swish and squeeze-excitation outputs in onnxruntime's layout: quantizing the weights alone
costs nothing, the activations 3 points), training the weights does not win it back. LSQ trains
each range with the network: the fake-quant's step size gets the straight-through gradient of the
distillation loss, so a range widens where clipping hurts and narrows where rounding does.

modelopt's own LSQ (``mtq.LSQConfig``) learns only NVFP4 per-block weight scales, and its INT8
fake-quant passes no gradient to amax, so QAD swaps its activation quantizers onto a registered
modelopt quant backend (:func:`modelopt...register_quant_backend`, the library's extension point)
for the length of the training run. The range is trained as log(amax) (steps relative to its size,
always positive) in its own optimizer group, and written back into the quantizer's ``_amax`` on
every forward: checkpoints, export and evaluation see plain modelopt quantizers with the ranges
QAD trained.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn

from edgekd.quantize.modelopt_api import register_backend, write_amax

BACKEND = "edgekd_learned_range"
_PARAM = "edgekd_log_amax"  # kept in the quantizer's __dict__: not a registered parameter, so state_dicts keep their keys
_BOUND = "edgekd_amax_bound"  # the most the quantizer's input can be (a ReLU6's 6): its range stops there


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def fake_quant_learned(x: torch.Tensor, quantizer: nn.Module) -> torch.Tensor:
    """modelopt's per-tensor integer fake-quant (``clamp(round(x * bound / amax)) * amax / bound``)
    with gradients to amax as well as x (LSQ), amax from the quantizer's learned log-range."""
    log_amax = quantizer.__dict__[_PARAM]
    amax = log_amax.exp()
    bound = quantizer.__dict__.get(_BOUND)
    if bound is not None:
        amax = amax.clamp(max=bound)
    write_amax(quantizer, amax)
    bits, unsigned = quantizer.num_bits, quantizer.unsigned
    top = 2.0 ** (bits - 1 + int(unsigned)) - 1.0
    bottom = 0.0 if unsigned else (-top if quantizer.narrow_range else -top - 1.0)
    scale = top / amax
    return torch.clamp(_round_ste(x.float() * scale), bottom, top).div(scale).to(x.dtype)


class LearnedRanges(nn.Module):
    """The log-ranges of the given (calibrated, per-tensor) activation quantizers, as parameters to
    train. ``lr_scale`` tells the optimizer to give them their own learning rate
    (:func:`edgekd.train.make_optimizer`). ``upper_bounds`` (quantizer name -> the most its input
    can be, from :mod:`edgekd.quantize.placement`) caps those ranges."""

    def __init__(self, quantizers: dict[str, nn.Module], lr_scale: float, upper_bounds: dict[str, float] | None = None):
        super().__init__()
        self.log_amax = nn.ParameterList()
        self.quantizers = list(quantizers.values())
        self.bounds = [(upper_bounds or {}).get(name) for name in quantizers]
        for q in self.quantizers:
            p = nn.Parameter(q.amax.detach().float().clamp_min(1e-8).log().reshape(()))
            p.lr_scale = lr_scale
            self.log_amax.append(p)


def learnable(quantizers: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The quantizers LSQ can train: per-tensor, calibrated, integer."""
    return {n: q for n, q in quantizers.items() if q.axis is None and q.amax is not None and q.amax.numel() == 1 and isinstance(q.num_bits, int)}


@contextlib.contextmanager
def learning_ranges(ranges: LearnedRanges) -> Iterator[None]:
    """While inside, ``ranges``' quantizers fake-quantize through :func:`fake_quant_learned`;
    afterwards they are plain modelopt quantizers again, holding the last ranges trained."""
    register_backend(BACKEND, fake_quant_learned)
    for p, q, bound in zip(ranges.log_amax, ranges.quantizers, ranges.bounds):
        q.__dict__[_PARAM], q.__dict__[_BOUND] = p, bound
        q.backend = BACKEND
    try:
        yield
    finally:
        for q in ranges.quantizers:
            q.backend = None
            q.__dict__.pop(_PARAM, None)
            q.__dict__.pop(_BOUND, None)


def amax_values(quantizers: dict[str, nn.Module]) -> dict[str, float]:
    return {n: float(q.amax) for n, q in learnable(quantizers).items()}


def range_changes(calibrated: dict[str, float], trained: dict[str, float]) -> dict[str, float]:
    """How far QAD moved the activation ranges from calibration (trained / calibrated amax, over
    the quantizers both have): the report's evidence that the ranges were learned, and how much."""
    ratios = sorted(trained[n] / calibrated[n] for n in calibrated if n in trained and calibrated[n] > 0)
    if not ratios:
        return {"quantizers": 0}
    return {"quantizers": len(ratios), "median_ratio": round(ratios[len(ratios) // 2], 4), "lowest_ratio": round(ratios[0], 4),
            "highest_ratio": round(ratios[-1], 4)}
