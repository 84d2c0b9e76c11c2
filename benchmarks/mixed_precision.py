"""Accuracy-aware INT8 (issue 14): FP32, full INT8 (PTQ, QAD) and the accuracy budget at 0.3 and 1.0 points, side by side.

For the networks that lose more than a point to INT8 calibration (PTQ) in the architecture benchmark
(``architectures_results.md``: MobileNetV3-Large, RegNetX-200MF, EfficientNet-Lite0; hard-swish,
SE blocks, depthwise and grouped convs) and MobileNetV2 as a control, on the ``ort-cpu`` layout
(the one this machine can time). With this script's recipe EfficientNet-Lite0 and MobileNetV2 lose
under a point to PTQ; the results file says which networks qualified.

- FP32: the FP32 export of the student, trained here with the architecture benchmark's recipe
  (a third of the training images held out: the budget is decided on validation);
- INT8 PTQ: ``edgekd export --precision int8`` of the FP32 checkpoint (calibration only);
- INT8 QAD: ``run_qad`` with every layer INT8 (the first pass of the budget run below);
- accuracy-aware at 0.3 and 1.0: ``run_qad`` with ``max_accuracy_drop`` (per-layer sensitivity,
  the fewest most-sensitive layers kept in float, QAD again), then the export stage. The 1.0 run
  ranks layers with the 0.3 run's ``sensitivity.json`` (``quantize.sensitivity_file``): the same
  seed and data give the same first QAD pass, so measuring again would repeat the same numbers.

Every row is an exported file run by onnxruntime on the full 10,000-image test set; latency is
onnxruntime CPU p50 at batch 1 and 64, 2 threads, all files timed interleaved round by round
after all training (median of per-round medians).

    .venv/bin/python benchmarks/mixed_precision.py            # about 2 h on 2 idle cores (MobileNetV3-Large's search is most of it)
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _common import machine  # noqa: E402
import architectures  # noqa: E402
from edgekd import ui  # noqa: E402
from edgekd.config import DataConfig, ExportConfig, QuantizeConfig, TrainConfig  # noqa: E402
from edgekd.export import load_for_export, ort_logits  # noqa: E402
from edgekd.runners.timing import interleaved_latency_ms  # noqa: E402
from edgekd.data import load_data  # noqa: E402
from _stages import export_run, qad_run  # noqa: E402
from edgekd.train import cross_entropy_loss  # noqa: E402

STUDENTS = ["mobilenetv3_large_100", "regnetx_002", "efficientnet_lite0", "mobilenetv2_100"]
BUDGETS = (0.3, 1.0)
WORK = ROOT / "benchmarks" / "_work" / "mixed_precision"


def exported_top1(onnx_path: str, pre, data) -> float:
    logits = ort_logits(onnx_path, pre(data.test.images).numpy())
    return float((logits.argmax(1) == data.test.labels.numpy()).mean())


def export_row(name: str, label: str, ckpt: Path, data, qcfg: QuantizeConfig, args, extra: dict) -> dict:
    out = WORK / name / label.replace(" ", "_")
    rec = export_run(ckpt, out, data, ExportConfig(precision="int8", layout="ort-cpu", check_batch=256), qcfg, args.seed)
    pre = load_for_export(ckpt)[0].preprocess
    row = {"student": name, "row": label, "code": code_version(), "onnx": _rel(rec["path"]), "fp32_onnx": _rel(rec["fp32_path"]), "test_top1": exported_top1(rec["path"], pre, data),
           "float_layers": len(rec.get("mixed_precision", {}).get("float_layers", [])), "shape": [pre.channels, pre.input_size, pre.input_size],
           "agreement": rec["checks"]["agreement"]["top1_agreement"], "u8_weights": rec.get("u8_weights"), **extra}
    if rec.get("mixed_precision", {}).get("steps"):
        row["cost_steps"] = rec["mixed_precision"]["steps"]
    return row


def code_version() -> str:
    """The commit the row's file was trained and exported with (``+changes`` when the tree was not clean)."""
    import subprocess

    run = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    head = run("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+changes" if run("status", "--porcelain", "--untracked-files=no") else "")


def _rel(path: str) -> str:
    """Paths in the results JSON are relative to the repository, so --time-only works from any checkout."""
    return str(Path(path).resolve().relative_to(ROOT.resolve())) if Path(path).resolve().is_relative_to(ROOT.resolve()) else str(path)


def finished_run(out: Path) -> dict | None:
    """A budget run this script already finished (its final metrics record the budget), to reuse."""
    for folder in (out / "mixed", out):
        path = folder / "metrics.json"
        if path.is_file() and "accuracy_budget" in (metrics := json.loads(path.read_text())):
            return {"checkpoint": str(folder / "best.pt"), "metrics": metrics}
    return None


def budget_run(name: str, ckpt: Path, data, budget: float, args, sensitivity_file: Path | None = None) -> tuple[dict, dict]:
    """run_qad with the budget; returns (the budget's row, the full-INT8 QAD row from its first pass).
    ``sensitivity_file``: the ranking an earlier budget measured on the same first pass (same seed
    and data, so run_qad would measure the same again)."""
    qcfg = QuantizeConfig(layout="ort-cpu", calib_images=512, max_accuracy_drop=budget, sensitivity_images=args.sensitivity_images,
                          sensitivity_file=str(sensitivity_file) if sensitivity_file else None,
                          train=TrainConfig(epochs=args.qad_epochs, batch_size=64, lr=1e-4, weight_decay=0.0, warmup_epochs=0.0))
    t0 = time.time()
    out = WORK / name / f"qad_budget_{budget:g}"
    res = finished_run(out) or qad_run(ckpt, qcfg, data, out, lambda model: (cross_entropy_loss(), None), args.seed)
    seconds = round(time.time() - t0, 1)
    m = res["metrics"]
    b = m["accuracy_budget"] or {}
    plain = qcfg.model_copy(update={"max_accuracy_drop": None})
    row = export_row(name, f"accuracy-aware {budget:g}", Path(res["checkpoint"]), data, plain, args,
                     {"budget": budget, "met_on_val": b.get("met"), "val_drop_points": b.get("val_drop_points"), "kept": m["float_layers"], "tried": sum(1 for s in b.get("search_steps") or [] if s.get("tried")),
                      "taken_out": [s["removed"] for s in b.get("search_steps") or [] if s.get("removed") and s["kept"]],
                      "back_in_int8_after_retraining": [s["removed"] for s in b.get("after_retraining") or [] if s["kept"]],
                      "float_before_retraining": b.get("float_layers_before_retraining"),
                      "sensitivity_top5": [(r["layer"], r["float_gain"], r["exported_gain"]) for r in b.get("sensitivity", [])[:5]],
                      "qad_seconds": seconds, "fp32_val_top1": m["fp32_val_top1"], "val_top1": m["val"]["top1"]})
    full = export_row(name, "INT8 QAD", out / "best.pt", data, plain, args, {"fp32_val_top1": m["fp32_val_top1"]})
    return row, full


def time_rows(rows: list[dict], args) -> None:
    """p50 of every distinct file of one student (FP32 once), interleaved round by round. Rows
    whose files are byte-identical (a budget that kept no layer in float ships the QAD model) share
    one measurement: timing the same file twice would only show the machine's noise as a difference."""
    for name in dict.fromkeys(r["student"] for r in rows):
        mine = [r for r in rows if r["student"] == name]
        digest = {path: hashlib.sha256((ROOT / path).read_bytes()).hexdigest() for path in [mine[0]["fp32_onnx"]] + [r["onnx"] for r in mine]}
        files = {digest[mine[0]["fp32_onnx"]]: ROOT / mine[0]["fp32_onnx"], **{digest[r["onnx"]]: ROOT / r["onnx"] for r in mine}}
        shape = tuple(mine[0]["shape"])
        for batch, runs in ((1, args.runs), (64, max(10, args.runs // 4))):
            per = interleaved_latency_ms(files, batch, shape, runs, args.rounds)
            for r in mine:
                r[f"b{batch}_ms"] = statistics.median(per[digest[r["onnx"]]])
                r[f"fp32_b{batch}_ms"] = statistics.median(per[digest[mine[0]["fp32_onnx"]]])
                r[f"b{batch}_rounds_ms"] = per[digest[r["onnx"]]]


def write_results(rows: list[dict], args, seconds: float) -> None:
    lines = ["# Accuracy-aware INT8: keep the layers INT8 hurts in float, within an accuracy budget (issue 14)", "",
             f"- Date: {datetime.date.today().isoformat()}; machine: {machine()}",
             f"- Command: `.venv/bin/python benchmarks/mixed_precision.py {' '.join(sys.argv[1:])}` ({seconds / 60:.1f} min)",
             f"- Data: Fashion-MNIST, {args.train_images} training images ({100 * args.val_fraction:.0f}% held for validation: a budget of 0.3 "
             "points is 6 images of 2,000), the full 10,000-image test set, 32 px, grey repeated to 3 channels. FP32 students trained here "
             f"with the architecture benchmark's recipe ({args.epochs} epochs, AdamW lr {args.lr}; EfficientNet-Lite0 from ImageNet weights, "
             "MobileNetV3-Large from random init).",
             f"- INT8: ort-cpu layout, calibration on 512 images (max), QAD {args.qad_epochs} epoch(s) (lr 1e-4, hard labels). Budget: top-1 points "
             f"vs the FP32 student on validation; sensitivity on {args.sensitivity_images} validation images, the 3 most sensitive confirmed on the "
             "exported file.",
             "- Accuracy: the exported ONNX file, onnxruntime CPU, 10,000 test images (95% CI about +-0.9 points at 60-75%). Latency: onnxruntime "
             f"CPU p50, 2 threads, {args.rounds} interleaved rounds.", "",
             "- Code: " + "; ".join(f"{name}: " + ", ".join(f"{r['row']} {r.get('code', '?')}" for r in rows if r["student"] == name)
                                   for name in dict.fromkeys(r["student"] for r in rows)) + ". Rows from before commit f30f6a4 are "
             "compared with the FP32 file of a refreshed PTQ row (before it, the FP32 reference file held the INT8 weights).", "",
             "- `u8 weights`: the ops the export gave u8 weights to stop onnxruntime's AVX2 drift (`image`: the first conv only; `signed`: ops "
             "with a signed input; `all`: every op, exact but slower without VNNI). The export picks it per file by agreement with the trained "
             "model, so two files of one network can differ in it; it moves latency more than a float layer does.", "",
             "| student | row | float layers | u8 weights | test top-1 % | vs FP32 (points) | val drop (points) | budget met on val | p50 b1 ms | p50 b64 ms | b1 vs FP32 | b64 vs FP32 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["student"] for r in rows):
        mine = [r for r in rows if r["student"] == name]
        fp32 = mine[0].get("fp32_test_top1")
        lines.append(f"| {name} | FP32 | all | - | {100 * fp32:.2f} | - | - | - | {mine[0].get('fp32_b1_ms', float('nan')):.3f} | "
                     f"{mine[0].get('fp32_b64_ms', float('nan')):.2f} | 1.00x | 1.00x |")
        for r in mine:
            met = "-" if r.get("met_on_val") is None else ("yes" if r["met_on_val"] else "no")
            drop = "-" if r.get("val_drop_points") is None else f"{r['val_drop_points']:.2f}"
            ratio = lambda b: f"{r['fp32_b%d_ms' % b] / r['b%d_ms' % b]:.2f}x" if r.get(f"b{b}_ms") else "-"  # noqa: E731
            lines.append(f"| {name} | {r['row']} | {r['float_layers']} | {r.get('u8_weights') or '-'} | {100 * r['test_top1']:.2f} | {100 * (r['test_top1'] - fp32):+.2f} | {drop} | {met} | "
                         f"{r.get('b1_ms', float('nan')):.3f} | {r.get('b64_ms', float('nan')):.2f} | {ratio(1)} | {ratio(64)} |")
    lines += ["", "Speed ratios are FP32 time / row time (above 1: faster than FP32). " + spread_note(rows), "", "## Layers kept in float, and the most sensitive", ""]
    for r in rows:
        if r.get("budget") is not None:
            lines.append(f"- {r['student']}, budget {r['budget']:g}: kept {', '.join(r['kept']) or 'none'} ({r['tried']} tried; taken out again once later layers were float: {', '.join(r.get('taken_out') or []) or 'none'}; back in INT8 after the second QAD: {', '.join(r.get('back_in_int8_after_retraining') or []) or 'none'}); most sensitive (layer, top-1 points "
                         f"gained in float on the fake-quant model, on the exported file): {r['sensitivity_top5']}")
    lines += ["", "## Goals (issue 14)", ""] + goals(rows) + ["", "Raw rows: `mixed_precision_results.json` beside this file."]
    out = Path(__file__).with_name("mixed_precision_results.md")
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1, default=str) + "\n")


def spread_note(rows: list[dict]) -> str:
    """How far one file's per-round p50s lie apart: a latency difference smaller than this is noise."""
    spread = {b: max((max(r[f"b{b}_rounds_ms"]) / min(r[f"b{b}_rounds_ms"]) for r in rows if r.get(f"b{b}_rounds_ms")), default=None) for b in (1, 64)}
    if spread[1] is None:
        return ""
    return (f"Largest round-to-round spread of one file's p50 (slowest / fastest round): {spread[1]:.2f}x at batch 1, {spread[64]:.2f}x at batch 64; "
            "latency differences smaller than that are within this machine's noise.")


def goals(rows: list[dict]) -> list[str]:
    aware = [r for r in rows if r.get("budget") is not None]
    ptq = {r["student"]: 100 * (r["test_top1"] - r["fp32_test_top1"]) for r in rows if r["row"] == "INT8 PTQ"}
    out = ["- Networks that lose more than 1 point to PTQ on the test file (the issue's choice of network): "
           + ", ".join(f"{n} {d:+.2f}" for n, d in ptq.items() if d < -1) + "; not: " + (", ".join(f"{n} {d:+.2f}" for n, d in ptq.items() if d >= -1) or "none") + "."]
    for r in aware:
        full = next(x for x in rows if x["student"] == r["student"] and x["row"] == "INT8 QAD")  # full INT8: the model the budget starts from
        within_test = 100 * (r["fp32_test_top1"] - r["test_top1"]) <= r["budget"]
        between = "b1_ms" in r and min(full["b1_ms"], r["fp32_b1_ms"]) * 0.95 <= r["b1_ms"] <= max(full["b1_ms"], r["fp32_b1_ms"]) * 1.05
        out.append(f"- {r['student']} budget {r['budget']:g}: within budget on validation {'yes' if r.get('met_on_val') else 'no'}, on the test file "
                   f"{'yes' if within_test else 'no'} ({100 * (r['fp32_test_top1'] - r['test_top1']):.2f} points); {r['float_layers']} float layer(s); "
                   f"batch-1 latency between full INT8 and FP32 (5% slack): {'yes' if between else 'no'}.")
    return out


def ptq_row(name: str, ckpt: Path, data, args, extra: dict | None = None) -> tuple[dict, float]:
    """The INT8 PTQ row of an FP32 checkpoint, and the test top-1 of its FP32 file (the student's own export)."""
    ptq = export_row(name, "INT8 PTQ", ckpt, data, QuantizeConfig(layout="ort-cpu", calib_images=512), args, extra or {})
    return ptq, exported_top1(str(ROOT / ptq["fp32_onnx"]), load_for_export(ckpt)[0].preprocess, data)


def refresh_ptq(rows: list[dict], args) -> None:
    """Export each student's FP32 checkpoint to INT8 by calibration again. Before commit "Export: when
    INT8 is calibrated from an FP32 checkpoint (PTQ), model.fp32.onnx is the FP32 student itself", the
    FP32 reference file held the INT8 weights in float, and this benchmark's FP32 row was that file."""
    data = load_data(DataConfig(train_subset=args.train_images, val_fraction=args.val_fraction), args.seed, store_size=32)
    for name in dict.fromkeys(r["student"] for r in rows):
        ptq, fp32_top1 = ptq_row(name, WORK / name / "fp32" / "best.pt", data, args, {"refreshed": True})
        for i, r in enumerate(rows):
            if r["student"] == name:
                r["fp32_test_top1"] = fp32_top1
                if r["row"] == "INT8 PTQ":
                    rows[i] = {**ptq, "fp32_test_top1": fp32_top1}
        ui.log(f"{name}: FP32 {100 * fp32_top1:.2f}%, PTQ {100 * ptq['test_top1']:.2f}%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--students", nargs="+", default=STUDENTS)
    ap.add_argument("--train-images", type=int, default=6000)
    ap.add_argument("--val-fraction", type=float, default=1 / 3, help="a budget of 0.3 points needs a validation set of thousands of images")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--qad-epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--sensitivity-images", type=int, default=500)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--fresh", action="store_true", help="drop the rows of students not run now (by default they stay in the results)")
    ap.add_argument("--time-only", action="store_true", help="only time the rows already in the results JSON (a run stopped before timing)")
    ap.add_argument("--refresh-ptq", action="store_true", help="export the PTQ row (and with it the FP32 reference file) of every student in the "
                                                              "results JSON again with today's code, then time all rows")
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.time()
    if args.time_only or args.refresh_ptq:
        rows = json.loads(Path(__file__).with_name("mixed_precision_results.json").read_text())
        if args.refresh_ptq:
            refresh_ptq(rows, args)
        time_rows(rows, args)
        write_results(rows, args, time.time() - t0)
        return
    architectures.WORK = WORK
    results = Path(__file__).with_name("mixed_precision_results.json")
    others = [r for r in json.loads(results.read_text()) if r["student"] not in args.students] if results.is_file() and not args.fresh else []
    data = load_data(DataConfig(train_subset=args.train_images, val_fraction=args.val_fraction), args.seed, store_size=32)
    rows: list[dict] = others  # the other students' rows stay; time_rows times them again with these
    for name in args.students:
        ckpt = architectures.train_fp32(name, data, args)  # the architecture benchmark's recipe, into this benchmark's folder
        ptq, fp32_top1 = ptq_row(name, ckpt, data, args)
        mine = [ptq]
        kept_ranking = WORK / name / "sensitivity_first_pass.json"  # survives deleting a budget's folder to run it again
        for budget in BUDGETS:
            ranked = WORK / name / f"qad_budget_{BUDGETS[0]:g}" / "sensitivity.json"
            if ranked.is_file() and not kept_ranking.is_file():
                shutil.copyfile(ranked, kept_ranking)
            row, full = budget_run(name, ckpt, data, budget, args, kept_ranking if kept_ranking.is_file() else None)
            if budget == BUDGETS[0]:
                mine.append(full)
            mine.append(row)
        for r in mine:
            r["fp32_test_top1"] = fp32_top1
        rows += mine
        ui.log(f"{name}: " + "; ".join(f"{r['row']} {100 * r['test_top1']:.2f}% ({r['float_layers']} float)" for r in mine))
        write_results(rows, args, time.time() - t0)
    time_rows(rows, args)
    write_results(rows, args, time.time() - t0)
    print(Path(__file__).with_name("mixed_precision_results.md").read_text())


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
