"""How much faster than FP32 can INT8 be on this CPU with onnxruntime? (issue 4's ">= 2x at batch 64")

For a sweep of convolutional students (edgekd's registry at several widths, a residual net and the
3-conv 64-128-256 CNN of ../shared/FACTS.md), each with seeded random weights and non-trivial BN
statistics, this exports the FP32 ONNX and runs onnxruntime's own ``quantize_static`` on it (QDQ,
per-channel s8 weights, u8 activations, MinMax on 256 real Fashion-MNIST images: the layout the
runtime itself recommends for x86). Both files are timed side by side, same session settings, at
batch 1 and 64. Speed does not depend on how well the weights are trained, so no training is
needed: this measures the runtime's INT8 ceiling for each network shape, the upper bound for any
INT8 export of it, edgekd's included.

    .venv/bin/python benchmarks/int8_ceiling.py            # ~4 min on 2 idle cores
    .venv/bin/python benchmarks/int8_ceiling.py --runs 30  # quicker, noisier
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from _common import machine  # noqa: E402
from edgekd.config import DataConfig  # noqa: E402
from edgekd.data import calibration_images  # noqa: E402
from edgekd.export import export_fp32, ort_quantize_static  # noqa: E402
from edgekd.runners.timing import median_latency_ms  # noqa: E402
from edgekd.data import load_data  # noqa: E402
from edgekd.models import PlainCNN, count_macs, count_params, create_model, default_preprocess  # noqa: E402


def networks() -> dict[str, nn.Module]:
    """Network shapes to try, smallest first."""
    nets = {f"{name} width {w:g}": create_model(name, 10, pretrained="none", in_chans=1, width=w, input_size=28)
            for name, w in [("nano_cnn", 1.0), ("small_cnn", 1.0), ("small_cnn", 1.5), ("small_cnn", 2.0), ("small_resnet", 1.0)]}
    nets["plain 64-128-256, 3 convs (FACTS.md)"] = PlainCNN([[64], [128], [256]], 1, 10)
    nets["plain 32 / 128x2 / 256x3 (late-heavy)"] = PlainCNN([[32], [128, 128], [256, 256, 256]], 1, 10)
    return nets


def randomize_bn(model: nn.Module, seed: int) -> nn.Module:
    """Seeded weights and BN statistics that are not the identity, as a trained network's would be."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.2 * torch.rand(m.num_features, generator=g) - 0.1)
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
    return model.eval()


def cpu_flags() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    keep = [f for f in flags if f.startswith(("avx", "fma", "amx")) or "vnni" in f]
    return " ".join(keep) or "none of avx/fma/vnni/amx"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", default="benchmarks/int8_ceiling_results.md")
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    data = load_data(DataConfig(train_subset=2000, test_subset=100), 0)
    calib = calibration_images(data.train, 256, 0)
    pre = default_preprocess("nano_cnn", 28, 1)
    rows = []
    with tempfile.TemporaryDirectory() as td:
        for i, (name, model) in enumerate(networks().items()):
            model = randomize_bn(model, i)
            fp32, int8 = Path(td) / f"{i}.fp32.onnx", Path(td) / f"{i}.int8.onnx"
            export_fp32(model, fp32, pre)
            ort_quantize_static(fp32, int8, calib, pre)
            lat = {(kind, b): median_latency_ms("ort-cpu", path, b, (1, 28, 28), runs=args.runs, warmup=10, threads=args.threads)
                   for b in (1, 64) for kind, path in (("fp32", fp32), ("int8", int8))}
            rows.append((name, count_params(model), count_macs(model, 28, 1), lat))
            print(f"{name}: b64 fp32 {lat['fp32', 64]:.2f} ms, int8 {lat['int8', 64]:.2f} ms, {lat['fp32', 64] / lat['int8', 64]:.2f}x", flush=True)
    write(rows, args, time.time() - t0)
    return 0


def write(rows, args, seconds: float) -> None:
    import onnxruntime

    best = max(r[3]["fp32", 64] / r[3]["int8", 64] for r in rows)
    lines = ["# INT8 ceiling of onnxruntime's CPU provider on this machine", "",
             f"Command: `python benchmarks/int8_ceiling.py {' '.join(sys.argv[1:])}`  ",
             f"Machine: {machine()}; CPU flags: {cpu_flags()}; onnxruntime {onnxruntime.__version__}, {args.threads} intra-op threads; "
             f"median of {args.runs} runs after 10 warm-up runs; {seconds / 60:.1f} min.  ",
             f"Date: {datetime.date.today().isoformat()}", "",
             "INT8 = onnxruntime's own `quantize_static` (QDQ, per-channel s8 weights, u8 activations, MinMax on 256 Fashion-MNIST "
             "training images) of the same FP32 ONNX: the runtime's best x86 layout and the upper bound for any INT8 export of that network.", "",
             "| network (28x28x1 input) | params | MACs | FP32 b1 ms | INT8 b1 ms | speed-up b1 | FP32 b64 ms | INT8 b64 ms | **speed-up b64** |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, params, macs, lat in rows:
        lines.append(f"| {name} | {params:,} | {macs / 1e6:.1f}M | {lat['fp32', 1]:.3f} | {lat['int8', 1]:.3f} | {lat['fp32', 1] / lat['int8', 1]:.2f}x "
                     f"| {lat['fp32', 64]:.2f} | {lat['int8', 64]:.2f} | **{lat['fp32', 64] / lat['int8', 64]:.2f}x** |")
    lines += ["", f"Largest batch-64 speed-up of any network here: **{best:.2f}x**."]
    out = ROOT / args.results
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
