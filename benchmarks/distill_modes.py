"""Distillation modes side by side (issue 16): the same nano student, seeds, data order and budget.

Rows, each trained with seeds 0, 1, 2 on the same Fashion-MNIST subset (test: the full 10,000):
- ``alone``: the student on hard labels (edgekd's control stage);
- ``kd``: logits KD from EfficientNet-Lite0 fine-tuned at 64 px; the student sees 28 px, so this is
  cross-resolution distillation without a feature term;
- ``kd+fitnet``: the same with a FitNets hint from the teacher's ``blocks.6`` (its 2x2 map at 64 px
  and the student's 7x7 map are pooled to the smaller: cross-resolution *with* the feature term);
- ``assistant``: teacher -> small_cnn (the assistant, distilled once, seed 0) -> nano, per seed;
- ``mutual``: two nano students learn from each other (no teacher); the better on validation counts.

Appends (or replaces) a "Run 3" section in ``benchmarks/distill_results.md`` with the command,
machine, date and budget. Everything except the teacher reuses nothing between runs.

    nice -n 10 .venv/bin/python benchmarks/distill_modes.py              # ~25 min on 2 slow CPU cores
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import machine  # noqa: E402
from edgekd import ui  # noqa: E402
from edgekd.config import DataConfig, DistillConfig, StudentConfig, TeacherConfig, TrainConfig  # noqa: E402
from edgekd.control import run_control  # noqa: E402
from edgekd.distill import DistillJob, run_distill_mode  # noqa: E402
from edgekd.finetune import run_finetune  # noqa: E402
from edgekd.stage_context import StageContext  # noqa: E402
from edgekd.data import load_data
from edgekd.atomic import write_bytes_atomic, write_json_atomic  # noqa: E402

ROWS = ["alone", "kd", "kd+fitnet", "assistant", "mutual"]
SECTION = "## Run 3: distillation modes (issue 16)"


def args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-subset", type=int, default=8000, help="training images (validation: the 6,000 held out of the full training set)")
    ap.add_argument("--epochs", type=int, default=3, help="student epochs (every row, every link)")
    ap.add_argument("--teacher-epochs", type=int, default=1)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--work", default="benchmarks/_work/distill-modes")
    ap.add_argument("--results", default="benchmarks/distill_results.md")
    ap.add_argument("--from-json", help="only rewrite the results section from this results.json")
    return ap.parse_args()


def student_cfg(a: argparse.Namespace) -> StudentConfig:
    return StudentConfig(model="nano_cnn", input_size=28, train=TrainConfig(epochs=a.epochs, lr=3e-3, batch_size=128, weight_decay=0.05))


def train_teacher(a: argparse.Namespace, data_cfg: DataConfig, data, work: Path) -> dict:
    """EfficientNet-Lite0 (ImageNet weights) fine-tuned at 64 px on the same subset; reused when already there."""
    cfg = TeacherConfig(input_size=64, train=TrainConfig(epochs=a.teacher_epochs, lr=1e-3, batch_size=64, label_smoothing=0.0))
    return run_finetune(cfg, data, work / "teacher", StageContext(seed=0, data_cfg=data_cfg))


def run_row(row: str, seed: int, a: argparse.Namespace, data_cfg: DataConfig, data, teacher: str, work: Path) -> dict:
    out = work / f"{row}-s{seed}"
    ctx = StageContext(seed=seed, resume=False, data_cfg=data_cfg, cache_dir=work / "cache")
    if row == "alone":
        return run_control(student_cfg(a), data, out, StageContext(seed=seed, data_cfg=data_cfg))["metrics"]
    if row == "mutual":
        return run_distill_mode(DistillJob(student_cfg(a), DistillConfig(mode="mutual", peers=2)), data, out, ctx)["metrics"]
    if row == "assistant":
        given = work / "assistant-s0" / "assistant" / "best.pt"
        assistant = str(given) if seed != 0 and given.is_file() else "small_cnn"
        return run_distill_mode(DistillJob(student_cfg(a), DistillConfig(mode="assistant", assistant=assistant), (Path(teacher),)), data, out, ctx)["metrics"]
    losses = ["kd", "fitnet"] if row == "kd+fitnet" else ["kd"]
    cfg = DistillConfig(losses=losses, teacher_layer="blocks.6" if "fitnet" in losses else None)
    return run_distill_mode(DistillJob(student_cfg(a), cfg, (Path(teacher),)), data, out, ctx)["metrics"]


def summary_row(row: str, runs: list[dict], alone: list[float] | None) -> str:
    tops = [100 * r["test"]["top1"] for r in runs]
    mean, spread = statistics.mean(tops), (statistics.stdev(tops) if len(tops) > 1 else 0.0)
    diff = "-" if row == "alone" or not alone else f"{mean - statistics.mean(alone):+.2f}"
    per_seed = " / ".join(f"{t:.2f}" for t in tops)
    vals = statistics.mean(100 * r["val"]["top1"] for r in runs)
    wall = statistics.mean(r["wall_seconds"] for r in runs)
    extra = ""
    if row == "assistant":
        extra = f"assistant small_cnn test {100 * runs[0]['assistant']['test_top1']:.2f}% (trained once, seed 0)"
    if row == "mutual":
        extra = "kept peer per seed: " + ", ".join(str(r["chosen_peer"]) for r in runs)
    return f"| {row} | {mean:.2f} | {spread:.2f} | {per_seed} | {diff} | {vals:.2f} | {wall:.0f} | {extra} |"


def markdown(a: argparse.Namespace, results: dict[str, list[dict]], teacher: dict, data, started: str, total_s: float) -> str:
    alone = [100 * r["test"]["top1"] for r in results.get("alone", [])]
    lines = [
        SECTION, "",
        f"Budget this machine affords: {len(data.train):,} training images (a subset of the 54,000) / {len(data.val):,} validation, "
        f"the full {len(data.test):,}-image test set; nano_cnn at 28 px, {a.epochs} epochs per student (AdamW lr 0.003, batch 128, "
        "augmentation 'flip'); KD T=1, alpha=0.5 (edgekd's defaults). Every row uses the same student, seeds, data order and budget; "
        "the assistant link and the student link each get the student's epochs.",
        f"Teacher: EfficientNet-Lite0 (ImageNet weights) fine-tuned at 64 px for {a.teacher_epochs} epoch(s) on the same subset: "
        f"test top-1 {100 * teacher['test']['top1']:.2f}%, {teacher['train_seconds']:.0f} s.", "",
        f"- Command: `{' '.join(shlex.quote(x) for x in [sys.executable.replace(str(ROOT) + '/', '')] + sys.argv)}`",
        f"- Machine: {machine()}, torch {torch.__version__}, {torch.get_num_threads()} torch threads",
        f"- Date: {started} (total {total_s / 60:.1f} min)", "",
        "| row | test top-1 % (mean) | spread (sd) | per seed | vs alone, points | val top-1 % | wall s per run | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [summary_row(row, runs, alone) for row, runs in results.items()]
    lines += ["", "'kd' is cross-resolution without a feature term (teacher 64 px, student 28 px); 'kd+fitnet' adds the pooled feature hint. "
              "A difference smaller than about twice the spread is not a measured gain."]
    if alone and 100 * teacher["test"]["top1"] < statistics.mean(alone):
        lines += ["", f"What this run says: the teacher ({100 * teacher['test']['top1']:.2f}%) is below the student trained alone "
                  f"({statistics.mean(alone):.2f}%), so no teacher-based form can gain here; this is the situation `edgekd build` now "
                  "detects (it distils from the control instead). A stronger teacher (more epochs, `recipes/teacher-fmnist.yaml`) is "
                  "the precondition for these forms to pay."]
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    """Replace this run's section in distill_results.md (or append it), keeping the earlier runs."""
    text = path.read_text() if path.is_file() else "# Distillation benchmark\n"
    if SECTION in text:
        start = text.index(SECTION)
        nxt = text.find("\n## ", start + len(SECTION))
        text = text[:start] + section + (text[nxt + 1:] if nxt != -1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    write_bytes_atomic(path, text.encode())


def main() -> int:
    a = args()
    if a.from_json:  # rewrite the section from a finished run's results.json (no training)
        saved = json.loads(Path(a.from_json).read_text())
        sizes = type("Sizes", (), {"train": range(saved["sizes"][0]), "val": range(saved["sizes"][1]), "test": range(saved["sizes"][2])})
        write_section(Path(a.results), markdown(a, saved["rows"], saved["teacher"], sizes, saved["started"], saved["total_s"]))
        return 0
    started, t0 = datetime.datetime.now().astimezone().isoformat(timespec="seconds"), time.time()
    work = Path(a.work)
    data_cfg = DataConfig(augment="flip", train_subset=a.train_subset)
    data = load_data(data_cfg, 0)
    teacher = train_teacher(a, data_cfg, data, work)
    ui.log(f"teacher test top-1 {teacher['metrics']['test']['top1']:.4f}")
    results: dict[str, list[dict]] = {}
    for row in [r for r in ROWS if r in a.rows.split(",")]:
        for seed in [int(s) for s in a.seeds.split(",")]:
            t = time.time()
            m = run_row(row, seed, a, data_cfg, data, teacher["checkpoint"], work)
            m["wall_seconds"] = round(time.time() - t, 1)
            results.setdefault(row, []).append(m)
            ui.log(f"{row} seed {seed}: test top-1 {m['test']['top1']:.4f} in {m['wall_seconds']} s")
            write_json_atomic(work / "results.json", {"args": vars(a), "teacher": teacher["metrics"], "rows": results, "started": started,
                                                      "total_s": time.time() - t0, "sizes": [len(data.train), len(data.val), len(data.test)]})
    section = markdown(a, results, teacher["metrics"], data, started, time.time() - t0)
    write_section(Path(a.results), section)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
