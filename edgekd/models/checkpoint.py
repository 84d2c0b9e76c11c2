"""Self-describing checkpoints (nanoGPT-style): tensors and plain data only, loaded with
``weights_only=True``; a file edgekd did not write, or a corrupt one, fails with one line."""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from edgekd.errors import EdgekdError
from edgekd.atomic import atomic_path

CHECKPOINT_FORMAT = "edgekd-checkpoint"
CHECKPOINT_VERSION = 1


def safe_torch_load(path: str | Path, what: str = "checkpoint") -> Any:
    """``torch.load(weights_only=True)`` with every failure turned into one clear line."""
    p = Path(path)
    if not p.is_file():
        raise EdgekdError(f"{what} not found: {p}", "check the path")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc) or "Unsupported global" in str(exc) or "GLOBAL" in str(exc):
            raise EdgekdError(f"refusing to load {p}: it contains Python objects/code, not only tensors", "only load checkpoints you trust; edgekd never unpickles code") from exc
        raise EdgekdError(f"{what} {p} is corrupt ({exc})", "re-create it or restore a good copy") from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, io.UnsupportedOperation) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EdgekdError(f"{what} {p} is truncated or corrupt ({first[:120]})", "re-create it or restore a good copy") from exc


def save_checkpoint(path: str | Path, model: nn.Module, classes: list[str], kind: str, extra: dict[str, Any] | None = None) -> Path:
    """Self-describing checkpoint (nanoGPT-style): rebuildable from the file alone, tensors + plain data only."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "kind": kind,
        "model": dict(model.edgekd_spec),
        "preprocess": model.preprocess.to_dict(),
        "feature_layer": getattr(model, "feature_layer", None),
        "classes": list(classes),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    payload.update(extra or {})
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    ckpt = safe_torch_load(path, "checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise EdgekdError(f"{path} is not an edgekd checkpoint", "pass a .pt written by `edgekd finetune` or `edgekd distill`")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise EdgekdError(f"{path} is checkpoint version {ckpt.get('version')}, this edgekd reads {CHECKPOINT_VERSION}", "re-create it with this version")
    return ckpt
