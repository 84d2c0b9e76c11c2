"""Model factory: timm teachers with verified pretrained weights, and edgekd's edge students.

Like timm: a registry filled by a decorator and one factory, :func:`create_model`. Every model
carries a :class:`~edgekd.data.Preprocess` (input size, channels, mean/std) so artifacts know how
to feed themselves, and a ``feature_layer`` (module path) that feature-distillation losses hook.

Students ("nano", < 100K parameters) are plain Conv-BN-ReLU stacks: every op has an INT8 kernel
on TensorRT and onnxruntime, BN folds into the conv, and nothing (SiLU, hard-swish,
squeeze-excite) quantizes badly.

>>> m = create_model("nano_cnn", num_classes=10)
>>> count_params(m) < 100_000
True
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from edgekd.data import Preprocess
from edgekd.errors import EdgekdError
from edgekd.models.checkpoint import load_checkpoint
from edgekd.models.pretrained import load_pretrained, timm_classifier_prefix
from edgekd.models.registry import STUDENTS

importlib.import_module("edgekd.models.students")  # its decorators fill the student registry

FASHION_MEAN = (0.2860,)
FASHION_STD = (0.3530,)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_preprocess(name: str, input_size: int | None, in_chans: int | None) -> Preprocess:
    if name in STUDENTS:
        ch = in_chans or 1
        mean, std = (FASHION_MEAN, FASHION_STD) if ch == 1 else (IMAGENET_MEAN, IMAGENET_STD)
        return Preprocess(input_size or 28, ch, mean, std)
    import timm

    cfg = timm.get_pretrained_cfg(name)
    cfg = cfg.to_dict() if cfg is not None else {}
    ch = in_chans or 3
    mean, std = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
    if ch != len(mean):
        mean, std = (sum(mean) / len(mean),) * ch, (sum(std) / len(std),) * ch
    return Preprocess(input_size or int(cfg.get("input_size", (3, 224, 224))[-1]), ch, tuple(mean), tuple(std))


def create_model(
    name: str,
    num_classes: int,
    pretrained: str = "none",
    in_chans: int | None = None,
    width: float = 1.0,
    input_size: int | None = None,
) -> nn.Module:
    """Build a student (edgekd registry) or any timm model, head sized for ``num_classes``.

    The model gets ``edgekd_spec`` (how to rebuild it), ``preprocess`` and ``feature_layer``.
    timm is imported only for a timm name: with torchvision and torch._dynamo it costs seconds in
    every process that rebuilds an edgekd student from a checkpoint.
    """
    if name in STUDENTS:
        chans = in_chans or 1
        model = STUDENTS[name].fn(num_classes=num_classes, in_chans=chans, width=width)
        model.feature_layer = "features"
        source = "random init"
        spec = {"name": name, "num_classes": num_classes, "in_chans": chans, "width": width}
    else:
        import timm

        if not timm.is_model(name):
            close = [m for m in timm.list_models(f"*{name.split('_')[0]}*")][:5]
            raise EdgekdError(f"unknown model '{name}'", f"see `edgekd models` for students; timm names like {', '.join(close) or 'resnet18, efficientnet_lite0'}")
        chans = in_chans or 3
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=chans)
        if chans != 3 and pretrained != "none":
            raise EdgekdError(f"pretrained weights for '{name}' need 3 input channels", "leave in_chans at 3; grey images are repeated to RGB")
        source = load_pretrained(model, name, pretrained)
        if pretrained != "none":
            zero_init_head(model)
        model.feature_layer = _timm_feature_layer(model)
        spec = {"name": name, "num_classes": num_classes, "in_chans": chans, "width": 1.0}
    model.edgekd_spec = spec
    model.weights_source = source
    model.preprocess = default_preprocess(name, input_size, chans)
    return model


def create_student(name: str, num_classes: int, channels: int, input_size: int, width: float = 1.0, pretrained: str = "none") -> nn.Module:
    """A student as the pipeline trains it. edgekd's students take the data's channels and start
    from random init; so does a timm student by default. With ``pretrained`` weights (timm,
    offline, a file) a timm student keeps its 3 input channels, grey images repeated to RGB as for
    the teacher: an ImageNet stem does not fit a 1-channel input."""
    if pretrained != "none" and name in STUDENTS:
        raise EdgekdError(f"edgekd student '{name}' has no pretrained weights", "set student.pretrained=none, or pick a timm student (e.g. mobilenetv3_large_100)")
    return create_model(name, num_classes, pretrained, in_chans=3 if pretrained != "none" else channels, width=width, input_size=input_size)


def zero_init_head(model: nn.Module) -> None:
    """A new classifier on pretrained features starts at zero (all classes equally likely, loss
    ln(C)). timm's EfficientNet init draws the head from +-1/sqrt(num_classes): for 3 classes
    that is +-0.58, and the initial logits reached 45 (loss 10.7 instead of 1.1), which the first
    epochs of a small data set spent undoing."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, nn.Linear):
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)


def _timm_feature_layer(model: nn.Module) -> str:
    """Last feature map before pooling: the natural FitNets hint layer of a timm model."""
    for cand in ("bn2", "conv_head", "norm", "layer4", "stages", "features"):
        if dict(model.named_modules()).get(cand) is not None:
            return cand
    return list(dict(model.named_children()))[-3]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: int, in_chans: int) -> int:
    """Multiply-accumulates of one forward pass at batch 1 (FLOPs / 2 from torch's counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(torch.zeros(1, in_chans, input_size, input_size))
    model.train(was_training)
    return int(fc.get_total_flops() // 2)


def set_trainable(model: nn.Module, mode: str, frozen_stages: int = 0) -> int:
    """'full' trains everything (but the stem and the first ``frozen_stages`` stages, when asked);
    'linear-probe' freezes all but the classifier. Returns the trainable parameter count."""
    if mode == "linear-probe":
        head = timm_classifier_prefix(model) if hasattr(model, "pretrained_cfg") else ("head.",)
        for n, p in model.named_parameters():
            p.requires_grad = n.startswith(head)
    else:
        frozen = early_stage_params(model, frozen_stages) if frozen_stages else set()
        for n, p in model.named_parameters():
            p.requires_grad = n not in frozen
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def early_stage_params(model: nn.Module, stages: int) -> set[str]:
    """Names of the parameters in the stem and the first ``stages`` stages, by timm's own grouping of
    the network (``group_matcher``: stem, then each stage or block group, then the head)."""
    name = getattr(model, "edgekd_spec", {}).get("name") or type(model).__name__
    groups = stage_groups(model, "teacher.frozen_stages", "set teacher.frozen_stages=0, or teacher.mode=linear-probe to freeze the whole backbone")
    if stages >= len(groups) - 1:
        raise EdgekdError(f"teacher.frozen_stages={stages}, but {name} has only {len(groups) - 2} stages after its stem",
                          f"use at most {len(groups) - 2} (or teacher.mode=linear-probe)")
    return {n for group in groups[: stages + 1] for n in group}


def stage_groups(model: nn.Module, option: str, hint: str) -> list[list[str]]:
    """Parameter names by timm's own grouping of the network (``group_matcher(coarse=True)``): the
    stem, then each stage or block group, then the head. ``option`` names what needs them, for the error."""
    from timm.models import group_parameters

    if not hasattr(model, "group_matcher"):
        name = getattr(model, "edgekd_spec", {}).get("name") or type(model).__name__
        raise EdgekdError(f"{option} needs a timm backbone with stages; {name} has no group_matcher", hint)
    return [list(g) for g in group_parameters(model, model.group_matcher(coarse=True)).values()]


def resolve_module(model: nn.Module, path: str) -> nn.Module:
    modules = dict(model.named_modules())
    if path not in modules:
        sample = [n for n in modules if n and n.count(".") < 2][:12]
        raise EdgekdError(f"model has no layer '{path}'", f"pick one of: {', '.join(sample)} ...")
    return modules[path]


def model_from_checkpoint(ckpt: dict[str, Any] | str | Path) -> nn.Module:
    """Rebuild the architecture named in the checkpoint and load its weights."""
    if not isinstance(ckpt, dict):
        ckpt = load_checkpoint(ckpt)
    spec = ckpt["model"]
    model = create_model(spec["name"], spec["num_classes"], pretrained="none", in_chans=spec["in_chans"], width=spec.get("width", 1.0), input_size=ckpt["preprocess"]["input_size"])
    model.preprocess = Preprocess.from_dict(ckpt["preprocess"])
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as exc:
        raise EdgekdError(f"checkpoint weights do not fit a {spec['name']} model: {str(exc).splitlines()[0][:160]}", "the checkpoint is from another architecture or was modified") from exc
    model.eval()
    return model
