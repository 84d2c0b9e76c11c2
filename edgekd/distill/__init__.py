"""Distillation: losses, feature hooks, teachers, the teacher-output cache, the composite loss and
the stage (:func:`run_distill_mode`: teacher, assistant or mutual). One distillation run is
``kd.py`` (:func:`run_distill`, :class:`DistillJob`); ``objective.py`` is the composite loss, ``losses.py``
its terms; ``stage.py``, ``assistant.py`` and ``mutual.py`` give the forms and their papers."""

from edgekd.distill.cache import TeacherCache, teacher_cache
from edgekd.distill.hooks import FeatureHook
from edgekd.distill.objective import DistillLoss, build_distill_loss, needs_features, teacher_weights
from edgekd.distill.losses import AttentionTransferLoss, HintLoss, KDLoss, MutualLoss, RKDLoss, attention_map, match_spatial, soft_targets
from edgekd.distill.kd import DistillJob, make_student, run_distill
from edgekd.distill.stage import run_distill_mode
from edgekd.distill.teachers import Teacher, check_teachers_stronger, load_teacher, measure_teachers, teacher_forward, warn_flat_soft_targets

__all__ = ["AttentionTransferLoss", "DistillJob", "DistillLoss", "FeatureHook", "HintLoss", "KDLoss", "MutualLoss", "RKDLoss", "Teacher", "TeacherCache", "attention_map",
           "build_distill_loss", "check_teachers_stronger", "load_teacher", "make_student", "match_spatial", "measure_teachers",
           "needs_features", "run_distill", "run_distill_mode", "soft_targets", "teacher_cache", "teacher_forward", "teacher_weights", "warn_flat_soft_targets"]
