"""Learned vs fixed activation ranges in QAD, row by row: two runs of ``architectures.py`` on the same
FP32 students, one with ``--fixed-ranges``, compared side by side.

    .venv/bin/python benchmarks/architectures.py --train-images 12000 --epochs 3 --fixed-ranges --out /tmp/fixed.md
    .venv/bin/python benchmarks/architectures.py --train-images 12000 --epochs 3
    .venv/bin/python benchmarks/learned_ranges.py --fixed /tmp/fixed.json --learned benchmarks/architectures_results.json

The committed comparison takes its fixed-range rows from the architectures results of commit
bcab64a (the same students, calibration and QAD budget; ranges fixed, as QAD was then):
``git show bcab64a:benchmarks/architectures_results.json > /tmp/fixed.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def rows_by_key(path: Path) -> dict[tuple[str, str], dict]:
    return {(r["student"], r["layout"]): r for r in json.loads(path.read_text()) if r.get("completed")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixed", type=Path, required=True, help="architectures_results.json of a --fixed-ranges run")
    ap.add_argument("--learned", type=Path, required=True, help="architectures_results.json of a run with learned ranges")
    ap.add_argument("--note", default="", help="where the two runs come from (written under the title)")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("learned_ranges_results.md"))
    args = ap.parse_args()
    fixed, learned = rows_by_key(args.fixed), rows_by_key(args.learned)
    keys = [k for k in learned if k in fixed]
    lines = ["# QAD with learned vs fixed activation ranges", "", args.note, "",
             f"Rows: {args.fixed} (fixed) and {args.learned} (learned). INT8 is the exported file's test top-1; "
             "agreement is the file's top-1 agreement with the PyTorch fake-quant model.", "",
             "| student | layout | FP32 test % | INT8 fixed % | INT8 learned % | learned - fixed | INT8 - FP32 fixed | INT8 - FP32 learned "
             "| agreement fixed | agreement learned |", "|---|---|---|---|---|---|---|---|---|---|"]
    gains = []
    for key in keys:
        f, g = fixed[key], learned[key]
        gains.append(100 * (g["int8_test_top1"] - f["int8_test_top1"]))
        lines.append(f"| {key[0]} | {key[1]} | {100 * g['fp32_test_top1']:.2f} | {100 * f['int8_test_top1']:.2f} | {100 * g['int8_test_top1']:.2f} "
                     f"| {gains[-1]:+.2f} | {100 * (f['int8_test_top1'] - f['fp32_test_top1']):+.2f} | {100 * (g['int8_test_top1'] - g['fp32_test_top1']):+.2f} "
                     f"| {100 * f['agreement']:.2f}% | {100 * g['agreement']:.2f}% |")
    within = lambda rows: sum(rows[k]["int8_test_top1"] >= rows[k]["fp32_test_top1"] - 0.005 for k in keys)  # noqa: E731
    lines += ["", f"- Rows: {len(keys)}. Learned minus fixed, test points: median {statistics.median(gains):+.2f}, "
              f"lowest {min(gains):+.2f}, highest {max(gains):+.2f}; better in {sum(g > 0 for g in gains)}, worse in {sum(g < 0 for g in gains)}.",
              f"- INT8 within 0.5 points of FP32: fixed {within(fixed)}/{len(keys)}, learned {within(learned)}/{len(keys)}.", ""]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
