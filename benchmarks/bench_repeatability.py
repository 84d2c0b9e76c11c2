"""Can `edgekd bench` be trusted? Repeatability and regression-detection check on this machine.

Three claims, each measured here and written to benchmarks/bench_repeatability.md:
1. The same model measured twice in a row gives medians within 5%.
2. The same model checked against its own baseline is *not* a regression, in N of N checks.
3. A planted slowdown (the same model with one extra Conv-BN-ReLU, ~27% more MACs) *is* one.

Models: edgekd's nano_cnn student (the default student, seeded init; weights do not change
latency), the same network with one extra 48->48 Conv-BN-ReLU in stage 2, and
a reference model (nano_cnn, other weights) timed interleaved with it. All exported with torch.onnx.export(dynamo=False),
dynamic batch, and timed by onnxruntime's CPU provider through edgekd.bench.

Run:  nice -n 10 .venv/bin/python benchmarks/bench_repeatability.py [--checks 20] [--batch 16] [--runs 200]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from edgekd.bench import BenchRequest, TimingPlan, check_regression, load_baseline, run_bench, save_baseline
from edgekd.models import conv_bn_relu, count_macs, create_model

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work" / "repeatability"
# The reference is the same architecture with other weights: the same op mix, so a busy neighbour
# slows both alike (a structurally different reference, e.g. pico_cnn, cancels drift less well).
REFERENCE = "nano_cnn"


def export(model: nn.Module, path: Path) -> Path:
    model.eval()
    torch.onnx.export(model, torch.zeros(1, 1, 28, 28), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    return path


def planted_slowdown(model: nn.Module) -> nn.Module:
    """The same network with one extra Conv-BN-ReLU after the last 48->48 conv of stage 2."""
    slow = copy.deepcopy(model)
    layers = list(slow.features)
    at = max(i for i, m in enumerate(layers) if isinstance(m, nn.Sequential) and m[0].in_channels == m[0].out_channels == 48)
    layers.insert(at + 1, conv_bn_relu(48, 48))
    slow.features = nn.Sequential(*layers)
    return slow


def build_models() -> dict[str, Path]:
    WORK.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    base = create_model("nano_cnn", 10, in_chans=1)
    slow = planted_slowdown(base)
    torch.manual_seed(1)
    ref = create_model(REFERENCE, 10, in_chans=1)
    macs = {name: count_macs(m, 28, 1) for name, m in (("base", base), ("slow", slow))}
    print(f"MACs: base {macs['base']:,}, planted {macs['slow']:,} (+{macs['slow'] / macs['base'] - 1:.1%})", flush=True)
    return {"base": export(base, WORK / "nano_cnn.onnx"), "slow": export(slow, WORK / "nano_cnn_planted.onnx"),
            "ref": export(ref, WORK / "reference.onnx"), "macs_extra": macs["slow"] / macs["base"] - 1}


def measure(model: Path, args: argparse.Namespace, reference: Path | None = None) -> dict:
    return run_bench(BenchRequest(str(model), batches=[args.batch], plan=TimingPlan(args.warmup, args.runs), threads=args.threads,
                                  reference=str(reference) if reference else None, seed=0))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checks", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--budget", type=float, default=0.10)
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: physical cores)")
    ap.add_argument("--out", type=Path, default=HERE / "bench_repeatability.md")
    ap.add_argument("--baseline", type=Path, default=HERE / "baselines" / "nano_cnn_b16_ort-cpu.json")
    args = ap.parse_args()
    t_start = time.time()
    m = build_models()

    # 1. twice in a row, no reference
    pairs = []
    for _ in range(args.checks // 2):
        a, b = measure(m["base"], args)["p50_ms"], measure(m["base"], args)["p50_ms"]
        pairs.append((a, b, abs(b / a - 1)))
        print(f"twice in a row: {a:.4f} / {b:.4f} ms ({pairs[-1][2]:.1%})", flush=True)

    # 2. baseline (with reference), then the same model against it, N times, both ways
    base_result = measure(m["base"], args, m["ref"])
    save_baseline(args.baseline, base_result, command=" ".join([Path(sys.executable).name, *sys.argv]))
    baseline = load_baseline(args.baseline)
    same_ref, same_abs, slow_ref, slow_abs = [], [], [], []
    for i in range(args.checks):
        r = measure(m["base"], args, m["ref"])
        same_ref.append(check_regression(r, baseline, args.budget))
        same_abs.append(check_regression({k: v for k, v in r.items() if k != "reference"}, baseline, args.budget))
        s = measure(m["slow"], args, m["ref"])
        slow_ref.append(check_regression(s, baseline, args.budget))
        slow_abs.append(check_regression({k: v for k, v in s.items() if k != "reference"}, baseline, args.budget))
        print(f"check {i + 1}: same {same_ref[-1].verdict} ({same_ref[-1].ratio - 1:+.1%}), planted {slow_ref[-1].verdict} ({slow_ref[-1].ratio - 1:+.1%}),"
              f" absolute: same {same_abs[-1].verdict} ({same_abs[-1].ratio - 1:+.1%}) planted {slow_abs[-1].verdict} ({slow_abs[-1].ratio - 1:+.1%})", flush=True)

    write_report(args, m, pairs, base_result, same_ref, same_abs, slow_ref, slow_abs, time.time() - t_start)
    ok = max(p[2] for p in pairs) <= 0.05 and not any(c.is_regression for c in same_ref) and all(c.is_regression for c in slow_ref)
    print(f"wrote {args.out}; claims hold: {ok}")
    return 0 if ok else 1


def _row(label: str, comps: list) -> str:
    ratios = np.array([c.ratio - 1 for c in comps])
    lows = np.array([c.low - 1 for c in comps])
    n_reg = sum(c.is_regression for c in comps)
    verdicts = {v: sum(c.verdict == v for c in comps) for v in ("regression", "possible-regression", "ok", "faster")}
    return (f"| {label} | {n_reg} / {len(comps)} | {', '.join(f'{k} {v}' for k, v in verdicts.items() if v)} | "
            f"{np.median(ratios):+.1%} ({ratios.min():+.1%} .. {ratios.max():+.1%}) | {np.median(lows):+.1%} |")


def write_report(args, m, pairs, base_result, same_ref, same_abs, slow_ref, slow_abs, seconds) -> None:
    fp = base_result["fingerprint"]
    diffs = [p[2] for p in pairs]
    lines = [
        "# Latency benchmark repeatability (edgekd bench, onnxruntime CPU)",
        "",
        f"Command: `{' '.join(['.venv/bin/python', 'benchmarks/bench_repeatability.py', *sys.argv[1:]])}`" + (f" (niceness {os.nice(0)})" if os.nice(0) else ""),
        f"Machine: {fp['cpu_model']}, {fp['cpu_cores_physical']} physical cores, {fp['os']}, no GPU; onnxruntime {fp['software'].get('onnxruntime')}, "
        f"{base_result['threads']} intra-op threads, graph optimisation ALL. Shared with other jobs: 1-minute load average "
        f"{base_result['load_average']['before'][0] if base_result['load_average']['before'] else '?'} at the baseline run (2 cores). Took {seconds:.0f} s.",
        "",
        f"Model: nano_cnn (edgekd's default student, 28x28x1, seeded init), batch {args.batch}, {args.warmup} warm-up + {args.runs} timed runs per measurement. "
        f"Planted slowdown: the same network with one extra 48->48 Conv-BN-ReLU (+{m['macs_extra']:.0%} MACs). Reference: {REFERENCE} with other seeded weights, timed interleaved (ABBA). "
        f"Regression budget {args.budget:.0%}, one-sided 95% bootstrap bound on the ratio of medians.",
        "",
        "## 1. Same model measured twice in a row (no reference)",
        "",
        "| pair | first p50 ms | second p50 ms | difference |",
        "|---|---|---|---|",
        *[f"| {i + 1} | {a:.4f} | {b:.4f} | {d:.1%} |" for i, (a, b, d) in enumerate(pairs)],
        "",
        f"Largest difference: **{max(diffs):.1%}** (median {np.median(diffs):.1%}); claim 'within 5%': **{'holds' if max(diffs) <= 0.05 else 'does NOT hold'}**.",
        "",
        f"## 2-3. Checks against the baseline ({args.baseline.relative_to(HERE.parent) if args.baseline.is_relative_to(HERE.parent) else args.baseline})",
        "",
        f"Baseline: p50 {base_result['p50_ms']:.4f} ms, reference p50 {base_result['reference']['p50_ms']:.4f} ms.",
        "",
        "| what is checked | reported as regression | verdicts | change vs baseline: median (min .. max) | median 95% lower bound |",
        "|---|---|---|---|---|",
        _row("same model, with reference (ratio of medians to the reference)", same_ref),
        _row("planted slowdown, with reference", slow_ref),
        _row("same model, absolute (no reference)", same_abs),
        _row("planted slowdown, absolute (no reference)", slow_abs),
        "",
        f"Same model not a regression (with reference): **{sum(not c.is_regression for c in same_ref)} of {len(same_ref)}**. "
        f"Planted slowdown reported as regression (with reference): **{sum(c.is_regression for c in slow_ref)} of {len(slow_ref)}**.",
        "",
        "Absolute mode compares raw medians with the baseline's; it is what a user gets without `--reference`. On a shared machine its "
        "spread is wider, which is why `--reference` exists.",
    ]
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
