"""``distill.mode: mutual``: Deep Mutual Learning (Zhang, Xiang, Hospedales & Lu, CVPR 2018).

Two or more students train together in one loop and each learns from the labels and from the
others' soft predictions (:class:`~edgekd.distill.losses.MutualLoss`): no pretrained teacher is
needed, which is the point when no strong teacher exists or it is too slow to run. The peers are
copies of the student (``distill.peers: 2``) or named networks (``distill.peers: [nano_cnn,
small_cnn]``, the first being the student); they share one input pipeline (the first peer's
preprocessing: all start from scratch, so the normalisation constants only need to agree). At the
end every peer is scored on validation and the best one becomes the stage's ``best.pt``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from edgekd import ui
from edgekd.atomic import atomic_path
from edgekd.config import DistillConfig, StudentConfig
from edgekd.data import Batch, DataSet
from edgekd.distill.kd import DistillJob
from edgekd.distill.losses import MutualLoss
from edgekd.models import check_model_name, count_params, create_student, safe_torch_load, save_checkpoint
from edgekd.stage_context import StageContext
from edgekd.train import evaluate, final_metrics, fit, FitOptions, seed_everything
from edgekd.train.env import on_main

PEERS_FORMAT = "edgekd-peers"


class Peers(nn.Module):
    """All peers as one module for the training loop: ``forward`` runs each and returns the first
    peer's logits (what validation scores between epochs); the loss reads all of them from ``last``."""

    def __init__(self, peers: list[nn.Module]):
        super().__init__()
        self.peers = nn.ModuleList(peers)
        self.last: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last = [p(x) for p in self.peers]
        return self.last[0]


class MutualLossFn:
    """``loss_fn(net, batch, x)`` for ``train.fit``: the summed :class:`MutualLoss` of all peers,
    with running means of its terms for the log and the metrics."""

    def __init__(self, cfg: DistillConfig):
        self.loss = MutualLoss(cfg.temperature, cfg.alpha)
        self.sums: dict[str, float] = {}
        self.steps = 0

    def __call__(self, net: nn.Module, batch: Batch, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first = net(x)
        peers = net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net
        terms = self.loss.terms(peers.last, batch.labels.to(first.device))
        for name, value in terms.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value.detach())
        self.steps += 1
        return sum(terms.values()), first

    def parts(self) -> dict[str, float]:
        return {k: v / max(1, self.steps) for k, v in self.sums.items()}


def peer_names(student_cfg: StudentConfig, distill_cfg: DistillConfig) -> list[str]:
    peers = distill_cfg.peers
    return [student_cfg.model] * peers if isinstance(peers, int) else list(peers)


def make_peers(student_cfg: StudentConfig, distill_cfg: DistillConfig, data: DataSet) -> list[nn.Module]:
    """Fresh peers at the student's input size and the data's channels, all with the first one's preprocessing."""
    models = []
    for name in peer_names(student_cfg, distill_cfg):
        check_model_name("student", name)
        models.append(create_student(name, data.num_classes, data.channels, student_cfg.input_size, student_cfg.width, student_cfg.pretrained))
    for m in models[1:]:
        m.preprocess = models[0].preprocess
    return models


def _save_peers(path: Path, model: nn.Module, extra: dict[str, Any]) -> Path:
    """All peers' weights (and, in ``last.pt``, the training state to resume): tensors and plain data only."""
    payload = {"format": PEERS_FORMAT, "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, **extra}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def run_mutual(job: DistillJob, data: DataSet, out_dir: str | Path, ctx: StageContext) -> dict:
    """Train ``distill.peers`` students together; the best on validation is written to ``out_dir/best.pt``
    (a normal student checkpoint), the peers' own checkpoints to ``out_dir/peers/``. No teacher:
    ``job.teachers`` are not used."""
    student_cfg, distill_cfg = job.student, job.distill
    seed_everything(ctx.seed, ctx.deterministic)
    peers = Peers(make_peers(student_cfg, distill_cfg, data))
    names = peer_names(student_cfg, distill_cfg)
    pre = peers.peers[0].preprocess
    ui.log(f"mutual learning: {len(names)} peers ({', '.join(names)}), {sum(count_params(p) for p in peers.peers):,} params in all, no teacher")
    extra = {"config": {"student": student_cfg.model_dump(), "distill": distill_cfg.model_dump(), "data": ctx.data_cfg.model_dump(), "seed": ctx.seed}}
    loss_fn = MutualLossFn(distill_cfg)
    result = fit(peers, data, student_cfg.train, Path(out_dir) / "peers", loss_fn, pre, FitOptions(augment=ctx.augment, seed=ctx.seed, resume=ctx.resume, save_fn=_save_peers, ckpt_extra=extra, description=f"mutual {'+'.join(names)}"))
    peers.load_state_dict(safe_torch_load(result.best_path, "peers checkpoint")["state_dict"])
    scores = [evaluate(p, data.val, pre, data.classes)["top1"] or 0.0 for p in peers.peers]
    best = max(range(len(scores)), key=lambda i: scores[i])
    ui.log(f"mutual learning: validation top-1 per peer {', '.join(f'{n} {s:.4f}' for n, s in zip(names, scores))}; keeping peer {best}")
    student = peers.peers[best]
    out = Path(out_dir)
    on_main(lambda: save_checkpoint(out / "best.pt", student, data.classes, "student", {**extra, "metrics": {"val": {"top1": scores[best]}}, "peer": best}))
    result = dataclasses.replace(result, best_path=out / "best.pt", metrics_path=out / "metrics.json")
    metrics = final_metrics(student, data, pre, result, {
        "params": count_params(student), "model": names[best], "losses": ["mutual"], "loss_parts": loss_fn.parts(), "mode": "mutual",
        "peers": [{"model": n, "val_top1": s} for n, s in zip(names, scores)], "chosen_peer": best, "teachers": [],
    })
    return {"checkpoint": str(out / "best.pt"), "last": str(result.last_path), "metrics_file": str(result.metrics_path), "metrics": metrics}
