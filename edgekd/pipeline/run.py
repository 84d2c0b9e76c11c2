"""Orchestration: which stages run in which order, when a stage is up to date, and the loop
that runs them."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

from edgekd import ui
from edgekd.config import Recipe
from edgekd.errors import EdgekdError
from edgekd.manifest import Manifest, hold_run_folder
from edgekd.atomic import sha256_file, sha256_json
from edgekd.models import check_model_name
from edgekd.pipeline.context import STAGE_INPUTS, BuildContext
from edgekd.pipeline.delivery import export_precision, stage_bench, stage_bundle, stage_evaluate, stage_export, stage_report
from edgekd.pipeline.summary import summary
from edgekd.pipeline.training import stage_control, stage_distill, stage_qad, stage_teacher
from edgekd.targets import resolve
from edgekd.train.env import current as current_ranks, on_main


STAGES = ("teacher", "control", "distill", "qad", "export", "evaluate", "bench", "report", "bundle")
QUICK_OVERRIDES = [
    "data.train_subset=3000", "data.test_subset=1000",
    "teacher.input_size=48", "teacher.train.epochs=1",
    "student.train.epochs=3", "quantize.train.epochs=1", "quantize.calib_images=256",
    "bench.runs=50", "bench.warmup=5",
]


STAGE_FUNCS: dict[str, Callable[[BuildContext], tuple[dict, dict]]] = {
    "teacher": stage_teacher, "control": stage_control, "distill": stage_distill, "qad": stage_qad, "export": stage_export,
    "evaluate": stage_evaluate, "bench": stage_bench, "report": stage_report, "bundle": stage_bundle,
}


def stages_for(recipe: Recipe, target) -> list[str]:
    quantized = export_precision(recipe, target) == "int8" and recipe.quantize.enabled
    return [s for s in STAGES if (s != "qad" or quantized) and (s != "control" or recipe.student.control)]


def stage_config(recipe: Recipe, target, stage: str) -> dict:
    """The part of the recipe a stage depends on (so editing bench settings never retrains a teacher)."""
    rc = recipe.model_dump(mode="json")
    data = {k: v for k, v in rc["data"].items() if k not in ("cache_dir", "decode_workers")}  # where and how fast images decode changes no result
    common = {"seed": rc["seed"], "deterministic": rc["deterministic"], "data": data}
    return {
        "teacher": {**common, "teacher": rc["teacher"]},
        "control": {**common, "student": rc["student"]},
        "distill": {**common, "student": rc["student"], "distill": rc["distill"]},
        "qad": {**common, "quantize": rc["quantize"], "distill": rc["distill"], "student_augment": rc["student"]["augment"], "layout": target.layout},
        "export": {**common, "export": rc["export"], "quantize": rc["quantize"], "layout": target.layout, "precision": export_precision(recipe, target)},
        "evaluate": common,
        "bench": {"bench": rc["bench"], "target": target.to_dict()},
        "report": {"target": target.to_dict()},
        "bundle": {"target": target.to_dict(), "recipe": rc},
    }[stage]


def check_model_names(recipe: Recipe, teacher_checkpoint: Path | None) -> None:
    """Refuse an unknown student/teacher name at once, not after minutes of teacher fine-tuning."""
    named = [("student", recipe.student.model)] + ([] if teacher_checkpoint else [("teacher", recipe.teacher.model)])
    for role, name in named:
        check_model_name(role, name)


def stage_hash(ctx: BuildContext, stage: str) -> str:
    inputs = {f"{s}.{k}": ctx.sha(s, k) for s, k in STAGE_INPUTS.get(stage, ()) if ctx.manifest.stage(s) and k in ctx.manifest.stage(s).get("artifacts", {})}
    extra = {"teacher_checkpoint": str(ctx.teacher_checkpoint) if ctx.teacher_checkpoint else None,
             "teacher_sha": sha256_file(ctx.teacher_checkpoint) if ctx.teacher_checkpoint and stage == "teacher" else None}
    return sha256_json({"stage": stage, "config": stage_config(ctx.recipe, ctx.target, stage), "inputs": inputs, **extra})


TRAINING_FOLDERS = {"teacher": "teacher", "control": "control", "distill": "student", "qad": "qad"}  # where each training stage resumes from


def drop_stale_training(ctx: BuildContext, stage: str, config_hash: str) -> None:
    """A training stage resumes from its folder's ``last.pt`` only when that run had this stage's
    settings and inputs (an interrupted build). After a recipe edit or a new upstream model the
    stage starts over: resuming would continue, or refuse, another run's training."""
    entry, folder = ctx.manifest.stage(stage), TRAINING_FOLDERS.get(stage)
    if folder and entry and entry.get("config_hash") != config_hash and (ctx.out / folder).exists():
        shutil.rmtree(ctx.out / folder)
        ui.log(f"[dim]{stage}: its settings or inputs changed since the last run; training starts over[/]")


def _open_stage(ctx: BuildContext, stage: str) -> dict:
    """Rank 0's start of a stage: skip it when up to date, else record it as running and give it its time limit."""
    h = stage_hash(ctx, stage)
    if ctx.manifest.is_done(stage, h):
        ui.log(f"[dim]{stage}: up to date, skipped[/]")
        return {"skip": True, "manifest": ctx.manifest.data}
    drop_stale_training(ctx, stage, h)
    limit = ctx.time_limit(stage)
    ui.log(f"[bold]{stage}[/] ..." + (f" (time budget share: {limit:.0f} s)" if limit else ""))
    ctx.manifest.start(stage, h)
    return {"skip": False, "limit": limit, "manifest": ctx.manifest.data}


def run_stage(ctx: BuildContext, stage: str) -> dict:
    """Run one stage (or skip it when up to date). Under torchrun rank 0 decides, and keeps the
    manifest; the training stages run on every rank, the others on rank 0 while the rest wait."""
    opened = on_main(lambda: _open_stage(ctx, stage))
    ctx.manifest.data = opened["manifest"]  # rank 0's manifest, on every rank (only rank 0 writes it)
    if opened["skip"]:
        return {"status": "skipped", "seconds": 0.0, "metrics": ctx.manifest.stage(stage).get("metrics", {})}
    limit = ctx.stage_limit = opened["limit"]
    t0 = time.time()
    ranks = current_ranks()
    artifacts: dict = {}
    metrics: dict = {}
    if stage in TRAINING_FOLDERS or ranks.is_main:
        ctx.running = stage
        try:
            with ui.heartbeat(stage):
                artifacts, metrics = STAGE_FUNCS[stage](ctx)
        finally:
            ctx.running = None
    entry, ctx.manifest.data = on_main(lambda: (ctx.manifest.finish(stage, artifacts, metrics), ctx.manifest.data))
    return {"status": "done", "seconds": round(time.time() - t0, 2), "metrics": entry["metrics"], "budget_s": limit}


def build(recipe: Recipe, out: str | Path, target_name: str | None = None, targets_dir: str | None = None,
          teacher_checkpoint: str | Path | None = None, until: str | None = None) -> dict:
    """Run every stage for ``target_name`` into ``out``; returns the machine-readable summary.
    Under torchrun every rank calls this; only rank 0 locks and writes ``out``."""
    loaded = resolve(target_name or recipe.target, targets_dir)
    target = loaded.target
    check_model_names(recipe, Path(teacher_checkpoint) if teacher_checkpoint else None)
    out = Path(out).resolve()  # stage functions return absolute paths; the manifest stores them relative to the run folder
    if not current_ranks().is_main:
        return _build_locked(recipe, out, target, teacher_checkpoint, until)
    out.mkdir(parents=True, exist_ok=True)
    with hold_run_folder(out) as stale:
        if stale:
            ui.log(f"[dim]removed {len(stale)} temporary file(s) left by an interrupted run[/]")
        return _build_locked(recipe, out, target, teacher_checkpoint, until)


def _build_locked(recipe: Recipe, out: Path, target, teacher_checkpoint: str | Path | None, until: str | None) -> dict:
    main = current_ranks().is_main
    ctx = BuildContext(recipe, out, target, Manifest(out), Path(teacher_checkpoint).resolve() if teacher_checkpoint else None)
    if main:  # the other ranks only read: rank 0's manifest reaches them at every stage (run_stage)
        ctx.manifest.data["recipe"] = recipe.model_dump(mode="json")
        ctx.manifest.data["target"] = target.to_dict()
        ctx.manifest.save()
    order = stages_for(recipe, target)
    ctx.order = order
    if until is not None and until not in order:
        raise EdgekdError(f"unknown stage '{until}'", f"use one of: {', '.join(order)}")
    stages: dict[str, dict] = {}
    t0 = time.time()
    for stage in order:
        stages[stage] = run_stage(ctx, stage)
        if stage == until:
            break
    return on_main(lambda: _verified_summary(ctx, stages, time.time() - t0))


def _verified_summary(ctx: BuildContext, stages: dict[str, dict], seconds: float) -> dict:
    problems = ctx.manifest.verify()
    if problems:
        raise EdgekdError(f"manifest check failed after build: {problems[0]}", "rerun the build; a file was changed while it ran")
    return summary(ctx, stages, seconds)
