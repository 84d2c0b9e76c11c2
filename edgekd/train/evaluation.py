"""Logits and accuracy of a model on a split (validation during training, test at the end)."""

from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from edgekd.data import Preprocess, Split, iterate
from edgekd.metrics import classification_metrics
from edgekd.train.env import memory_format


@torch.inference_mode()
def predict_logits(model: nn.Module, split: Split, preprocess: Preprocess, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    dev = next(model.parameters()).device
    outs = [model(preprocess(b.images).to(dev).contiguous(memory_format=memory_format(dev))).float().cpu() for b in iterate(split, batch_size)]
    return torch.cat(outs) if outs else torch.zeros(0)


def evaluate(model: nn.Module, split: Split, preprocess: Preprocess, classes: list[str], batch_size: int = 256) -> dict:
    """Top-1, loss, per-class accuracy and confusion matrix of ``model`` on ``split``."""
    if len(split) == 0:
        return {"top1": None, "n": 0}
    logits = predict_logits(model, split, preprocess, batch_size)
    loss = F.cross_entropy(logits, split.labels).item()
    return classification_metrics(logits.argmax(1).numpy(), split.labels.numpy(), classes, loss)
