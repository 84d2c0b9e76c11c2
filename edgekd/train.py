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


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = int(cfg.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


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


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state()}


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
    """Train ``model`` for ``cfg.epochs``; returns paths of best/last checkpoints and final metrics.

    ``trainable`` (default: the model) is what the optimiser updates, e.g. student + adapters.
    """
    env = init_distributed()
    dev = device()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    last_path, best_path, metrics_path = out / "last.pt", out / "best.pt", out / "metrics.json"
    extra = dict(ckpt_extra or {})
    save = save_fn or (lambda p, m, e: save_checkpoint(p, m, data.classes, kind, e))

    model.to(dev, memory_format=torch.channels_last)  # ~30% faster convs on CPU (oneDNN) and GPU
    trainable = trainable if trainable is not None else model
    trainable.to(dev)
    net = model
    if env.world > 1 and dev.type == "cuda" and not cfg.freeze_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # SyncBN needs CUDA; on gloo/CPU each rank keeps its own stats
        net = model
    if env.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    steps = num_batches(len(data.train), cfg.batch_size, env.world, drop_last=True) or 1
    opt = make_optimizer(trainable, cfg)
    sched = make_scheduler(opt, cfg, steps)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and dev.type == "cuda")

    start_epoch, best_top1, history, resumed = 0, -1.0, [], None
    if resume and last_path.is_file():
        state = safe_torch_load(last_path, "resume checkpoint")
        ts = state.get("train_state") if isinstance(state, dict) else None
        if not ts or ts.get("config") != cfg.model_dump():
            raise EdgekdError(f"{last_path} was written with other training settings", "use a fresh output folder, or pass --no-resume to start over")
        try:
            model.load_state_dict(state["state_dict"])
        except RuntimeError as exc:
            raise EdgekdError(f"{last_path} holds weights of another model", "use a fresh output folder, or pass --no-resume to start over") from exc
        if "trainable_state" in ts:
            trainable.load_state_dict(ts["trainable_state"])
        opt.load_state_dict(ts["optimizer"])
        sched.load_state_dict(ts["scheduler"])
        start_epoch, best_top1, history = ts["epoch"] + 1, ts["best_top1"], ts["history"]
        torch.set_rng_state(ts["rng"]["torch"])
        resumed = start_epoch
        ui.log(f"resuming {description} from epoch {start_epoch}/{cfg.epochs} ({last_path})")

    t0 = time.time()
    seen = 0
    with ui.progress() as prog:
        task = prog.add_task(description, total=max(0, cfg.epochs - start_epoch) * steps, rate="", info="")
        for epoch in range(start_epoch, cfg.epochs):
            net.train()
            if cfg.freeze_bn:
                for mod in model.modules():
                    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                        mod.eval()
            ep_loss, ep_n, ep_t = 0.0, 0, time.time()
            for batch in iterate(data.train, cfg.batch_size, shuffle=True, seed=seed, epoch=epoch, augment=augment, rank=env.rank, world=env.world, drop_last=True):
                x = preprocess(batch.images).to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
                with torch.autocast(dev.type, enabled=scaler.is_enabled()):
                    loss, _ = loss_fn(net, batch, x)
                if not torch.isfinite(loss):
                    raise EdgekdError(f"training diverged (loss {loss.item()}) at epoch {epoch}", "lower the learning rate")
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.grad_clip:
                    scaler.unscale_(opt)
                    nn.utils.clip_grad_norm_(trainable.parameters(), cfg.grad_clip)
                scaler.step(opt)
                scaler.update()
                sched.step()
                ep_loss += loss.item() * len(batch.labels)
                ep_n += len(batch.labels)
                seen += len(batch.labels) * env.world
                prog.update(task, advance=1, rate=f"{ep_n * env.world / max(1e-9, time.time() - ep_t):.0f} img/s", info=f"ep {epoch + 1}/{cfg.epochs} loss {ep_loss / ep_n:.3f}")
            val = evaluate(model, data.val, preprocess, data.classes) if env.is_main else {}
            record = {"epoch": epoch, "train_loss": ep_loss / max(1, ep_n), "val_top1": val.get("top1"), "val_loss": val.get("loss"), "lr": sched.get_last_lr()[0], "seconds": round(time.time() - ep_t, 2)}
            history.append(record)
            prog.update(task, info=f"ep {epoch + 1}/{cfg.epochs} val {record['val_top1'] or 0:.4f}")
            if env.is_main:
                top1 = val.get("top1") if val.get("top1") is not None else -record["train_loss"]
                if top1 > best_top1:
                    best_top1 = top1
                    save(best_path, model, {**extra, "metrics": {"val": val, "epoch": epoch}})
                train_state = {"epoch": epoch, "best_top1": best_top1, "history": history, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "config": cfg.model_dump(), "rng": _rng_state()}
                if trainable is not model:
                    train_state["trainable_state"] = trainable.state_dict()
                save(last_path, model, {**extra, "train_state": train_state})
            if env.world > 1:
                dist.barrier()
    seconds = time.time() - t0
    if env.is_main and (cfg.epochs == 0 or not best_path.exists()):  # zero epochs: the initial model is the result (never a stale best.pt)
        save(best_path, model, {**extra, "metrics": {}})
        save(last_path, model, {**extra, "train_state": {"epoch": cfg.epochs - 1, "best_top1": best_top1, "history": history, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "config": cfg.model_dump(), "rng": _rng_state()}})
    return FitResult(best_path, last_path, metrics_path, {}, history, seconds, seen / seconds if seconds > 0 else 0.0, resumed)


def final_metrics(model: nn.Module, data: DataSet, preprocess: Preprocess, result: FitResult, extra: dict[str, Any] | None = None) -> dict:
    """Evaluate the best checkpoint's model on val and test and write metrics.json atomically."""
    metrics = {
        "val": evaluate(model, data.val, preprocess, data.classes),
        "test": evaluate(model, data.test, preprocess, data.classes),
        "history": result.history,
        "train_seconds": round(result.seconds, 2),
        "images_per_second": round(result.images_per_second, 1),
        "resumed_from_epoch": result.resumed_from_epoch,
        **(extra or {}),
    }
    write_json_atomic(result.metrics_path, metrics)
    result.metrics = metrics
    return metrics
