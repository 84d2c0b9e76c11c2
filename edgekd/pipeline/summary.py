"""The machine-readable summary of a build, read from the manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgekd.pipeline.context import BuildContext
from edgekd.time_budget import DEFAULT_TIME_BUDGET_S


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
