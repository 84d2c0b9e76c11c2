"""Models: edgekd's students, any timm network with verified pretrained weights, and checkpoints.

registry.py (the student registry, recommended timm students), students.py (edgekd's CNNs),
pretrained.py (verified weights), checkpoint.py (save/load, ``weights_only``), factory.py
(:func:`create_model`, :func:`model_from_checkpoint`, parameter and MAC counts).
"""

from edgekd.models.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, load_checkpoint, safe_torch_load, save_checkpoint
from edgekd.models.factory import (count_macs, count_params, create_model, create_student, default_preprocess, model_from_checkpoint, resolve_module, set_trainable, stage_groups,
                                   zero_init_head)
from edgekd.models.pretrained import load_pretrained, offline_efficientnet_lite0_path
from edgekd.models.registry import RECOMMENDED_TIMM, StudentSpec, check_model_name, is_known_model, list_students, register_student
from edgekd.models.students import PlainCNN, conv_bn_relu

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "RECOMMENDED_TIMM", "PlainCNN", "StudentSpec", "check_model_name", "conv_bn_relu", "count_macs", "count_params", "is_known_model",
           "create_model", "create_student", "default_preprocess", "list_students", "load_checkpoint", "load_pretrained", "model_from_checkpoint",
           "offline_efficientnet_lite0_path", "register_student", "resolve_module", "safe_torch_load", "save_checkpoint", "set_trainable", "stage_groups",
           "zero_init_head"]
