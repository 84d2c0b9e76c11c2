"""The one training loop, shared by fine-tuning, distillation and quantization-aware distillation.

It knows nothing about teachers or quantizers: callers pass a ``loss_fn(model, batch, x)`` that
returns ``(loss, logits)``. What it owns: AdamW/SGD with linear warm-up + cosine decay,
checkpoint every epoch (``last.pt``) and on a new best validation top-1 (``best.pt``), resume
after an interruption, AMP on CUDA, DistributedDataParallel when launched by ``torchrun``
(NCCL on GPUs, gloo on CPU), and metrics JSON beside the checkpoint.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from edgekd import ui
from edgekd.config import TrainConfig
from edgekd.data import Batch, DataSet, Preprocess, Split, iterate, num_batches
from edgekd.errors import EdgekdError
from edgekd.manifest import write_json_atomic
from edgekd.metrics import classification_metrics
from edgekd.models import safe_torch_load, save_checkpoint

LossFn = Callable[[nn.Module, Batch, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
SaveFn = Callable[[Path, nn.Module, dict[str, Any]], Path]


# ----------------------------------------------------------------------------- environment
def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistEnv:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); NCCL on CUDA, gloo otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return DistEnv(dist.get_rank(), dist.get_world_size())


# ----------------------------------------------------------------------------- optimiser
def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """No weight decay on biases and norm parameters (1-D tensors)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
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


# ----------------------------------------------------------------------------- evaluation
@torch.inference_mode()
def predict_logits(model: nn.Module, split: Split, preprocess: Preprocess, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    dev = next(model.parameters()).device
    outs = [model(preprocess(b.images).to(dev).contiguous(memory_format=torch.channels_last)).float().cpu() for b in iterate(split, batch_size)]
    return torch.cat(outs) if outs else torch.zeros(0)


def evaluate(model: nn.Module, split: Split, preprocess: Preprocess, classes: list[str], batch_size: int = 256) -> dict:
    """Top-1, loss, per-class accuracy and confusion matrix of ``model`` on ``split``."""
    if len(split) == 0:
        return {"top1": None, "n": 0}
    logits = predict_logits(model, split, preprocess, batch_size)
    loss = F.cross_entropy(logits, split.labels).item()
    return classification_metrics(logits.argmax(1).numpy(), split.labels.numpy(), classes, loss)


# ----------------------------------------------------------------------------- training
def cross_entropy_loss(label_smoothing: float = 0.0) -> LossFn:
    def loss_fn(model: nn.Module, batch: Batch, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(x)
        return F.cross_entropy(logits, batch.labels.to(logits.device), label_smoothing=label_smoothing), logits

    return loss_fn


@dataclass
class FitResult:
    best_path: Path
    last_path: Path
    metrics_path: Path
    metrics: dict
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    images_per_second: float = 0.0
    resumed_from_epoch: int | None = None
    stopped: str = "epochs"  # "epochs", "plateau" (early stopping) or "time" (time limit)
    plan: dict = field(default_factory=dict)  # the epochs/batch trained with, and why they differ from the recipe


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state()}


def _comparable(cfg: dict) -> dict:
    """Training settings that must match to resume (a new time limit does not change the run)."""
    return {k: v for k, v in cfg.items() if k != "time_limit_s"}


def _wrap_for_ranks(model: nn.Module, env: DistEnv, dev: torch.device, cfg: TrainConfig) -> tuple[nn.Module, nn.Module]:
    """(model, the module to call): SyncBN + DDP when torchrun launched several ranks."""
    if env.world > 1 and dev.type == "cuda" and not cfg.freeze_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # SyncBN needs CUDA; on gloo/CPU each rank keeps its own stats
    if env.world > 1:
        return model, nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    return model, model


def _resume(last_path: Path, cfg: TrainConfig, model: nn.Module, trainable: nn.Module, opt, sched, description: str) -> tuple[int, list[dict], int | None]:
    """(start epoch, history, resumed-from epoch) from ``last.pt``, refusing another run's file."""
    state = safe_torch_load(last_path, "resume checkpoint")
    ts = state.get("train_state") if isinstance(state, dict) else None
    if not ts or _comparable(ts.get("config") or {}) != _comparable(cfg.model_dump()):
        raise EdgekdError(f"{last_path} was written with other training settings", "use a fresh output folder, or pass --no-resume to start over")
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as exc:
        raise EdgekdError(f"{last_path} holds weights of another model", "use a fresh output folder, or pass --no-resume to start over") from exc
    if "trainable_state" in ts:
        trainable.load_state_dict(ts["trainable_state"])
    opt.load_state_dict(ts["optimizer"])
    sched.load_state_dict(ts["scheduler"])
    torch.set_rng_state(ts["rng"]["torch"])
    ui.log(f"resuming {description} from epoch {ts['epoch'] + 1}/{cfg.epochs} ({last_path})")
    return ts["epoch"] + 1, ts["history"], ts["epoch"] + 1


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


@dataclass
class _Loop:
    """What one epoch of training needs (kept together so the epoch function stays short)."""

    net: nn.Module
    model: nn.Module
    trainable: nn.Module
    loss_fn: LossFn
    preprocess: Preprocess
    cfg: TrainConfig
    opt: torch.optim.Optimizer
    sched: Any
    scaler: Any
    dev: torch.device
    env: DistEnv
    started: float


def _train_epoch(loop: _Loop, data: DataSet, epoch: int, augment: str, seed: int, prog, task) -> tuple[float, int]:
    """One pass over the training split (or until the time limit); returns (mean loss, images)."""
    cfg = loop.cfg
    loop.net.train()
    if cfg.freeze_bn:
        for mod in loop.model.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.eval()
    ep_loss, ep_n, ep_t = 0.0, 0, time.time()
    for batch in iterate(data.train, cfg.batch_size, shuffle=True, seed=seed, epoch=epoch, augment=augment, rank=loop.env.rank, world=loop.env.world, drop_last=True):
        x = batch_input(batch, loop.preprocess, loop.dev)
        with torch.autocast(loop.dev.type, enabled=loop.scaler.is_enabled()):
            loss, _ = loop.loss_fn(loop.net, batch, x)
        if not torch.isfinite(loss):
            raise EdgekdError(f"training diverged (loss {loss.item()}) at epoch {epoch}", "lower the learning rate")
        loop.opt.zero_grad(set_to_none=True)
        loop.scaler.scale(loss).backward()
        if cfg.grad_clip:
            loop.scaler.unscale_(loop.opt)
            nn.utils.clip_grad_norm_(loop.trainable.parameters(), cfg.grad_clip)
        loop.scaler.step(loop.opt)
        loop.scaler.update()
        loop.sched.step()
        ep_loss += loss.item() * len(batch.labels)
        ep_n += len(batch.labels)
        prog.update(task, advance=1, rate=f"{ep_n * loop.env.world / max(1e-9, time.time() - ep_t):.0f} img/s", info=f"ep {epoch + 1}/{cfg.epochs} loss {ep_loss / ep_n:.3f}")
        if cfg.time_limit_s and time.time() - loop.started >= cfg.time_limit_s:
            break
    return ep_loss / max(1, ep_n), ep_n


def batch_input(batch: Batch, preprocess: Preprocess, dev: torch.device) -> torch.Tensor:
    return preprocess(batch.images).to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)


def fit(
    model: nn.Module,
    data: DataSet,
    cfg: TrainConfig,
    out_dir: str | Path,
    loss_fn: LossFn,
    preprocess: Preprocess,
    augment: str = "crop-flip",
    seed: int = 0,
    kind: str = "model",
    resume: bool = True,
    save_fn: SaveFn | None = None,
    ckpt_extra: dict[str, Any] | None = None,
    trainable: nn.Module | None = None,
    description: str = "train",
) -> FitResult:
    """Train ``model``; returns paths of best/last checkpoints, the history and why it stopped.

    The length fits the data (:func:`fit_to_data`), stops early on a validation plateau
    (``patience``) and at ``time_limit_s``. ``trainable`` (default: the model) is what the
    optimiser updates, e.g. student + adapters.
    """
    env, dev = init_distributed(), device()
    recipe_cfg = cfg
    cfg, why = fit_to_data(cfg, len(data.train), env.world)
    if why:
        ui.log(f"{description}: {why}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    last_path, best_path = out / "last.pt", out / "best.pt"
    extra = dict(ckpt_extra or {})
    save = save_fn or (lambda p, m, e: save_checkpoint(p, m, data.classes, kind, e))
    model.to(dev, memory_format=torch.channels_last)  # ~30% faster convs on CPU (oneDNN) and GPU
    trainable = trainable if trainable is not None else model
    trainable.to(dev)
    model, net = _wrap_for_ranks(model, env, dev, cfg)
    steps = num_batches(len(data.train), cfg.batch_size, env.world, drop_last=True) or 1
    opt = make_optimizer(trainable, cfg)
    t0 = time.time()
    sched = make_scheduler(opt, cfg, steps, clock=lambda: time.time() - t0)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and dev.type == "cuda")
    start_epoch, history, resumed = 0, [], None
    if resume and last_path.is_file():
        start_epoch, history, resumed = _resume(last_path, cfg, model, trainable, opt, sched, description)
    best = max((score(h) for h in history), default=None)

    def train_state(epoch: int) -> dict[str, Any]:
        ts = {"epoch": epoch, "history": history, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
              "config": cfg.model_dump(), "rng": _rng_state()}
        if trainable is not model:
            ts["trainable_state"] = trainable.state_dict()
        return ts

    loop = _Loop(net, model, trainable, loss_fn, preprocess, cfg, opt, sched, scaler, dev, env, t0)
    seen, stopped = 0, "epochs"
    with ui.progress() as prog:
        task = prog.add_task(description, total=max(0, cfg.epochs - start_epoch) * steps, rate="", info="")
        for epoch in range(start_epoch, cfg.epochs):
            ep_t = time.time()
            train_loss, n = _train_epoch(loop, data, epoch, augment, seed, prog, task)
            seen += n * env.world
            val = evaluate(model, data.val, preprocess, data.classes) if env.is_main else {}
            record = {"epoch": epoch, "train_loss": train_loss, "val_top1": val.get("top1"), "val_loss": val.get("loss"), "lr": sched.get_last_lr()[0],
                      "seconds": round(time.time() - ep_t, 2)}
            history.append(record)
            prog.update(task, info=f"ep {epoch + 1}/{cfg.epochs} val {val.get('top1') or 0:.4f}")
            if env.is_main:
                if best is None or score(record) > best:
                    best = score(record)
                    save(best_path, model, {**extra, "metrics": {"val": val, "epoch": epoch}})
                save(last_path, model, {**extra, "train_state": train_state(epoch)})
            if env.world > 1:
                dist.barrier()
            reason = stop_reason(history, cfg, time.time() - t0)
            if reason:
                stopped = reason
                ui.log(f"{description}: stopped after epoch {epoch + 1}/{cfg.epochs}: "
                       + ("time limit reached" if reason == "time" else f"no better validation top-1 for {cfg.patience} epochs"))
                break
    seconds = time.time() - t0
    if env.is_main and (cfg.epochs == 0 or not best_path.exists()):  # zero epochs: the initial model is the result (never a stale best.pt)
        save(best_path, model, {**extra, "metrics": {}})
        save(last_path, model, {**extra, "train_state": train_state(cfg.epochs - 1)})
    plan = {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "recipe_epochs": recipe_cfg.epochs, "recipe_batch_size": recipe_cfg.batch_size,
            "epochs_run": len(history), "steps": steps * len(history), "why": why, "time_limit_s": cfg.time_limit_s}
    return FitResult(best_path, last_path, out / "metrics.json", {}, history, seconds, seen / seconds if seconds > 0 else 0.0, resumed, stopped, plan)


def final_metrics(model: nn.Module, data: DataSet, preprocess: Preprocess, result: FitResult, extra: dict[str, Any] | None = None) -> dict:
    """Evaluate the best checkpoint's model on val and test and write metrics.json atomically."""
    metrics = {
        "val": evaluate(model, data.val, preprocess, data.classes),
        "test": evaluate(model, data.test, preprocess, data.classes),
        "history": result.history,
        "train_seconds": round(result.seconds, 2),
        "images_per_second": round(result.images_per_second, 1),
        "resumed_from_epoch": result.resumed_from_epoch,
        "stopped": result.stopped,
        "plan": result.plan,
        **(extra or {}),
    }
    write_json_atomic(result.metrics_path, metrics)
    result.metrics = metrics
    return metrics
