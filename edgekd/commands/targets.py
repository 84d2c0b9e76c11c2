"""CLI commands for targets (issue 5): `edgekd targets list` and `edgekd targets show NAME`.

Example: edgekd targets list --targets-dir ./my-targets
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from edgekd import ui
from edgekd.cli_options import JsonOpt, emit
from edgekd.targets import accelerator_present, load_targets, resolve

TargetsDirOpt = Annotated[Optional[Path], typer.Option("--targets-dir", help="Extra folder of NAME.toml target files (also $EDGEKD_TARGETS_DIR); overrides shipped targets of the same name.")]


def list_targets(targets_dir: TargetsDirOpt = None, as_json: JsonOpt = False) -> None:
    """List deployment targets: runtime, precision, layout, batch, power mode, and whether this machine can run it.

    Example: edgekd targets list --json
    """
    rows = []
    for name, lt in load_targets(targets_dir).items():
        t = lt.target
        here = accelerator_present(t)
        rows.append({"name": name, "aliases": t.aliases, "runtime": t.runtime, "precision": t.precision, "layout": t.layout, "batch": t.batch,
                     "tensorrt": t.tensorrt, "jetpack": t.jetpack, "dla_core": t.dla.core, "power": f"{t.power.id}:{t.power.name}" if t.power else None,
                     "budget_ms": [t.latency_budget.batch1_ms, t.latency_budget.batch_ms], "runs_here": here.ok, "why": here.reason, "file": str(lt.path)})
    ui.show(ui.table("edgekd targets (`targets show NAME` for details)", ["name", "runtime", "prec/layout", "batch", "TRT/JP", "DLA", "nvpmodel", "budget ms b1/bN", "here"],
                     [[r["name"] + (f" ({', '.join(r['aliases'])})" if r["aliases"] else ""), r["runtime"], f"{r['precision']}/{r['layout']}", r["batch"],
                       "/".join(v for v in (r["tensorrt"], r["jetpack"]) if v) or None, r["dla_core"], r["power"],
                       f"{r['budget_ms'][0]}/{r['budget_ms'][1]}", "yes" if r["runs_here"] else "no"] for r in rows]))
    emit({"targets": rows}, as_json)


def show_target(
    name: Annotated[str, typer.Argument(help="Target name or alias (e.g. jetson).")],
    targets_dir: TargetsDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one target's full definition and the file it came from.

    Example: edgekd targets show jetson
    """
    lt = resolve(name, targets_dir)
    data = lt.target.to_dict()
    here = accelerator_present(lt.target)
    flat = _flatten(data)
    ui.show(ui.table(f"target {lt.target.name} ({lt.path})", ["field", "value"], [[k, v] for k, v in flat.items()] + [["runs here", f"{here.ok}: {here.reason}"]]))
    emit({"target": data, "file": str(lt.path), "runs_here": here.ok, "why": here.reason}, as_json)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = ", ".join(map(str, v)) if isinstance(v, list) else v
    return out


def register(app: typer.Typer) -> None:
    """Add this module's commands to the edgekd app."""
    group = typer.Typer(help="Deployment targets (targets/*.toml, --targets-dir, $EDGEKD_TARGETS_DIR).", no_args_is_help=True)
    group.command("list")(list_targets)
    group.command("show")(show_target)
    app.add_typer(group, name="targets")
