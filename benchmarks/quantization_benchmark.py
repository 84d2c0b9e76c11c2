"""INT8 side by side: FP32 vs edgekd QAD (ort-cpu layout) vs onnxruntime quantize_static vs naive fake-quant export.

For each student (nano_cnn and the wider small_cnn) in one run:
1. train the FP32 student on Fashion-MNIST (KD from benchmarks/_work/teacher/best.pt through
   edgekd.distill when that checkpoint exists, else hard labels);
2. FP32 ONNX;
3. edgekd QAD: fold BN, INT8 fake-quant (modelopt), max calibration on 512 train images, fine-tune,
   export in the onnxruntime-CPU layout with the trained scales (relu_codes 255, and 127 for comparison);
4. onnxruntime ``quantize_static`` (QDQ, per-channel s8 weights, u8 activations, MinMax on the same
   512 images) on the FP32 ONNX of step 2: plain post-training quantization;
5. naive: modelopt ``INT8_DEFAULT_CFG`` fake-quant of the FP32 student (BN not folded), max
   calibration, exported straight to ONNX (TensorRT-style Q/DQ) and run on onnxruntime CPU.

Measured: Fashion-MNIST test top-1 of the ONNX file in onnxruntime, and onnxruntime CPU latency
(2 threads, batch 1 and 64, median of --runs runs after warm-up), ORT-vs-PyTorch top-1 agreement of
the QAD export with its fake-quant model on the test set. Results -> benchmarks/quantization_results.md.

    nice -n 10 .venv/bin/python benchmarks/quantization_benchmark.py            # full (see results file for time)
    .venv/bin/python benchmarks/quantization_benchmark.py --quick              # ~2 min smoke run
"""

from __future__ import annotations

import argparse
import copy
import inspect
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from edgekd import ui
from edgekd.config import DataConfig, DistillConfig, QuantizeConfig, TrainConfig
from edgekd.data import calibration_images
from edgekd.export import (agreement, export_fp32, export_int8_ort, export_int8_tensorrt, ort_logits, ort_quantize_static,
                           reference_logits)
from edgekd.data import load_data
from edgekd.runners.timing import median_latency_ms
from edgekd.manifest import versions
from edgekd.atomic import write_bytes_atomic
from edgekd.models import count_params, create_model, model_from_checkpoint
from edgekd.quantize import forward_loop_over, load_quantized, quantize_model, save_quantized
from edgekd.train import cross_entropy_loss, fit, FitOptions, seed_everything

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import machine as common_machine  # noqa: E402
DEFAULT_RELU_CODES = inspect.signature(export_int8_ort).parameters["relu_codes"].default
QAD_LABEL = f"INT8 edgekd QAD, ort-cpu layout (default relu_codes={DEFAULT_RELU_CODES})"
TEACHER = HERE / "_work" / "teacher" / "best.pt"


def machine() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    vnni = "VNNI" if ("avx512_vnni" in flags or "avx_vnni" in flags) else "no VNNI (AVX2 u8s8 kernels can saturate)"
    return f"{common_machine()}, {vnni}, no GPU"


def make_loss(model, data, use_teacher: bool):
    if use_teacher:
        from edgekd.distill import build_distill_loss, load_teacher

        loss, extra = build_distill_loss(model, [load_teacher(TEACHER)], DistillConfig(), data, augment="flip")
        return loss, extra
    return cross_entropy_loss(), None


LOSS_USED: dict[str, str] = {}  # student -> the loss its FP32 checkpoint was really trained with (reused ones included)


def loss_label(use_teacher: bool) -> str:
    return "KD from benchmarks/_work/teacher/best.pt" if use_teacher else "hard labels (no teacher checkpoint present)"


def train_student(name: str, data, epochs: int, work: Path, use_teacher: bool, seed: int, reuse: bool = False):
    seed_everything(seed)
    if reuse and (work / f"{name}-fp32" / "best.pt").is_file():
        from edgekd.models import load_checkpoint

        ck = load_checkpoint(work / f"{name}-fp32" / "best.pt")
        LOSS_USED[name] = ck.get("bench_loss", "hard labels (reused checkpoint trained before the teacher existed; it predates the bench_loss field)")
        return model_from_checkpoint(ck), 0.0
    model = create_model(name, data.num_classes)
    loss, _ = make_loss(model, data, use_teacher)
    LOSS_USED[name] = loss_label(use_teacher)
    res = fit(model, data, TrainConfig(epochs=epochs, batch_size=128, lr=3e-3, weight_decay=0.05), work / f"{name}-fp32", loss, model.preprocess, FitOptions(augment="flip", seed=seed, kind="student", resume=False, description=f"FP32 {name}", ckpt_extra={"bench_loss": LOSS_USED[name]}))
    return model_from_checkpoint(res.best_path), res.seconds


def qad(fp32, data, epochs: int, work: Path, use_teacher: bool, calib, seed: int, reuse: bool = False):
    if reuse and (work / f"{fp32.edgekd_spec['name']}-qad" / "last.pt").is_file():
        return load_quantized(work / f"{fp32.edgekd_spec['name']}-qad" / "last.pt"), 0.0
    model = copy.deepcopy(fp32)
    model.edgekd_spec = fp32.edgekd_spec
    model.preprocess = fp32.preprocess
    model = quantize_model(model, QuantizeConfig(calibrator="max", layout="ort-cpu"), calib, model.preprocess)
    loss, _ = make_loss(model, data, use_teacher)
    name = fp32.edgekd_spec["name"]
    res = fit(model, data, TrainConfig(epochs=epochs, batch_size=128, lr=1e-4, weight_decay=0.0, warmup_epochs=0.0), work / f"{name}-qad", loss,
              model.preprocess, FitOptions(augment="flip", seed=seed, kind="quantized-student", resume=False,
                                           save_fn=lambda p, m, e: save_quantized(p, m, data.classes, e), description=f"QAD {name}"))
    return load_quantized(res.last_path), res.seconds


def naive(fp32, calib):
    """modelopt INT8_DEFAULT_CFG straight on the FP32 student (BN unfolded), max calibration."""
    import modelopt.torch.quantization as mtq

    model = copy.deepcopy(fp32).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(model, copy.deepcopy(mtq.INT8_DEFAULT_CFG), forward_loop_over(calib, fp32.preprocess))
    model.edgekd_quant = {"format": "naive"}
    return model


def bench_file(path: Path, x: np.ndarray, labels: np.ndarray, runs: int, shape) -> dict:
    logits = ort_logits(path, x)
    return {"top1": float((logits.argmax(1) == labels).mean()), "logits": logits,
            "b1_ms": median_latency_ms("ort-cpu", path, 1, shape, runs=runs, warmup=20), "b64_ms": median_latency_ms("ort-cpu", path, 64, shape, runs=runs, warmup=10)}


def run_student(name: str, data, args, work: Path, use_teacher: bool) -> list[dict]:
    calib = calibration_images(data.train, 512, args.seed)
    fp32, fp32_s = train_student(name, data, args.epochs, work, use_teacher, args.seed, args.reuse)
    qmodel, qad_s = qad(fp32, data, args.qad_epochs, work, use_teacher, calib, args.seed, args.reuse)
    pre = fp32.preprocess
    shape = (pre.channels, pre.input_size, pre.input_size)
    x_t = pre(data.test.images)
    x, labels = x_t.numpy(), data.test.labels.numpy()
    d = work / name
    d.mkdir(parents=True, exist_ok=True)
    export_fp32(fp32, d / "fp32.onnx", pre)
    _, untrained = export_int8_ort(qmodel, d / "qad_ort.onnx", pre, calib)  # edgekd's default relu_codes
    other = 255 if DEFAULT_RELU_CODES == 127 else 127
    export_int8_ort(qmodel, d / "qad_ort_other.onnx", pre, calib, relu_codes=other)
    ort_quantize_static(d / "fp32.onnx", d / "ort_static.onnx", calib, pre)
    nv = naive(fp32, calib)
    export_int8_tensorrt(nv, d / "naive.onnx", pre)
    fq_ref = reference_logits(qmodel, x_t)
    rows = []
    variants = [("FP32", "fp32.onnx"), (QAD_LABEL, "qad_ort.onnx"), (f"INT8 edgekd QAD, relu_codes={other}", "qad_ort_other.onnx"),
                ("INT8 onnxruntime quantize_static", "ort_static.onnx"), ("INT8 naive fake-quant export", "naive.onnx")]
    for label, fname in variants:
        ui.log(f"timing {name} {label}")
        r = bench_file(d / fname, x, labels, args.runs, shape)
        row = {"student": name, "params": count_params(fp32), "variant": label, "top1": r["top1"], "b1_ms": r["b1_ms"], "b64_ms": r["b64_ms"]}
        if "QAD" in label:
            ag = agreement(fq_ref, r["logits"], labels)
            row["agreement"] = ag["top1_agreement"]
            row["fakequant_top1"] = ag["reference_top1"]
        rows.append(row)
    base = rows[0]
    for r in rows:
        r["speedup_b1"] = base["b1_ms"] / r["b1_ms"]
        r["speedup_b64"] = base["b64_ms"] / r["b64_ms"]
    rows[0]["train_s"] = fp32_s
    rows[1]["train_s"] = qad_s
    rows[1]["untrained"] = untrained
    return rows


def goals(rows: list[dict]) -> list[str]:
    out = []
    for student in dict.fromkeys(r["student"] for r in rows):
        rs = {r["variant"]: r for r in rows if r["student"] == student}
        fp, q, st = rs["FP32"], rs[QAD_LABEL], rs["INT8 onnxruntime quantize_static"]
        ok = lambda b: "met" if b else "NOT met"  # noqa: E731
        out.append(f"- {student}: accuracy within 0.3 pt of FP32: {ok(q['top1'] >= fp['top1'] - 0.003)} ({(q['top1'] - fp['top1']) * 100:+.2f} pt); "
                   f"not below quantize_static: {ok(q['top1'] >= st['top1'])} ({(q['top1'] - st['top1']) * 100:+.2f} pt); "
                   f"batch-64 latency <= 1.1x quantize_static: {ok(q['b64_ms'] <= 1.1 * st['b64_ms'])} ({q['b64_ms'] / st['b64_ms']:.2f}x); "
                   f"ORT-vs-PyTorch agreement >= 99.5%: {ok(q['agreement'] >= 0.995)} ({q['agreement']:.2%})"
                   + (f"; >= 2x faster than FP32 at batch 64: {ok(q['speedup_b64'] >= 2)} ({q['speedup_b64']:.2f}x)" if student != "nano_cnn" else ""))
    return out


def write_markdown(rows: list[dict], args, seconds: float, use_teacher: bool, path: Path) -> None:
    v = versions()
    lines = [
        "# INT8 quantization benchmark (issue 4)",
        "",
        f"Command: `python benchmarks/quantization_benchmark.py {' '.join(sys.argv[1:])}`  ",
        f"Machine: {machine()} (a load average well above 0 means other jobs shared the CPU and latencies carry noise).  ",
        f"Versions: torch {v.get('torch')}, onnxruntime {v.get('onnxruntime')}, modelopt {v.get('modelopt')}, onnx {v.get('onnx')}.  ",
        f"Budget: FP32 students {args.epochs} epoch(s), QAD {args.qad_epochs} epoch(s) (lr 1e-4), batch 128, flip augmentation, "
        f"{len_train(args)} training images; loss of the FP32 students (and their QAD runs, trained in the same run): {'; '.join(f'{k}: {v}' for k, v in LOSS_USED.items()) or loss_label(use_teacher)}; "
        f"calibration 512 training images (max). Test set: {args.test_n} Fashion-MNIST test images. "
        f"Latency: onnxruntime {v.get('onnxruntime')} CPU provider, 2 intra-op threads, median of {args.runs} runs. Wall time of the run: {seconds / 60:.1f} min.",
        "",
        "| student | params | variant | test top-1 | batch 1 ms | batch 64 ms | vs FP32 b1 | vs FP32 b64 | ORT~PyTorch top-1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['student']} | {r['params']:,} | {r['variant']} | {r['top1']:.4f} | {r['b1_ms']:.3f} | {r['b64_ms']:.2f} | "
                     f"{r['speedup_b1']:.2f}x | {r['speedup_b64']:.2f}x | {agree_cell(r)} |")
    if args.reuse:
        lines.insert(6, "Checkpoints reused from an earlier run of this script with the same budget (--reuse); training times are that run's.  ")
    lines += ["", "Goals (from the issue):", *goals(rows), "",
              "Notes:",
              "- 'ORT~PyTorch' is the top-1 agreement of the onnxruntime INT8 file with the fake-quant PyTorch model it came from, on the whole test set.",
              "- The QAD export quantizes every op onnxruntime has an integer kernel for, with the trained scales; the convs reading the image get "
              "u8 weights (zero point 128), since u8 codes up to 255 there saturate onnxruntime's AVX2 u8 x s8 kernel.",
              "- relu_codes=127 keeps the exact trained grid (u8 codes <= 127 for values <= amax, so AVX2 u8 x s8 cannot saturate) but clips at 2*amax "
              "instead of amax; relu_codes=255 keeps the trained clipping range with a grid twice as fine.",
              "- The naive export is TensorRT-style Q/DQ (inputs only): onnxruntime CPU cannot fuse it and runs it in float plus Q/DQ overhead.",
              ""]
    write_bytes_atomic(path, "\n".join(lines).encode())


def agree_cell(row: dict) -> str:
    return f"{row['agreement']:.4f}" if "agreement" in row else "-"


def len_train(args) -> str:
    return f"{args.train_subset:,}" if args.train_subset else "54,000"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3,000 train / 1,000 test images, 1 epoch each, 20 timing runs")
    ap.add_argument("--students", default="nano_cnn,small_cnn")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--qad-epochs", type=int, default=1)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--train-subset", type=int, default=None, help="train on only N images (the 2-core CPU budget)")
    ap.add_argument("--reuse", action="store_true", help="reuse FP32/QAD checkpoints this script left in --work (export + timing only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=HERE / "_work" / "quantization")
    ap.add_argument("--out", type=Path, default=None, help="results Markdown (default: benchmarks/quantization_results.md; --quick: the work dir)")
    args = ap.parse_args()
    test_subset = None
    if args.quick:
        args.train_subset, test_subset = 3000, 1000
    if args.quick:
        args.epochs, args.qad_epochs, args.runs = 1, 1, 20
    torch.set_num_threads(2)
    t0 = time.time()
    data = load_data(DataConfig(train_subset=args.train_subset, test_subset=test_subset), args.seed)
    args.test_n = len(data.test)
    use_teacher = TEACHER.is_file()
    if use_teacher:
        try:
            import edgekd.distill  # noqa: F401
        except ImportError:
            use_teacher = False
    rows = []
    for name in args.students.split(","):
        rows += run_student(name.strip(), data, args, args.work, use_teacher)
    out = args.out or (args.work / "quantization_results_quick.md" if args.quick else HERE / "quantization_results.md")
    write_markdown(rows, args, time.time() - t0, use_teacher, out)
    ui.show(ui.table("INT8 benchmark", ["student", "variant", "top-1", "b1 ms", "b64 ms", "agree"],
                     [[r["student"], r["variant"], r["top1"], r["b1_ms"], r["b64_ms"], r.get("agreement")] for r in rows]))
    print(out.read_text())


if __name__ == "__main__":
    main()
