"""Logits and accuracy of a model on a split (validation during training, test at the end)."""

from __future__ import annotations


import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from edgekd.data import Preprocess, Split, eval_batch_size, iterate
from edgekd.metrics import classification_metrics
from edgekd.train.env import DistEnv, memory_format


@torch.inference_mode()
def predict_logits(model: nn.Module, split: Split, preprocess: Preprocess, batch_size: int | None = None) -> torch.Tensor:
    """Logits of ``split`` in order (``batch_size``: default :func:`eval_batch_size`)."""
    batch_size = batch_size or eval_batch_size(preprocess.input_size)
    model.eval()
    dev = next(model.parameters()).device
    outs = [model(preprocess(b.images).to(dev).contiguous(memory_format=memory_format(dev))).float().cpu() for b in iterate(split, batch_size)]
    return torch.cat(outs) if outs else torch.zeros(0)


def _sharded_logits(model: nn.Module, split: Split, preprocess: Preprocess, batch_size: int | None, env: DistEnv) -> torch.Tensor:
    """Each rank's contiguous share of ``split`` through ``model``, gathered on every rank in order:
    the logits one process computes, in 1/world of the time."""
    per = -(-len(split) // env.world)
    mine = split.select(torch.arange(env.rank * per, min(len(split), (env.rank + 1) * per)))
    parts: list = [None] * env.world
    dist.all_gather_object(parts, predict_logits(model, mine, preprocess, batch_size) if len(mine) else None)
    return torch.cat([p for p in parts if p is not None])


def evaluate(model: nn.Module, split: Split, preprocess: Preprocess, classes: list[str], batch_size: int | None = None, env: DistEnv | None = None) -> dict:
    """Top-1, loss, per-class accuracy and confusion matrix of ``model`` on ``split``; with ``env``
    of several ranks (every rank calls it) the split is shared out and the logits gathered."""
    if len(split) == 0:
        return {"top1": None, "n": 0}
    if env is not None and env.world > 1:
        logits = _sharded_logits(model, split, preprocess, batch_size, env)
    else:
        logits = predict_logits(model, split, preprocess, batch_size)
    loss = F.cross_entropy(logits, split.labels).item()
    return classification_metrics(logits.argmax(1).numpy(), split.labels.numpy(), classes, loss)
