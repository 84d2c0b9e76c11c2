"""An x86 build's question "which runtime is faster on this CPU?": FP32 and INT8 on every CPU runtime
installed (onnxruntime, OpenVINO), side by side, with the verdict.

The same exported files run on each runtime (OpenVINO reads the Q/DQ ONNX file directly), every
runtime with the same threads, batches and timing plan, so the only thing that differs is the runtime.
"""

from __future__ import annotations

from typing import Any

from edgekd.bench.stage import BenchRequest, run_bench
from edgekd.runners.timing import TimingPlan
from edgekd.runners import CPU_RUNTIMES, runtime_available


def compare_cpu_runtimes(files: dict[str, str], batches: list[int], plan: TimingPlan, threads: int | None, target: str | None,
                         done: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """``files`` maps 'int8' / 'fp32' to model paths; ``done`` holds results already measured ({runtime: {'int8': result, 'fp32': result}}).
    Returns {'runtimes': {name: {batch: {'fp32_ms', 'int8_ms', 'speedup'}}}, 'skipped': {name: why}, 'verdict': str}."""
    measured: dict[str, dict[str, Any]] = dict(done or {})
    skipped: dict[str, str] = {}
    for runtime in CPU_RUNTIMES:
        ok, why = runtime_available(runtime)
        if not ok:
            skipped[runtime] = why
            continue
        for kind, path in files.items():
            if kind not in measured.get(runtime, {}):
                req = BenchRequest(model=path, runtime=runtime, batches=batches, plan=plan, threads=threads, target=target)
                measured.setdefault(runtime, {})[kind] = run_bench(req)
    table = {rt: _by_batch(res) for rt, res in measured.items() if rt in CPU_RUNTIMES}
    return {"runtimes": table, "skipped": skipped, "verdict": runtime_verdict(table)}


def _by_batch(results: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    p50 = {kind: {str(s["batch"]): s["p50_ms"] for s in res["sweep"]} for kind, res in results.items()}
    rows = {}
    for batch in sorted(set().union(*[set(v) for v in p50.values()]), key=int):
        i8, f32 = p50.get("int8", {}).get(batch), p50.get("fp32", {}).get(batch)
        rows[batch] = {"fp32_ms": f32, "int8_ms": i8, "speedup": round(f32 / i8, 3) if i8 and f32 else None}
    return rows


def runtime_verdict(table: dict[str, dict[str, dict[str, float | None]]]) -> str:
    """Which runtime runs the INT8 file fastest at the largest batch, and by how much over the other runtimes and over FP32."""
    if not table:
        return "no CPU runtime was measured"
    batch = max((b for rows in table.values() for b in rows), key=int)
    int8 = {rt: rows[batch]["int8_ms"] for rt, rows in table.items() if rows.get(batch, {}).get("int8_ms")}
    if not int8:
        return "no INT8 file was measured"
    best = min(int8, key=int8.__getitem__)
    text = f"INT8 is fastest on {best} ({int8[best]:.2f} ms at batch {batch}"
    others = [f"{int8[rt] / int8[best]:.2f}x faster than {rt}'s INT8" for rt in int8 if rt != best]
    fp32 = {rt: rows[batch]["fp32_ms"] for rt, rows in table.items() if rows.get(batch, {}).get("fp32_ms")}
    if fp32:
        fastest_fp32 = min(fp32, key=fp32.__getitem__)
        others.append(f"{fp32[fastest_fp32] / int8[best]:.2f}x the fastest FP32 ({fastest_fp32})")
    return text + (", " + ", ".join(others) if others else "") + ")"


def runtime_rows(cpu: dict[str, Any]) -> list[list[str]]:
    """One row per runtime and batch: runtime, batch, FP32 ms, INT8 ms, INT8 speed-up."""
    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    return [[rt, batch, num(r["fp32_ms"]), num(r["int8_ms"]), "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"]
            for rt, rows in cpu.get("runtimes", {}).items() for batch, r in rows.items()]


def runtime_lines(cpu: dict[str, Any] | None) -> list[str]:
    """The report's markdown table: one row per runtime and batch, the verdict above it."""
    if not cpu or not cpu.get("runtimes"):
        return []
    lines = ["", f"CPU runtimes on this machine, p50 (the same files on each): **{cpu['verdict']}**", "",
             "| runtime | batch | FP32 ms | INT8 ms | INT8 speed-up |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in runtime_rows(cpu)]
    lines += [f"- {rt}: not measured ({why})" for rt, why in cpu.get("skipped", {}).items()]
    return lines
