"""`edgekd build`: the whole pipeline for one target, resumable, ending in a deployment bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from edgekd import ui
from edgekd.time_budget import DEFAULT_TIME_BUDGET_S, shares_text
from edgekd.cli_options import (AllowNotReadyOpt, ConfigOpt, DataRootOpt, DatasetOpt, ExcludeOpt, JsonOpt, MaxDropOpt, SeedOpt, SetOpt, UnlabeledOpt, emit,
                                layer_list, overrides)


def build(
    target: Annotated[Optional[str], typer.Option("--target", "-t", help="Deployment target (see `edgekd targets list`); 'jetson' = jetson-orin-nano. \\[default: the recipe's, x86-cpu]")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: stage outputs, manifest.json, bundle/ and bundle.tar.gz.")] = Path("runs/build"),
    student: Annotated[Optional[str], typer.Option(help="Student model (see `edgekd models`). \\[default: nano_cnn]")] = None,
    teacher: Annotated[Optional[Path], typer.Option(help="Use this teacher checkpoint instead of fine-tuning one.")] = None,
    dataset: DatasetOpt = None,
    data_root: DataRootOpt = None,
    unlabeled: UnlabeledOpt = None,
    target_test: Annotated[Optional[str], typer.Option("--target-test", help="Labeled test folder from the deployment domain (<class>/<image>): every "
                                                       "accuracy in the report is also given there (data.target_test_root).")] = None,
    seed: SeedOpt = None,
    quick: Annotated[bool, typer.Option("--quick", help="A first look in a few minutes: 3,000 images, 1 teacher epoch at 48 px, 3 student epochs.")] = False,
    until: Annotated[Optional[str], typer.Option(help="Stop after this stage (teacher, control, distill, qad, export, evaluate, bench, report, bundle).")] = None,
    time_budget: Annotated[Optional[str], typer.Option("--time-budget", help="Wall time for the whole build, e.g. 20m, 90s, 1.5h, or 'none' (or 0). The training "
                                                       "stages share what is left when each starts, in proportion to their weights ("
                                                       + shares_text() + "), and stop on time, their learning rate annealed to the deadline. \\[default: "
                                                       f"{DEFAULT_TIME_BUDGET_S // 60}m for the stages whose length edgekd sizes; a recipe's explicit epochs are not cut]")] = None,
    control: Annotated[bool, typer.Option("--control/--no-control", help="Also train the student alone on hard labels (the control), report what "
                                          "distillation bought against it, and ship the better one.")] = True,
    targets_dir: Annotated[Optional[Path], typer.Option(help="Extra folder of target .toml files (also $EDGEKD_TARGETS_DIR).")] = None,
    allow_not_ready: AllowNotReadyOpt = False,
    max_accuracy_drop: MaxDropOpt = None,
    exclude: ExcludeOpt = None,
    print_config: Annotated[bool, typer.Option("--print-config", help="Print the full recipe (every default, after overrides) as YAML and exit.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Teacher -> control -> distill -> quantization-aware distill (qad) -> export -> evaluate -> bench -> report -> bundle, for one target.

    Every stage writes into --out with a manifest (config, sha256 of every artifact, metrics,
    timings). Rerunning skips finished stages; an interrupted build resumes where it stopped.

    Examples:

      edgekd build --target jetson-orin-nano

      edgekd build --target x86-cpu --quick --out runs/quick --json

      edgekd build --print-config > my-recipe.yaml; edgekd build -c my-recipe.yaml --set student.train.epochs=20
    """
    from edgekd.config import load_recipe, recipe_to_yaml  # lazy: `edgekd --help` and light commands import no torch/onnx
    from edgekd.pipeline import QUICK_OVERRIDES, build as run_build  # lazy: `edgekd --help` and light commands import no torch/onnx

    from edgekd.config import parse_duration  # lazy: `edgekd --help` and light commands import no torch/onnx

    opts = overrides({"student.model": student, "data.dataset": dataset, "data.root": data_root, "data.unlabeled_root": unlabeled,
                      "data.target_test_root": target_test, "seed": seed, "target": target,
                      "export.allow_not_ready": True if allow_not_ready else None, "student.control": None if control else False,
                      "time_budget_s": parse_duration(time_budget) if time_budget else None,
                      "quantize.max_accuracy_drop": max_accuracy_drop, "quantize.exclude": layer_list(exclude)})
    recipe = load_recipe(config, (QUICK_OVERRIDES if quick else []) + (set_ or []) + opts)
    if print_config:
        typer.echo(recipe_to_yaml(recipe), nl=False)
        return
    result = run_build(recipe, out, recipe.target, str(targets_dir) if targets_dir else None, teacher, until)
    show_summary(result)
    emit(result, as_json)


def show_summary(result: dict) -> None:
    """The end of a build, in 80 columns: stages and times, what each stage bought, latency, the verdict, what to run next."""
    from edgekd.report import accuracy_table, latency_table  # lazy: `edgekd --help` and light commands import no torch/onnx

    budget = result.get("time_budget_s")
    rows = [[name, s["status"], f"{s['seconds']:.0f}"] + ([f"{s['budget_s']:.0f}" if s.get("budget_s") else "-"] if budget else [])
            for name, s in result["stages"].items()]
    ui.show(ui.table(f"edgekd build --target {result['target']}: {result['seconds'] / 60:.1f} min" + (f" of {budget / 60:.0f}" if budget else ""),
                     ["stage", "status", "seconds"] + (["budget s"] if budget else []), rows))
    report = result.get("report")
    if report:
        ui.show(accuracy_table(report))
        if report["latency"]:
            ui.show(latency_table(report))
        cpu = report.get("cpu_runtimes") or {}
        if cpu.get("runtimes"):
            from edgekd.bench.cpu_runtimes import runtime_rows  # lazy: `edgekd --help` and light commands import no torch/onnx

            ui.show(ui.table("CPU runtimes here, p50 ms (same files)", ["runtime", "batch", "FP32 ms", "INT8 ms", "speed-up"], runtime_rows(cpu)))
            ui.log(f"[bold]runtimes[/]: {cpu['verdict']}")
        for note in report["notes"]:
            ui.log(f"[dim]note: {note}[/]")
        ui.log(f"[bold]verdict[/]: {report['verdict']}")
        ui.log(f"report: {result.get('report_md')}")
        ui.log(f"next: {report['next']}")
    elif result.get("device_build"):
        ui.log(f"on the device: {result['device_build']}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the edgekd app."""
    app.command("build")(build)
