"""Option types shared by every command (huggingface_hub-style): one definition, one help text."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import typer

from edgekd.manifest import hold_run_folder

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="Recipe file (YAML/TOML); see `edgekd build --print-config`.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override any recipe key, e.g. --set student.train.epochs=3 (repeatable).")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder for checkpoints and metrics.")]
AllowNotReadyOpt = Annotated[bool, typer.Option("--allow-not-ready", help="Ship an INT8 graph even when the target runtime's readiness check fails "
                                              "(e.g. an unquantized residual Add on TensorRT); recorded in the manifest and bundle.")]
MaxDropOpt = Annotated[Optional[float], typer.Option("--max-accuracy-drop", help="Accuracy budget: top-1 points INT8 may lose against the FP32 student on "
                                                   "validation. Over it, the most sensitive layers stay in higher precision (FP16 on TensorRT, float on "
                                                   "onnxruntime CPU), fewest first, until it fits; then QAD again. \\[default: none, every layer INT8]")]
ExcludeOpt = Annotated[Optional[str], typer.Option("--exclude", help="Layers kept in higher precision by hand: module paths, comma-separated "
                                                   "(e.g. conv_stem,classifier).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout (progress goes to stderr).")]
SeedOpt = Annotated[Optional[int], typer.Option(help="Random seed (data split, init, augmentation). \\[default: 0]")]
DatasetOpt = Annotated[Optional[str], typer.Option(help="'fashion-mnist', 'imagefolder' (with --data-root), or a torchvision dataset. \\[default: fashion-mnist]")]
DataRootOpt = Annotated[Optional[str], typer.Option(help="Dataset folder. Fashion-MNIST default: $EDGEKD_FASHION_MNIST or /usr/share/datasets/fashion-mnist.")]
TrainSubsetOpt = Annotated[Optional[int], typer.Option(help="Use only N training images (quick runs). \\[default: all]")]
UnlabeledOpt = Annotated[Optional[str], typer.Option("--unlabeled", help="Folder of unlabeled images from the deployment domain (any layout): "
                                                   "KD on them, MMD alignment, target calibration (data.unlabeled_root).")]
TestSubsetOpt = Annotated[Optional[int], typer.Option(help="Use only N validation/test images (quick runs). \\[default: all]")]


def _train_default(section: str, key: str) -> Any:
    """The recipe's default for ``<section>.train.<key>``, so --help shows what a run really uses."""
    from edgekd.config import Recipe  # lazy: `edgekd --help` imports no pydantic models

    return getattr(getattr(Recipe(), section).train, key)


def epochs_opt(section: str) -> Any:
    return Annotated[Optional[int], typer.Option(help=f"Training epochs. \\[default: {_train_default(section, 'epochs')}]")]


def batch_opt(section: str) -> Any:
    return Annotated[Optional[int], typer.Option(help=f"Batch size. \\[default: {_train_default(section, 'batch_size')}]")]


def lr_opt(section: str) -> Any:
    return Annotated[Optional[float], typer.Option(help=f"Peak learning rate (after warm-up). \\[default: {_train_default(section, 'lr'):g}]")]
ResumeOpt = Annotated[bool, typer.Option("--resume/--no-resume", help="Continue from last.pt in --out when present.")]


@contextlib.contextmanager
def output_folder(out: Path) -> Iterator[None]:
    """Hold ``out`` for a training command: a second run into it is refused while this one runs,
    and temporary files a killed run left there are removed. Under torchrun only rank 0 (the one
    that writes) takes the lock."""
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    with hold_run_folder(out):
        yield


def overrides(pairs: dict[str, Any]) -> list[str]:
    """CLI options that were given become recipe overrides (None means 'not given')."""
    out = []
    for key, value in pairs.items():
        if value is None:
            continue
        out.append(f"{key}={json.dumps(value) if not isinstance(value, str) else value}")
    return out


def layer_list(text: str | None) -> list[str] | None:
    """``--exclude a,b`` -> ["a", "b"] (None: not given)."""
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def emit(result: dict, as_json: bool) -> None:
    """The ``--json`` object on stdout (under torchrun from rank 0 only: one object, not one per rank)."""
    if as_json and os.environ.get("RANK", "0") == "0":
        sys.stdout.write(json.dumps(result, default=str) + "\n")


