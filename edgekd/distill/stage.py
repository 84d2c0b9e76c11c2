"""Stage: distill. One or more teachers into a small student (:func:`run_distill`).

Losses (each a small ``nn.Module`` whose docstring gives its formula and paper):

- :class:`KDLoss`: soft targets at temperature T (Hinton, Vinyals & Dean 2015, "Distilling the
  Knowledge in a Neural Network"); several teachers are averaged with weights (:func:`soft_targets`).
- :class:`HintLoss`: FitNets hints (Romero et al. 2015) with a learned 1x1 adapter.
- :class:`RKDLoss`: relational KD, distance + angle (Park et al. 2019, "Relational Knowledge Distillation").
- :class:`AttentionTransferLoss`: activation-based attention transfer (Zagoruyko & Komodakis 2017).
- Born-again self-distillation (Furlanello et al. 2018): ``DistillJob(self_distill=True)``.
- Teacher-assistant chains (Mirzadeh et al. 2020, ``assistant.py``) and Deep Mutual Learning
  (Zhang et al. 2018, :class:`MutualLoss`, ``mutual.py``): ``distill.mode``, see :func:`run_distill_mode`.
- Cross-resolution (the image case of cross-modal distillation): the teacher sees the image at its
  own, larger input size and the student at the size the device affords; logits need no alignment
  and the feature losses pool the larger map to the smaller (:func:`match_spatial`).

Features are found by module path through forward hooks (:class:`FeatureHook`, torchdistill's way),
so no model code changes. :class:`DistillLoss` is the weighted sum of named terms and keeps each
term's running mean for logging. :func:`build_distill_loss` builds it for any (student, teachers,
DistillConfig); the quantization-aware distillation stage reuses it.

Speed: teachers run in ``eval()`` under ``torch.inference_mode()``. When augmentation is
deterministic ('none': one view per image, 'flip': two views) the teacher's outputs are computed
once and cached on disk (:class:`TeacherCache`), keyed by teacher checksum + data fingerprint +
teacher preprocessing + augmentation, so later epochs and later students cost only the student.
'crop-flip' has random crops: the teacher then runs online, and the log says so.
"""

from __future__ import annotations

from pathlib import Path

from edgekd.data import DataSet
from edgekd.distill.assistant import run_assistant_chain
from edgekd.distill.kd import DistillJob, run_distill
from edgekd.distill.mutual import run_mutual
from edgekd.stage_context import StageContext


def run_distill_mode(job: DistillJob, data: DataSet, out_dir: str | Path, ctx: StageContext) -> dict:
    """The distill stage in ``distill.mode``: 'teacher' (:func:`run_distill`; cross-resolution when
    the teacher's input is larger), 'assistant' (teacher -> assistant -> student) or 'mutual'
    (peers, no teacher: ``job.teachers`` and ``ctx.cache_dir`` are not used). Same outputs in every
    mode: ``best.pt``, ``last.pt``, ``metrics.json``."""
    if job.distill.mode == "assistant":
        return run_assistant_chain(job, data, out_dir, ctx)
    if job.distill.mode == "mutual":
        return run_mutual(job, data, out_dir, ctx)
    return run_distill(job, data, out_dir, ctx)
