"""Which input of a residual Add gets the Q/DQ in TensorRT's layout: the identity (shortcut) only.

TensorRT fuses a Conv with the Add that consumes its output ("Conv + ElementWise(residual)"), with
the *other* input read in INT8 and the sum kept INT8. So NVIDIA quantizes only that other input:
pytorch-quantization's ResNet example (``residual_quantizer(identity)``) and Model Optimizer's ONNX
PTQ, whose ``build_non_residual_input_map`` + ``remove_partial_input_qdq``
(modelopt/onnx/quantization/graph_utils.py) drop the Q/DQ on the conv-branch input. This module is
that rule on edgekd's torch.fx graph, written to agree with Model Optimizer's:

- an input has a *fusible backbone* when it comes from a Conv through only ops TensorRT fuses into
  it (a ReLU, SiLU, or ops that move values; BatchNorm is already folded into the conv here);
- neither input has one: no fusion, both inputs are quantized (an ordinary INT8 element-wise add);
- one has: that one is the conv branch, unless the other branch starts at that very conv
  (ConvNeXt-style ``conv -> ... -> add(conv, ...)``: not a residual, both quantized);
- both have: the input farther from the two inputs' lowest common ancestor is the conv branch
  (ResNet's downsample shortcut is one conv deep, the main branch two or three).
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.conv import _ConvNd

_FUSIBLE_MODULES = (nn.ReLU, nn.SiLU, nn.Identity, nn.Dropout)
_FUSIBLE_FN = {F.relu, torch.relu, F.silu}
_FUSIBLE_METHODS = {"relu", "relu_"}


def _fusible_step(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), _FUSIBLE_MODULES)
    if node.op == "call_function":
        return node.target in _FUSIBLE_FN
    return node.op == "call_method" and node.target in _FUSIBLE_METHODS


def fusible_backbone(node: torch.fx.Node, modules: dict[str, nn.Module]) -> torch.fx.Node | None:
    """The Conv that ``node`` comes from through ops TensorRT fuses into it, or None."""
    while isinstance(node, torch.fx.Node):
        if node.op == "call_module" and isinstance(modules.get(node.target), _ConvNd):
            return node
        if not _fusible_step(node, modules) or not node.args:
            return None
        node = node.args[0]
    return None


def _ancestors(node: torch.fx.Node) -> dict[torch.fx.Node, int]:
    """Every node ``node`` depends on, with its shortest distance (``node`` itself at 0)."""
    dist, frontier = {node: 0}, [node]
    while frontier:
        nxt = []
        for n in frontier:
            for parent in n.all_input_nodes:
                if parent not in dist:
                    dist[parent] = dist[n] + 1
                    nxt.append(parent)
        frontier = nxt
    return dist


def conv_branch_input(add: torch.fx.Node, inputs: list[torch.fx.Node], modules: dict[str, nn.Module]) -> torch.fx.Node | None:
    """The input of a two-input Add that TensorRT fuses into its conv (left without Q/DQ), or None
    when the Add is no residual (see the module docstring for the rule)."""
    if len(inputs) != 2 or inputs[0] is inputs[1]:
        return None
    a, b = inputs
    bb_a, bb_b = fusible_backbone(a, modules), fusible_backbone(b, modules)
    if bb_a is None and bb_b is None:
        return None
    anc_a, anc_b = _ancestors(a), _ancestors(b)
    common = [n for n in anc_a if n in anc_b]
    lca = min(common, key=lambda n: (anc_a[n] + anc_b[n], anc_a[n])) if common else None
    if bb_a is not None and bb_b is not None:
        if bb_a is bb_b:
            return None
        return a if lca is None or anc_a[lca] > anc_b[lca] else b
    branch, backbone = (a, bb_a) if bb_a is not None else (b, bb_b)
    return None if lca is backbone else branch
