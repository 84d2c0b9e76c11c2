"""Wall time of the README's main command, `edgekd build`, with its defaults and with --quick.

Runs the real CLI in a fresh run folder, records every stage's time, the shipped model's accuracy
and latency, and writes ``benchmarks/build_results.md``.

    python benchmarks/build_benchmark.py                       # default build for jetson-orin-nano, then --quick for x86-cpu
    python benchmarks/build_benchmark.py --only quick
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

RUNS = {
    "default": ["build", "--target", "jetson-orin-nano"],
    "quick": ["build", "--target", "x86-cpu", "--quick"],
}


def run(name: str, args: list[str], work: Path) -> dict:
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(Path(sys.executable).parent / "edgekd"), *args, "--out", str(out), "--json"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name} build failed with exit code {proc.returncode}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"name": name, "command": "edgekd " + " ".join(args), "wall": wall, "result": res}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=sorted(RUNS))
    ap.add_argument("--work", default="benchmarks/_work/build")
    ap.add_argument("--results", default="benchmarks/build_results.md")
    args = ap.parse_args()
    names = [args.only] if args.only else list(RUNS)
    rows = [run(n, RUNS[n], ROOT / args.work) for n in names]
    lines = ["# `edgekd build` wall time on this machine", "",
             "| command | wall time | teacher top-1 | shipped INT8 top-1 (ONNX file) | FP32 student top-1 | params | layout | readiness | p50 ms b1 (runtime) | stages (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        res = r["result"]
        stages = ", ".join(f"{k} {v['seconds']:.0f}" for k, v in res["stages"].items())
        lat = res.get("latency", {})
        lines.append(f"| `{r['command']}` | **{r['wall'] / 60:.1f} min** | {res.get('teacher_accuracy') or 0:.4f} | {res['accuracy']:.4f} | {res.get('fp32_accuracy') or 0:.4f} | "
                     f"{res['params']:,} | {res['layout']} | {res['checks'].get('tensorrt_readiness')} | {res['latency_ms']:.3f} ({lat.get('runtime')}) | {stages} |")
    lines += ["", f"- Machine: {machine()}", f"- Date: {datetime.datetime.now().isoformat(timespec='seconds')}",
              f"- Command: `python benchmarks/build_benchmark.py {' '.join(sys.argv[1:])}` (each build in a fresh folder under {args.work})",
              "- Goals: default build under 20 minutes on 2 cores, --quick in about 2 minutes."]
    (ROOT / args.results).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
