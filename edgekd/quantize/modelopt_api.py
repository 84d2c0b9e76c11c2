"""Every reach into nvidia-modelopt, public and private, in one place.

edgekd uses modelopt's fake-quant modules (``mtq.quantize``, ``TensorQuantizer``, its calibrators)
and, where modelopt has no public way, three pieces of its private state: a calibrator's
histogram (``_calibrator._calib_hist`` / ``_calib_bin_edges``) for the MSE and entropy searches,
and the ``_amax`` buffer that learned ranges write into. These are tested against the version
range pinned in pyproject.toml (``nvidia-modelopt>=0.47,<0.48``); a newer modelopt that moves them
breaks here, in one module, and tests/test_learned_ranges.py / test_quantize_export.py say so.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
import torch.nn as nn


def mtq() -> Any:
    """``modelopt.torch.quantization``, imported quietly (it warns about CUDA/Triton on CPU hosts);
    imported when first needed: it takes seconds, and ``edgekd --help`` must not pay for it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import modelopt.torch.quantization as m
    return m


def tensor_quantizer_cls() -> type:
    mtq()
    from modelopt.torch.quantization.nn import TensorQuantizer

    return TensorQuantizer


def start_histogram_calibration(quantizer: nn.Module) -> None:
    """Give ``quantizer`` a fresh histogram calibrator and switch it from quantizing to collecting."""
    from modelopt.torch.quantization.calib import HistogramCalibrator

    quantizer._calibrator = HistogramCalibrator(num_bits=8, axis=None, unsigned=False)
    quantizer.disable_quant()
    quantizer.enable_calib()


def calibration_histogram(quantizer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts, bin edges) the quantizer's histogram calibrator collected: private state, no public getter.

    When a later batch widens the range, modelopt 0.47 re-bins with ``torch.histc`` evenly over
    [0, last edge] but builds the edges with ``torch.arange``, which can overshoot by an edge or two:
    MobileNetV3-Large at 224 px got 2,166 counts and 2,168 edges, and the MSE search failed on the
    shapes. The edges returned are those the counts were binned with."""
    hist, edges = quantizer._calibrator._calib_hist, quantizer._calibrator._calib_bin_edges
    if len(edges) != len(hist) + 1:
        edges = torch.linspace(0.0, float(edges[-1]), len(hist) + 1, dtype=torch.as_tensor(edges).dtype)
    return hist, edges


def write_amax(quantizer: nn.Module, amax: torch.Tensor) -> None:
    """Copy ``amax`` into the quantizer's ``_amax`` buffer in place, without autograd (the learned
    ranges' forward pass keeps the buffer in step with the trained log-range)."""
    with torch.no_grad():
        quantizer._amax.copy_(amax.detach().reshape(quantizer._amax.shape))


def amax_buffer_key(module_name: str) -> str:
    """The state_dict key of a quantizer's amax buffer (how checkpoints store it)."""
    return f"{module_name}._amax"


def register_backend(name: str, fn: Callable[[torch.Tensor, nn.Module], torch.Tensor]) -> None:
    """Register ``fn`` as a modelopt quant backend (a quantizer with ``backend = name`` calls it) once."""
    from modelopt.torch.quantization.nn.modules.tensor_quantizer import is_registered_quant_backend, register_quant_backend

    if not is_registered_quant_backend(name):
        register_quant_backend(name, fn)
