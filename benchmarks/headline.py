"""The project's headline table, reproduced on this machine in one run.

For each student (nano_cnn < 100K params, small_cnn ~0.56M) it runs the real `edgekd build
--target x86-cpu` (distill -> QAD -> export) from one shared teacher, then measures side by side,
with the same onnxruntime CPU settings:

    teacher FP32 | student FP32 | student INT8 (edgekd QAD, ort-cpu layout) | student INT8 (ORT quantize_static PTQ)

Accuracy is the exported file's own Fashion-MNIST test top-1; latency is the p50 of >= 200 runs at
batch 1 and 64. Writes ``benchmarks/headline_results.md`` and ``benchmarks/headline.png``
(accuracy vs latency).

    python benchmarks/headline.py --teacher benchmarks/_work/teacher/best.pt          # full
    python benchmarks/headline.py --quick                                              # minutes, subset
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402
sys.path.insert(0, str(ROOT))

QUICK = ["data.train_subset=3000", "data.test_subset=1000", "teacher.input_size=48", "teacher.train.epochs=1", "student.train.epochs=2",
         "quantize.train.epochs=1", "quantize.calib_images=256"]




def latency(path: Path, batches: list[int], runs: int, threads: int) -> dict[int, float]:
    from edgekd.bench import BenchRequest, TimingPlan, run_bench

    r = run_bench(BenchRequest(model=str(path), runtime="ort-cpu", batches=batches, plan=TimingPlan(warmup=20, runs=runs), threads=threads))
    return {s["batch"]: s["p50_ms"] for s in r["sweep"]}


def accuracy(path: Path, data, preprocess) -> float:
    from edgekd.pipeline import onnx_test_accuracy

    return onnx_test_accuracy(path, data, preprocess)["top1"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", help="teacher checkpoint (default: train one in the first build, as `edgekd build` does)")
    ap.add_argument("--students", default="nano_cnn,small_cnn")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads for every row")
    ap.add_argument("--work", default="benchmarks/_work/headline")
    ap.add_argument("--set", action="append", default=[], help="recipe overrides for every build")
    ap.add_argument("--results", default="benchmarks/headline_results.md")
    args = ap.parse_args()

    import torch

    from edgekd.config import load_recipe
    from edgekd.data import Preprocess, calibration_images
    from edgekd.export import export_fp32, ort_quantize_static
    from edgekd.models import load_checkpoint, model_from_checkpoint
    from edgekd.pipeline import build

    t_start = time.time()
    work = ROOT / args.work
    rows, teacher_ckpt, data = [], args.teacher, None
    for student in args.students.split(","):
        recipe = load_recipe(None, (QUICK if args.quick else []) + args.set + [f"student.model={student}"])
        res = build(recipe, work / student, "x86-cpu", teacher_checkpoint=teacher_ckpt)
        out = work / student
        teacher_ckpt = teacher_ckpt or str(out / "teacher" / "best.pt")
        if data is None:
            from edgekd.data import load_data

            data = load_data(recipe.data, recipe.seed)
        ck = load_checkpoint(out / "student" / "best.pt")
        pre = Preprocess.from_dict(ck["preprocess"])
        fp32, int8 = out / "export" / "model.fp32.onnx", out / "export" / "model.onnx"
        ptq = out / "export" / "model.ptq.onnx"
        ort_quantize_static(fp32, ptq, calibration_images(data.train, recipe.quantize.calib_images, recipe.seed), pre)
        for label, path in (("FP32", fp32), ("INT8 edgekd QAD", int8), ("INT8 ORT quantize_static", ptq)):
            lat = latency(path, [1, 64], args.runs, args.threads)
            rows.append({"model": f"{student} ({res['params']:,} params)", "variant": label, "top1": accuracy(path, data, pre),
                         "mb": path.stat().st_size / 1e6, "b1": lat[1], "b64": lat[64]})
    tck = load_checkpoint(teacher_ckpt)
    teacher = model_from_checkpoint(tck)
    tpath = work / "teacher.fp32.onnx"
    export_fp32(teacher, tpath, teacher.preprocess)
    tlat = latency(tpath, [1, 64], max(50, args.runs // 4), args.threads)
    rows.insert(0, {"model": f"teacher {tck['model']['name']} ({sum(v.numel() for k, v in tck['state_dict'].items() if 'num_batches' not in k and 'running' not in k):,} params)",
                    "variant": "FP32", "top1": accuracy(tpath, data, teacher.preprocess), "mb": tpath.stat().st_size / 1e6, "b1": tlat[1], "b64": tlat[64]})
    write(rows, args, time.time() - t_start, torch.__version__)
    return 0


def write(rows: list[dict], args, seconds: float, torch_version: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import onnxruntime

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(rows):
        ax.scatter(r["b64"] / 64, 100 * r["top1"], s=40)
        # alternate labels above/below the point: FP32 and INT8 rows of one student often sit at the same accuracy
        ax.annotate(f"{r['model'].split(' (')[0]} {r['variant']}", (r["b64"] / 64, 100 * r["top1"]), fontsize=7,
                    xytext=(4, 4 if i % 2 else -10), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel(f"ms per image at batch 64 (onnxruntime CPU, {args.threads} threads, log scale)")
    ax.set_ylabel("Fashion-MNIST test top-1 (%)")
    ax.set_title("edgekd: accuracy vs latency" + (" (QUICK MODE)" if args.quick else ""))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = ROOT / "benchmarks" / ("headline_quick.png" if args.quick else "headline.png")
    fig.savefig(png, dpi=110)
    lines = [f"# Headline: teacher vs students, FP32 vs INT8{' (QUICK MODE: subset, few epochs; not the real numbers)' if args.quick else ''}", "",
             "| model | variant | test top-1 | ONNX MB | p50 ms batch 1 | p50 ms batch 64 |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['variant']} | {r['top1']:.4f} | {r['mb']:.2f} | {r['b1']:.3f} | {r['b64']:.2f} |" for r in rows]
    lines += ["", f"![accuracy vs latency]({png.name})", "",
              f"- Command: `python benchmarks/headline.py {' '.join(sys.argv[1:])}`",
              f"- Machine: {machine()}; torch {torch_version}, onnxruntime {onnxruntime.__version__}; every row timed with the same settings",
              f"- Date: {datetime.datetime.now().isoformat(timespec='seconds')}; total {seconds / 60:.1f} min",
              "- Accuracy: each ONNX file's own top-1 on the Fashion-MNIST test set; latency: p50 of the timed runs after 20 warm-up runs."]
    out = ROOT / (args.results if not args.quick else args.results.replace(".md", "_quick.md"))
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
