"""How long and how fast a run trains: optimiser, warm-up + cosine schedule (time-aware), the
length fitted to the data set, how epochs are scored, and when to stop early."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn

from edgekd.config import TrainConfig


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """No weight decay on biases and norm parameters (1-D tensors). A parameter with an
    ``lr_scale`` attribute (QAD's learned activation ranges) trains at ``cfg.lr * lr_scale``,
    without weight decay, in a group of its own."""
    decay, no_decay, scaled = [], [], {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if hasattr(p, "lr_scale"):
            scaled.setdefault(p.lr_scale, []).append(p)
        else:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups += [{"params": ps, "weight_decay": 0.0, "lr": cfg.lr * scale} for scale, ps in scaled.items()]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int, clock: Callable[[], float] | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay. With a time limit (``clock`` = seconds used so far) the
    decay follows whichever runs out first, steps or time, so a stage stopped by its deadline
    still ends at a small learning rate instead of being cut off at its peak."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = int(cfg.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        if clock is not None and cfg.time_limit_s:
            progress = max(progress, clock() / cfg.time_limit_s)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def fit_to_data(cfg: TrainConfig, n_train: int, world: int = 1) -> tuple[TrainConfig, str | None]:
    """The training length this data set gets: the batch shrinks so an epoch has at least 8
    steps (a 300-image set at batch 64 would give 4, and fewer than one batch would give none),
    and the epochs grow until ``min_steps`` optimizer steps are reached (capped at ``max_epochs``).
    Returns the config to train with and a one-line reason when it differs."""
    batch = max(1, min(cfg.batch_size, n_train // (8 * world) or 1))
    steps = max(1, n_train // (batch * world))
    epochs = cfg.epochs
    if cfg.min_steps and epochs * steps < cfg.min_steps:
        epochs = min(cfg.max_epochs, math.ceil(cfg.min_steps / steps))
    if (batch, epochs) == (cfg.batch_size, cfg.epochs):
        return cfg, None
    why = (f"{n_train} training images: {epochs} epochs of {steps} steps at batch {batch} "
           f"(recipe: {cfg.epochs} epochs at batch {cfg.batch_size}; min_steps {cfg.min_steps})")
    return cfg.model_copy(update={"batch_size": batch, "epochs": epochs}), why


def score(record: dict) -> tuple[float, float]:
    """How good an epoch is: validation top-1, ties broken by the lower validation loss (a
    30-image validation set reaches 100% early and stays there; the loss still tells epochs
    apart). Without validation data: the lower training loss."""
    if record.get("val_top1") is None:
        return (-record["train_loss"], 0.0)
    return (record["val_top1"], -(record.get("val_loss") or 0.0))


def stop_reason(history: list[dict], cfg: TrainConfig, seconds: float) -> str | None:
    """Why training should stop now: 'time' (limit reached), 'plateau' (``patience`` epochs
    without a better :func:`score`), or None to go on."""
    if cfg.time_limit_s and seconds >= cfg.time_limit_s:
        return "time"
    scores = [score(h) for h in history]
    if cfg.patience and scores and len(scores) - 1 - scores.index(max(scores)) >= cfg.patience:
        return "plateau"
    return None
