"""One module per stage with its CLI commands; cli.py registers them.

What several commands share lives here: the checkpoint and calibration options of quantize and
export, and two groups of options that typer cannot express as one parameter: a training
section's --epochs/--batch-size/--lr (:func:`train_options`) and the data, seed, --quick, --out,
--resume and --json options at the end of the training commands (:func:`run_options`). A command
declares a group as one placeholder parameter (``train: TrainOptions``, ``run: RunOptions``);
typer sees the group's options in its place, the command receives them as one object.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Optional

import typer

from edgekd.cli_options import (DataRootOpt, DatasetOpt, JsonOpt, OutOpt, ResumeOpt, SeedOpt, TestSubsetOpt, TrainSubsetOpt, UnlabeledOpt, batch_opt,
                                epochs_opt, lr_opt, overrides)

if TYPE_CHECKING:
    from edgekd.config import Recipe
    from edgekd.stage_context import StageContext

CheckpointArg = Annotated[Path, typer.Argument(help="Student checkpoint (.pt from `edgekd distill` or `edgekd quantize`).")]
CalibratorOpt = Annotated[Optional[str], typer.Option(help="Activation-range calibrator: max, percentile, entropy, mse, or auto (max; the others too when max loses over a point on validation, the best kept). \\[default: auto]")]
CalibImagesOpt = Annotated[Optional[int], typer.Option(help="Training images used to calibrate activation ranges. \\[default: 512]")]

# The run options in the order --help lists them; "quick" gets each command's own help text.
_RUN: dict[str, Any] = {"dataset": DatasetOpt, "data_root": DataRootOpt, "unlabeled": UnlabeledOpt, "train_subset": TrainSubsetOpt, "test_subset": TestSubsetOpt,
                        "seed": SeedOpt, "quick": None, "out": OutOpt, "resume": ResumeOpt, "as_json": JsonOpt}
TRAINING_OPTIONS = tuple(_RUN)
_TRAIN = {"epochs": epochs_opt, "batch_size": batch_opt, "lr": lr_opt}


@dataclass(frozen=True)
class RunOptions:
    """The run options one command was given (None: not given)."""

    dataset: Optional[str] = None
    data_root: Optional[str] = None
    unlabeled: Optional[str] = None
    train_subset: Optional[int] = None
    test_subset: Optional[int] = None
    seed: Optional[int] = None
    quick: bool = False
    out: Path = Path("runs")
    resume: bool = True
    as_json: bool = False

    def recipe(self, config: Optional[Path], set_: Optional[list[str]], opts: dict[str, Any], quick_set: list[str] | None = None) -> Recipe:
        """The validated recipe: ``quick_set`` when --quick, then --set, then the command's options and the data options given."""
        from edgekd.config import load_recipe  # lazy: --help must not import pydantic's models

        data = {"data.dataset": self.dataset, "data.root": self.data_root, "data.unlabeled_root": self.unlabeled, "data.train_subset": self.train_subset,
                "data.test_subset": self.test_subset, "seed": self.seed}
        return load_recipe(config, ((quick_set or []) if self.quick else []) + (set_ or []) + overrides(opts | data))


    def context(self, recipe: Recipe, augment: str | None = None, **fields: Any) -> StageContext:
        """The stage context of a command's run: the recipe's seed and data (with ``augment`` when the
        stage has its own), --resume, and any other :class:`~edgekd.stage_context.StageContext` field."""
        from edgekd.stage_context import StageContext  # lazy: pydantic config only, but `edgekd --help` imports nothing it does not show

        data_cfg = recipe.data if augment is None else recipe.data.model_copy(update={"augment": augment})
        return StageContext(recipe.seed, recipe.deterministic, self.resume, data_cfg, **fields)


@dataclass(frozen=True)
class TrainOptions:
    """--epochs, --batch-size and --lr for the recipe section ``section`` (None: not given)."""

    section: str
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    lr: Optional[float] = None

    def overrides(self) -> dict[str, Any]:
        """``{"<section>.train.epochs": ..., ...}``, for :meth:`RunOptions.recipe`."""
        return {f"{self.section}.train.{key}": getattr(self, key) for key in _TRAIN}


def run_options(*names: str, out: Path, quick_help: str = "") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a command with a ``run: RunOptions`` parameter: typer sees the run options ``names``
    there (in :data:`_RUN`'s order), with ``out`` as the --out default."""
    quick_opt = Annotated[bool, typer.Option("--quick", help=quick_help)]
    return _expand("run", RunOptions, [(n, _RUN[n] or quick_opt, out if n == "out" else RunOptions.__dataclass_fields__[n].default)
                                       for n in _RUN if n in names])


def train_options(section: str, *names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a command with a ``train: TrainOptions`` parameter: typer sees ``names`` (of --epochs,
    --batch-size, --lr) there, their help texts showing the recipe's defaults for ``section``."""
    return _expand("train", functools.partial(TrainOptions, section), [(n, _TRAIN[n](section), None) for n in _TRAIN if n in names])


def _expand(placeholder: str, make: Callable[..., Any], options: list[tuple[str, Any, Any]]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The decorator: ``options`` (name, annotation, default) replace the parameter ``placeholder`` in
    the signature typer reads, and the command gets ``make(**their values)`` as ``placeholder``."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(command, eval_str=True)
        kind = sig.parameters[placeholder].kind
        expanded = [inspect.Parameter(name, kind, annotation=annotation, default=default) for name, annotation, default in options]
        params = [q for p in sig.parameters.values() for q in (expanded if p.name == placeholder else [p])]

        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            kwargs[placeholder] = make(**{p.name: kwargs.pop(p.name, p.default) for p in expanded})
            return command(*args, **kwargs)

        wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params} | {"return": sig.return_annotation}
        return wrapper

    return decorate
