"""Bring your own network: every standard CNN through QAD and both INT8 layouts, side by side (issue 12).

For each student: train it in FP32 on Fashion-MNIST at 32 px (timm networks: grey repeated to 3
channels, random init except EfficientNet-Lite0's offline ImageNet weights), then for each layout
(``tensorrt``, ``ort-cpu``) run edgekd's own stages on it: ``run_qad`` (quantizers placed on the
traced graph for that layout, calibration, one epoch of QAD) and ``run_export`` (the real export
stage with its readiness gate). Recorded per row:

- whether QAD + export completed (the gate passed), and the TensorRT-readiness counts: quantized
  Conv/Gemm of all, residual Adds with both inputs quantized, readiness errors;
- ONNX-vs-PyTorch (fake-quant) top-1 agreement and max |logit diff| on the whole test set;
- FP32 and INT8 test top-1 of the exported files (the TensorRT-layout file run by onnxruntime with
  its Q/DQ executed as written: TensorRT's arithmetic emulated in float), and the PTQ val top-1;
- onnxruntime CPU p50 at batch 1 and 64 for the FP32 file, edgekd's ort-cpu INT8 file and
  onnxruntime's own ``quantize_static`` of the same FP32 file, timed interleaved in one process
  after all training (median of per-round medians).

    .venv/bin/python benchmarks/architectures.py                  # ~45 min on 2 idle cores
    .venv/bin/python benchmarks/architectures.py --quick          # a check that it runs (labelled)
    .venv/bin/python benchmarks/architectures.py --latency-only --sizes 224 160 --students resnet18   # deployment resolution,
        # every runtime (random init: latency does not depend on the weights); rows added to architectures_latency_results.json
"""

from __future__ import annotations

import argparse
import datetime
import json
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
from edgekd import ui  # noqa: E402
from edgekd.config import DataConfig, ExportConfig, QuantizeConfig, TrainConfig  # noqa: E402
from edgekd.data import calibration_images  # noqa: E402
from edgekd.runners.timing import interleaved_latency_ms  # noqa: E402
from edgekd.export import agreement, load_for_export, ort_logits, ort_quantize_static, reference_logits  # noqa: E402
from edgekd.data import load_data  # noqa: E402
from edgekd.models import count_params, create_model  # noqa: E402
from _stages import export_run, qad_run  # noqa: E402
from edgekd.train import cross_entropy_loss, fit, FitOptions  # noqa: E402

STUDENTS = ["resnet18", "mobilenetv2_100", "mobilenetv3_large_100", "efficientnet_lite0", "regnetx_002", "repvgg_a0", "mobilenetv4_conv_small",
            "nano_cnn", "small_cnn"]
LAYOUTS = ("tensorrt", "ort-cpu")
WORK = ROOT / "benchmarks" / "_work" / "architectures"


def test_accuracy(path: Path, x: np.ndarray, labels: np.ndarray, exact_qdq: bool = False) -> tuple[float, np.ndarray]:
    logits = ort_logits(path, x, exact_qdq=exact_qdq)
    return float((logits.argmax(1) == labels).mean()), logits


def train_fp32(name: str, data, args) -> Path:
    out = WORK / name / "fp32"
    if (out / "best.pt").is_file() and not args.retrain:
        return out / "best.pt"
    torch.manual_seed(args.seed)
    model = create_model(name, 10, pretrained="offline" if name == "efficientnet_lite0" else "none", input_size=32)
    cfg = TrainConfig(epochs=args.epochs, batch_size=64, lr=args.lr, weight_decay=0.05, warmup_epochs=0.3)
    fit(model, data, cfg, out, cross_entropy_loss(), model.preprocess, FitOptions(augment="flip", seed=args.seed, resume=False, description=f"{name} FP32"))
    return out / "best.pt"


def quantize_and_export(name: str, layout: str, ckpt: Path, data, args) -> dict:
    out = WORK / name / layout
    qcfg = QuantizeConfig(layout=layout, calib_images=512, learn_ranges=not getattr(args, "fixed_ranges", False),
                          train=TrainConfig(epochs=args.qad_epochs, batch_size=64, lr=1e-4, weight_decay=0.0, warmup_epochs=0.0))
    t0 = time.time()
    reused = args.reuse_qad and (out / "qad" / "metrics.json").is_file()
    if reused:
        qad = {"checkpoint": str(out / "qad" / "best.pt"), "metrics": json.loads((out / "qad" / "metrics.json").read_text())}
    else:
        qad = qad_run(ckpt, qcfg, data, out / "qad", qad_loss(ckpt, data, out, args), args.seed)
    row = {"student": name, "layout": layout, "qad_seconds": qad["metrics"].get("train_seconds") if reused else round(time.time() - t0, 1), "ptq_val_top1": qad["metrics"]["ptq_val_top1"],
           "fp32_val_top1": qad["metrics"]["fp32_val_top1"], "qad_val_top1": qad["metrics"]["val"]["top1"], "qad_result": qad["metrics"]["result"],
           "calibrator": qad["metrics"].get("calibrator"), "calibrators_tried": qad["metrics"].get("calibrators_tried")}
    try:
        rec = export_run(qad["checkpoint"], out / "export", data, ExportConfig(precision="int8", layout=layout, check_batch=256), qcfg, args.seed)
    except Exception as exc:  # noqa: BLE001 - a failed export is a result of this benchmark, recorded as such
        row.update(completed=False, error=str(exc).splitlines()[0][:200])
        return row
    trt = rec["checks"]["tensorrt_readiness"]
    row.update(completed=True, onnx=rec["path"], fp32_onnx=rec["fp32_path"], trt_errors=len(trt["errors"]),
               trt_quantized_ops=sum(1 for op in trt["quantized_ops"] if op["activation"] and op["weight"] and op["weight_axis"] == 0),
               compute_ops=len(trt["quantized_ops"]) + len(trt["float_ops"]),
               residual_adds=len(trt["residual_adds"]), residual_adds_quantized=sum(a.get("layout", "both" if all(a["inputs_quantized"]) else "none") in ("identity-only", "both") for a in trt["residual_adds"]),
               ort_integer_ops=rec["checks"]["ort_cpu_fusion"]["counts"]["integer_ops"],
               ort_float_ops=rec["checks"]["ort_cpu_fusion"]["counts"]["float_compute_ops"], relu_codes=rec.get("relu_codes"),
               u8_weights=rec.get("u8_weights"), weight_bits=rec.get("weight_bits", 8))
    model, _ = load_for_export(qad["checkpoint"])
    x = model.preprocess(data.test.images)
    labels = data.test.labels.numpy()
    ref = reference_logits(model, x)
    row["int8_test_top1"], got = test_accuracy(Path(rec["path"]), x.numpy(), labels, exact_qdq=layout == "tensorrt")
    # FP32 is the student QAD started from (its checkpoint, in PyTorch): the export's model.fp32.onnx of a
    # QAD checkpoint is the INT8 weights with float activations, which hides what the weight grid costs
    row["fp32_test_top1"] = float((reference_logits(load_for_export(ckpt)[0], x).argmax(1) == labels).mean())
    row["int8_weights_fp32_test_top1"], _ = test_accuracy(Path(rec["fp32_path"]), x.numpy(), labels)
    row["fake_quant_test_top1"] = float((ref.argmax(1) == labels).mean())
    agree = agreement(ref, got)
    row["agreement"], row["max_abs_diff"] = agree["top1_agreement"], agree["max_abs_diff"]
    row["noise_floor"] = noise_floor(model, x, ref)
    if layout == "ort-cpu":
        # onnxruntime's own quantize_static starts from the FP32 student's export, as a user's would
        fp32_file = export_run(ckpt, out / "fp32_export", data, ExportConfig(precision="fp32", layout=layout), qcfg, args.seed)["path"]
        row["fp32_onnx"] = fp32_file
        base = out / "export" / "quantize_static.onnx"
        ort_quantize_static(Path(fp32_file), base, calibration_images(data.train, 512, args.seed), model.preprocess)
        row["quantize_static_onnx"] = str(base)
        row["quantize_static_test_top1"], _ = test_accuracy(base, x.numpy(), labels)
        like_for_like = {"all": ("quantize_static_u8u8", {"u8_weights": True}), "none": ("quantize_static_r7", {"reduce_range": True})}
        if row["u8_weights"] in like_for_like:  # onnxruntime's own quantize_static with the weight type edgekd shipped (U8U8, or 7-bit)
            key, options = like_for_like[row["u8_weights"]]
            base_like = out / "export" / f"{key}.onnx"
            ort_quantize_static(Path(fp32_file), base_like, calibration_images(data.train, 512, args.seed), model.preprocess, **options)
            row[f"{key}_onnx"] = str(base_like)
            row[f"{key}_test_top1"], _ = test_accuracy(base_like, x.numpy(), labels)
        row["shape"] = [model.preprocess.channels, model.preprocess.input_size, model.preprocess.input_size]
    return row


def qad_loss(ckpt: Path, data, out: Path, args):
    """QAD's loss: hard labels, or (``--qad-teacher fp32``, what ``edgekd quantize --teacher`` does with
    the student's own FP32 checkpoint) distillation from the FP32 model QAD started from."""
    if args.qad_teacher == "none":
        return lambda model: (cross_entropy_loss(), None)
    from edgekd.config import DistillConfig
    from edgekd.distill import build_distill_loss, load_teacher

    teacher = load_teacher(ckpt)
    return lambda model: build_distill_loss(model, [teacher], DistillConfig(), data, out / "cache", "flip")


def noise_floor(model: torch.nn.Module, x: torch.Tensor, ref: np.ndarray) -> float:
    """Top-1 agreement of the fake-quant model with itself run in float64: how often a last-bit
    difference in float arithmetic flips a rounding decision that carries through to the top-1.
    No runtime can agree with PyTorch better than PyTorch agrees with itself."""
    import copy

    m64 = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        r64 = np.concatenate([m64(x[i : i + 250].double()).numpy() for i in range(0, len(x), 250)])
    return float((r64.argmax(1) == ref.argmax(1)).mean())


def time_rows(rows: list[dict], args) -> None:
    """onnxruntime CPU p50 of FP32 / edgekd INT8 / quantize_static, interleaved round by round."""
    for row in rows:
        if row["layout"] != "ort-cpu" or not row.get("completed"):
            continue
        files = {"fp32": row["fp32_onnx"], "edgekd": row["onnx"], "quantize_static": row["quantize_static_onnx"]}
        for key in baselines(row)[1:]:
            files[key] = row[f"{key}_onnx"]
        for batch, runs in ((1, args.runs), (64, max(10, args.runs // 4))):
            per = interleaved_latency_ms(files, batch, tuple(row["shape"]), runs, args.rounds)
            for key in files:
                row[f"{key}_b{batch}_ms"] = statistics.median(per[key])


def fmt_pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def kept_rows(rows: list[dict], args) -> list[str]:
    return [f"{r['student']} {r['layout']}" for r in rows if r["student"] not in args.students or r["layout"] not in args.layouts]


def write_results(rows: list[dict], args, seconds: float, path: Path) -> None:
    rows.sort(key=lambda r: (STUDENTS.index(r["student"]) if r["student"] in STUDENTS else len(STUDENTS), LAYOUTS.index(r["layout"])))
    label = "QUICK CHECK (tiny budget, not the real numbers)" if args.quick else "full run"
    lines = [f"# Bring your own network: QAD + both INT8 layouts per architecture ({label})", "",
             f"- Date: {datetime.date.today()}; machine: {machine()}",
             f"- Command: `{' '.join(['.venv/bin/python', 'benchmarks/architectures.py'] + sys.argv[1:])}` ({seconds / 60:.1f} min)",
             f"- Data: Fashion-MNIST, {args.train_images} training images (10% held for validation), the full 10,000-image test set, 32 px; timm "
             "networks see the grey image repeated to 3 channels.",
             f"- Budget per network: FP32 {args.epochs} epochs (AdamW lr {args.lr}, batch 64, flip); then per layout calibration on 512 images (calibrator "
             "auto: max, or when max loses more than a point on validation the best of max / MSE / percentile / entropy on validation; "
             "the PTQ column names the one kept) "
             f"+ {args.qad_epochs} QAD epoch(s) (lr 1e-4, {QAD_LOSS[getattr(args, 'qad_teacher', 'none')]}; activation ranges "
             f"{'fixed at calibration' if getattr(args, 'fixed_ranges', False) else 'learned with the weights (LSQ, range lr ' + str(QuantizeConfig().range_lr) + ')'}). Pretrained: only "
             "efficientnet_lite0 (offline ImageNet weights); every other network starts from random init.",
             "- INT8 accuracy is that of the exported file, run by onnxruntime (the tensorrt-layout file with graph optimisations off, so its "
             "Q/DQ run as written: TensorRT's arithmetic emulated in float). FP32 is the FP32 student QAD started from; onnxruntime's "
             "quantize_static quantizes that student's own FP32 export.",
             *([f"- Rows trained in an earlier run of this script with the same budget (`--merge`): {', '.join(kept_rows(rows, args)) or 'none'}; "
                "every row was timed together in this run."] if getattr(args, "merge", False) else []),
             *(["- Timed by `--time-only`: the rows of the results JSON (trained by an earlier invocation) timed again, every row in one run "
                "(the minutes above are the timing run's)."] if getattr(args, "time_only", False) else []),
             "", "## Correctness and accuracy", "",
             "| student | layout | completed | Conv/Gemm quantized (per-channel axis 0) | residual adds quantized as TensorRT fuses them (tensorrt: identity input; ort-cpu: both) | TensorRT readiness errors "
             "| ORT integer / float compute ops | ONNX~PyTorch top-1 | PyTorch fp32~fp64 top-1 (noise floor) | max abs logit diff | FP32 test % "
             "| PTQ val % | INT8 QAD test % | INT8 - FP32 (points) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r.get("completed"):
            lines.append(f"| {r['student']} | {r['layout']} | **no**: {r.get('error')} |" + " |" * 11)
            continue
        drop = 100 * (r["int8_test_top1"] - r["fp32_test_top1"])
        lines.append(f"| {r['student']} | {r['layout']} | yes | {r['trt_quantized_ops']}/{r['compute_ops']} | {r['residual_adds_quantized']}/{r['residual_adds']} "
                     f"| {r['trt_errors'] if r['layout'] == 'tensorrt' else '(n/a: u8 layout)'} | {r['ort_integer_ops']} / {r['ort_float_ops']} "
                     f"| {fmt_pct(r['agreement'])}% | {fmt_pct(r.get('noise_floor'))}% | {r['max_abs_diff']:.3f} | {fmt_pct(r['fp32_test_top1'])} | {fmt_pct(r['ptq_val_top1'])} "
                     f"{'(' + r['calibrator'] + ') ' if r.get('calibrator') else ''}| {fmt_pct(r['int8_test_top1'])} | {drop:+.2f} |")
    lines += ["", "## onnxruntime CPU latency (ort-cpu layout), p50 ms, 2 threads", "",
              "| student | params | FP32 b1 | edgekd INT8 b1 | quantize_static b1 | FP32 b64 | edgekd INT8 b64 | quantize_static b64 "
              "| edgekd / quantize_static b1 | b64 | INT8 speed-up vs FP32 b1 | b64 | quantize_static test % | edgekd weights |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["layout"] != "ort-cpu" or not r.get("completed") or "edgekd_b1_ms" not in r:
            continue
        for base in baselines(r):
            lines.append(f"| {r['student']} | {r['params']:,} | {r['fp32_b1_ms']:.3f} | {r['edgekd_b1_ms']:.3f} | {r[base + '_b1_ms']:.3f} "
                         f"| {r['fp32_b64_ms']:.2f} | {r['edgekd_b64_ms']:.2f} | {r[base + '_b64_ms']:.2f} "
                         f"| {r['edgekd_b1_ms'] / r[base + '_b1_ms']:.2f}x | {r['edgekd_b64_ms'] / r[base + '_b64_ms']:.2f}x "
                         f"| {r['fp32_b1_ms'] / r['edgekd_b1_ms']:.2f}x | {r['fp32_b64_ms'] / r['edgekd_b64_ms']:.2f}x "
                         f"| {fmt_pct(r[base + '_test_top1'])}{BASELINE_LABEL.get(base, '')} | {WEIGHTS.get(r.get('u8_weights'), 's8')} |")
    lines += ["", "## Goals (issue 12)", ""] + goals(rows) + ["", "Raw rows: `architectures_results.json` beside this file.", ""]
    path.write_text("\n".join(lines))
    path.with_suffix(".json").write_text(json.dumps(rows, indent=1, default=str))


QAD_LOSS = {"fp32": "distilling from the FP32 student QAD started from: soft targets at T=1 and labels, alpha 0.5, as `edgekd quantize --teacher`",
            "none": "hard labels only"}
WEIGHTS = {"image": "s8 (u8 on the image conv)", "signed": "u8 on signed inputs", "all": "u8 (saturation-free)", "none": "7-bit s8 (trained)"}
BASELINE_LABEL = {"quantize_static_u8u8": " (U8U8)", "quantize_static_r7": " (reduce_range: 7-bit)"}


def baselines(row: dict) -> list[str]:
    """quantize_static variants timed for a row; the last is the like-for-like one (same weight type)."""
    return ["quantize_static"] + [k for k in BASELINE_LABEL if f"{k}_onnx" in row]


def goals(rows: list[dict]) -> list[str]:
    done = [r for r in rows if r.get("completed")]
    trt = [r for r in done if r["layout"] == "tensorrt"]
    out = [f"- Completed: {len(done)}/{len(rows)} rows.",
           f"- TensorRT layout, 0 readiness errors and every Conv/Gemm + residual-add input quantized: "
           f"{sum(r['trt_errors'] == 0 and r['trt_quantized_ops'] == r['compute_ops'] and r['residual_adds_quantized'] == r['residual_adds'] for r in trt)}/{len(trt)}.",
           f"- ONNX~PyTorch top-1 agreement >= 99%: {sum(r['agreement'] >= 0.99 for r in done)}/{len(done)} "
           f"(lowest {min((r['agreement'] for r in done), default=0):.2%}); at or above PyTorch's own fp32~fp64 noise floor minus 0.5 points: "
           f"{sum(r['agreement'] >= r.get('noise_floor', 1.0) - 0.005 for r in done)}/{len(done)}.",
           f"- INT8 within 0.5 points of FP32: {sum(r['int8_test_top1'] >= r['fp32_test_top1'] - 0.005 for r in done)}/{len(done)}."]
    timed = [r for r in done if "edgekd_b1_ms" in r]
    ok = [r for r in timed if max(r["edgekd_b1_ms"] / r[baselines(r)[-1] + "_b1_ms"], r["edgekd_b64_ms"] / r[baselines(r)[-1] + "_b64_ms"]) <= 1.1]
    out.append(f"- edgekd INT8 <= 1.1x quantize_static latency at batch 1 and 64 (like-for-like weights: U8U8 where edgekd shipped u8 "
               f"weights, reduce_range where it shipped 7-bit ones): {len(ok)}/{len(timed)}.")
    slow = [r["student"] for r in timed if r["edgekd_b1_ms"] > r["fp32_b1_ms"] or r["edgekd_b64_ms"] > r["fp32_b64_ms"]]
    out.append(f"- INT8 not faster than FP32 here at batch 1 or 64 (the build says so and suggests the FP32 export): {', '.join(slow) or 'none'}.")
    return out


def latency_only(args) -> None:
    """FP32 / INT8 p50 on onnxruntime and OpenVINO at deployment resolution (``_deploy_latency.py``); rows accumulate across invocations."""
    from _deploy_latency import cpu_flags, latency_row, latency_table

    out = args.out.with_name("architectures_latency_results.md")
    store = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else {"rows": [], "runs": []}
    t0 = time.time()
    for name in args.students:
        for size in args.sizes:
            row = latency_row(name, size, WORK / "latency", {1: args.runs, 64: max(4, args.runs // 8)}, args.rounds)
            store["rows"] = [r for r in store["rows"] if (r["network"], r["size"]) != (name, size)] + [row]
            out.with_suffix(".json").write_text(json.dumps(store, indent=1))
    store["runs"].append({"argv": sys.argv[1:], "date": str(datetime.date.today()), "machine": f"{machine()}; flags {cpu_flags()}", "minutes": round((time.time() - t0) / 60, 1)})
    out.with_suffix(".json").write_text(json.dumps(store, indent=1))
    order = {n: i for i, n in enumerate(STUDENTS)}
    lines = ["# Every network at deployment resolution: FP32 and INT8 on onnxruntime and OpenVINO, p50 ms, 2 threads", "",
             *[f"- {r['date']} `{' '.join(['benchmarks/architectures.py'] + r['argv'])}` ({r['minutes']} min): {r['machine']}" for r in store["runs"]],
             "- Random-init networks (3 channels, 10 classes); files as `benchmarks/_deploy_latency.py` describes; timm nets and edgekd's students alike.", ""]
    lines += latency_table(sorted(store["rows"], key=lambda r: (-r["size"], order.get(r["network"], len(order)))))
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--students", nargs="+", default=STUDENTS)
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS, help="layouts to (re)run; with --merge the others' rows are kept")
    ap.add_argument("--train-images", type=int, default=6000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--qad-epochs", type=int, default=1)
    ap.add_argument("--qad-teacher", choices=["fp32", "none"], default="fp32",
                    help="QAD learns from the FP32 student it started from (soft targets T=1 + labels, alpha 0.5), or from hard labels only")
    ap.add_argument("--fixed-ranges", action="store_true", help="QAD keeps the calibrated activation ranges (before: it learns them)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--reuse-qad", action="store_true", help="export and measure the QAD checkpoints of an earlier run again (an export change) instead of re-running QAD")
    ap.add_argument("--quick", action="store_true", help="tiny budget, to check the script runs")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("architectures_results.md"))
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of students not in --students from the results JSON (continue a stopped run); all rows are timed together")
    ap.add_argument("--time-only", action="store_true",
                    help="only time the rows already in the results JSON (a run stopped before its timing phase) and rewrite the results")
    ap.add_argument("--latency-only", action="store_true", help="no training: time every network at --sizes on every CPU runtime")
    ap.add_argument("--sizes", nargs="+", type=int, default=[224, 160])
    args = ap.parse_args()
    if args.latency_only:
        latency_only(args)
        return
    if args.time_only:
        t0 = time.time()
        rows = json.loads(args.out.with_suffix(".json").read_text())
        time_rows(rows, args)
        write_results(rows, args, time.time() - t0, args.out)
        print(args.out.read_text())
        return
    if args.quick:
        args.train_images, args.epochs, args.runs, args.rounds = 1000, 1, 20, 1
        args.out = args.out.with_name("architectures_results_quick.md")
    torch.set_num_threads(2)
    t0 = time.time()
    data = load_data(DataConfig(train_subset=args.train_images), args.seed, store_size=32)
    rows = [r for r in json.loads(args.out.with_suffix(".json").read_text())
            if r["student"] not in args.students or r["layout"] not in args.layouts] if args.merge else []
    for row in rows:
        if row.get("completed") and "noise_floor" not in row:  # rows from a run that predates the column
            model, _ = load_for_export(WORK / row["student"] / row["layout"] / "qad" / "best.pt")
            x = model.preprocess(data.test.images)
            row["noise_floor"] = noise_floor(model, x, reference_logits(model, x))
    for name in args.students:
        ckpt = train_fp32(name, data, args)
        params = count_params(load_for_export(ckpt)[0])
        for layout in args.layouts:
            row = quantize_and_export(name, layout, ckpt, data, args)
            row["params"] = params
            rows.append(row)
            ui.log(f"{name} {layout}: {json.dumps({k: v for k, v in row.items() if not isinstance(v, str) or k == 'error'})}")
            write_results(rows, args, time.time() - t0, args.out)
    time_rows(rows, args)
    write_results(rows, args, time.time() - t0, args.out)
    print(args.out.read_text())


if __name__ == "__main__":
    main()
