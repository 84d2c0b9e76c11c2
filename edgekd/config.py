"""Typed, strict configuration for every stage, and the recipe file that holds them.

One place validates everything: a recipe (YAML or TOML) is parsed into :class:`Recipe`; unknown
keys and wrong types fail with the dotted field name. CLI options and ``key=value`` overrides
(``teacher.train.epochs=3``) are applied on top before validation, so ``edgekd build
--print-config`` shows exactly what will run. Pattern borrowed from torchtune recipes and
Model Optimizer's ``extra="forbid"`` configs.
"""

from __future__ import annotations

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (e.g. NGC TensorRT containers, JetPack 5)
    import tomli as tomllib
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgekd.errors import EdgekdError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Strict):
    dataset: str = Field("fashion-mnist", description="'fashion-mnist', 'imagefolder', or a torchvision dataset name (e.g. 'cifar10')")
    root: str | None = Field(None, description="dataset folder; default: $EDGEKD_FASHION_MNIST or /usr/share/datasets/fashion-mnist")
    val_fraction: float = Field(0.1, ge=0.0, lt=0.9, description="share of the training set held out for validation")
    test_fraction: float = Field(0.2, gt=0.0, lt=0.9, description="share held out as the test set when the data set has none (an ImageFolder without test/)")
    train_subset: int | None = Field(None, gt=0, description="use only this many training images (quick runs)")
    test_subset: int | None = Field(None, gt=0, description="use only this many test images (quick runs)")
    augment: Literal["none", "flip", "crop-flip"] = Field("crop-flip", description="train-time augmentation")
    resize: Literal["crop", "pad", "stretch"] = Field("crop", description="how an image folder's pictures become squares once, when decoded: "
                                                      "shorter side resized then centre crop (timm/torchvision eval), pad to square, or stretch")
    cache_dir: str | None = Field(None, description="where image folders are decoded once (uint8, memory-mapped); default $EDGEKD_DATA_CACHE "
                                                    "or ~/.cache/edgekd/images")
    decode_workers: int | None = Field(None, ge=1, description="processes decoding an image folder the first time (default: one per core)")
    unlabeled_root: str | None = Field(None, description="a folder of unlabeled images from the deployment domain (any layout, sub-folders "
                                                         "read, names ignored): KD on them (distill.unlabeled_weight), MMD alignment "
                                                         "(teacher.mmd, distill.mmd), target calibration (quantize.calibration)")
    target_test_root: str | None = Field(None, description="a labeled test folder from the deployment domain (<class>/<image>, the training "
                                                           "classes; '/' in a class name written '_'): every accuracy is also given on it")


class MMDConfig(Strict):
    """Feature alignment between the labeled (source) and the unlabeled (target) images: see edgekd.distill.domain."""

    weight: float = Field(0.0, ge=0, description="lambda of lambda * MMD^2(phi(X_s), phi(X_t)); 0: off (needs data.unlabeled_root)")
    bandwidths: list[float] = Field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0, 4.0], description="Gaussian kernel widths, as multiples "
                                                                                                      "of the batch's mean squared distance (DAN)")
    layer: str | None = Field(None, description="module path whose output (pooled over space) is phi; default: the model's feature layer")
    conditional: bool = Field(False, description="also the class-conditional MMD on the teacher's pseudo-labels of the target images (JDA)")

    @field_validator("bandwidths")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if not v or min(v) <= 0:
            raise ValueError("at least one bandwidth, all > 0")
        return v


class TrainConfig(Strict):
    epochs: int = Field(5, ge=0, description="passes over the training set")
    batch_size: int = Field(64, ge=1, le=4096)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0, le=10)
    weight_decay: float = Field(0.05, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD only")
    warmup_epochs: float = Field(0.3, ge=0, description="linear warm-up before the cosine decay")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    amp: bool = Field(True, description="mixed precision where CUDA is present (ignored on CPU)")
    grad_clip: float | None = Field(None, gt=0)
    freeze_bn: bool = Field(False, description="keep BatchNorm statistics frozen (eval mode): small batches, or exact DDP equivalence")
    min_steps: int = Field(0, ge=0, description="at least this many optimizer steps: on a small data set the epochs are raised to reach it "
                                              "(a recipe that sets `epochs` and not `min_steps` turns this off: explicit epochs win)")
    max_epochs: int = Field(300, ge=1, description="cap on the epochs `min_steps` may ask for")
    patience: int | None = Field(None, ge=1, description="early stopping: stop after this many epochs without a better validation top-1")
    time_limit_s: float | None = Field(None, gt=0, description="wall-time limit: the learning-rate schedule ends and training stops by then "
                                                               "(`build --time-budget` sets it per stage)")


class TeacherConfig(Strict):
    model: str = Field("efficientnet_lite0", description="timm model name (or a registered edgekd model)")
    pretrained: str = Field("auto", description="'auto' (offline package, else timm download), 'timm', 'offline', 'none', or a weights file path")
    input_size: int = Field(48, ge=16, le=1024, description="square input side in pixels (below ~40 px frozen ImageNet features collapse)")
    mode: Literal["full", "linear-probe", "progressive"] = Field("full", description="fine-tune everything, only the new head, or "
                                                                                    "'progressive': the head first, then one more stage of the "
                                                                                    "backbone at a time from the top (gradual unfreezing)")
    frozen_stages: int = Field(0, ge=0, le=16, description="mode 'full': keep the stem and the first N stages of a timm backbone as pretrained "
                                                           "(no backward pass through them: cheaper steps; their BatchNorm statistics still adapt)")
    # Defaults sized so the whole default `edgekd build` fits ~20 min on 2 CPU cores; recipes/teacher-fmnist.yaml is the accurate one.
    # No label smoothing: a smoothed teacher's soft targets carry less of the similarity structure KD
    # transfers (Mueller, Kornblith & Hinton 2019, "When does label smoothing help?").
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=1, lr=1e-3, batch_size=64, label_smoothing=0.0, min_steps=300, patience=8))
    mmd: MMDConfig = Field(default_factory=MMDConfig, description="fine-tuning aligns the teacher's features on source and unlabeled target images")


class StudentConfig(Strict):
    model: str = Field("nano_cnn", description="edgekd student (see `edgekd models`) or a timm model name")
    input_size: int = Field(28, ge=16, le=1024)
    width: float = Field(1.0, gt=0, le=8, description="width multiplier for edgekd students")
    pretrained: str = Field("none", description="timm students: 'none' (random init), or as teacher.pretrained: 'auto', 'timm' (download), "
                                                "'offline', or a weights file path; grey images are then repeated to RGB")
    augment: Literal["none", "flip", "crop-flip"] = Field("flip", description="student augmentation in `build`: 'flip' lets teacher outputs be cached")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=8, lr=3e-3, batch_size=128, weight_decay=0.05, min_steps=1000, patience=8))
    control: bool = Field(True, description="`build` also trains this student alone on hard labels with the same budget (the control), "
                                            "reports what distillation bought against it, and ships the better one (see distill.ship)")


class DistillConfig(Strict):
    mode: Literal["teacher", "assistant", "mutual"] = Field("teacher", description=(
        "'teacher': learn from the teacher(s); cross-resolution when the teacher's input size is above the student's "
        "(kd and rkd need no alignment, fitnet and at pool the larger feature map to the smaller). 'assistant': teacher -> "
        "distill.assistant -> student (Mirzadeh et al. 2020). 'mutual': distill.peers students learn from each other, "
        "no teacher (Zhang et al. 2018)"))
    assistant: str | None = Field(None, description="mode 'assistant': the intermediate network, an edgekd student or timm name "
                                                    "(distilled from the teacher first) or a checkpoint .pt")
    peers: int | list[str] = Field(2, description="mode 'mutual': how many copies of the student, or the peers' model names "
                                                  "(the first is the student); the best on validation is kept")
    losses: list[Literal["kd", "fitnet", "rkd", "at"]] = Field(default_factory=lambda: ["kd"])
    # T=1, alpha=0.5 measured best on validation (benchmarks/distill_results.md) with a teacher fine-tuned
    # with label smoothing 0.1, as teachers were then: at Hinton's usual T=4 its soft targets were nearly
    # uniform. The default teacher now trains without smoothing; rerun that benchmark before changing these.
    temperature: float = Field(1.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the soft-target term; 1-alpha goes to hard labels")
    feature_weight: float = Field(1.0, ge=0, description="weight of fitnet / attention terms")
    relation_weight: float = Field(1.0, ge=0, description="weight of the RKD term")
    student_layer: str | None = Field(None, description="student module path for feature losses (default: model's feature_layer)")
    teacher_layer: str | None = Field(None, description="teacher module path for feature losses (default: model's feature_layer)")
    teacher_weights: list[float] | None = Field(None, description="one weight per teacher (multi-teacher); default equal")
    cache_teacher: bool = Field(True, description="cache teacher logits when augmentation allows it")
    unlabeled_weight: float = Field(0.1, ge=0, description="weight of the KD term on unlabeled target images (data.unlabeled_root; teacher "
                                                           "soft targets only, no label term); at 1 a pico student lost 1.2-4.8 source points, "
                                                           "at 0.1 under one (benchmarks/domain_results.md)")
    unlabeled_ratio: float = Field(1.0, gt=0, le=8, description="unlabeled images per labeled image in each step")
    mmd: MMDConfig = Field(default_factory=MMDConfig, description="the student's features aligned on source and unlabeled target images")
    ship: Literal["better", "distilled"] = Field("better", description="'better': when the control (student alone) beats the distilled "
                                                                     "student on validation, build ships the control and says why")
    weak_teacher: Literal["control", "keep"] = Field("control", description="in `build`, when the fine-tuned teacher validates below the "
                                                                        "control (student alone): 'control' distils from the control instead "
                                                                        "(born-again) and QAD learns from it too; 'keep' uses the teacher anyway")
    born_again_init: Literal["teacher", "scratch"] = Field("teacher", description="a born-again student (self-distillation; in `build`, distilling "
                                                                                  "from the control) starts from the teacher's weights ('teacher': "
                                                                                  "more training for a student cut short by the time budget, +0.6 "
                                                                                  "points on the default build) or a fresh init ('scratch', "
                                                                                  "Furlanello et al.)")

    @field_validator("losses")
    @classmethod
    def _nonempty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one loss is needed")
        return v

    @field_validator("peers")
    @classmethod
    def _two_or_more(cls, v: int | list[str]) -> int | list[str]:
        if (v if isinstance(v, int) else len(v)) < 2:
            raise ValueError("mutual learning needs at least 2 peers")
        return v


class QuantizeConfig(Strict):
    enabled: bool = True
    calibrator: Literal["auto", "max", "percentile", "entropy", "mse"] = Field("auto", description=(
        "activation ranges: 'max' (fast, never clips), or from a histogram: 'percentile', 'mse' (least squared error), 'entropy' (least "
        "KL divergence); 'auto': max, and when it loses more than a point of validation top-1 to FP32 the three others too, the best on "
        "validation kept. Weights always take their max"))
    percentile: float = Field(99.99, gt=50, le=100)
    calib_images: int = Field(512, ge=16)
    select_images: int = Field(1000, ge=50, description="'auto' scores each calibrator on at most this many validation images (a "
                                                        "fixed random subset; 1,000 tell a lost point from noise and keep a 224 px export to minutes)")
    calibration: Literal["source", "target"] = Field("source", description="calibrate on training images, or on the unlabeled target images "
                                                                          "(data.unlabeled_root); with 'target', calibrator 'auto' scores on "
                                                                          "agreement with the FP32 student on target images")
    fold_bn: bool = True
    learn_ranges: bool = Field(True, description="QAD trains the activation ranges with the weights (LSQ); off: the calibrated ranges stay fixed")
    range_lr: float = Field(0.05, gt=0, le=1, description="learning rate of the learned ranges (on log amax: a relative step)")
    layout: Literal["auto", "tensorrt", "ort-cpu", "openvino"] = Field("auto", description="where activation quantizers go: the runtime's Q/DQ layout; 'auto' takes the target's")
    weight_bits: int | None = Field(None, ge=7, le=8, description="weight grid QAD trains and the file ships: 7 cannot saturate onnxruntime's "
                                                                 "u8 x s8 kernels on x86 CPUs without VNNI (its reduce_range); unset: 7 for the "
                                                                 "ort-cpu layout on an x86-64 target, else 8")
    max_accuracy_drop: float | None = Field(None, ge=0, le=100, description="accuracy budget in top-1 points vs the FP32 student (validation): "
                                                                           "if INT8 loses more after QAD, the most sensitive layers stay in "
                                                                           "higher precision (FP16 on TensorRT, float on onnxruntime) until it fits")
    exclude: list[str] = Field(default_factory=list, description="layers (module paths) pinned to higher precision by hand")
    sensitivity_images: int = Field(500, ge=50, description="validation images the per-layer sensitivity is measured on")
    sensitivity_file: str | None = Field(None, description="rank layers by this sensitivity.json (an earlier budgeted run on the same student) "
                                                           "instead of measuring again: another budget costs only the search and QAD")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=1, lr=1e-4, batch_size=128, weight_decay=0.0, warmup_epochs=0.0, min_steps=200))


class ExportConfig(Strict):
    precision: Literal["int8", "fp16", "fp32"] = "int8"
    layout: Literal["auto", "tensorrt", "ort-cpu", "openvino"] = Field("auto", description="Q/DQ layout; 'auto' takes the target's")
    opset: int = Field(17, ge=17, le=23)
    check_batch: int = Field(256, ge=1, description="held images for the ORT-vs-PyTorch agreement check")
    allow_not_ready: bool = Field(False, description="ship an INT8 graph the target's runtime cannot fully run in INT8 (recorded)")


class BenchConfig(Strict):
    warmup: int = Field(20, ge=0)
    runs: int = Field(200, ge=10)
    batches: list[int] = Field(default_factory=lambda: [1, 64])
    threads: int | None = Field(None, ge=1)


class Recipe(Strict):
    """Everything `edgekd build` needs. Each section configures one stage."""

    name: str = "default"
    seed: int = Field(0, ge=0, le=2**32 - 1, description="random seed (numpy and torch accept 0 .. 2**32-1)")
    deterministic: bool = False
    target: str = "x86-cpu"
    time_budget_s: float | None = Field(None, ge=0, description="wall-time budget of the whole build in seconds (`--time-budget 20m`), shared out "
                                                               "over the training stages. Unset: 20 min for the stages whose length edgekd "
                                                               "sizes itself (min_steps > 0); 0: none")
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    bench: BenchConfig = Field(default_factory=BenchConfig)


def describe_validation_error(exc: ValidationError, source: str) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    return f"{source}: {where}: {msg}"


def parse_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or TOML file into a dict; any parse problem becomes one clear error."""
    p = Path(path)
    if not p.is_file():
        raise EdgekdError(f"config file not found: {p}", "check the path")
    try:
        text = p.read_text()
        data = tomllib.loads(text) if p.suffix == ".toml" else yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EdgekdError(f"{p} is not valid {'TOML' if p.suffix == '.toml' else 'YAML'}: {detail}", "fix the syntax") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise EdgekdError(f"{p} must hold a mapping of keys, not {type(data).__name__}", "see `edgekd build --print-config` for the layout")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings; values are parsed as YAML scalars/lists (``3``, ``true``, ``[kd,fitnet]``)."""
    for item in overrides:
        if "=" not in item:
            raise EdgekdError(f"override '{item}' is not key=value", "write e.g. teacher.train.epochs=3")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise EdgekdError(f"override '{item}': '{part}' is not a section", "check the key path with --print-config")
            node = child
        node[parts[-1]] = value
    return data


TRAIN_SECTIONS = (("teacher", "train"), ("student", "train"), ("quantize", "train"))


def explicit_epochs_win(data: dict[str, Any]) -> None:
    """A recipe (or --set) that names a stage's ``epochs`` gets exactly that many: its
    ``min_steps`` is turned off unless it is named too."""
    for section, sub in TRAIN_SECTIONS:
        train = data.get(section, {}).get(sub) if isinstance(data.get(section), dict) else None
        if isinstance(train, dict) and "epochs" in train and "min_steps" not in train:
            train["min_steps"] = 0


def merge_into(defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """``given`` over ``defaults``, section by section: a recipe that sets ``teacher.train.lr``
    keeps the teacher's other training defaults (its epochs, label smoothing) instead of the
    generic ones of a fresh TrainConfig."""
    out = dict(defaults)
    for key, value in given.items():
        out[key] = merge_into(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def parse_duration(text: str) -> float:
    """'20m', '90s', '1.5h' or plain seconds -> seconds; 'none', 'off' or 0 -> 0 (no budget)."""
    units = {"s": 1, "m": 60, "h": 3600}
    raw = text.strip().lower()
    if raw in ("none", "off"):
        return 0.0
    try:
        value = float(raw[:-1]) * units[raw[-1]] if raw and raw[-1] in units else float(raw)
    except ValueError:
        value = -1.0
    if value == 0:
        return 0.0
    if not math.isfinite(value) or value < 0:
        raise EdgekdError(f"time budget '{text}' is not a duration", "write e.g. 20m, 90s or 1.5h")
    return value


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Defaults <- recipe file <- overrides, validated once."""
    data: dict[str, Any] = parse_file(path) if path else {}
    data = apply_overrides(data, overrides or [])
    explicit_epochs_win(data)
    try:
        return Recipe.model_validate(merge_into(Recipe().model_dump(mode="json"), data))
    except ValidationError as exc:
        raise EdgekdError(describe_validation_error(exc, str(path or "recipe")), "see `edgekd build --print-config` for valid keys") from exc


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
