"""Distillation: losses, feature hooks, teachers, the teacher-output cache, the composite loss and
the stage (:func:`run_distill_mode`: teacher, assistant or mutual). See ``stage.py``, ``assistant.py``
and ``mutual.py`` for the forms and their papers."""

from edgekd.distill.cache import TeacherCache, teacher_cache
from edgekd.distill.hooks import FeatureHook
from edgekd.distill.loss import DistillLoss, build_distill_loss, needs_features, teacher_weights
from edgekd.distill.losses import AttentionTransferLoss, HintLoss, KDLoss, MutualLoss, RKDLoss, attention_map, match_spatial, soft_targets
from edgekd.distill.stage import check_student_name, make_student, run_distill, run_distill_mode
from edgekd.distill.teachers import Teacher, check_teachers_stronger, load_teacher, measure_teachers, teacher_forward, warn_flat_soft_targets

__all__ = ["AttentionTransferLoss", "DistillLoss", "FeatureHook", "HintLoss", "KDLoss", "MutualLoss", "RKDLoss", "Teacher", "TeacherCache", "attention_map",
           "build_distill_loss", "check_student_name", "check_teachers_stronger", "load_teacher", "make_student", "match_spatial", "measure_teachers",
           "needs_features", "run_distill", "run_distill_mode", "soft_targets", "teacher_cache", "teacher_forward", "teacher_weights", "warn_flat_soft_targets"]
