"""Stage 2: distil one or more teachers into a small student.

Losses (each a small ``nn.Module`` whose docstring gives its formula and paper):

- :class:`KDLoss`: soft targets at temperature T (Hinton, Vinyals & Dean 2015, "Distilling the
  Knowledge in a Neural Network"); several teachers are averaged with weights (:func:`soft_targets`).
- :class:`HintLoss`: FitNets hints (Romero et al. 2015) with a learned 1x1 adapter.
- :class:`RKDLoss`: relational KD, distance + angle (Park et al. 2019, "Relational Knowledge Distillation").
- :class:`AttentionTransferLoss`: activation-based attention transfer (Zagoruyko & Komodakis 2017).
- Born-again self-distillation (Furlanello et al. 2018): ``run_distill(..., self_distill=True)``.

Features are found by module path through forward hooks (:class:`FeatureHook`, torchdistill's way),
so no model code changes. :class:`DistillLoss` is the weighted sum of named terms and keeps each
term's running mean for logging. :func:`build_distill_loss` builds it for any (student, teachers,
DistillConfig); the quantization-aware distillation stage reuses it.

Speed: teachers run in ``eval()`` under ``torch.inference_mode()``. When augmentation is
deterministic ('none': one view per image, 'flip': two views) the teacher's outputs are computed
once and cached on disk (:class:`TeacherCache`), keyed by teacher checksum + data fingerprint +
teacher preprocessing + augmentation, so later epochs and later students cost only the student.
'crop-flip' has random crops: the teacher then runs online, and the log says so.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgekd import ui
from edgekd.config import DataConfig, DistillConfig, StudentConfig
from edgekd.data import Batch, DataSet, Preprocess, Split
from edgekd.errors import EdgekdError
from edgekd.manifest import atomic_path, sha256_file, sha256_json
from edgekd.models import count_params, create_model, list_students, load_checkpoint, model_from_checkpoint, resolve_module, safe_torch_load

CACHE_FORMAT = "edgekd-teacher-cache"
CACHE_VERSION = 1
CACHE_ENV = "EDGEKD_CACHE_DIR"
FEATURE_CACHE_LIMIT_BYTES = 2 << 30  # above this a teacher's feature maps are not cached (memory)
FEATURE_LOSSES = ("fitnet", "rkd", "at")


# ============================================================================= losses
def soft_targets(teacher_logits: list[torch.Tensor], weights: list[float], temperature: float) -> torch.Tensor:
    """Weighted average of the teachers' softened distributions: sum_i w_i softmax(z_i / T), sum w = 1.

    Averaging probabilities (not logits) is the multi-teacher ensemble of Hinton et al. §2 and of
    "Efficient Knowledge Distillation from an Ensemble of Teachers" (Fukuda et al. 2017).
    """
    total = float(sum(weights))
    probs = [w / total * F.softmax(z.float() / temperature, dim=1) for z, w in zip(teacher_logits, weights)]
    return torch.stack(probs).sum(0)


class KDLoss(nn.Module):
    """Hinton KD: ``alpha * T^2 * KL(p_t || softmax(z_s/T)) + (1-alpha) * CE(z_s, y)``.

    ``p_t`` is the teacher's ``softmax(z_t/T)`` (or a weighted average over teachers). The T^2
    keeps the soft term's gradient, ``T * (softmax(z_s/T) - p_t)``, on the same scale as the hard
    term's whatever T is (Hinton, Vinyals & Dean 2015, §2). KL is averaged over the batch.
    """

    def __init__(self, temperature: float, alpha: float):
        super().__init__()
        self.temperature = temperature
        self.alpha = alpha

    def terms(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        t = self.temperature
        log_q = F.log_softmax(student_logits.float() / t, dim=1)
        soft = F.kl_div(log_q, teacher_probs, reduction="batchmean") * (t * t)
        hard = F.cross_entropy(student_logits.float(), labels)
        return {"kd": self.alpha * soft, "ce": (1.0 - self.alpha) * hard}

    def forward(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return sum(self.terms(student_logits, teacher_probs, labels).values())


def match_spatial(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring two (N, C, H, W) maps to the smaller of their spatial sizes by adaptive average pooling.

    A 64-px teacher and a 28-px student give maps of different sizes; pooling the larger one
    (rather than upsampling the smaller) compares the same image regions without inventing detail.
    """
    h, w = min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1])
    if a.shape[-2:] != (h, w):
        a = F.adaptive_avg_pool2d(a, (h, w))
    if b.shape[-2:] != (h, w):
        b = F.adaptive_avg_pool2d(b, (h, w))
    return a, b


class HintLoss(nn.Module):
    """FitNets hint: ``mean((r(f_s) - f_t)^2)`` with ``r`` a learned 1x1 conv when widths differ.

    Romero et al. 2015, "FitNets: Hints for Thin Deep Nets": the regressor ``r`` maps the student's
    guided layer to the teacher's hint layer width; spatial sizes are matched by
    :func:`match_spatial`. The adapter trains with the student and is dropped afterwards.
    """

    def __init__(self, student_channels: int, teacher_channels: int):
        super().__init__()
        self.adapter = nn.Identity() if student_channels == teacher_channels else nn.Conv2d(student_channels, teacher_channels, 1, bias=False)

    def forward(self, student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
        s, t = match_spatial(self.adapter(student_feature.float()), teacher_feature.float())
        return F.mse_loss(s, t)


def _pairwise_distances(e: torch.Tensor) -> torch.Tensor:
    sq = e.pow(2).sum(1)
    d2 = (sq.unsqueeze(0) + sq.unsqueeze(1) - 2 * e @ e.t()).clamp_min(1e-12)
    d = d2.sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))


class RKDLoss(nn.Module):
    """Relational KD: ``w_d * L_dist + w_a * L_angle`` on embeddings (Park et al. CVPR 2019).

    ``L_dist = mean_{i!=j} huber(d_s(i,j)/mu_s, d_t(i,j)/mu_t)`` with ``d`` the Euclidean distance and
    ``mu`` the mean distance over pairs; ``L_angle = mean_{i,j,k} huber(cos∠_s(i,j,k), cos∠_t(i,j,k))``
    with ``cos∠(i,j,k) = <(e_i-e_j)/|e_i-e_j|, (e_k-e_j)/|e_k-e_j|>``. Scale- and rotation-invariant,
    so student and teacher embeddings may have different widths. The paper uses w_d=25, w_a=50
    (ratio 1:2, kept here; the overall weight is DistillConfig.relation_weight).
    """

    def __init__(self, distance_weight: float = 1.0, angle_weight: float = 2.0):
        super().__init__()
        self.distance_weight = distance_weight
        self.angle_weight = angle_weight

    @staticmethod
    def distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        ds, dt = _pairwise_distances(student.float()), _pairwise_distances(teacher.float())
        off = ~torch.eye(len(ds), dtype=torch.bool, device=ds.device)
        ds = ds / ds[off].mean().clamp_min(1e-12)
        dt = dt / dt[off].mean().clamp_min(1e-12)
        return F.smooth_l1_loss(ds[off], dt[off])

    @staticmethod
    def angle(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        def cosines(e: torch.Tensor) -> torch.Tensor:
            diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # diff[j, i] = (e_i - e_j)/|.|
            return torch.bmm(diff, diff.transpose(1, 2)).reshape(-1)  # [j, i, k] = cos angle at j

        return F.smooth_l1_loss(cosines(student.float()), cosines(teacher.float()))

    def forward(self, student_embedding: torch.Tensor, teacher_embedding: torch.Tensor) -> torch.Tensor:
        s, t = student_embedding.flatten(1), teacher_embedding.flatten(1)
        return self.distance_weight * self.distance(s, t) + self.angle_weight * self.angle(s, t)


def attention_map(feature: torch.Tensor, p: int = 2) -> torch.Tensor:
    """Spatial attention ``Q = mean_c |A_c|^p`` (N, 1, H, W), before normalisation."""
    return feature.float().abs().pow(p).mean(1, keepdim=True)


class AttentionTransferLoss(nn.Module):
    """Attention transfer: ``beta/2 * mean_{n,k}(Q_s/|Q_s|_2 - Q_t/|Q_t|_2)^2`` (Zagoruyko & Komodakis, ICLR 2017).

    ``Q = mean_c |A_c|^p`` (p=2) flattened per image, as in the authors' code
    (``(at(x) - at(y)).pow(2).mean()`` with beta=1000). Maps of different sizes are matched by
    pooling the attention maps (:func:`match_spatial`) before normalising.
    """

    def __init__(self, p: int = 2, beta: float = 1000.0):
        super().__init__()
        self.p = p
        self.beta = beta

    def forward(self, student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
        qs, qt = match_spatial(attention_map(student_feature, self.p), attention_map(teacher_feature, self.p))
        qs, qt = F.normalize(qs.flatten(1), dim=1), F.normalize(qt.flatten(1), dim=1)
        return self.beta / 2 * (qs - qt).pow(2).mean()


# ============================================================================= hooks
class FeatureHook:
    """Keep the output of the module at ``path`` on every forward pass (torchdistill-style).

    >>> hook = FeatureHook(model, "features", "student")   # doctest: +SKIP
    >>> model(x); hook.output.shape                         # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, path: str, who: str = "model"):
        try:
            module = resolve_module(model, path)
        except EdgekdError as exc:
            raise EdgekdError(f"{who} has no layer '{path}'", f"pass --{who}-layer with a module path; {exc.hint}") from exc
        self.path = path
        self.output: torch.Tensor | None = None
        self._handle = module.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self.output = output[0] if isinstance(output, (tuple, list)) else output

    def remove(self) -> None:
        self._handle.remove()
        self.output = None


# ============================================================================= teachers
@dataclass
class Teacher:
    """A frozen teacher: its model in eval mode, its own preprocessing and its checkpoint checksum."""

    model: nn.Module
    preprocess: Preprocess
    path: Path
    sha256: str
    name: str
    classes: list[str]
    spec: dict
    hook: FeatureHook | None = None

    def describe(self) -> dict:
        return {"path": str(self.path), "sha256": self.sha256, "model": self.name, "input_size": self.preprocess.input_size}


def load_teacher(path: str | Path) -> Teacher:
    """Load an edgekd checkpoint as a frozen teacher (weights_only load, eval mode, no gradients)."""
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt)
    model.eval().requires_grad_(False)
    return Teacher(model, model.preprocess, Path(path), sha256_file(path), ckpt["model"]["name"], list(ckpt["classes"]), dict(ckpt["model"]))


def check_teachers(teachers: list[Teacher], data: DataSet) -> None:
    """Every teacher must predict exactly the dataset's classes; a different count is a hard error."""
    for t in teachers:
        if len(t.classes) != data.num_classes:
            raise EdgekdError(
                f"teacher {t.path} predicts {len(t.classes)} classes but dataset {data.name} has {data.num_classes}",
                "distil on the dataset the teacher was fine-tuned on, or fine-tune a teacher on this one (edgekd finetune)",
            )
        if t.classes != data.classes:
            ui.warn(f"teacher {t.path} class names {t.classes[:3]}... differ from the dataset's {data.classes[:3]}...; assuming the same order")


def teacher_forward(teacher: Teacher, images_u8: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    """Teacher logits (and hooked feature map) for a uint8 batch, under inference_mode, as normal tensors."""
    with torch.inference_mode():
        logits = teacher.model(teacher.preprocess(images_u8).to(device))
        feature = teacher.hook.output if teacher.hook is not None else None
    out = {"logits": logits.float().clone()}
    if feature is not None:
        out["feature"] = feature.float().clone()
    return out


# ============================================================================= teacher cache
def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "edgekd" / "teacher-logits")


def views_for(augment: str) -> int | None:
    """Distinct views of one image under an augmentation: 1 ('none'), 2 ('flip'), None = random (not cacheable)."""
    return {"none": 1, "flip": 2}.get(augment)


def cache_key(teacher: Teacher, data: DataSet, augment: str, feature_layer: str | None) -> str:
    """What the cached outputs depend on: teacher weights, data, teacher preprocessing, augmentation, hooked layer."""
    return sha256_json({
        "format": CACHE_FORMAT, "version": CACHE_VERSION, "teacher_sha256": teacher.sha256, "data": data.fingerprint(),
        "train_size": len(data.train), "preprocess": teacher.preprocess.to_dict(), "augment": augment, "feature_layer": feature_layer,
    })[:32]


class TeacherCache:
    """Teacher outputs for every training image and view, (N, V, ...), in memory and on disk.

    View 0 is the image as stored, view 1 its horizontal mirror (what ``data.augment_batch`` does
    for 'flip'), so ``lookup`` indexes with ``batch.indices`` and ``batch.flipped``. Each table
    ('logits', and 'feature' for feature losses) is its own file keyed by :func:`cache_key`, so a
    logits-only run reuses the logits a feature run computed. ``key``/``path`` are the logits'.
    """

    def __init__(self, paths: dict[str, Path], tables: dict[str, torch.Tensor], hit: bool, seconds: float = 0.0):
        self.paths, self.tables, self.hit, self.seconds = paths, tables, hit, seconds
        self.path = paths["logits"]
        self.key = self.path.stem

    def lookup(self, batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
        view = batch.flipped.long() if self.tables["logits"].shape[1] > 1 else torch.zeros_like(batch.flipped, dtype=torch.long)
        return {k: v[batch.indices, view].to(device).float() for k, v in self.tables.items()}


def _read_table(path: Path, n: int, views: int) -> torch.Tensor | None:
    """One cached table, or None (missing, unreadable or not matching its key/shape: then it is recomputed)."""
    if not path.is_file():
        return None
    try:
        payload = safe_torch_load(path, "teacher cache")
    except EdgekdError as exc:
        ui.warn(f"ignoring unreadable teacher cache {path} ({exc.message}); recomputing")
        return None
    table = payload.get("table") if isinstance(payload, dict) else None
    if payload.get("key") != path.stem or not isinstance(table, torch.Tensor) or tuple(table.shape[:2]) != (n, views):
        ui.warn(f"teacher cache {path} does not match its key or shape; recomputing")
        return None
    return table


def compute_teacher_tables(teacher: Teacher, split: Split, views: int, device: torch.device, batch_size: int = 256) -> tuple[dict[str, torch.Tensor], float]:
    """Run the teacher once over every image (and its mirror when views=2): logits float32, features float16."""
    n = len(split)
    tables: dict[str, torch.Tensor] = {}
    t0, done = time.time(), 0
    with ui.progress() as prog:
        task = prog.add_task(f"teacher {teacher.name} -> cache", total=n * views, rate="", info="")
        for start in range(0, n, batch_size):
            images = split.images[start : start + batch_size]
            for v in range(views):
                out = teacher_forward(teacher, images.flip(-1) if v == 1 else images, device)
                for k, val in out.items():
                    if k not in tables:
                        tables[k] = torch.empty((n, views, *val.shape[1:]), dtype=torch.float32 if k == "logits" else torch.float16)
                    tables[k][start : start + len(images), v] = val.cpu().to(tables[k].dtype)
                done += len(images)
                prog.update(task, advance=len(images), rate=f"{done / max(1e-9, time.time() - t0):.0f} img/s")
    return tables, time.time() - t0


def feature_cache_bytes(teacher: Teacher, split: Split, views: int, device: torch.device) -> int:
    """Bytes the hooked feature maps of every image/view would take in float16 (one probe batch)."""
    if teacher.hook is None or len(split) == 0:
        return 0
    out = teacher_forward(teacher, split.images[:1], device)
    return int(out["feature"].numel()) * 2 * len(split) * views


def teacher_cache(teacher: Teacher, data: DataSet, augment: str, cache_dir: Path, device: torch.device) -> TeacherCache | None:
    """The teacher's cached outputs (loaded or built), or None when they cannot be cached (random crops, too big)."""
    views = views_for(augment)
    if views is None:
        ui.log(f"teacher {teacher.name} runs online every step: data.augment={augment} has random crops, so its outputs are not cacheable "
               "(use --augment flip to cache them and train several times faster)")
        return None
    if feature_cache_bytes(teacher, data.train, views, device) > FEATURE_CACHE_LIMIT_BYTES:
        ui.log(f"teacher {teacher.name} runs online: its '{teacher.hook.path}' feature maps would take over {FEATURE_CACHE_LIMIT_BYTES >> 30} GiB to cache "
               "(pick a smaller --teacher-layer to cache them)")
        return None
    layers = {"logits": None, **({"feature": teacher.hook.path} if teacher.hook is not None else {})}
    paths = {name: Path(cache_dir) / f"{cache_key(teacher, data, augment, layer)}.pt" for name, layer in layers.items()}
    t0 = time.time()
    tables = {name: _read_table(p, len(data.train), views) for name, p in paths.items()}
    if all(t is not None for t in tables.values()):
        ui.log(f"teacher {teacher.name}: cache hit {', '.join(str(p) for p in paths.values())} ({time.time() - t0:.1f} s to load)")
        return TeacherCache(paths, tables, hit=True, seconds=time.time() - t0)
    tables, seconds = compute_teacher_tables(teacher, data.train, views, device)
    for name, p in paths.items():
        with atomic_path(p) as tmp:
            torch.save({"format": CACHE_FORMAT, "version": CACHE_VERSION, "key": p.stem, "teacher": teacher.describe(), "augment": augment,
                        "layer": layers[name], "table": tables[name]}, tmp)
    n = len(data.train) * views
    ui.log(f"teacher {teacher.name}: cached {n:,} outputs in {seconds:.1f} s ({n / max(seconds, 1e-9):.0f} img/s) -> {', '.join(str(p) for p in paths.values())}")
    return TeacherCache(paths, tables, hit=False, seconds=seconds)


# ============================================================================= composite loss
class DistillLoss(nn.Module):
    """Weighted sum of named terms; a ``train.fit`` loss_fn: ``(model, batch, x) -> (loss, logits)``.

    Terms: ``kd`` (alpha, soft targets of all teachers averaged with ``teacher_weights``), ``ce``
    (1-alpha, or 1 without kd), ``fitnet``/``at`` (feature_weight) and ``rkd`` (relation_weight);
    feature terms are summed over teachers with the same weights. ``parts`` holds each term's
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
            fs = self.hook.output
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
        logits = model(x)
        parts = self.terms(logits, batch, outs)
        for k, v in parts.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v.detach())
        self.steps += 1
        return sum(parts.values()), logits

    def parts(self) -> dict[str, float]:
        return {k: round(v / max(1, self.steps), 5) for k, v in self.sums.items()}

    def close(self) -> None:
        """Remove the forward hooks (student and teachers)."""
        for h in [self.hook] + [t.hook for t in self.teachers]:
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
        probe = data.train.images[:2]
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
    loss.to(device)
    return loss, loss.hints


# ============================================================================= stage
def check_student_name(name: str) -> None:
    """Fail before any data is loaded when the student name is neither an edgekd student nor a timm model."""
    import timm

    if name in {s.name for s in list_students()} or timm.is_model(name):
        return
    raise EdgekdError(f"unknown student '{name}'", f"pick one of {', '.join(s.name for s in list_students())} (see `edgekd models`) or a timm model name")


def make_student(student_cfg: StudentConfig, data: DataSet, teachers: list[Teacher], self_distill: bool) -> nn.Module:
    """A fresh student: the configured one at the dataset's channels, or (born-again) a copy of the teacher's architecture."""
    if self_distill:
        t = teachers[0]
        model = create_model(t.spec["name"], data.num_classes, "none", in_chans=t.spec["in_chans"], width=t.spec.get("width", 1.0), input_size=t.preprocess.input_size)
        model.preprocess = t.preprocess
        return model
    return create_model(student_cfg.model, data.num_classes, "none", in_chans=data.channels, width=student_cfg.width, input_size=student_cfg.input_size)


def teachers_model(teacher: Teacher) -> str:
    return teacher.spec["name"]


def check_resume_matches(last: Path, extra: dict) -> None:
    """Refuse to resume a run that distilled with other losses, teachers or data settings (fit only checks the optimiser settings)."""
    if not last.is_file():
        return
    ckpt = safe_torch_load(last, "resume checkpoint")
    old = ckpt.get("config", {}) if isinstance(ckpt, dict) else {}
    same = (old.get("distill") == extra["config"]["distill"] and old.get("data") == extra["config"]["data"]
            and [t.get("sha256") for t in ckpt.get("teachers", [])] == [t["sha256"] for t in extra["teachers"]])
    if not same:
        raise EdgekdError(f"{last} was written by a distillation with other losses, teachers or data", "use a fresh --out folder, or pass --no-resume to start over")


FLAT_SOFT_TARGETS = 0.9  # mean entropy of softmax(z_t / T), as a fraction of log(classes), above which KD teaches little


def measure_teachers(teachers: list[Teacher], data: DataSet, temperature: float) -> list[dict]:
    """One pass of each teacher over validation, before training: its top-1 (compared with the
    student's at the end) and how flat its soft targets are at the distillation temperature.

    Flat targets are a trap measured here (benchmarks/distill_results.md): the 94.1% EfficientNet-Lite0
    teacher, fine-tuned with label smoothing 0.1, gives targets at T=4 with 96% of the maximum entropy
    (p(true class) 0.25 on average). Label smoothing erases the logit structure KD feeds on (Mueller
    et al. 2019, "When does label smoothing help?"), so a lower temperature is what such a teacher needs.
    """
    from edgekd.train import predict_logits

    if len(data.val) == 0:
        return [{} for _ in teachers]
    records = []
    for teacher in teachers:
        logits = predict_logits(teacher.model, data.val, teacher.preprocess)
        p = (logits / temperature).softmax(1)
        entropy = -(p * p.clamp_min(1e-12).log()).sum(1).mean().item() / math.log(logits.shape[1])
        records.append({"val_top1": (logits.argmax(1) == data.val.labels).float().mean().item(),
                        f"soft_target_entropy_T{temperature:g}": round(entropy, 4)})
    return records


def warn_flat_soft_targets(teachers: list[Teacher], records: list[dict], cfg: DistillConfig) -> None:
    """Warn before training when a teacher's soft targets at ``cfg.temperature`` are nearly uniform."""
    if "kd" not in cfg.losses or cfg.alpha == 0:
        return
    for teacher, record in zip(teachers, records):
        entropy = record.get(f"soft_target_entropy_T{cfg.temperature:g}")
        if entropy is not None and entropy > FLAT_SOFT_TARGETS:
            ui.warn(f"teacher {teacher.name}'s soft targets at T={cfg.temperature:g} are nearly uniform ({entropy:.0%} of the maximum entropy "
                    "on validation), so KD will teach little beyond 'be unsure'. Lower distill.temperature (e.g. 1 or 2); teachers "
                    "fine-tuned with label smoothing give flat targets")


def check_teachers_stronger(records: list[dict], metrics: dict, born_again: bool = False) -> None:
    """Warn when the student ended up more accurate on validation than its teacher(s).

    Soft targets from a teacher weaker than the student pull it toward the teacher's mistakes.
    Measured here (benchmarks/distill_results.md): nano_cnn trained alone for 8 epochs reached 93.0%
    test top-1, and 91.8% with KD (alpha 0.9) from a 91.5% teacher. ``records`` come from
    ``measure_teachers``; they go into the metrics either way. A born-again student is meant to
    overtake its teacher, so it is not warned about.
    """
    for teacher_metrics, record in zip(metrics["teachers"], records):
        teacher_metrics.update(record)
    student_val = metrics["val"].get("top1")
    if born_again or student_val is None or not all(records):
        return
    best_teacher = max(r["val_top1"] for r in records)
    metrics["teacher_weaker_than_student"] = best_teacher < student_val
    if metrics["teacher_weaker_than_student"]:
        ui.warn(f"the student ({student_val:.4f} val top-1) ended up more accurate than its best teacher ({best_teacher:.4f}): the teacher's "
                "soft targets were probably holding it back. Train a stronger teacher (e.g. recipes/teacher-fmnist.yaml, more epochs), "
                "or lower distill.alpha (0 = hard labels only)")


def run_distill(
    teachers: list[str | Path],
    student_cfg: StudentConfig,
    distill_cfg: DistillConfig,
    data_cfg: DataConfig,
    out_dir: str | Path,
    seed: int = 0,
    deterministic: bool = False,
    resume: bool = True,
    data: DataSet | None = None,
    self_distill: bool = False,
    cache_dir: str | Path | None = None,
) -> dict:
    """Distil ``teachers`` into a student; writes ``best.pt``, ``last.pt`` and ``metrics.json`` into ``out_dir``.

    With ``self_distill`` (born-again networks, Furlanello et al. 2018) the single teacher must be a
    trained student and the new student is a freshly initialised copy of its architecture.
    """
    from edgekd.finetune import load_data
    from edgekd.train import device as train_device, final_metrics, fit, seed_everything

    if not teachers:
        raise EdgekdError("distillation needs at least one teacher", "pass --teacher PATH (a checkpoint from `edgekd finetune`)")
    if self_distill and len(teachers) != 1:
        raise EdgekdError(f"self-distillation takes exactly one teacher, got {len(teachers)}", "pass one --teacher: the trained student to teach a fresh copy of itself")
    if not self_distill:
        check_student_name(student_cfg.model)
    seed_everything(seed, deterministic)
    loaded = [load_teacher(p) for p in teachers]
    teacher_weights(distill_cfg, len(loaded))
    data = data or load_data(data_cfg, seed)
    if self_distill and student_cfg.model != teachers_model(loaded[0]):
        ui.log(f"self-distillation: the student is a fresh {teachers_model(loaded[0])} like the teacher (student.model={student_cfg.model} is ignored)")
    student = make_student(student_cfg, data, loaded, self_distill)
    dev = train_device()
    student.to(dev)
    loss_fn, adapters = build_distill_loss(student, loaded, distill_cfg, data, cache_dir, data_cfg.augment, dev)  # validates, then caches
    teacher_records = measure_teachers(loaded, data, distill_cfg.temperature)
    warn_flat_soft_targets(loaded, teacher_records, distill_cfg)
    train_cfg = student_cfg.train
    name = student.edgekd_spec["name"]
    ui.log(f"student {name}{' (born-again copy of the teacher)' if self_distill else ''}: {count_params(student):,} params at {student.preprocess.input_size} px; "
           f"teachers {', '.join(t.name for t in loaded)}; losses {'+'.join(distill_cfg.losses)}; data {data.name}: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test")
    trainable = nn.ModuleDict({"student": student, "distill": adapters}) if len(adapters) else None
    extra = {"config": {"student": student_cfg.model_dump(), "distill": distill_cfg.model_dump(), "data": data_cfg.model_dump(), "seed": seed, "self_distill": self_distill},
             "teachers": [t.describe() for t in loaded]}
    if resume:
        check_resume_matches(Path(out_dir) / "last.pt", extra)
    try:
        result = fit(student, data, train_cfg, out_dir, loss_fn, student.preprocess, augment=data_cfg.augment, seed=seed, kind="student",
                     resume=resume, ckpt_extra=extra, trainable=trainable, description=f"distill {name}")
    finally:
        loss_fn.close()
    best = model_from_checkpoint(load_checkpoint(result.best_path))
    teacher_mode = ["cached" if c is not None else "online" for c in loss_fn.caches]
    metrics = final_metrics(best, data, best.preprocess, result, {
        "params": count_params(best), "model": name, "losses": list(distill_cfg.losses), "loss_parts": loss_fn.parts(), "self_distill": self_distill,
        "teachers": [{**t.describe(), "outputs": m} for t, m in zip(loaded, teacher_mode)],
        "teacher_cache_seconds": round(sum(c.seconds for c in loss_fn.caches if c is not None), 2),
    })
    check_teachers_stronger(teacher_records, metrics, born_again=self_distill)
    return {"checkpoint": str(result.best_path), "last": str(result.last_path), "metrics_file": str(result.metrics_path), "metrics": metrics}
