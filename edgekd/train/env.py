"""Where training runs: seeding, the device, and the process group when ``torchrun`` starts
several ranks (NCCL on GPUs, gloo on CPU)."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from edgekd.config import TrainConfig


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def memory_format(dev: torch.device) -> torch.memory_format:
    """channels_last on CUDA (tensor-core convs want NHWC). On CPU it bought 0-9% (EfficientNet-Lite0
    9%, ResNet-18 0%, measured at batch 64) and oneDNN's AVX2 1x1-conv weight gradient never
    finished one step of timm's repvgg_a0 in channels_last, so CPU keeps the default layout."""
    return torch.channels_last if dev.type == "cuda" else torch.contiguous_format


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


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state()}


def wrap_for_ranks(model: nn.Module, env: DistEnv, dev: torch.device, cfg: TrainConfig) -> tuple[nn.Module, nn.Module]:
    """(model, the module to call): SyncBN + DDP when torchrun launched several ranks."""
    if env.world > 1 and dev.type == "cuda" and not cfg.freeze_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # SyncBN needs CUDA; on gloo/CPU each rank keeps its own stats
    if env.world > 1:
        return model, nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    return model, model
