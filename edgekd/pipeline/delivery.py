"""The stages after training: export (ONNX per target layout), evaluate (accuracy of the
exported file), bench (latency here), report (what each stage bought) and bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgekd import ui
from edgekd.atomic import write_bytes_atomic, write_json_atomic
from edgekd.bench import BenchRequest, TimingPlan, run_bench
from edgekd.bench.cpu_runtimes import compare_cpu_runtimes
from edgekd.bundle import BundleModel, make_bundle
from edgekd.config import Recipe
from edgekd.data import Preprocess
from edgekd.export import ExportJob, ort_logits, run_export
from edgekd.export.openvino_layout import openvino_logits, openvino_missing
from edgekd.metrics import classification_metrics
from edgekd.models import load_checkpoint
from edgekd.pipeline.context import BuildContext
from edgekd.report import build_report, markdown, plot
from edgekd.runners.ort import cpu_session
from edgekd.targets import accelerator_present


def stage_export(ctx: BuildContext) -> tuple[dict, dict]:
    rc, t = ctx.recipe, ctx.target
    precision = export_precision(rc, t)
    source = "qad" if precision == "int8" and rc.quantize.enabled else "distill"
    layout = rc.export.layout if rc.export.layout != "auto" else t.layout
    export_cfg = rc.export.model_copy(update={"precision": precision, "layout": layout})
    # after QAD the checkpoint carries its float layers (the budget was met by training): export must not search again
    quantize_cfg = rc.quantize.model_copy(update={"max_accuracy_drop": None, "exclude": []}) if source == "qad" else rc.quantize
    checkpoint = ctx.path("qad", "checkpoint") if source == "qad" else ctx.path("distill", "shipped_checkpoint")
    r = run_export(ExportJob(export_cfg, quantize_cfg, checkpoint), ctx.data, ctx.out / "export", ctx.stage_context())
    artifacts = {"onnx": r["path"], "record": str(ctx.out / "export" / "export.json")}
    if r.get("fp32_path"):
        artifacts["fp32_onnx"] = r["fp32_path"]
    checks = r.get("checks", {})
    return artifacts, {"precision": precision, "layout": r.get("layout"), "source": source, "checks": checks, "comparison": r.get("comparison"),
                       "relu_codes": r.get("relu_codes"), "mixed_precision": r.get("mixed_precision"), "accuracy_budget": r.get("accuracy_budget")}


def onnx_test_accuracy(onnx_path: Path, data, preprocess, exact_qdq: bool = False, layout: str | None = None, split=None) -> dict:
    """Top-1 of the exported file itself on the whole test set, or on ``split`` (the target-domain
    test set): what ships is what is measured.

    ``exact_qdq`` for a TensorRT-layout file: its Q/DQ run as written, TensorRT's arithmetic
    (see :func:`edgekd.runners.ort.cpu_session`). An ``openvino``-layout file runs on OpenVINO where it is installed."""
    split = data.test if split is None else split
    on_openvino = layout == "openvino" and openvino_missing() is None  # the runtime the file was laid out for
    sess = None if on_openvino else cpu_session(onnx_path, exact_qdq=exact_qdq or layout == "openvino")
    preds = []
    for start in range(0, len(split), 500):
        x = preprocess(split.take(slice(start, start + 500))).numpy()
        preds.append((openvino_logits(onnx_path, x) if on_openvino else ort_logits(sess, x)).argmax(1))
    return classification_metrics(np.concatenate(preds), split.labels.numpy(), data.classes)


def stage_evaluate(ctx: BuildContext) -> tuple[dict, dict]:
    pre = Preprocess.from_dict(load_checkpoint(ctx.path("distill", "checkpoint"))["preprocess"])
    export = ctx.manifest.stage("export")["metrics"]
    int8 = export.get("precision") == "int8"
    exact, layout = int8 and export.get("layout") == "tensorrt", export.get("layout") if int8 else None
    shipped = onnx_test_accuracy(ctx.path("export", "onnx"), ctx.data, pre, exact_qdq=exact, layout=layout)
    metrics = {"test_top1": shipped["top1"], "per_class": shipped["per_class"], "n": shipped["n"], "precision": export.get("precision", "").upper()}
    if ctx.data.target_test is not None:  # the shipped file on the deployment domain's labeled test set
        target = onnx_test_accuracy(ctx.path("export", "onnx"), ctx.data, pre, exact_qdq=exact, layout=layout, split=ctx.data.target_test)
        metrics.update({"target_top1": target["top1"], "target_n": target["n"], "target_per_class": target["per_class"]})
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
        if slower and avail.ok and runtime == "ort-cpu" and t.layout == "ort-cpu":  # off the target (another CPU) it decides nothing
            ui.warn(f"the INT8 model is SLOWER than FP32 on {runtime} at batch "
                    + ", ".join(f"{b} ({metrics['speedup_vs_fp32'][b]:.2f}x FP32's speed)" for b in slower))
    if avail.ok:
        metrics["within_budget"] = {"1": metrics["latency_ms"]["1"]["p50_ms"] <= t.latency_budget.batch1_ms}
    if t.kind == "cpu" and t.arch == "x86_64" and "fp32_onnx" in results:  # an x86 CPU build: the same files on every CPU runtime here
        files = {"int8": str(ctx.path("export", "onnx")), "fp32": str(ctx.path("export", "fp32_onnx"))}
        metrics["cpu_runtimes"] = compare_cpu_runtimes(files, batches, plan, threads, t.name, {runtime: {"int8": shipped, "fp32": results["fp32_onnx"]}})
        ui.log(f"CPU runtimes: {metrics['cpu_runtimes']['verdict']}")
    out = ctx.out / "bench.json"
    write_json_atomic(out, {"metrics": metrics, "results": results})
    return {"record": out}, metrics


def stage_report(ctx: BuildContext) -> tuple[dict, dict]:
    """report.json / report.md / report.png: what each stage bought, from the manifest's metrics."""
    stages = {k: v.get("metrics", {}) for k, v in ctx.manifest.data["stages"].items() if v.get("status") == "done"}
    report = build_report(stages, ctx.target.to_dict(), {"bundle": str(ctx.out / "bundle"), "bundle_tar": str(ctx.out / "bundle.tar.gz")})
    folder = ctx.out / "report"
    folder.mkdir(exist_ok=True)
    write_json_atomic(folder / "report.json", report)
    write_bytes_atomic(folder / "report.md", markdown(report, f"edgekd build --target {ctx.target.name}").encode())
    plot(report, folder / "report.png")
    return {"json": folder / "report.json", "md": folder / "report.md", "png": folder / "report.png"}, report


def stage_bundle(ctx: BuildContext) -> tuple[dict, dict]:
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
    qad = ctx.manifest.data["stages"].get("qad", {}).get("artifacts", {})
    report.update({f"report/sensitivity.{k}": ctx.path("qad", f"sensitivity_{k}") for k in ("json", "png") if f"sensitivity_{k}" in qad})
    bundle_dir = make_bundle(ctx.out / "bundle", BundleModel(onnx_files, "model", ck["classes"], ctx.device_preprocess(ck["preprocess"])), ctx.target.to_dict(), metrics, extra,
                             attachments=report)
    tar = Path(str(bundle_dir) + ".tar.gz")
    arts = {"bundle_json": bundle_dir / "bundle.json"}
    if tar.is_file():
        arts["tar"] = tar
    return arts, {"bundle": str(bundle_dir)}


def export_precision(recipe: Recipe, target) -> str:
    """The target decides unless the recipe asks for something else than its default int8."""
    return recipe.export.precision if recipe.export.precision != "int8" else target.precision
