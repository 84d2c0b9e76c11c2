"""Where the INT8 quantizers go, read from the network's graph (torch.fx), per target runtime.

modelopt quantizes the *modules* it knows (Conv, Linear): their weights, per output channel. A
network's ``forward`` also has ops that are not modules: timm's ``x + shortcut``, squeeze-excite
multiplies, concatenations, functional pooling. If those get no quantizer, the exported graph
leaves them in float: TensorRT then cannot fuse a residual add into its conv (users' most common
complaint, "INT8 is no faster than FP16"), and onnxruntime's CPU provider cannot form its
DQ -> op -> Q integer groups. So activations are quantized here, on the edges of the traced graph:

- ``tensorrt`` (TensorRT developer guide, "Explicit quantization: Q/DQ layer placement
  recommendations"): the activation input of every Conv / ConvTranspose / Gemm and, of a residual
  Add, the identity input only (:mod:`edgekd.quantize.residual`, NVIDIA's own rule): TensorRT fuses
  the Add into the conv that feeds its other input and keeps the sum INT8. An Add that is no
  residual gets both inputs quantized, as do both inputs of a two-tensor Mul (squeeze-excite gating),
  so TensorRT runs it in INT8 (both as Model Optimizer's ONNX PTQ places them). TensorRT propagates
  Q/DQ through pooling.
- ``ort-cpu`` (onnxruntime's QDQ format, as its own ``quantize_static`` lays it out): every input
  *and output* tensor of the ops onnxruntime has integer kernels for (Conv, Gemm, Add, Mul, Concat,
  pooling, Sigmoid); an output followed only by a ReLU / ReLU6 is taken after it, because
  onnxruntime folds that activation into the quantized op. Those outputs (and Sigmoid's) are
  quantized *unsigned* (codes 0..255 over [0, amax]), exactly the u8 grid onnxruntime runs: it
  drops a ReLU6 into the Q after it, so the Q's range must end where the clip does.
- ``openvino`` (what NNCF's ``nncf.quantize`` emits for OpenVINO's CPU plugin, and its
  low-precision transformations' rules): TensorRT's sites (Conv / Gemm inputs, both inputs of a
  residual Add; not the squeeze-excite Multiply, which NNCF ignores), per-tensor, and *unsigned*
  where the tensor is non-negative: the CPU plugin's Convolution takes only u8 activations (signed
  ones only on AMX / AVX2-VNNI-2 CPUs), a signed one costs a zero-point shift.

One quantizer per tensor, shared by all its consumers: a tensor has one scale in the ONNX file,
so it has one in training too, and what QAD trains is what ships. Quantizer names follow the
graph's node names (``edgekd_act.layer1_0_add``), so rebuilding the same architecture re-creates
the same names and a checkpoint loads strictly.

The network arrives prepared by :mod:`edgekd.quantize.fuse` (branches fused, BatchNorm folded).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from edgekd.errors import EdgekdError
from edgekd.quantize.residual import conv_branch_input

LAYOUTS = ("tensorrt", "ort-cpu", "openvino")
ACT_PREFIX = "edgekd_act"
FEATURE_TAP = "edgekd_feature_tap"
CARRIED_ATTRS = ("edgekd_spec", "preprocess", "feature_layer", "weights_source", "pretrained_cfg", "edgekd_bn_folded", "edgekd_reparameterized")

# What each op is, as far as quantizer placement cares.
_ADD = {operator.add, operator.iadd, torch.add}
_MUL = {operator.mul, operator.imul, torch.mul}
_CAT = {torch.cat, torch.concat, torch.concatenate}
_POOL_FN = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d}
_SIGMOID_FN = {torch.sigmoid, F.sigmoid}
_RELU_FN = {F.relu, torch.relu, F.relu6}
_METHODS = {"add": "add", "add_": "add", "mul": "mul", "mul_": "mul", "sigmoid": "sigmoid", "relu": "relu", "relu_": "relu"}
_POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
# ops that move values without changing them: a tensor keeps its scale through them (onnxruntime
# shares the quantization parameters of Flatten/Reshape inputs and outputs)
_PASSTHROUGH_MODULES = (nn.Flatten, nn.Dropout, nn.Identity)
_PASSTHROUGH_FN = {torch.flatten, torch.reshape, F.dropout}
_PASSTHROUGH_METHODS = {"flatten", "view", "reshape", "contiguous"}

# kinds whose activation inputs (and, for ort-cpu, outputs) are quantized
INPUT_KINDS = {"tensorrt": {"conv", "linear", "add", "mul"}, "ort-cpu": {"conv", "linear", "add", "mul", "cat", "pool", "sigmoid"},
               "openvino": {"conv", "linear", "add"}}
OUTPUT_KINDS = {"tensorrt": set(), "ort-cpu": INPUT_KINDS["ort-cpu"], "openvino": set()}
UNSIGNED_LAYOUTS = {"ort-cpu", "openvino"}  # non-negative tensors get a u8 grid (OpenVINO's CPU convs take only u8 activations)


class _Tracer(torch.fx.Tracer):
    """Keeps Conv, Linear and BatchNorm (and their subclasses, e.g. timm's ``BatchNormAct2d`` and
    ``Linear``) as single nodes: they are what weight quantizers and BN folding act on."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (_ConvNd, nn.Linear, _BatchNorm)) or type(m).__module__.startswith("modelopt"):
            return True
        return super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> torch.fx.GraphModule:
    """torch.fx trace with edgekd's leaf modules; one clear error when the network cannot be traced."""
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # noqa: BLE001 - tracing fails in many ways (data-dependent control flow, ...)
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise EdgekdError(f"cannot trace {type(model).__name__} with torch.fx ({first})",
                          "INT8 placement reads the network's graph; export this model with --precision fp16 or fp32") from exc
    gm = torch.fx.GraphModule(model, graph, class_name=type(model).__name__)
    for attr in CARRIED_ATTRS:
        if hasattr(model, attr):
            setattr(gm, attr, getattr(model, attr))
    return gm


def _example_input(model: nn.Module) -> torch.Tensor:
    pre = getattr(model, "preprocess", None)
    ch, size = (pre.channels, pre.input_size) if pre is not None else (3, 32)
    return torch.zeros(2, ch, size, size)


def _is_tensor(node: Any) -> bool:
    return isinstance(node, torch.fx.Node) and isinstance(node.meta.get("tensor_meta"), TensorMetadata)


def op_kind(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """'conv', 'linear', 'add', 'mul', 'cat', 'pool', 'sigmoid', 'relu' or None (anything else)."""
    if node.op == "call_module":
        m = modules.get(node.target)
        if isinstance(m, _ConvNd):
            return "conv"
        if isinstance(m, nn.Linear):
            return "linear"
        if isinstance(m, _POOL_MODULES):
            return "pool"
        if isinstance(m, nn.Sigmoid):
            return "sigmoid"
        if isinstance(m, (nn.ReLU, nn.ReLU6)) or (isinstance(m, nn.Hardtanh) and m.min_val >= 0):
            return "relu"
        return None
    if node.op == "call_function":
        fn = node.target
        if fn in _ADD:
            return "add" if sum(_is_tensor(a) for a in node.args) == 2 else None
        if fn in _MUL:
            return "mul" if sum(_is_tensor(a) for a in node.args) == 2 else None
        if fn in _CAT:
            return "cat"
        if fn in _POOL_FN:
            return "pool"
        if fn in _SIGMOID_FN:
            return "sigmoid"
        if fn in _RELU_FN:
            return "relu"
        return None
    if node.op == "call_method" and node.target in _METHODS:
        kind = _METHODS[node.target]
        if kind in ("add", "mul"):
            return kind if sum(_is_tensor(a) for a in node.args) == 2 else None
        return kind
    return None


def _tensor_inputs(node: torch.fx.Node, kind: str) -> list[torch.fx.Node]:
    if kind in ("conv", "linear", "pool", "sigmoid"):
        return [node.args[0]] if _is_tensor(node.args[0]) else []
    if kind == "cat":
        seq = node.args[0] if node.args else node.kwargs.get("tensors", [])
        return [a for a in seq if _is_tensor(a)]
    return [a for a in node.args if _is_tensor(a)]


def _is_passthrough(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), _PASSTHROUGH_MODULES)
    return (node.op == "call_function" and node.target in _PASSTHROUGH_FN) or (node.op == "call_method" and node.target in _PASSTHROUGH_METHODS)


def _through_passthrough(node: torch.fx.Node, modules: dict[str, nn.Module]) -> torch.fx.Node:
    """The tensor before any Flatten / Dropout / reshape: one quantizer there covers both."""
    while _is_passthrough(node, modules) and _is_tensor(node.args[0]):
        node = node.args[0]
    return node


def _output_site(node: torch.fx.Node, modules: dict[str, nn.Module]) -> torch.fx.Node:
    """The op's output, or the ReLU/ReLU6 that is its only user (the runtime folds it into the op)."""
    users = list(node.users)
    if len(users) == 1 and op_kind(users[0], modules) == "relu":
        return users[0]
    return node


def activation_sites(gm: torch.fx.GraphModule, layout: str) -> list[torch.fx.Node]:
    """The tensors (graph nodes) that get an activation quantizer for ``layout``, in graph order."""
    if layout not in LAYOUTS:
        raise EdgekdError(f"unknown layout '{layout}'", f"use one of {', '.join(LAYOUTS)}")
    modules = dict(gm.named_modules())
    sites: dict[torch.fx.Node, None] = {}
    for node in gm.graph.nodes:
        kind = op_kind(node, modules)
        if kind in INPUT_KINDS[layout]:
            inputs = _tensor_inputs(node, kind)
            fused = conv_branch_input(node, inputs, modules) if kind == "add" and layout == "tensorrt" else None
            for src in inputs:
                if src is fused:
                    continue  # TensorRT fuses this conv output into the Add: no Q/DQ between them
                sites[_through_passthrough(src, modules) if OUTPUT_KINDS[layout] else src] = None
        if kind in OUTPUT_KINDS[layout] and _is_tensor(node):
            sites[_output_site(node, modules)] = None
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(sites, key=order.__getitem__)


def _add_feature_tap(gm: torch.fx.GraphModule) -> None:
    """Distillation hooks a module path (``feature_layer``); in a traced graph a container
    (``features``, ``layer4``) is never called as a whole, so its last output gets an Identity tap."""
    path = getattr(gm, "feature_layer", None)
    if not path or any(n.op == "call_module" and n.target == path for n in gm.graph.nodes):
        return
    inside = [n for n in gm.graph.nodes if path in (n.meta.get("nn_module_stack") or {})]
    if not inside:
        return
    last = inside[-1]
    gm.add_submodule(FEATURE_TAP, nn.Identity())
    with gm.graph.inserting_after(last):
        tap = gm.graph.call_module(FEATURE_TAP, (last,))
    last.replace_all_uses_with(tap, delete_user_cb=lambda u: u is not tap)
    gm.feature_layer = FEATURE_TAP


def _drop_identities(gm: torch.fx.GraphModule) -> None:
    """Remove ``nn.Identity`` calls (folded BatchNorms, disabled drop-path): a quantizer must see
    the op that really produced a tensor, e.g. the Conv before a ReLU."""
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and type(modules.get(node.target)) is nn.Identity and node.target != FEATURE_TAP:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.recompile()


def traced_for_placement(model: nn.Module) -> torch.fx.GraphModule:
    """The GraphModule placement works on: traced, no-op Identities removed, tensor shapes
    recorded, feature layer tapped."""
    gm = trace(model)
    _drop_identities(gm)
    ShapeProp(gm).propagate(_example_input(model))
    _add_feature_tap(gm)
    return gm


def input_quantizers(gm: torch.fx.GraphModule) -> dict[str, nn.Module]:
    """{module path: the activation quantizer feeding it} for every module (Conv, Linear...) that reads one."""
    modules = dict(gm.named_modules())
    found = {}
    for node in gm.graph.nodes:
        src = node.args[0] if node.op == "call_module" and node.args else None
        while isinstance(src, torch.fx.Node) and _is_passthrough(src, modules):
            src = src.args[0]
        if isinstance(src, torch.fx.Node) and src.op == "call_module" and str(src.target).startswith(ACT_PREFIX + "."):
            found.setdefault(node.target, modules[src.target])
    return found


def _nonnegative_nodes(gm: torch.fx.GraphModule, modules: dict[str, nn.Module]) -> set[torch.fx.Node]:
    """Nodes whose output is >= 0: ReLU / ReLU6 / Sigmoid, and pooling or reshapes of those."""
    nonneg: set[torch.fx.Node] = set()
    for node in gm.graph.nodes:
        kind = op_kind(node, modules)
        if kind in ("relu", "sigmoid") or ((kind == "pool" or _is_passthrough(node, modules)) and node.args and node.args[0] in nonneg):
            nonneg.add(node)
    return nonneg


def _upper_bound(node: torch.fx.Node, modules: dict[str, nn.Module], bounds: dict[torch.fx.Node, float]) -> float | None:
    """The most an op's output can be (ReLU6 / Hardtanh: their top; sigmoids: 1; pooling and reshapes:
    their input's), or None. A learned range never needs to reach past it, and onnxruntime's file
    relies on it not doing so: it folds a ReLU6 into the Q after it, whose range then does the clipping."""
    if node.op == "call_module":
        m = modules.get(node.target)
        if isinstance(m, nn.Hardtanh):  # ReLU6 is Hardtanh(0, 6)
            return float(m.max_val)
        if isinstance(m, (nn.Sigmoid, nn.Hardsigmoid)):
            return 1.0
    elif node.op == "call_function" and node.target in (F.relu6, F.hardtanh):
        return 6.0 if node.target is F.relu6 else float(node.kwargs.get("max_val", node.args[2] if len(node.args) > 2 else 1.0))
    elif (node.op == "call_function" and node.target in _SIGMOID_FN | {F.hardsigmoid}) or (node.op == "call_method" and node.target == "sigmoid"):
        return 1.0
    if (op_kind(node, modules) == "pool" or _is_passthrough(node, modules)) and node.args and isinstance(node.args[0], torch.fx.Node):
        return bounds.get(node.args[0])
    return None


def _upper_bounds(gm: torch.fx.GraphModule, modules: dict[str, nn.Module]) -> dict[torch.fx.Node, float]:
    bounds: dict[torch.fx.Node, float] = {}
    for node in gm.graph.nodes:
        bound = _upper_bound(node, modules, bounds)
        if bound is not None:
            bounds[node] = bound
    return bounds


def insert_activation_quantizers(gm: torch.fx.GraphModule, layout: str, make_quantizer) -> list[str]:
    """Insert ``make_quantizer()`` modules, named ``edgekd_act.<node>``, on each activation site for
    ``layout`` (see :func:`activation_sites`); records them in ``gm.edgekd_placement``, with the
    upper bound of each one whose input has one (:func:`_upper_bound`)."""
    names, unsigned, upper = [], [], {}
    modules = dict(gm.named_modules())
    nonneg, bounds = _nonnegative_nodes(gm, modules), _upper_bounds(gm, modules)
    for src in activation_sites(gm, layout):
        path = f"{ACT_PREFIX}.{src.name}"
        gm.add_submodule(path, make_quantizer())
        with gm.graph.inserting_after(src):
            q = gm.graph.call_module(path, (src,))
        if "tensor_meta" in src.meta:  # same shape out as in: op_kind still sees the ops after it as tensor ops
            q.meta["tensor_meta"] = src.meta["tensor_meta"]
        src.replace_all_uses_with(q, delete_user_cb=lambda u, q=q: u is not q)
        names.append(src.name)
        if layout in UNSIGNED_LAYOUTS and src in nonneg:
            unsigned.append(path)
        if src in bounds:
            upper[path] = bounds[src]
    gm.graph.lint()
    gm.recompile()
    gm.edgekd_placement = {"layout": layout, "activations": names, "unsigned": unsigned, "upper_bounds": upper}
    return names
