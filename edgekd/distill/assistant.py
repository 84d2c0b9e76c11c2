"""``distill.mode: assistant``: teacher-assistant distillation (Mirzadeh, Farajtabar, Li, Levine,
Matsukawa & Ghasemzadeh, AAAI 2020, "Improved Knowledge Distillation via Teacher Assistant").

When the gap between a big teacher and a tiny student is too wide, the student learns less from
the teacher than from a network of intermediate size: distil the teacher into the assistant first,
then the assistant into the student (each link is ordinary KD with the recipe's losses). The chain
runs as one command; each link is its own run folder (``assistant/``, then the stage's own), so it
resumes and caches teacher outputs like any distillation. ``distill.assistant`` is a network name
(trained here, from the teacher) or a checkpoint ``.pt`` of an already trained assistant.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from edgekd import ui
from edgekd.atomic import write_json_atomic
from edgekd.config import StudentConfig
from edgekd.data import DataSet
from edgekd.distill.kd import DistillJob, run_distill, within_stage_limit
from edgekd.errors import EdgekdError
from edgekd.stage_context import StageContext
from edgekd.train.env import on_main


def _limited(student_cfg: StudentConfig, share: float, started: float) -> StudentConfig:
    """The student config with ``share`` of what is left of the stage's time limit: the two links
    share the stage's budget instead of taking it twice."""
    return student_cfg.model_copy(update={"train": within_stage_limit(student_cfg.train, started, share)})


def run_assistant_chain(job: DistillJob, data: DataSet, out_dir: str | Path, ctx: StageContext) -> dict:
    """teacher(s) -> ``distill.assistant`` -> student; returns the student link's result, with the
    assistant's accuracy under ``metrics["assistant"]``."""
    distill_cfg, student_cfg = job.distill, job.student
    if not distill_cfg.assistant:
        raise EdgekdError("distill.mode=assistant needs distill.assistant", "e.g. --assistant small_cnn (a network name) or --assistant assistant.pt")
    started, link = time.time(), distill_cfg.model_copy(update={"mode": "teacher"})
    given = Path(distill_cfg.assistant)
    if given.suffix == ".pt" or given.is_file():
        assistant_ckpt, assistant_metrics = str(given), {"checkpoint": str(given), "trained_here": False}
        ui.log(f"teacher assistant: {given} (given)")
    else:
        ui.log(f"teacher assistant: distilling {distill_cfg.assistant} from the teacher first, then the student from it")
        a_cfg = _limited(student_cfg, 0.5, started).model_copy(update={"model": distill_cfg.assistant})
        r = run_distill(dataclasses.replace(job, student=a_cfg, distill=link), data, Path(out_dir) / "assistant", ctx)
        assistant_ckpt = r["checkpoint"]
        assistant_metrics = {"checkpoint": assistant_ckpt, "trained_here": True, "model": distill_cfg.assistant, "params": r["metrics"]["params"],
                             "val_top1": r["metrics"]["val"]["top1"], "test_top1": r["metrics"]["test"]["top1"], "train_seconds": r["metrics"]["train_seconds"]}
    last_link = DistillJob(_limited(student_cfg, 1.0, started), link, (Path(assistant_ckpt),), self_distill=False)
    result = run_distill(last_link, data, out_dir, ctx)
    result["metrics"].update({"mode": "assistant", "assistant": assistant_metrics})
    on_main(lambda: write_json_atomic(result["metrics_file"], result["metrics"]))
    return result
