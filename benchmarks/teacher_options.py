"""Where the default build's teacher budget buys the most accuracy (issue 13).

The default ``edgekd build`` gives its teacher (EfficientNet-Lite0, ImageNet weights) a share of a
20-minute budget. This runs the real ``edgekd finetune`` once per option, each under the same wall
time limit, one after the other on an otherwise idle machine, and records validation and test
top-1 of the best-by-validation checkpoint. A teacher option is worth having when it beats the
student trained alone (93.1% on the default build): below it, the build distils from the control.
Frozen stages are not cached: the teacher trains on random crops and flips, so the frozen stages see
a new input every epoch.

    python benchmarks/teacher_options.py                    # about 25 min idle (6 options x 200 s + loading and testing)
    python benchmarks/teacher_options.py --seconds 300 --only 48px-3ep
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

# name -> (what it tries, recipe overrides); every option also gets the wall-time limit, under which
# the cosine schedule ends on time (edgekd.train.schedule), so a longer recipe is cut, not truncated
OPTIONS = {
    "48px-1ep": ("the build's default: full fine-tune, 48 px, 1 epoch", []),
    "48px-3ep": ("more epochs at 48 px (the schedule fits the time limit)", ["teacher.train.epochs=3"]),
    "32px-3ep": ("fewer pixels, more epochs", ["teacher.input_size=32", "teacher.train.epochs=3"]),
    "64px-2ep": ("more pixels (the teacher recipe's size)", ["teacher.input_size=64", "teacher.train.epochs=2"]),
    "48px-frozen2-2ep": ("stem and first 2 stages frozen (cheaper steps), more epochs", ["teacher.frozen_stages=2", "teacher.train.epochs=2"]),
    "48px-probe": ("frozen backbone, only the head trains (linear probe)", ["teacher.mode=linear-probe", "teacher.train.epochs=10", "teacher.train.lr=0.01"]),
}


def run_option(name: str, sets: list[str], seconds: float, work: Path) -> dict:
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(Path(sys.executable).parent / "edgekd"), "finetune", "--out", str(out), "--json", "--set", f"teacher.train.time_limit_s={seconds}"]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        return {"name": name, "error": f"exit {proc.returncode}"}
    m = json.loads((out / "metrics.json").read_text())
    return {"name": name, "sets": sets, "wall_s": round(time.time() - t0, 1), "train_s": m["train_seconds"], "epochs_run": len(m["history"]),
            "stopped": m.get("stopped"), "val_top1": m["val"]["top1"], "test_top1": m["test"]["top1"], "img_s": m["images_per_second"]}


def write(rows: list[dict], args, path: Path) -> None:
    lines = ["# Teacher options under the default build's teacher budget", "",
             f"Each option is `edgekd finetune` (defaults: EfficientNet-Lite0, offline ImageNet weights, Fashion-MNIST 54,000 / 6,000 / "
             f"10,000) with `--set teacher.train.time_limit_s={args.seconds:g}` plus its overrides; run one after the other.", "",
             "| option | what it tries | epochs run | stopped by | train s | img/s | val top-1 % | test top-1 % |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        about = OPTIONS[r["name"]][0]
        if "error" in r:
            lines.append(f"| {r['name']} | {about} | failed: {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['name']} | {about} | {r['epochs_run']} | {r['stopped']} | {r['train_s']:.0f} | {r['img_s']:.0f} "
                     f"| {100 * r['val_top1']:.2f} | {100 * r['test_top1']:.2f} |")
    lines += ["", f"- Machine: {machine()}", f"- Date: {datetime.datetime.now().isoformat(timespec='seconds')}",
              f"- Command: `python benchmarks/teacher_options.py {' '.join(sys.argv[1:])}`".rstrip(), ""]
    path.write_text("\n".join(lines))
    path.with_suffix(".json").write_text(json.dumps(rows, indent=1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=200.0, help="wall-time limit of each option's training (the default build's teacher used 183 s here)")
    ap.add_argument("--only", action="append", choices=sorted(OPTIONS))
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "_work" / "teacher_options")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("teacher_options_results.md"))
    args = ap.parse_args()
    rows = [run_option(name, OPTIONS[name][1], args.seconds, args.work) for name in (args.only or OPTIONS)]
    write(rows, args, args.out)
    print(args.out.read_text())
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
