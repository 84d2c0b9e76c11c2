"""The composite distillation loss: the weighted sum of named terms (hard labels, KD, features,
relations; with unlabeled deployment-domain images, KD on them and MMD alignment) with each
term's running mean for logging, built for any (student, teachers, DistillConfig) by
:func:`build_distill_loss`; quantization-aware distillation reuses it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgekd import ui
from edgekd.config import DistillConfig
from edgekd.data import Batch, DataSet, Preprocess
from edgekd.data.unlabeled import UnlabeledFeed
from edgekd.errors import EdgekdError
from edgekd.distill.cache import TeacherCache, default_cache_dir, teacher_cache
from edgekd.distill.hooks import FeatureHook
from edgekd.distill.domain import MMDLoss
from edgekd.distill.losses import AttentionTransferLoss, HintLoss, KDLoss, RKDLoss, soft_targets
from edgekd.distill.teachers import Teacher, check_teachers, teacher_forward
from edgekd.train.env import current as current_ranks

FEATURE_LOSSES = ("fitnet", "rkd", "at")


class DistillLoss(nn.Module):
    """Weighted sum of named terms; a ``train.fit`` loss_fn: ``(model, batch, x) -> (loss, logits)``.

    Terms: ``kd`` (alpha, soft targets of all teachers averaged with ``teacher_weights``), ``ce``
    (1-alpha, or 1 without kd), ``fitnet``/``at`` (feature_weight) and ``rkd`` (relation_weight);
    feature terms are summed over teachers with the same weights. With unlabeled images
    (:meth:`use_unlabeled`) each step also draws ``unlabeled_ratio`` times as many of them, through
    the same forward pass: ``kd_unlabeled`` (unlabeled_weight; the teachers' soft targets only, no
    label term) and ``mmd``/``mmd_class`` (:class:`edgekd.distill.domain.MMDLoss` on the student's
    features, the teachers' pseudo-labels for the conditional part). ``parts`` holds each term's
    running mean since the start, for logging. Its parameters (FitNets adapters) must train with
    the student: :func:`build_distill_loss` returns them as the extra trainable modules.
    """

    def __init__(self, student: nn.Module, teachers: list[Teacher], caches: list[TeacherCache | None], weights: list[float], cfg: DistillConfig):
        super().__init__()
        self.cfg = cfg
        self.teachers, self.caches = teachers, caches
        self.weights = [w / sum(weights) for w in weights]
        self.kd = KDLoss(cfg.temperature, cfg.alpha)
        self.rkd = RKDLoss()
        self.at = AttentionTransferLoss()
        self.hook = FeatureHook(student, cfg.student_layer or getattr(student, "feature_layer", "features"), "student") if needs_features(cfg) else None
        self.hints = nn.ModuleList()
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.unlabeled, self.unlabeled_caches, self.feed, self.mmd, self.mmd_hook = None, [], None, None, None

    def use_unlabeled(self, student: nn.Module, split, caches: list[TeacherCache | None]) -> None:
        """Train on ``split`` (unlabeled images) too: KD on them, and MMD when ``cfg.mmd.weight`` > 0."""
        self.unlabeled, self.unlabeled_caches, self.preprocess = split, caches, student.preprocess
        if self.cfg.mmd.weight > 0:
            self.mmd = MMDLoss(self.cfg.mmd)
            self.mmd_hook = FeatureHook(student, self.cfg.mmd.layer or getattr(student, "feature_layer", "features"), "student")

    def unlabeled_terms(self, logits_u: torch.Tensor, ub: Batch, batch: Batch) -> dict[str, torch.Tensor]:
        """The terms of the unlabeled half of the step: no label is read (``ub.labels`` are -1)."""
        dev = logits_u.device
        outs = [c.lookup(ub, dev) if c is not None else teacher_forward(t, ub.images, dev) for t, c in zip(self.teachers, self.unlabeled_caches)]
        probs = soft_targets([o["logits"] for o in outs], self.weights, self.cfg.temperature)
        parts = {"kd_unlabeled": self.cfg.unlabeled_weight * self.kd.soft(logits_u, probs)} if self.cfg.unlabeled_weight > 0 else {}
        if self.mmd is not None:
            f, n = self.mmd_hook.output, len(batch.labels)
            parts.update(self.mmd.terms(f[:n], f[n:], batch.labels, probs.argmax(1)))
        return parts

    def add_hint_adapters(self, student_channels: int, teacher_channels: list[int]) -> None:
        self.hints = nn.ModuleList(HintLoss(student_channels, c) for c in teacher_channels)

    def teacher_outputs(self, batch: Batch, device: torch.device) -> list[dict[str, torch.Tensor]]:
        return [c.lookup(batch, device) if c is not None else teacher_forward(t, batch.images, device) for t, c in zip(self.teachers, self.caches)]

    def terms(self, logits: torch.Tensor, batch: Batch, outs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        losses = self.cfg.losses
        labels = batch.labels.to(logits.device)
        parts: dict[str, torch.Tensor] = {}
        if "kd" in losses:
            parts.update(self.kd.terms(logits, soft_targets([o["logits"] for o in outs], self.weights, self.cfg.temperature), labels))
        else:
            parts["ce"] = F.cross_entropy(logits.float(), labels)
        if self.hook is not None:
            fs = self.hook.output[: len(logits)]  # the labeled rows (the unlabeled ones follow them in the same pass)
            for name, fn in (("fitnet", self._hint), ("at", self._attention), ("rkd", self._relation)):
                if name in losses:
                    parts[name] = sum(w * fn(i, fs, o["feature"]) for i, (w, o) in enumerate(zip(self.weights, outs)))
        return parts

    def _hint(self, i: int, fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
        return self.cfg.feature_weight * self.hints[i](fs, ft)

    def _attention(self, i: int, fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
        return self.cfg.feature_weight * self.at(fs, ft)

    def _relation(self, i: int, fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
        return self.cfg.relation_weight * self.rkd(fs.float().mean((2, 3)), ft.float().mean((2, 3)))

    def forward(self, model: nn.Module, batch: Batch, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outs = self.teacher_outputs(batch, x.device)
        if self.unlabeled is None:
            logits = model(x)
            parts = self.terms(logits, batch, outs)
        else:
            if self.feed is None:  # sized on the first step: the loop may have shrunk the batch to the data
                ranks = current_ranks()
                self.feed = UnlabeledFeed(self.unlabeled, max(2, round(len(x) * self.cfg.unlabeled_ratio)), torch.initial_seed() % 2**31,
                                          ranks.rank, ranks.world)
            ub = self.feed.next()
            xu = self.preprocess(ub.images).to(x.device, dtype=x.dtype).contiguous(memory_format=torch.contiguous_format)
            both = model(torch.cat([x.contiguous(memory_format=torch.contiguous_format), xu]))
            logits = both[: len(x)]
            parts = self.terms(logits, batch, outs)
            parts.update(self.unlabeled_terms(both[len(x):], ub, batch))
        for k, v in parts.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v.detach())
        self.steps += 1
        return sum(parts.values()), logits

    def parts(self) -> dict[str, float]:
        return {k: round(v / max(1, self.steps), 5) for k, v in self.sums.items()}

    def close(self) -> None:
        """Remove the forward hooks (student and teachers)."""
        for h in [self.hook, self.mmd_hook] + [t.hook for t in self.teachers]:
            if h is not None:
                h.remove()


def needs_features(cfg: DistillConfig) -> bool:
    return any(name in cfg.losses for name in FEATURE_LOSSES)


def teacher_weights(cfg: DistillConfig, n: int) -> list[float]:
    weights = cfg.teacher_weights or [1.0] * n
    if len(weights) != n:
        raise EdgekdError(f"distill.teacher_weights has {len(weights)} weights for {n} teachers", "give one weight per --teacher, e.g. --teacher-weights 0.7,0.3")
    if sum(weights) <= 0 or min(weights) < 0:
        raise EdgekdError(f"distill.teacher_weights {weights} must be non-negative with a positive sum", "e.g. --teacher-weights 0.7,0.3")
    return list(weights)


def _probe_channels(model: nn.Module, hook: FeatureHook, preprocess: Preprocess, images_u8: torch.Tensor, device: torch.device) -> int:
    was = model.training
    model.eval()
    with torch.inference_mode():
        model(preprocess(images_u8[:2]).to(device))
    model.train(was)
    out = hook.output
    if out is None or out.ndim != 4:
        raise EdgekdError(f"layer '{hook.path}' gives {None if out is None else tuple(out.shape)}, feature losses need a (N, C, H, W) map",
                          "pick a convolutional layer with --student-layer / --teacher-layer")
    return int(out.shape[1])


def build_distill_loss(student: nn.Module, teachers: list[Teacher], cfg: DistillConfig, data: DataSet, cache_dir: str | Path | None = None,
                       augment: str = "flip", device: torch.device | None = None) -> tuple[DistillLoss, nn.Module]:
    """Build the composite distillation loss for ``student`` and return ``(loss_fn, extra_trainable)``.

    - ``loss_fn(model, batch, x) -> (loss, logits)`` plugs into ``train.fit``; ``loss_fn.parts()``
      gives each named term's mean so far; call ``loss_fn.close()`` afterwards to drop the hooks.
    - ``extra_trainable`` holds the modules that must train with the student (FitNets adapters):
      pass ``trainable=nn.ModuleDict({"student": student, "distill": extra_trainable})`` to fit.
    - The student's feature layer is hooked by module path (``cfg.student_layer``, default the
      model's ``feature_layer``), so call this *after* any module swapping such as
      ``mtq.quantize`` (quantization-aware distillation reuses this function that way).
    - Teacher outputs come from the on-disk cache when ``augment`` allows it ('none', 'flip') and
      ``cfg.cache_teacher`` is on; otherwise the teachers run online at every step.
    """
    device = device or next(student.parameters()).device
    weights = teacher_weights(cfg, len(teachers))
    check_teachers(teachers, data)
    loss = DistillLoss(student, teachers, [None] * len(teachers), weights, cfg)
    if needs_features(cfg):
        for t in teachers:
            if t.hook is not None:
                t.hook.remove()
            t.hook = FeatureHook(t.model, cfg.teacher_layer or getattr(t.model, "feature_layer", None) or "features", "teacher")
            t.model.to(device)
        probe = data.train.take(slice(0, 2))
        student_channels = _probe_channels(student, loss.hook, student.preprocess, probe, device)
        teacher_channels = [_probe_channels(t.model, t.hook, t.preprocess, probe, device) for t in teachers]
        if "fitnet" in cfg.losses:
            loss.add_hint_adapters(student_channels, teacher_channels)
    for t in teachers:
        t.model.to(device)
    if cfg.cache_teacher:
        loss.caches = [teacher_cache(t, data, augment, Path(cache_dir or default_cache_dir()), device) for t in teachers]
    else:
        ui.log("teachers run online every step (distill.cache_teacher=false)")
    _use_unlabeled(loss, student, teachers, cfg, data, Path(cache_dir or default_cache_dir()), device)
    loss.to(device)
    return loss, loss.hints


def _use_unlabeled(loss: DistillLoss, student: nn.Module, teachers: list[Teacher], cfg: DistillConfig, data: DataSet, cache_dir: Path,
                   device: torch.device) -> None:
    """Give the loss the unlabeled images (and the teachers' cached outputs on them) when a term uses them."""
    if cfg.mmd.weight > 0 and data.unlabeled is None:
        raise EdgekdError("distill.mmd needs unlabeled images from the deployment domain", "pass --unlabeled DIR (data.unlabeled_root), or set distill.mmd.weight=0")
    if data.unlabeled is None:
        return
    if cfg.unlabeled_weight == 0 and cfg.mmd.weight == 0:
        ui.log("unlabeled images given but not used: distill.unlabeled_weight and distill.mmd.weight are both 0")
        return
    caches = [teacher_cache(t, data, "flip", cache_dir, device, split=data.unlabeled) if cfg.cache_teacher else None for t in teachers]
    loss.use_unlabeled(student, data.unlabeled, caches)
    ui.log(f"unlabeled images: {len(data.unlabeled):,}, {cfg.unlabeled_ratio:g} per labeled image in each step; KD weight {cfg.unlabeled_weight:g}"
           + (f", MMD weight {cfg.mmd.weight:g}{' (+ class-conditional)' if cfg.mmd.conditional else ''} on '{loss.mmd_hook.path}'" if loss.mmd else ""))
