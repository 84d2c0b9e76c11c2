"""Where training runs: seeding, the device, and the process group when ``torchrun`` starts
several ranks (NCCL on GPUs, gloo on CPU).

Under torchrun, rank 0 decides and the others follow: :func:`share` broadcasts rank 0's value (a
stop decision, an epoch's validation record, a stage's result), :func:`on_main` runs a job (a
write into the run folder) on rank 0 only and hands its result to every rank. A rank that fails
leaves one line in torchrun's store (:func:`announce_failure`), so the ranks that torchrun then
stops can say which rank failed and why (:func:`peer_failure`).
"""

from __future__ import annotations

import datetime
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

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


T = TypeVar("T")
TIMEOUT_ENV = "EDGEKD_DIST_TIMEOUT_S"  # how long a rank waits in one collective (rank 0 exporting and benchmarking while the others wait)
FAILURE_KEY = "edgekd/failed/"
_STORE: dict[str, Any] = {}


def launched_ranks() -> int:
    """How many ranks torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed() -> DistEnv:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); NCCL on CUDA, gloo otherwise.
    The rendezvous store is kept: it carries a failing rank's one line to the others."""
    if launched_ranks() <= 1:
        return DistEnv()
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, 3 * 3600)))
        store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
        _STORE["store"] = store
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", store=store, rank=rank, world_size=world, timeout=timeout)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return DistEnv(dist.get_rank(), dist.get_world_size())


def leave_distributed() -> None:
    """At the end of a command: wait for every rank, then leave the process group, so no rank exits
    while another still works and gloo's threads never outlive the interpreter (that aborted rank 0
    with "terminate called without an active exception" after a build; pytorch/pytorch#190489)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _STORE.clear()


def current() -> DistEnv:
    """This process's rank and the world size (rank 0 of 1 outside torchrun or before joining)."""
    if dist.is_available() and dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size())
    return DistEnv()


def share(value: T) -> T:
    """Rank 0's ``value`` on every rank (any picklable object); the value itself with one rank."""
    if current().world <= 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(job: Callable[[], T]) -> T:
    """Run ``job`` on rank 0 only (a write into the run folder, a decision) and return its result
    on every rank, once rank 0 has finished: the others may then read what it wrote."""
    env = current()
    return share(job() if env.is_main else None) if env.world > 1 else job()


def announce_failure(line: str) -> None:
    """Leave this rank's error line where the other ranks find it (torchrun's store)."""
    store, env = _STORE.get("store"), current()
    if store is not None:
        try:
            store.set(f"{FAILURE_KEY}{env.rank}", line)
        except Exception:  # noqa: BLE001 - the store may be gone with torchrun; the line is printed anyway
            pass


def peer_failure(wait_s: float = 3.0) -> tuple[int, str] | None:
    """(rank, its error line) of another rank that failed, waiting up to ``wait_s`` for it to be written."""
    store, env = _STORE.get("store"), current()
    if store is None:
        return None
    deadline = time.time() + wait_s
    while True:
        try:
            for r in range(env.world):
                if r != env.rank and store.check([f"{FAILURE_KEY}{r}"]):
                    return r, store.get(f"{FAILURE_KEY}{r}").decode(errors="replace")
        except Exception:  # noqa: BLE001 - torchrun's store closed: nothing more to learn
            return None
        if time.time() >= deadline:
            return None
        time.sleep(0.1)


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state()}


def wrap_for_ranks(model: nn.Module, env: DistEnv, dev: torch.device, cfg: TrainConfig) -> tuple[nn.Module, nn.Module]:
    """(model, the module to call): SyncBN + DDP when torchrun launched several ranks."""
    if env.world > 1 and dev.type == "cuda" and not cfg.freeze_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # SyncBN needs CUDA; on gloo/CPU each rank keeps its own stats
    if env.world > 1:
        return model, nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    return model, model
