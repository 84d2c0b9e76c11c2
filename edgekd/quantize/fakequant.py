"""Quantization-aware distillation (QAD): INT8 fake-quant in the student, FP32 teacher, then fine-tune.

Follows NVIDIA Model Optimizer's PyTorch quantization guide (``mtq.quantize(model, cfg,
forward_loop)``; the library never sees the data loader) and the QAT recipe of Jacob et al.,
"Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference"
(CVPR 2018): fold BatchNorm into the convolutions, simulate INT8 (per-channel symmetric weights,
per-tensor activations) and train with straight-through gradients. The loss is the caller's
(usually the distillation loss from an FP32 teacher: Hinton et al., "Distilling the Knowledge in a
Neural Network", 2015), so the quantized student learns from the unquantized teacher.

Activation quantizers are placed on the traced graph for the target runtime's layout
(:mod:`edgekd.quantize.placement`): residual adds, SE multiplies, concatenations and pooling get
theirs too, so the network QAD trains is the one the runtime executes in INT8.

A quantized checkpoint stores plain tensors only (weights + every quantizer's ``_amax``) and a small
``quantize`` dict; :func:`load_quantized` rebuilds the model, re-inserts the quantizers without
calibrating and loads the amax values, so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from edgekd import ui
from edgekd.config import QuantizeConfig
from edgekd.data import Preprocess
from edgekd.errors import EdgekdError
from edgekd.models import create_model, load_checkpoint, save_checkpoint
from edgekd.quantize.bias import round_biases_like_onnxruntime
from edgekd.quantize.calibrate import HISTOGRAM_METHODS, forward_loop_over, recalibrate_activations
from edgekd.quantize.fuse import fold_batchnorm, plain_linears, reparameterize
from edgekd.quantize.modelopt_api import amax_buffer_key, mtq as modelopt_mtq, tensor_quantizer_cls
from edgekd.quantize.placement import ACT_PREFIX, LAYOUTS, insert_activation_quantizers, traced_for_placement
from edgekd.quantize.sensitivity import set_float_layers

QUANT_FORMAT = "edgekd-int8-fakequant-2"  # 2: activation quantizers placed on the traced graph, per layout
QUANTIZED_KIND = "quantized-student"
QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear)


# Max calibration without modelopt's all-reduce of amax over the ranks: under torchrun every rank
# calibrates on the same images (the same ranges), and export runs on rank 0 alone (a collective
# there would wait forever for the other ranks).
LOCAL_MAX = {"method": "max", "distributed_sync": False}


def weight_config(bits: int = 8) -> dict:
    """modelopt config: per-channel (axis 0) symmetric ``bits``-bit weights on every Conv/Linear, max calibration.

    Everything else is off: activations are quantized by the quantizers
    :mod:`edgekd.quantize.placement` puts on the graph (modelopt's own per-module
    ``input_quantizer`` would put a second, differently scaled quantizer on the same tensor).
    """
    return {"quant_cfg": [{"quantizer_name": "*", "enable": False},
                          {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": bits, "axis": 0}}],
            "algorithm": LOCAL_MAX}


def default_weight_bits(layout: str, arch: str) -> int:
    """7-bit weights for onnxruntime on x86-64, 8 elsewhere.

    Without VNNI (AVX2, most edge x86 boxes and this CI machine), onnxruntime's u8 x s8 kernels add
    neighbouring products in 16 bits (``vpmaddubsw``) and saturate: 2 * 255 * 127 > 32767. Its
    documented cures are u8 weights (exact, but up to 2x slower on large convs here) or 7-bit weights
    (``reduce_range``: 2 * 255 * 63 < 32767). Trained in QAD, the 7-bit grid costs little accuracy
    and keeps the fast kernel; TensorRT and ARM kernels accumulate in 32 bits and keep 8.
    """
    return 7 if layout == "ort-cpu" and arch == "x86_64" else 8


def for_target(cfg: QuantizeConfig, layout: str, arch: str) -> QuantizeConfig:
    """``cfg`` with 'auto' layout and unset weight bits resolved for a target (its layout and CPU architecture)."""
    layout = cfg.layout if cfg.layout != "auto" else layout
    bits = cfg.weight_bits or default_weight_bits(layout, arch)
    return cfg.model_copy(update={"layout": layout, "weight_bits": bits})


ACTIVATION_CFG = [{"quantizer_name": f"{ACT_PREFIX}.*", "cfg": {"num_bits": 8, "axis": None}}]


# ----------------------------------------------------------------------------- calibration
def enabled_quantizers(model: nn.Module) -> dict[str, nn.Module]:
    TQ = tensor_quantizer_cls()
    return {n: m for n, m in model.named_modules() if isinstance(m, TQ) and m.is_enabled}


def activation_quantizers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in enabled_quantizers(model).items() if n.startswith(ACT_PREFIX + ".")}


def quantize_model(model: nn.Module, cfg: QuantizeConfig, calib_u8: torch.Tensor | None, preprocess: Preprocess,
                   float_layers: list[str] | None = None) -> nn.Module:
    """INT8 fake-quant for the runtime of ``cfg.layout`` (the one place the layout is read from;
    'auto' must be resolved for a target first, :func:`for_target`): fuse re-parameterizable branches, fold BN (if asked),
    place quantizers on the traced graph, calibrate activation ranges. Returns the quantized model
    (a ``torch.fx.GraphModule`` that shares its weights with ``model``). ``float_layers`` (default
    ``cfg.exclude``) stay in higher precision (:func:`edgekd.quantize.sensitivity.set_float_layers`).

    ``calib_u8=None`` inserts quantizers without calibrating (used when amax values are loaded
    from a checkpoint). Raises EdgekdError when nothing in the model can be quantized.
    """
    layout = cfg.layout
    if layout not in LAYOUTS:
        raise EdgekdError(f"INT8 layout '{layout}' is not one of {', '.join(LAYOUTS)}",
                          "resolve quantize.layout for a target first: edgekd.quantize.for_target(cfg, layout, arch), or --target / --layout")
    mtq = modelopt_mtq()
    model.eval()
    if not any(isinstance(m, QUANTIZABLE) for m in model.modules()):
        raise EdgekdError(f"{type(model).__name__} has no layer INT8 can quantize (no Conv/Linear)", "export it with --precision fp16 or fp32")
    reparameterize(model)
    plain_linears(model)
    if cfg.fold_bn:
        fold_batchnorm(model)
    qmodel = traced_for_placement(model)
    loop = forward_loop_over(calib_u8, preprocess) if calib_u8 is not None else None
    with warnings.catch_warnings(), ui.quiet_library_output():
        warnings.simplefilter("ignore")
        try:
            qmodel = mtq.quantize(qmodel, weight_config(cfg.weight_bits or 8), None)  # converts Conv/Linear; must precede any other quantizer
            insert_activation_quantizers(qmodel, layout, tensor_quantizer_cls())
            mtq.set_quantizer_by_cfg(qmodel, ACTIVATION_CFG + [{"quantizer_name": name, "cfg": {"num_bits": 8, "axis": None, "unsigned": True}}
                                                               for name in qmodel.edgekd_placement["unsigned"]])
            if loop is not None:
                mtq.calibrate(qmodel, algorithm=LOCAL_MAX, forward_loop=loop)
        except RuntimeError as exc:
            raise EdgekdError(f"modelopt could not quantize {type(model).__name__}: {str(exc).splitlines()[0][:200]}",
                              "export it with --precision fp16 or fp32") from exc
    if not enabled_quantizers(qmodel):
        raise EdgekdError(f"{type(model).__name__} has no layer INT8 can quantize (no Conv/Linear)", "export it with --precision fp16 or fp32")
    method = "max" if cfg.calibrator == "auto" else cfg.calibrator  # quantize.stage.calibrate chooses for 'auto'; a plain calibration takes max
    if loop is not None and method in HISTOGRAM_METHODS:
        recalibrate_activations(list(activation_quantizers(qmodel).values()), qmodel, loop, method, cfg.percentile)
    kept = set_float_layers(qmodel, cfg.exclude if float_layers is None else float_layers)
    if layout == "ort-cpu":
        round_biases_like_onnxruntime(qmodel)
    qmodel.edgekd_quant = {"format": QUANT_FORMAT, "fold_bn": bool(cfg.fold_bn), "calibrator": method, "percentile": cfg.percentile,
                           "layout": layout, "weight_bits": cfg.weight_bits or 8, "reparameterized": bool(getattr(model, "edgekd_reparameterized", False)), "float_layers": kept}
    return qmodel


def is_quantized(model: nn.Module) -> bool:
    return hasattr(model, "edgekd_quant") and bool(enabled_quantizers(model))


def quantizer_summary(model: nn.Module) -> list[dict[str, Any]]:
    """One row per enabled quantizer: path, kind, per-channel or per-tensor, amax range."""
    rows = []
    for name, q in enabled_quantizers(model).items():
        amax = getattr(q, "amax", None)
        rows.append({
            "quantizer": name,
            "axis": q.axis,
            "channels": int(amax.numel()) if amax is not None else 0,
            "amax_min": float(amax.min()) if amax is not None else None,
            "amax_max": float(amax.max()) if amax is not None else None,
        })
    return rows


# ----------------------------------------------------------------------------- checkpoints
def save_quantized(path: str | Path, model: nn.Module, classes: list[str], extra: dict[str, Any] | None = None) -> Path:
    """Self-describing checkpoint: weights + quantizer amax buffers (tensors only) + the quantize recipe."""
    return save_checkpoint(path, model, classes, QUANTIZED_KIND, {**(extra or {}), "quantize": dict(model.edgekd_quant)})


def load_quantized(ckpt: dict[str, Any] | str | Path) -> nn.Module:
    """Rebuild a quantized student from its checkpoint: architecture, re-parameterization, BN fold,
    the same quantizer placement (names follow the traced graph), amax values, weights."""
    if not isinstance(ckpt, dict):
        ckpt = load_checkpoint(ckpt)
    q = ckpt.get("quantize")
    if not isinstance(q, dict) or q.get("format") != QUANT_FORMAT:
        raise EdgekdError("checkpoint is not a quantized edgekd student of this version",
                          "run `edgekd quantize` on the FP32 student, or export it with --precision fp32/fp16")
    spec = ckpt["model"]
    model = create_model(spec["name"], spec["num_classes"], pretrained="none", in_chans=spec["in_chans"], width=spec.get("width", 1.0),
                         input_size=ckpt["preprocess"]["input_size"])
    model.preprocess = Preprocess.from_dict(ckpt["preprocess"])
    cfg = QuantizeConfig(fold_bn=q["fold_bn"], calibrator=q["calibrator"], percentile=q.get("percentile", 99.99), weight_bits=q.get("weight_bits", 8),
                         layout=q["layout"])
    qmodel = quantize_model(model, cfg, None, model.preprocess, q.get("float_layers", []))
    state = ckpt["state_dict"]
    TQ = tensor_quantizer_cls()
    for name, module in qmodel.named_modules():
        key = amax_buffer_key(name)
        if isinstance(module, TQ) and key in state:
            module.amax = state[key].clone()
    try:
        qmodel.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise EdgekdError(f"quantized checkpoint does not fit a {spec['name']} model: {str(exc).splitlines()[0][:160]}",
                          "the checkpoint is from another architecture or was modified") from exc
    qmodel.eval()
    return qmodel
