"""Before quantizers are placed: the network as it will be deployed.

Re-parameterizable training branches (RepVGG, MobileOne) are fused with timm's own
``reparameterize_model``, BatchNorm is folded into the convolutions (including timm's
``BatchNormAct2d``: BN + activation in one module), and subclasses of ``nn.Linear`` become plain
``nn.Linear``. So the weights QAD trains, and their scales, are the ones that ship.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from edgekd.quantize.placement import trace


def reparameterize(model: nn.Module) -> bool:
    """Fuse training-time branches (RepVGG, MobileOne, ...) in place with timm's own utility.

    Returns whether anything had a branch to fuse; the re-parameterized network is what QAD trains
    and what ships (the branches would otherwise be exported as separate convs and adds).
    """
    has = any(hasattr(m, "reparameterize") or hasattr(m, "switch_to_deploy") or (hasattr(m, "fuse") and m is not model) for m in model.modules())
    if not has:
        return False
    from timm.utils.model import reparameterize_model

    reparameterize_model(model, inplace=True)
    model.edgekd_reparameterized = True
    return True


def plain_linears(model: nn.Module) -> int:
    """Swap subclasses of ``nn.Linear`` (timm's ``Linear`` head) for ``nn.Linear`` with the same
    weights, in place: modelopt quantizes the classes it has registered, not their subclasses, and
    an unquantized classifier Gemm is not TensorRT-ready. Returns how many were swapped."""
    swapped = 0
    for path, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and type(m) is not nn.Linear and type(m).forward is not nn.Linear.forward:
            plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            plain.load_state_dict(m.state_dict())
            _set_module(model, path, plain)
            swapped += 1
    return swapped


def _conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) module paths where a BatchNorm consumes only a Conv2d's output."""
    graph = trace(model).graph
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0]
        if getattr(src, "op", None) == "call_module" and type(modules.get(src.target)) is nn.Conv2d and len(src.users) == 1:
            pairs.append((src.target, node.target))
    return pairs


@torch.no_grad()
def _fold_pair(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    conv.weight.mul_(scale.view(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.bias = nn.Parameter(((bias - bn.running_mean) * scale + bn.bias).detach().clone())


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def _after_bn(bn: nn.BatchNorm2d) -> nn.Module:
    """What is left of a folded BN: nothing, or timm BatchNormAct2d's dropout + activation."""
    rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if isinstance(m, nn.Module) and not isinstance(m, nn.Identity)]
    return nn.Sequential(*rest) if rest else nn.Identity()


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every Conv2d -> BatchNorm2d pair in place; returns how many.

    Folding before fake-quant makes the trained weight scales the deployed ones: both TensorRT and
    onnxruntime fold BN before quantizing, so an unfolded QAT model trains on other weights.
    """
    pairs = _conv_bn_pairs(model)
    modules = dict(model.named_modules())
    for conv_path, bn_path in pairs:
        _fold_pair(modules[conv_path], modules[bn_path])
        _set_module(model, bn_path, _after_bn(modules[bn_path]))
    model.edgekd_bn_folded = True
    return len(pairs)
