"""`edgekd build`: the whole pipeline for one target, resumable, ending in a deployment bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from edgekd import ui
from edgekd.cli_options import AllowNotReadyOpt, ConfigOpt, DataRootOpt, DatasetOpt, JsonOpt, SeedOpt, SetOpt, emit, overrides


def build(
    target: Annotated[Optional[str], typer.Option("--target", "-t", help="Deployment target (see `edgekd targets list`); 'jetson' = jetson-orin-nano. \\[default: the recipe's, x86-cpu]")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: stage outputs, manifest.json, bundle/ and bundle.tar.gz.")] = Path("runs/build"),
    student: Annotated[Optional[str], typer.Option(help="Student model (see `edgekd models`). \\[default: nano_cnn]")] = None,
    teacher: Annotated[Optional[Path], typer.Option(help="Use this teacher checkpoint instead of fine-tuning one.")] = None,
    dataset: DatasetOpt = None,
    data_root: DataRootOpt = None,
    seed: SeedOpt = None,
    quick: Annotated[bool, typer.Option("--quick", help="A first look in a few minutes: 3,000 images, 1 teacher epoch at 48 px, 3 student epochs.")] = False,
    until: Annotated[Optional[str], typer.Option(help="Stop after this stage (teacher, distill, qad, export, evaluate, bench, bundle).")] = None,
    targets_dir: Annotated[Optional[Path], typer.Option(help="Extra folder of target .toml files (also $EDGEKD_TARGETS_DIR).")] = None,
    allow_not_ready: AllowNotReadyOpt = False,
    print_config: Annotated[bool, typer.Option("--print-config", help="Print the full recipe (every default, after overrides) as YAML and exit.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Fine-tune -> distill -> quantization-aware distill -> export -> evaluate -> bench -> bundle, for one target.

    Every stage writes into --out with a manifest (config, sha256 of every artifact, metrics,
    timings). Rerunning skips finished stages; an interrupted build resumes where it stopped.

    Examples:

      edgekd build --target jetson-orin-nano

      edgekd build --target x86-cpu --quick --out runs/quick --json

      edgekd build --print-config > my-recipe.yaml; edgekd build -c my-recipe.yaml --set student.train.epochs=20
    """
    from edgekd.config import load_recipe, recipe_to_yaml
    from edgekd.pipeline import QUICK_OVERRIDES, build as run_build

    opts = overrides({"student.model": student, "data.dataset": dataset, "data.root": data_root, "seed": seed, "target": target,
                      "export.allow_not_ready": True if allow_not_ready else None})
    recipe = load_recipe(config, (QUICK_OVERRIDES if quick else []) + (set_ or []) + opts)
    if print_config:
        typer.echo(recipe_to_yaml(recipe), nl=False)
        return
    result = run_build(recipe, out, recipe.target, str(targets_dir) if targets_dir else None, teacher, until)
    rows = [[name, s["status"], f"{s['seconds']:.1f}"] for name, s in result["stages"].items()]
    ui.show(ui.table(f"edgekd build --target {result['target']}", ["stage", "status", "seconds"], rows))
    if "accuracy" in result:
        lat = result.get("latency", {})
        ui.show(ui.table("shipped model", ["precision", "layout", "test top-1", "FP32 top-1", "params", "p50 ms (batch 1)", "runtime", "speed-up vs FP32", "bundle"],
                         [[result.get("precision"), result.get("layout"), result.get("accuracy"), result.get("fp32_accuracy"), result.get("params"),
                           result.get("latency_ms"), lat.get("runtime"), lat.get("speedup_vs_fp32"), result.get("bundle_tar") or result.get("bundle")]]))
    if result.get("device_build"):
        ui.log(f"on the device: {result['device_build']}")
    emit(result, as_json)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the edgekd app."""
    app.command("build")(build)
