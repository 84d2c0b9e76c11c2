"""The ``edgekd`` command line: wiring only. Each command validates its options through the typed
recipe (edgekd/config.py) and calls one stage function; errors become one line and exit code 2."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from edgekd import ui
from edgekd.errors import EdgekdError

app = typer.Typer(
    name="edgekd",
    help="Big accurate classifier -> small INT8 model that runs fast on an edge device.\n\n"
    "Pipeline: finetune (teacher) -> distill (student) -> export (INT8 ONNX / TensorRT) -> bench. "
    "`edgekd build --target NAME` runs them all.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
STATE = {"debug": False}

from edgekd.cli_options import (ConfigOpt, DataRootOpt, DatasetOpt, JsonOpt, OutOpt, ResumeOpt, SeedOpt, SetOpt, TestSubsetOpt,
                                TrainSubsetOpt, batch_opt, emit, epochs_opt, lr_opt, output_folder, overrides as _overrides)


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", envvar="EDGEKD_QUIET", help="No progress bars or tables (also EDGEKD_QUIET=1).")] = False,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU threads for training/inference (torch). On a shared or busy machine 1 is often faster than 2+: OpenMP threads spin while waiting for a core. \\[default: torch's, or $OMP_NUM_THREADS]")] = None,
) -> None:
    STATE["debug"] = debug
    ui.set_debug(debug)
    ui.set_quiet(quiet)
    if threads:
        import torch

        torch.set_num_threads(threads)


@app.command()
def finetune(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    model: Annotated[Optional[str], typer.Option(help="Teacher backbone (any timm name). \\[default: efficientnet_lite0]")] = None,
    pretrained: Annotated[Optional[str], typer.Option(help="'auto' (offline package, else timm download), 'timm', 'offline', 'none', or a weights file. \\[default: auto]")] = None,
    mode: Annotated[Optional[str], typer.Option(help="'full' fine-tune or 'linear-probe' (frozen backbone). \\[default: full]")] = None,
    input_size: Annotated[Optional[int], typer.Option(help="Input side in pixels. \\[default: 64]")] = None,
    epochs: epochs_opt("teacher") = None,
    batch_size: batch_opt("teacher") = None,
    lr: lr_opt("teacher") = None,
    optimizer: Annotated[Optional[str], typer.Option(help="'adamw' or 'sgd'. \\[default: adamw]")] = None,
    label_smoothing: Annotated[Optional[float], typer.Option(help="Label smoothing. \\[default: 0.1]")] = None,
    dataset: DatasetOpt = None,
    data_root: DataRootOpt = None,
    train_subset: TrainSubsetOpt = None,
    test_subset: TestSubsetOpt = None,
    seed: SeedOpt = None,
    quick: Annotated[bool, typer.Option("--quick", help="A first look in about a minute: 2,000 images, 1 epoch, 48 px (below ~40 px the frozen ImageNet features collapse).")] = False,
    out: OutOpt = Path("runs/teacher"),
    resume: ResumeOpt = True,
    as_json: JsonOpt = False,
) -> None:
    """Stage 1: fine-tune a pretrained backbone into the teacher.

    Example: edgekd finetune --epochs 4 --input-size 64 --out runs/teacher
    """
    from edgekd.config import load_recipe
    from edgekd.finetune import run_finetune

    quick_set = ["data.train_subset=2000", "data.test_subset=1000", "teacher.train.epochs=1", "teacher.input_size=48"] if quick else []
    opts = _overrides({
        "teacher.model": model, "teacher.pretrained": pretrained, "teacher.mode": mode, "teacher.input_size": input_size,
        "teacher.train.epochs": epochs, "teacher.train.batch_size": batch_size, "teacher.train.lr": lr,
        "teacher.train.optimizer": optimizer, "teacher.train.label_smoothing": label_smoothing,
        "data.dataset": dataset, "data.root": data_root, "data.train_subset": train_subset, "data.test_subset": test_subset, "seed": seed,
    })
    recipe = load_recipe(config, quick_set + (set_ or []) + opts)
    with output_folder(out):
        result = run_finetune(recipe.teacher, recipe.data, out, recipe.seed, recipe.deterministic, resume)
    m = result["metrics"]
    ui.show(ui.table("teacher fine-tune", ["model", "params", "val top-1", "test top-1", "train s", "img/s", "checkpoint"],
                     [[recipe.teacher.model, f"{m['params']:,}", m["val"]["top1"], m["test"]["top1"], m["train_seconds"], m["images_per_second"], result["checkpoint"]]]))
    emit({"checkpoint": result["checkpoint"], "metrics_file": result["metrics_file"], "val_top1": m["val"]["top1"], "test_top1": m["test"]["top1"],
          "params": m["params"], "train_seconds": m["train_seconds"], "images_per_second": m["images_per_second"]}, as_json)


@app.command()
def models(
    input_size: Annotated[int, typer.Option(min=16, max=1024, help="Input side for the MAC count.")] = 28,
    in_chans: Annotated[int, typer.Option(min=1, max=4, help="Input channels for students.")] = 1,
    num_classes: Annotated[int, typer.Option(min=2, help="Classes for the head.")] = 10,
    as_json: JsonOpt = False,
) -> None:
    """List edgekd's students (nano < 100K params, small) and the timm edge networks it recommends,
    with parameters and MACs at --input-size (timm networks take 3 channels).

    Any timm model name works as a student (--set student.model=NAME) or teacher.
    """
    from edgekd.models import RECOMMENDED_TIMM, count_macs, count_params, create_model, list_students

    rows = []
    for spec in list_students():
        m = create_model(spec.name, num_classes, in_chans=in_chans)
        rows.append({"name": spec.name, "family": spec.family, "params": count_params(m), "macs": count_macs(m, input_size, in_chans), "about": spec.doc})
    for name, about in RECOMMENDED_TIMM.items():
        m = create_model(name, num_classes, input_size=input_size)
        rows.append({"name": name, "family": "timm", "params": count_params(m), "macs": count_macs(m, input_size, 3), "about": about})
    ui.show(ui.table(f"students at {input_size}x{input_size} (edgekd: {in_chans} channel(s), timm: 3)", ["name", "family", "params", "MMACs", "about"],
                     [[r["name"], r["family"], f"{r['params']:,}", f"{r['macs'] / 1e6:.1f}", r["about"]] for r in rows]))
    emit({"models": rows}, as_json)


# Each stage's commands live in edgekd/commands/<stage>.py and register themselves here.
from edgekd.commands import bench as _bench_cmds, build as _build_cmds, deploy as _deploy_cmds, distill as _distill_cmds, export as _export_cmds, targets as _targets_cmds  # noqa: E402

for _mod in (_distill_cmds, _export_cmds, _bench_cmds, _build_cmds, _targets_cmds, _deploy_cmds):
    _mod.register(app)


def _is_usage_error(exc: BaseException) -> bool:
    """A bad command line (unknown option, missing argument, value of the wrong type or out of range)."""
    return callable(getattr(exc, "format_message", None)) and isinstance(getattr(exc, "exit_code", None), int)


def _usage_line(exc: BaseException) -> str:
    """Click's message and the command's --help, on one line (Click itself prints a usage block)."""
    ctx = getattr(exc, "ctx", None)
    where = getattr(ctx, "command_path", None) or "edgekd"
    return f"{' '.join(exc.format_message().split()).rstrip('.')} (see `{where} --help`)"


def main() -> None:
    """Console entry point: one-line errors, exit code 2, tracebacks only with --debug."""
    import logging

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime is found" on every CPU run (modelopt import)
    try:
        code = app(standalone_mode=False)
        # Typer turns Ctrl-C into Exit(130) and, outside standalone mode, *returns* exit codes.
        if isinstance(code, int) and code != 0:
            if code == 130:
                ui.console.print("[bold red]interrupted[/]: rerun the same command to resume", soft_wrap=True)
            sys.exit(code)
    except EdgekdError as exc:
        if STATE["debug"]:
            raise
        ui.console.print(f"[bold red]error[/]: {exc.one_line()}", soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        ui.console.print("[bold red]interrupted[/]: rerun the same command to resume", soft_wrap=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001
        if isinstance(exc, typer.Exit) or type(exc).__name__ == "Exit":
            sys.exit(getattr(exc, "exit_code", 0))
        if isinstance(exc, typer.Abort) or type(exc).__name__ == "Abort":
            ui.console.print("[bold red]interrupted[/]: rerun the same command to resume", soft_wrap=True)
            sys.exit(130)
        if _is_usage_error(exc):  # Typer >= 0.26 vendors Click, so its exceptions are not click's classes
            ui.console.print(f"[bold red]error[/]: {_usage_line(exc)}", soft_wrap=True)
            sys.exit(2)
        if STATE["debug"]:
            raise
        ui.console.print(f"[bold red]error[/]: unexpected {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} (rerun with --debug for the traceback and report it)", soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
