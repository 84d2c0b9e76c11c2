"""The end-of-build report: what each stage bought, measured in this build, and how sure it is.

Rows, all on the same test set: teacher; the student trained alone (the control); the distilled
student; INT8 after calibration (PTQ); INT8 after QAD; the exported file that ships. With a
labeled target-domain test set (``data.target_test_root``) every row also gives its top-1 there,
the distilled row's change against the source-only control included. Each row has
its 95% interval (Wilson) and its change against the row it came from, with the interval of that
difference, so a reader can tell a gain from noise. Latency is FP32 vs INT8 per batch on this
machine. The same content is rendered three ways: a table that fits 80 columns, ``report.md``,
and ``report.png`` (accuracy vs latency, per-class accuracy).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.table import Table

from edgekd.bench.cpu_runtimes import runtime_lines

Z95 = 1.96


def wilson(p: float, n: int) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy ``p`` measured on ``n`` images."""
    if n <= 0:
        return 0.0, 1.0
    denom = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def half_width(p: float, n: int) -> float:
    lo, hi = wilson(p, n)
    return (hi - lo) / 2


def diff_half_width(p1: float, p2: float, n: int) -> float:
    """95% half-width of the difference of two accuracies on the same ``n`` images, treated as
    independent samples: conservative (the paired interval is narrower)."""
    return Z95 * math.sqrt((p1 * (1 - p1) + p2 * (1 - p2)) / max(1, n))


def _row(step: str, top1: float | None, n: int, base: float | None, seconds: float | None = None, note: str = "",
         target: tuple[float | None, int, float | None] | None = None) -> dict[str, Any] | None:
    """One ladder row; ``target`` = (top-1, images, base top-1) on the target-domain test set, when there is one."""
    if top1 is None:
        return None
    row = {"step": step, "test_top1": top1, "n": n, "ci95": half_width(top1, n), "seconds": seconds, "note": note}
    if base is not None:
        row["change"] = top1 - base
        row["change_ci95"] = diff_half_width(top1, base, n)
    if target is not None and target[0] is not None:
        t, tn, tbase = target
        row.update({"target_top1": t, "target_n": tn, "target_ci95": half_width(t, tn)})
        if tbase is not None:
            row.update({"target_change": t - tbase, "target_change_ci95": diff_half_width(t, tbase, tn)})
    return row


def distilled_label(d: dict) -> str:
    """The distilled row's name: how it was distilled (teacher, control, assistant chain, peers)."""
    if d.get("mode") == "assistant":
        a = d.get("assistant") or {}
        return f"distilled via assistant {a.get('model') or 'checkpoint'}"
    if d.get("mode") == "mutual":
        return f"mutual learning, {len(d.get('peers') or [])} peers"
    return "distilled student" + (" (from the control)" if d.get("distilled_from") == "control" else "")


def _budget_note(budget: dict | None) -> str:
    if not budget:
        return ""
    return f"budget {budget['budget_points']:g} pts {'met' if budget['met'] else 'NOT met'} (val)"


def accuracy_rows(stages: dict[str, dict], n: int) -> list[dict[str, Any]]:
    """The accuracy ladder from the stages' metrics (a stage that did not run has no row)."""
    t, c, d, q, e = (stages.get(k) or {} for k in ("teacher", "control", "distill", "qad", "evaluate"))
    shipped = d.get("shipped_student", "distilled")
    fp32 = c.get("test_top1") if shipped == "control" else d.get("test_top1")
    ptq, qad = q.get("ptq_test_top1"), q.get("test_top1")
    floats, full = q.get("float_layers") or [], q.get("full_int8_test_top1")  # full: QAD of every layer, when the budget made a mixed model
    tn = int(e.get("target_n") or d.get("target_n") or c.get("target_n") or 0)
    tfp32 = c.get("target_top1") if shipped == "control" else d.get("target_top1")
    tq = q.get("target_top1") if not floats else None  # the target row of a mixed model is the budget row's
    rows = [
        _row(f"teacher {t.get('model') or ''}".strip(), t.get("test_top1"), n, None, t.get("train_seconds"), target=(t.get("target_top1"), tn, None)),
        _row(f"assistant {(d.get('assistant') or {}).get('model')}", (d.get("assistant") or {}).get("test_top1"), n, None,
             (d.get("assistant") or {}).get("train_seconds")),
        _row("student alone (control)", c.get("test_top1"), n, None, c.get("train_seconds"), target=(c.get("target_top1"), tn, None)),
        _row(distilled_label(d), d.get("test_top1"), n,
             c.get("test_top1"), d.get("train_seconds"), "shipped the control instead" if shipped == "control" else "",
             target=(d.get("target_top1"), tn, c.get("target_top1"))),
        _row("INT8 calibrated (PTQ)", ptq, n, fp32, target=(q.get("ptq_target_top1"), tn, tfp32)),
        _row("INT8 after QAD", full if full is not None else qad, n, ptq, q.get("train_seconds"),
             "kept PTQ: QAD did not beat it" if str(q.get("result", "")).startswith("calibrated") and full is None else "",
             target=(tq, tn, q.get("ptq_target_top1"))),
        _row(f"INT8, {len(floats)} layer(s) kept float", qad if floats else None, n, full if full is not None else ptq, None, _budget_note(q.get("accuracy_budget")),
             target=(q.get("target_top1"), tn, None)),
        _row(f"exported {e.get('precision') or 'INT8'} file", e.get("test_top1"), n, qad if qad is not None else fp32,
             target=(e.get("target_top1"), tn, q.get("target_top1") if q.get("target_top1") is not None else tfp32)),
    ]
    return [r for r in rows if r is not None]


def latency_rows(bench: dict) -> list[dict[str, Any]]:
    rows = []
    fp32 = bench.get("fp32_p50_ms") or {}
    for batch, lat in sorted((bench.get("latency_ms") or {}).items(), key=lambda kv: int(kv[0])):
        f = fp32.get(batch)
        rows.append({"batch": int(batch), "fp32_ms": f, "shipped_ms": lat["p50_ms"], "speedup": f / lat["p50_ms"] if f else None})
    return rows


def build_report(stages: dict[str, dict], target: dict, summary: dict) -> dict[str, Any]:
    """Everything the report shows, as plain data (this is what ``--json`` carries)."""
    ev = stages.get("evaluate") or {}
    n = int(ev.get("n") or 0)
    acc = accuracy_rows(stages, n)
    lat = latency_rows(stages.get("bench") or {})
    bench = stages.get("bench") or {}
    report = {"accuracy": acc, "latency": lat, "runtime": bench.get("runtime"), "on_target_runtime": bench.get("on_target_runtime"),
              "test_images": n, "notes": notes(stages, n), "per_class": ev.get("per_class") or {}}
    report["mixed_precision"] = (stages.get("export") or {}).get("mixed_precision")
    report["cpu_runtimes"] = bench.get("cpu_runtimes")  # x86 builds: FP32 / INT8 on each CPU runtime (edgekd.bench.cpu_runtimes)
    report["verdict"] = verdict(acc, lat, stages, target)
    report["next"] = next_command(target, summary)
    return report


def notes(stages: dict[str, dict], n: int) -> list[str]:
    out = []
    if 0 < n and half_width(0.9, n) > 0.01:
        out.append(f"The test set has {n} images: one image is {100 / n:.1f} points and an accuracy near 90% is known to "
                   f"+-{100 * half_width(0.9, n):.1f} points (95%); smaller differences are noise.")
    d, c = stages.get("distill") or {}, stages.get("control") or {}
    if d.get("target_top1") is not None and c.get("target_top1") is not None and d.get("target_n"):
        gain, noise = d["target_top1"] - c["target_top1"], diff_half_width(d["target_top1"], c["target_top1"], d["target_n"])
        out.append(f"On the {d['target_n']} target-domain test images the distilled student is {100 * gain:+.2f} +-{100 * noise:.2f} points "
                   f"against the source-only control ({100 * d['target_top1']:.2f}% vs {100 * c['target_top1']:.2f}%).")
    if d.get("distilled_from_reason"):
        out.append(d["distilled_from_reason"])
    if d.get("ship_reason"):
        out.append(d["ship_reason"])
    if d.get("val_top1") is not None and c.get("val_top1") is not None and d.get("val_n"):
        noise = diff_half_width(d["val_top1"], c["val_top1"], d["val_n"])
        if abs(d["val_top1"] - c["val_top1"]) < noise:
            out.append(f"On {d['val_n']} validation images the distilled student and the control are within noise of each other "
                       f"({100 * (d['val_top1'] - c['val_top1']):+.2f} points, +-{100 * noise:.2f}): which one ships is close to a coin toss.")
    for stage in ("teacher", "control", "distill", "qad"):
        plan = (stages.get(stage) or {}).get("plan") or {}
        if plan.get("why"):
            out.append(f"{stage}: {plan['why']}")
        if (stages.get(stage) or {}).get("stopped") in ("plateau", "time"):
            out.append(f"{stage}: stopped early ({stages[stage]['stopped']}) after {plan.get('epochs_run')} of {plan.get('epochs')} epochs")
    return out


def verdict(acc: list[dict], lat: list[dict], stages: dict[str, dict], target: dict) -> str:
    if not acc:
        return "nothing was evaluated"
    last = acc[-1]
    text = f"ships the {last['step']}: {100 * last['test_top1']:.2f}% +-{100 * last['ci95']:.2f} test top-1"
    b1 = next((r for r in lat if r["batch"] == 1), None)
    bench = stages.get("bench") or {}
    if b1 and b1["speedup"]:
        text += f", {b1['speedup']:.2f}x FP32's speed at batch 1 on {bench.get('runtime', 'this machine')}"
        if not bench.get("on_target_runtime", True):
            text += f" (not the target's {target.get('runtime')}: time it there)"
    if (stages.get("distill") or {}).get("shipped_student") == "control":
        text += "; distillation lost to the student alone, so the control ships"
    return text


def next_command(target: dict, summary: dict) -> str:
    bundle = summary.get("bundle_tar") or summary.get("bundle") or "runs/build/bundle.tar.gz"
    if target.get("runtime") == "tensorrt":
        return f"edgekd deploy {bundle} --host user@device   # build the engine and verify on the device"
    folder = summary.get("bundle") or "runs/build/bundle"
    return f"python3 -m edgekd.runtime bench {folder}   # latency with the bundle's own runtime"


# ----------------------------------------------------------------------------- rendering
def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _change(r: dict) -> str:
    return f"{100 * r['change']:+.2f} +-{100 * r['change_ci95']:.2f}" if "change" in r else ""


def accuracy_table(report: dict) -> Table:
    t = Table(title=f"accuracy on {report['test_images']} test images (95% intervals)", title_justify="left")
    for col, kw in (("step", {"max_width": 26, "overflow": "fold"}), ("top-1 %", {"justify": "right"}), ("+-", {"justify": "right"}),
                    ("change, points", {"justify": "right"}), ("s", {"justify": "right"})):
        t.add_column(col, no_wrap=col != "step", **kw)
    target = any("target_top1" in r for r in report["accuracy"])
    if target:
        t.add_column("target %", justify="right", no_wrap=True)
    for r in report["accuracy"]:
        cells = [r["step"], _pct(r["test_top1"]), f"{100 * r['ci95']:.2f}", _change(r), "-" if r.get("seconds") is None else f"{r['seconds']:.0f}"]
        t.add_row(*cells, *([_target(r)] if target else []))
    return t


def _target(r: dict) -> str:
    """A row's target-domain top-1 with its interval (and change against the row it came from)."""
    if "target_top1" not in r:
        return "-"
    text = f"{100 * r['target_top1']:.2f} +-{100 * r['target_ci95']:.2f}"
    return text + (f" ({100 * r['target_change']:+.2f})" if "target_change" in r else "")


def latency_table(report: dict) -> Table:
    t = Table(title=f"latency p50, {report.get('runtime')}" + ("" if report.get("on_target_runtime") else " (not the target's runtime)"),
              title_justify="left")
    for col in ("batch", "FP32 ms", "shipped ms", "speed-up"):
        t.add_column(col, justify="right", no_wrap=True)
    for r in report["latency"]:
        t.add_row(str(r["batch"]), "-" if r["fp32_ms"] is None else f"{r['fp32_ms']:.3f}", f"{r['shipped_ms']:.3f}",
                  "-" if r["speedup"] is None else f"{r['speedup']:.2f}x")
    return t


def _num(v: float | None, spec: str, suffix: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{suffix}"


def markdown(report: dict, title: str) -> str:
    lines = [f"# {title}", "", f"**Verdict:** {report['verdict']}", "", f"Accuracy on {report['test_images']} test images (95% intervals):", "",
             "| step | test top-1 % | +- | change, points | seconds | target top-1 % (change) | note |", "|---|---|---|---|---|---|---|"]
    for r in report["accuracy"]:
        target = _target(r) + (f" +-{100 * r['target_change_ci95']:.2f}" if "target_change_ci95" in r else "")
        lines.append(f"| {r['step']} | {_pct(r['test_top1'])} | {100 * r['ci95']:.2f} | {_change(r)} | {_num(r.get('seconds'), '.0f')} | {target} | {r.get('note', '')} |")
    where = "this machine" + ("" if report.get("on_target_runtime") else ", not the target's runtime")
    lines += ["", f"Latency p50 on {report.get('runtime')} ({where}):", "", "| batch | FP32 ms | shipped ms | speed-up |", "|---|---|---|---|"]
    for r in report["latency"]:
        lines.append(f"| {r['batch']} | {_num(r['fp32_ms'], '.3f')} | {r['shipped_ms']:.3f} | {_num(r['speedup'], '.2f', 'x')} |")
    lines += runtime_lines(report.get("cpu_runtimes"))
    lines += _mixed_precision_lines(report.get("mixed_precision"))
    if report["notes"]:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in report["notes"]]
    lines += ["", f"Next: `{report['next']}`", "", "![accuracy vs latency, per-class accuracy](report.png)", ""]
    return "\n".join(lines)


def _mixed_precision_lines(mixed: dict | None) -> list[str]:
    """What each layer kept in higher precision costs (the export measured it on onnxruntime CPU)."""
    if not mixed or not mixed.get("float_layers"):
        return []
    lines = ["", f"Layers kept in higher precision: {', '.join(mixed['float_layers'])} (sensitivity.png ranks every layer)."]
    if not mixed.get("steps"):
        return lines + [mixed.get("latency", "")]
    lines += ["", "| float layers | added | p50 batch 1 ms | p50 batch 64 ms |", "|---|---|---|---|"]
    lines += [f"| {s['float_layers']} | {s['added'] or '(full INT8)'} | {s['batch1_ms']:.3f} | {s['batch64_ms']:.2f} |" for s in mixed["steps"]]
    fp32 = mixed.get("fp32") or {}
    return lines + [f"| FP32 | - | {_num(fp32.get('batch1_ms'), '.3f')} | {_num(fp32.get('batch64_ms'), '.2f')} |"]


def plot(report: dict, path: Path) -> Path:
    """report.png: accuracy vs batch-1 latency of FP32 / control / PTQ / QAD / shipped, and the
    shipped file's per-class accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b1 = next((r for r in report["latency"] if r["batch"] == 1), {})
    fp32_ms, int8_ms = b1.get("fp32_ms") or b1.get("shipped_ms"), b1.get("shipped_ms")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in report["accuracy"]:
        if r["step"].startswith("teacher"):
            continue
        ms = int8_ms if ("INT8" in r["step"] or r["step"].startswith("exported")) else fp32_ms
        ax1.errorbar([ms], [100 * r["test_top1"]], yerr=[100 * r["ci95"]], fmt="o", capsize=4, label=r["step"])
    ax1.set_xlabel(f"p50 latency at batch 1, ms ({report.get('runtime')})")
    ax1.set_ylabel("test top-1 %")
    ax1.set_title("accuracy vs latency (95% intervals)")
    ax1.legend(fontsize=7)
    classes = list(report["per_class"])
    ax2.barh(classes, [100 * report["per_class"][c] for c in classes])
    ax2.set_xlabel("test top-1 % of the shipped file")
    ax2.set_title("per class")
    ax2.invert_yaxis()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path
