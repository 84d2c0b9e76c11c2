"""Logits of an exported file next to the PyTorch model's: onnxruntime's (optimized, or with Q/DQ
run as written), and how far apart two sets are. Shared by the export checks and the layouts."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn as nn

from edgekd.data import eval_batch_size
from edgekd.export.to_onnx import INPUT_NAME
from edgekd.runners.ort import cpu_session


def ort_logits(path_or_session, x: np.ndarray, batch_size: int = 256, exact_qdq: bool = False) -> np.ndarray:
    sess = path_or_session if hasattr(path_or_session, "run") else cpu_session(path_or_session, exact_qdq=exact_qdq)
    return np.concatenate([sess.run(None, {INPUT_NAME: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)])


def agreement(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None = None) -> dict[str, Any]:
    """Top-1 agreement and max abs logit difference of ``candidate`` vs ``reference`` (+ both accuracies)."""
    out = {"n": int(len(reference)), "top1_agreement": float((reference.argmax(1) == candidate.argmax(1)).mean()),
           "max_abs_diff": float(np.abs(reference - candidate).max())}
    if labels is not None:
        out["reference_top1"] = float((reference.argmax(1) == labels).mean())
        out["onnx_top1"] = float((candidate.argmax(1) == labels).mean())
    return out


def reference_logits(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """PyTorch's logits of preprocessed ``x``, in inference batches sized for its resolution."""
    step = eval_batch_size(x.shape[-1])
    with torch.no_grad():
        return torch.cat([model(x[i : i + step]) for i in range(0, len(x), step)]).float().numpy()
