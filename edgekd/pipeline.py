"""`edgekd build`: the only module that knows the stage order.

    teacher (finetune) -> control (the student alone) -> distill (FP32 student; ships the better of
    distilled and control) -> qad (INT8 fake-quant + KD) -> export (ONNX per target layout, checks)
    -> evaluate (accuracy of the exported file) -> bench (latency here) -> report (what each stage
    bought: table, report.md, report.png) -> bundle (folder + .tar.gz for the device)

With a time budget (``--time-budget 20m``) the training stages share it out (:data:`TIME_SHARES`):
each gets its share of what is left when it starts, and reports what it used.

Stages pass artifacts as files recorded in ``<out>/manifest.json`` with their sha256. A stage is
skipped when its config and the checksums of its inputs are unchanged and its outputs are intact;
an interrupted stage reruns, and training stages resume from their own ``last.pt``. So running
``build`` twice does no work the second time, and killing it mid-stage loses at most one epoch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgekd import ui
from edgekd.config import Recipe
from edgekd.errors import EdgekdError
from edgekd.manifest import Manifest, hold_run_folder, sha256_file, sha256_json, write_bytes_atomic, write_json_atomic

STAGES = ("teacher", "control", "distill", "qad", "export", "evaluate", "bench", "report", "bundle")
DEFAULT_TIME_BUDGET_S = 20 * 60  # for the stages whose length edgekd sizes itself, unless the recipe sets time_budget_s
# Shares of what is left of the budget when each training stage starts (the rest: the teacher-output
# cache, export, evaluation, bench, report, bundle). Control and distill get the same share: the
# control is the student alone *with the same budget*.
TIME_SHARES = {"teacher": 0.25, "control": 0.23, "distill": 0.23, "qad": 0.06}
TIME_RESERVE = 0.23
QUICK_OVERRIDES = [
    "data.train_subset=3000", "data.test_subset=1000",
    "teacher.input_size=48", "teacher.train.epochs=1",
    "student.train.epochs=3", "quantize.train.epochs=1", "quantize.calib_images=256",
    "bench.runs=50", "bench.warmup=5",
]


@dataclass
class BuildContext:
    recipe: Recipe
    out: Path
    target: Any  # edgekd.targets.Target
    manifest: Manifest
    teacher_checkpoint: Path | None = None
    _data: Any = None
    results: dict[str, dict] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    order: list[str] = field(default_factory=list)
    stage_limit: float | None = None  # the running stage's time limit, set by run_stage

    def time_limit(self, stage: str) -> float | None:
        """This training stage's share of what is left of the build's time budget (None: no limit).
        The default budget applies only to stages whose length edgekd sizes (``min_steps`` > 0):
        a recipe's explicit epochs are not cut unless it also sets a budget."""
        explicit = self.recipe.time_budget_s is not None
        budget = self.recipe.time_budget_s if explicit else DEFAULT_TIME_BUDGET_S
        if not budget or stage not in TIME_SHARES or (not explicit and self.train_config(stage).min_steps == 0):
            return None
        pending = [s for s in self.order[self.order.index(stage):] if s in TIME_SHARES]
        left = budget - (time.time() - self.started)
        share = TIME_SHARES[stage] / (sum(TIME_SHARES[s] for s in pending) + TIME_RESERVE)
        return round(max(10.0, left * share), 1)

    def train_config(self, stage: str):
        rc = self.recipe
        return {"teacher": rc.teacher.train, "control": rc.student.train, "distill": rc.student.train, "qad": rc.quantize.train}[stage]

    def limited(self, train):
        """``train`` (a TrainConfig) with the running stage's time limit, when the build has a budget."""
        return train if self.stage_limit is None else train.model_copy(update={"time_limit_s": self.stage_limit})

    @property
    def data(self):
        """The dataset, loaded once and shared by every stage that needs it."""
        if self._data is None:
            from edgekd.finetune import load_data

            self._data = load_data(self.recipe.data, self.recipe.seed, store_size=max(64, self.recipe.teacher.input_size))
        return self._data

    def path(self, stage: str, key: str) -> Path:
        return self.manifest.artifact_path(stage, key)

    def sha(self, stage: str, key: str) -> str:
        return self.manifest.stage(stage)["artifacts"][key]["sha256"]


# ----------------------------------------------------------------------------- stages
def stage_teacher(ctx: BuildContext) -> tuple[dict, dict]:
    if ctx.teacher_checkpoint is not None:
        from edgekd.models import load_checkpoint

        ck = load_checkpoint(ctx.teacher_checkpoint)  # validates it before anything builds on it
        # A copy inside the run folder: the manifest only records (and trusts) files under --out.
        copy = write_bytes_atomic(ctx.out / "teacher" / "provided.pt", ctx.teacher_checkpoint.read_bytes())
        return {"checkpoint": copy}, {"provided": True, "model": ck["model"]["name"], "source": str(ctx.teacher_checkpoint)}
    from edgekd.finetune import run_finetune

    cfg = ctx.recipe.teacher.model_copy(update={"train": ctx.limited(ctx.recipe.teacher.train)})
    r = run_finetune(cfg, ctx.recipe.data, ctx.out / "teacher", ctx.recipe.seed, ctx.recipe.deterministic, data=ctx.data)
    return {"checkpoint": r["checkpoint"], "metrics": r["metrics_file"]}, {**training_metrics(r["metrics"]), "model": cfg.model}


def training_metrics(m: dict) -> dict:
    """What the manifest keeps of a training stage's metrics.json."""
    return {"val_top1": m["val"]["top1"], "val_n": m["val"].get("n"), "test_top1": m["test"]["top1"], "params": m.get("params"),
            "train_seconds": m["train_seconds"], "stopped": m.get("stopped"), "plan": m.get("plan")}


def stage_control(ctx: BuildContext) -> tuple[dict, dict]:
    """The student alone on hard labels, same budget: what distillation has to beat."""
    from edgekd.control import run_control

    rc = ctx.recipe
    student = rc.student.model_copy(update={"train": ctx.limited(rc.student.train)})
    r = run_control(student, rc.data.model_copy(update={"augment": rc.student.augment}), ctx.out / "control", ctx.data, rc.seed, rc.deterministic)
    return {"checkpoint": r["checkpoint"], "metrics": r["metrics_file"]}, training_metrics(r["metrics"])


def choose_student(distilled: dict, control: dict | None, rule: str) -> tuple[str, str | None]:
    """("distilled" | "control", why): the control ships only when it beat distillation on
    validation and the recipe allows it (``distill.ship: better``)."""
    if control is None or control.get("val_top1") is None or rule != "better":
        return "distilled", None
    if control["val_top1"] > distilled["val_top1"]:
        return "control", (f"distillation lost to the student alone on validation ({100 * distilled['val_top1']:.2f}% vs "
                           f"{100 * control['val_top1']:.2f}%): the control ships (distill.ship=distilled ships the distilled one)")
    return "distilled", None


def stage_distill(ctx: BuildContext) -> tuple[dict, dict]:
    from edgekd.distill import run_distill

    rc = ctx.recipe
    data_cfg = rc.data.model_copy(update={"augment": rc.student.augment})
    student = rc.student.model_copy(update={"train": ctx.limited(rc.student.train)})
    r = run_distill([ctx.path("teacher", "checkpoint")], student, rc.distill, data_cfg, ctx.out / "student", rc.seed, rc.deterministic,
                    data=ctx.data, cache_dir=ctx.out / "cache")
    metrics = {**training_metrics(r["metrics"]), "teacher_weaker_than_student": r["metrics"].get("teacher_weaker_than_student")}
    control = ctx.manifest.stage("control")["metrics"] if "control" in ctx.order else None
    shipped, why = choose_student(metrics, control, rc.distill.ship)
    if why:
        ui.warn(why)
    chosen = r["checkpoint"] if shipped == "distilled" else ctx.path("control", "checkpoint")
    return {"checkpoint": r["checkpoint"], "metrics": r["metrics_file"], "shipped_checkpoint": chosen}, {**metrics, "shipped_student": shipped, "ship_reason": why}


def stage_qad(ctx: BuildContext) -> tuple[dict, dict]:
    """Quantization-aware distillation: the INT8 fake-quant student keeps learning from the FP32 teacher."""
    from edgekd.distill import build_distill_loss, load_teacher
    from edgekd.quantize import run_qad

    rc = ctx.recipe
    teacher = load_teacher(ctx.path("teacher", "checkpoint"))
    augment = rc.student.augment

    def make_loss(qstudent):
        return build_distill_loss(qstudent, [teacher], rc.distill, ctx.data, ctx.out / "cache", augment)

    cfg = rc.quantize if rc.quantize.layout != "auto" else rc.quantize.model_copy(update={"layout": ctx.target.layout})
    cfg = cfg.model_copy(update={"train": ctx.limited(cfg.train)})
    r = run_qad(ctx.path("distill", "shipped_checkpoint"), cfg, ctx.data, ctx.out / "qad", make_loss, rc.seed, augment)
    m = r["metrics"]
    return {"checkpoint": r["checkpoint"], "metrics": r["metrics_file"]}, {**training_metrics(m), "fp32_val_top1": m.get("fp32_val_top1"),
                                                                             "ptq_val_top1": m.get("ptq_val_top1"), "ptq_test_top1": m.get("ptq_test_top1"),
                                                                             "result": m.get("result")}


def stage_export(ctx: BuildContext) -> tuple[dict, dict]:
    from edgekd.export import run_export

    rc, t = ctx.recipe, ctx.target
    precision = export_precision(rc, t)
    source = "qad" if precision == "int8" and rc.quantize.enabled else "distill"
    layout = rc.export.layout if rc.export.layout != "auto" else t.layout
    export_cfg = rc.export.model_copy(update={"precision": precision, "layout": layout})
    r = run_export(ctx.path("qad", "checkpoint") if source == "qad" else ctx.path("distill", "shipped_checkpoint"), ctx.out / "export", ctx.data, export_cfg, rc.quantize, t.name, rc.seed)
    artifacts = {"onnx": r["path"], "record": str(ctx.out / "export" / "export.json")}
    if r.get("fp32_path"):
        artifacts["fp32_onnx"] = r["fp32_path"]
    checks = r.get("checks", {})
    return artifacts, {"precision": precision, "layout": r.get("layout"), "source": source, "checks": checks, "comparison": r.get("comparison"),
                       "relu_codes": r.get("relu_codes")}


def onnx_test_accuracy(onnx_path: Path, data, preprocess, exact_qdq: bool = False) -> dict:
    """Top-1 of the exported file itself on the whole test set (what ships is what is measured).

    ``exact_qdq`` for a TensorRT-layout file: its Q/DQ run as written, TensorRT's arithmetic
    (see :func:`edgekd.export.ort_session`)."""
    from edgekd.export import ort_logits, ort_session
    from edgekd.metrics import classification_metrics

    sess = ort_session(onnx_path, exact_qdq=exact_qdq)
    preds = []
    for start in range(0, len(data.test), 500):
        x = preprocess(data.test.images[start : start + 500]).numpy()
        preds.append(ort_logits(sess, x).argmax(1))
    return classification_metrics(np.concatenate(preds), data.test.labels.numpy(), data.classes)


def stage_evaluate(ctx: BuildContext) -> tuple[dict, dict]:
    from edgekd.models import load_checkpoint
    from edgekd.data import Preprocess

    pre = Preprocess.from_dict(load_checkpoint(ctx.path("distill", "checkpoint"))["preprocess"])
    export = ctx.manifest.stage("export")["metrics"]
    shipped = onnx_test_accuracy(ctx.path("export", "onnx"), ctx.data, pre, exact_qdq=export.get("precision") == "int8" and export.get("layout") == "tensorrt")
    metrics = {"test_top1": shipped["top1"], "per_class": shipped["per_class"], "n": shipped["n"], "precision": export.get("precision", "").upper()}
    if "fp32_onnx" in ctx.manifest.stage("export")["artifacts"]:
        fp32 = onnx_test_accuracy(ctx.path("export", "fp32_onnx"), ctx.data, pre)
        metrics["fp32_test_top1"] = fp32["top1"]
        drop = fp32["top1"] - shipped["top1"]
        metrics["int8_drop_points"] = round(100 * drop, 3)
        if drop > 0.003:
            ui.warn(f"the shipped INT8 model is {100 * drop:.2f} points less accurate than FP32 on the test set ({shipped['top1']:.4f} vs {fp32['top1']:.4f})")
    out = ctx.out / "evaluate.json"
    write_json_atomic(out, metrics)
    return {"record": out}, metrics


def stage_bench(ctx: BuildContext) -> tuple[dict, dict]:
    """Latency here, on this machine's runtime for the target (onnxruntime CPU when the target's runtime is absent)."""
    from edgekd.bench import BenchRequest, TimingPlan, run_bench
    from edgekd.targets import accelerator_present

    rc, t = ctx.recipe, ctx.target
    avail = accelerator_present(t)
    runtime = t.runtime if avail.ok else "ort-cpu"
    if not avail.ok:
        ui.log(f"target runtime {t.runtime} is not available here ({avail.reason}); timing on onnxruntime CPU instead")
    batches = sorted({1, t.batch, *rc.bench.batches})
    plan = TimingPlan(warmup=rc.bench.warmup, runs=rc.bench.runs)
    threads = rc.bench.threads or t.threads
    results = {}
    for key in ("onnx", "fp32_onnx"):
        if key in ctx.manifest.stage("export")["artifacts"]:
            results[key] = run_bench(BenchRequest(model=str(ctx.path("export", key)), runtime=runtime, batches=batches, plan=plan, threads=threads, target=t.name))
    shipped = results["onnx"]
    metrics: dict[str, Any] = {
        "runtime": runtime, "on_target_runtime": avail.ok, "reason": None if avail.ok else avail.reason,
        "latency_ms": {str(s["batch"]): {k: s[k] for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "throughput")} for s in shipped["sweep"]},
        "fingerprint": shipped["fingerprint"],
    }
    if "fp32_onnx" in results:
        fp32 = {s["batch"]: s["p50_ms"] for s in results["fp32_onnx"]["sweep"]}
        metrics["fp32_p50_ms"] = {str(b): v for b, v in fp32.items()}
        metrics["speedup_vs_fp32"] = {str(s["batch"]): round(fp32[s["batch"]] / s["p50_ms"], 3) for s in shipped["sweep"] if s["batch"] in fp32}
        slower = [b for b, x in metrics["speedup_vs_fp32"].items() if x < 1.0]
        if slower and runtime == "ort-cpu" and t.layout == "ort-cpu":
            ui.warn(f"the INT8 model is SLOWER than FP32 on {runtime} at batch "
                    + ", ".join(f"{b} ({metrics['speedup_vs_fp32'][b]:.2f}x FP32's speed)" for b in slower))
    if avail.ok:
        metrics["within_budget"] = {"1": metrics["latency_ms"]["1"]["p50_ms"] <= t.latency_budget.batch1_ms}
    out = ctx.out / "bench.json"
    write_json_atomic(out, {"metrics": metrics, "results": results})
    return {"record": out}, metrics


def stage_report(ctx: BuildContext) -> tuple[dict, dict]:
    """report.json / report.md / report.png: what each stage bought, from the manifest's metrics."""
    from edgekd.report import build_report, markdown, plot

    stages = {k: v.get("metrics", {}) for k, v in ctx.manifest.data["stages"].items() if v.get("status") == "done"}
    report = build_report(stages, ctx.target.to_dict(), {"bundle": str(ctx.out / "bundle"), "bundle_tar": str(ctx.out / "bundle.tar.gz")})
    folder = ctx.out / "report"
    folder.mkdir(exist_ok=True)
    write_json_atomic(folder / "report.json", report)
    write_bytes_atomic(folder / "report.md", markdown(report, f"edgekd build --target {ctx.target.name}").encode())
    plot(report, folder / "report.png")
    return {"json": folder / "report.json", "md": folder / "report.md", "png": folder / "report.png"}, report


def stage_bundle(ctx: BuildContext) -> tuple[dict, dict]:
    from edgekd.bundle import make_bundle
    from edgekd.models import load_checkpoint

    ck = load_checkpoint(ctx.path("distill", "shipped_checkpoint"))
    onnx_files = {"model": ctx.path("export", "onnx")}
    if "fp32_onnx" in ctx.manifest.stage("export")["artifacts"]:
        onnx_files["fp32"] = ctx.path("export", "fp32_onnx")
    ev, be = ctx.manifest.stage("evaluate")["metrics"], ctx.manifest.stage("bench")["metrics"]
    metrics = {"accuracy": {"test_top1": ev["test_top1"], "fp32_test_top1": ev.get("fp32_test_top1"), "n": ev["n"]},
               "latency_host": {"runtime": be["runtime"], "on_target_runtime": be["on_target_runtime"], "ms": be["latency_ms"], "fingerprint": be["fingerprint"]},
               "export_checks": ctx.manifest.stage("export")["metrics"].get("checks")}
    extra = {"recipe": ctx.recipe.model_dump(mode="json"), "stages": {k: v.get("config_hash") for k, v in ctx.manifest.data["stages"].items()}}
    report = {f"report/report.{k}": ctx.path("report", k) for k in ("md", "png", "json")}
    bundle_dir = make_bundle(ctx.out / "bundle", onnx_files, "model", ck["classes"], ck["preprocess"], ctx.target.to_dict(), metrics, extra, attachments=report)
    tar = Path(str(bundle_dir) + ".tar.gz")
    arts = {"bundle_json": bundle_dir / "bundle.json"}
    if tar.is_file():
        arts["tar"] = tar
    return arts, {"bundle": str(bundle_dir)}


STAGE_FUNCS: dict[str, Callable[[BuildContext], tuple[dict, dict]]] = {
    "teacher": stage_teacher, "control": stage_control, "distill": stage_distill, "qad": stage_qad, "export": stage_export,
    "evaluate": stage_evaluate, "bench": stage_bench, "report": stage_report, "bundle": stage_bundle,
}


# ----------------------------------------------------------------------------- orchestration
def export_precision(recipe: Recipe, target) -> str:
    """The target decides unless the recipe asks for something else than its default int8."""
    return recipe.export.precision if recipe.export.precision != "int8" else target.precision


def stages_for(recipe: Recipe, target) -> list[str]:
    quantized = export_precision(recipe, target) == "int8" and recipe.quantize.enabled
    return [s for s in STAGES if (s != "qad" or quantized) and (s != "control" or recipe.student.control)]


def _inputs(stage: str) -> list[tuple[str, str]]:
    """(stage, artifact) pairs whose checksums are part of ``stage``'s identity."""
    return {
        "distill": [("teacher", "checkpoint"), ("control", "checkpoint")],
        "qad": [("teacher", "checkpoint"), ("distill", "shipped_checkpoint")],
        "export": [("qad", "checkpoint"), ("distill", "shipped_checkpoint")],
        "evaluate": [("export", "onnx")],
        "bench": [("export", "onnx")],
        "report": [("evaluate", "record"), ("bench", "record")],
        "bundle": [("export", "onnx"), ("evaluate", "record"), ("bench", "record"), ("report", "json")],
    }.get(stage, [])


def stage_config(recipe: Recipe, target, stage: str) -> dict:
    """The part of the recipe a stage depends on (so editing bench settings never retrains a teacher)."""
    rc = recipe.model_dump(mode="json")
    common = {"seed": rc["seed"], "deterministic": rc["deterministic"], "data": rc["data"]}
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
    import timm

    from edgekd.models import list_students

    students = [s.name for s in list_students()]
    named = [("student", recipe.student.model)] + ([] if teacher_checkpoint else [("teacher", recipe.teacher.model)])
    for role, name in named:
        if name not in students and not timm.is_model(name):
            raise EdgekdError(f"unknown {role} model '{name}'", f"use one of {', '.join(students)} (see `edgekd models`) or a timm model name")


def stage_hash(ctx: BuildContext, stage: str) -> str:
    inputs = {f"{s}.{k}": ctx.sha(s, k) for s, k in _inputs(stage) if ctx.manifest.stage(s) and k in ctx.manifest.stage(s).get("artifacts", {})}
    extra = {"teacher_checkpoint": str(ctx.teacher_checkpoint) if ctx.teacher_checkpoint else None,
             "teacher_sha": sha256_file(ctx.teacher_checkpoint) if ctx.teacher_checkpoint and stage == "teacher" else None}
    return sha256_json({"stage": stage, "config": stage_config(ctx.recipe, ctx.target, stage), "inputs": inputs, **extra})


def run_stage(ctx: BuildContext, stage: str) -> dict:
    h = stage_hash(ctx, stage)
    if ctx.manifest.is_done(stage, h):
        entry = ctx.manifest.stage(stage)
        ui.log(f"[dim]{stage}: up to date, skipped[/]")
        return {"status": "skipped", "seconds": 0.0, "metrics": entry.get("metrics", {})}
    limit = ctx.stage_limit = ctx.time_limit(stage)
    ui.log(f"[bold]{stage}[/] ..." + (f" (time budget share: {limit:.0f} s)" if limit else ""))
    ctx.manifest.start(stage, h)
    t0 = time.time()
    with ui.heartbeat(stage):
        artifacts, metrics = STAGE_FUNCS[stage](ctx)
    entry = ctx.manifest.finish(stage, artifacts, metrics)
    return {"status": "done", "seconds": round(time.time() - t0, 2), "metrics": entry["metrics"], "budget_s": limit}


def build(recipe: Recipe, out: str | Path, target_name: str | None = None, targets_dir: str | None = None,
          teacher_checkpoint: str | Path | None = None, until: str | None = None) -> dict:
    """Run every stage for ``target_name`` into ``out``; returns the machine-readable summary."""
    from edgekd.targets import resolve

    loaded = resolve(target_name or recipe.target, targets_dir)
    target = loaded.target
    check_model_names(recipe, Path(teacher_checkpoint) if teacher_checkpoint else None)
    out = Path(out).resolve()  # stage functions return absolute paths; the manifest stores them relative to the run folder
    out.mkdir(parents=True, exist_ok=True)
    with hold_run_folder(out) as stale:
        if stale:
            ui.log(f"[dim]removed {len(stale)} temporary file(s) left by an interrupted run[/]")
        return _build_locked(recipe, out, target, teacher_checkpoint, until)


def _build_locked(recipe: Recipe, out: Path, target, teacher_checkpoint: str | Path | None, until: str | None) -> dict:
    ctx = BuildContext(recipe, out, target, Manifest(out), Path(teacher_checkpoint).resolve() if teacher_checkpoint else None)
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
    problems = ctx.manifest.verify()
    if problems:
        raise EdgekdError(f"manifest check failed after build: {problems[0]}", "rerun the build; a file was changed while it ran")
    return summary(ctx, stages, time.time() - t0)


def check_passed(check: Any) -> Any:
    """One export check's outcome for the summary: its ``ok``, or for the agreement check
    (which records numbers, not a verdict) its top-1 agreement."""
    if not isinstance(check, dict):
        return check
    return check["ok"] if "ok" in check else check.get("top1_agreement")


def summary(ctx: BuildContext, stages: dict[str, dict], seconds: float) -> dict:
    m = ctx.manifest
    result: dict[str, Any] = {"target": ctx.target.name, "out": str(ctx.out), "manifest": str(m.path), "seconds": round(seconds, 2),
                              "stages": {k: {"status": v["status"], "seconds": v["seconds"], "budget_s": v.get("budget_s")} for k, v in stages.items()},
                              "time_budget_s": (ctx.recipe.time_budget_s or DEFAULT_TIME_BUDGET_S) if any(v.get("budget_s") for v in stages.values()) else None}
    if m.stage("bundle") and m.stage("bundle").get("status") == "done":
        result["bundle"] = m.stage("bundle")["metrics"]["bundle"]
        tar = m.stage("bundle")["artifacts"].get("tar")
        result["bundle_tar"] = str(ctx.out / tar["path"]) if tar else None
    if m.stage("export") and m.stage("export").get("status") == "done":
        result["onnx"] = str(m.artifact_path("export", "onnx").resolve())
        result["precision"] = m.stage("export")["metrics"]["precision"]
        result["layout"] = m.stage("export")["metrics"]["layout"]
        checks = m.stage("export")["metrics"].get("checks") or {}
        result["checks"] = {k: check_passed(v) for k, v in checks.items()}
    if m.stage("evaluate") and m.stage("evaluate").get("status") == "done":
        ev = m.stage("evaluate")["metrics"]
        result["accuracy"] = ev["test_top1"]
        result["fp32_accuracy"] = ev.get("fp32_test_top1")
    if m.stage("distill") and m.stage("distill").get("status") == "done":
        result["params"] = m.stage("distill")["metrics"].get("params")
    if m.stage("teacher") and m.stage("teacher").get("status") == "done":
        result["teacher_accuracy"] = m.stage("teacher")["metrics"].get("test_top1")
    if m.stage("bench") and m.stage("bench").get("status") == "done":
        b = m.stage("bench")["metrics"]
        result["latency_ms"] = b["latency_ms"]["1"]["p50_ms"]
        result["latency"] = {"runtime": b["runtime"], "on_target_runtime": b["on_target_runtime"], "p50_ms_by_batch": {k: v["p50_ms"] for k, v in b["latency_ms"].items()},
                             "speedup_vs_fp32": b.get("speedup_vs_fp32")}
    if m.stage("report") and m.stage("report").get("status") == "done":
        result["report"] = m.stage("report")["metrics"]
        result["report_md"] = str(m.artifact_path("report", "md"))
    if ctx.target.runtime == "tensorrt" and result.get("bundle"):
        result["device_build"] = f"cd {Path(result['bundle']).name} && sh engine/build_engine.sh"
    return result
