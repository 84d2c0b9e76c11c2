"""What the teacher stage adds to plain fine-tuning for a deployment domain: gradual unfreezing and
feature alignment on unlabeled target images.

- Gradual unfreezing (Howard & Ruder 2018, "Universal Language Model Fine-tuning for Text
  Classification", ULMFiT §3.3): the new head trains first, then one more group of the pretrained
  backbone at a time, from the top down, until everything trains. The groups are timm's own
  (``group_matcher(coarse=True)``: stem, stages, head; :func:`edgekd.models.stage_groups`), the same
  ones ``teacher.frozen_stages`` freezes. ULMFiT unfreezes a group per epoch; edgekd's teacher often
  trains for one or two epochs, so the schedule runs on the fraction of training done (steps, or
  the time limit, whichever is further): with G groups, ``k = min(G, 1 + floor(G * progress))``
  groups from the top train. A frozen group gets no gradient (no backward pass below the lowest
  trainable group), its BatchNorm statistics still adapt.
- :func:`teacher_loss`: cross-entropy on the labeled images plus, with ``teacher.mmd``, the MMD of
  :mod:`edgekd.distill.domain` between the teacher's features on labeled and unlabeled images
  (pseudo-labels for the class-conditional part: the teacher's own current predictions, JDA's
  iterative refinement).
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgekd import ui
from edgekd.config import TeacherConfig, TrainConfig
from edgekd.data import Batch, DataSet, num_batches
from edgekd.data.unlabeled import UnlabeledFeed
from edgekd.distill.domain import MMDLoss
from edgekd.distill.hooks import FeatureHook
from edgekd.errors import EdgekdError
from edgekd.models import stage_groups
from edgekd.train import LossFn, fit_to_data
from edgekd.train.env import current as current_ranks


def unfrozen_groups(progress: float, groups: int) -> int:
    """How many groups, counted from the head, train at ``progress`` (0..1) of the run."""
    return max(1, min(groups, 1 + math.floor(groups * max(0.0, progress))))


class GradualUnfreezing:
    """Sets ``requires_grad`` group by group as training goes on (call :meth:`step` before each step)."""

    def __init__(self, model: nn.Module, total_steps: int, time_limit_s: float | None, frozen: set[str]):
        if current_ranks().world > 1:
            raise EdgekdError("teacher.mode=progressive runs in one process (DDP needs the trainable set fixed)", "use teacher.mode=full under torchrun")
        named = dict(model.named_parameters())
        groups = stage_groups(model, "teacher.mode=progressive", "use teacher.mode=full (or linear-probe) for this model")
        self.groups = [[named[n] for n in g if n not in frozen] for g in groups]
        self.groups = [g for g in self.groups if g]
        self.total_steps, self.time_limit_s, self.started, self.steps, self.active = max(1, total_steps), time_limit_s, time.time(), 0, 0
        self.history: list[tuple[int, int]] = []  # (step, groups trainable from then on)

    def step(self) -> None:
        progress = self.steps / self.total_steps
        if self.time_limit_s:
            progress = max(progress, (time.time() - self.started) / self.time_limit_s)
        k = unfrozen_groups(progress, len(self.groups))
        if k != self.active:
            for i, group in enumerate(self.groups):
                for p in group:
                    p.requires_grad_(i >= len(self.groups) - k)
            self.active = k
            self.history.append((self.steps, k))
            ui.log(f"gradual unfreezing: step {self.steps}: the top {k} of {len(self.groups)} parameter groups train")
        self.steps += 1


def planned_steps(cfg: TrainConfig, n_train: int) -> int:
    """The optimizer steps ``fit`` will take (its own sizing of the run to the data)."""
    fitted, _ = fit_to_data(cfg, n_train, current_ranks().world)
    return fitted.epochs * max(1, num_batches(n_train, fitted.batch_size, current_ranks().world, drop_last=True))


def teacher_loss(model: nn.Module, cfg: TeacherConfig, data: DataSet, unfreeze: GradualUnfreezing | None) -> tuple[LossFn, FeatureHook | None]:
    """The teacher's loss: cross-entropy (+ MMD to the unlabeled images with ``cfg.mmd.weight`` > 0),
    stepping the unfreezing schedule first. Returns the loss and the hook to remove afterwards."""
    smoothing, mmd = cfg.train.label_smoothing, cfg.mmd
    if mmd.weight > 0 and data.unlabeled is None:
        raise EdgekdError("teacher.mmd needs unlabeled images from the deployment domain", "pass --unlabeled DIR (data.unlabeled_root), or set teacher.mmd.weight=0")
    if mmd.weight == 0 and data.unlabeled is not None:
        ui.log("unlabeled images given: fine-tuning uses them only with teacher.mmd.weight > 0 (distillation and QAD use them)")
    hook = FeatureHook(model, mmd.layer or model.feature_layer, "teacher") if mmd.weight > 0 else None
    term, state = MMDLoss(mmd), {}

    def loss_fn(net: nn.Module, batch: Batch, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if unfreeze is not None:
            unfreeze.step()
        if hook is None:
            logits = net(x)
            return F.cross_entropy(logits, batch.labels.to(logits.device), label_smoothing=smoothing), logits
        if "feed" not in state:
            ranks = current_ranks()
            state["feed"] = UnlabeledFeed(data.unlabeled, len(x), torch.initial_seed() % 2**31, ranks.rank, ranks.world)
        ub = state["feed"].next()
        xu = model.preprocess(ub.images).to(x.device, dtype=x.dtype)
        both = net(torch.cat([x.contiguous(memory_format=torch.contiguous_format), xu]))
        logits, n = both[: len(x)], len(x)
        f = hook.output
        parts = term.terms(f[:n], f[n:], batch.labels, both[n:].detach().argmax(1))
        return F.cross_entropy(logits, batch.labels.to(logits.device), label_smoothing=smoothing) + sum(parts.values()), logits

    return loss_fn, hook
