"""The student registry (timm's pattern: a decorator fills a dict, one factory reads it), and the
timm networks edgekd recommends as edge students."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from edgekd.errors import EdgekdError


@dataclass(frozen=True)
class StudentSpec:
    name: str
    fn: Callable[..., nn.Module]
    family: str  # "nano" | "small"
    doc: str


STUDENTS: dict[str, StudentSpec] = {}


def register_student(family: str) -> Callable:
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        STUDENTS[fn.__name__] = StudentSpec(fn.__name__, fn, family, (fn.__doc__ or "").strip().splitlines()[0])
        return fn

    return deco


def list_students() -> list[StudentSpec]:
    return list(STUDENTS.values())


def check_model_name(role: str, name: str) -> None:
    """Refuse an unknown model name (``role``: teacher, student) in one line before any data is
    loaded or any stage trains: every command calls it first."""
    if not is_known_model(name):
        students = ", ".join(s.name for s in list_students())
        raise EdgekdError(f"unknown {role} model '{name}'", f"use one of {students} (see `edgekd models`) or a timm model name")


def is_known_model(name: str) -> bool:
    """An edgekd student or a timm model name. timm (with torchvision and torch._dynamo: seconds)
    is imported only for a name that is not edgekd's own, so a process that rebuilds a student or
    resumes a build starts quickly."""
    if name in STUDENTS:
        return True
    import timm

    return timm.is_model(name)


# timm networks edgekd recommends as edge students: each goes through QAD and both INT8 layouts
# (tests/test_architectures.py; accuracy and speed in benchmarks/architectures_results.md).
RECOMMENDED_TIMM = {
    "resnet18": "residual 3x3 convs; INT8 pays off on CPU and TensorRT",
    "mobilenetv2_100": "inverted residuals, depthwise, ReLU6",
    "mobilenetv3_large_100": "depthwise, hard-swish, squeeze-excite",
    "mobilenetv3_small_050": "tiny depthwise + SE; overhead-bound in INT8 on CPU",
    "efficientnet_lite0": "depthwise, ReLU6, no SE: built for INT8 edge devices",
    "regnetx_002": "grouped convs, residual",
    "repvgg_a0": "re-parameterized into plain 3x3 convs before QAD",
    "mobileone_s0": "re-parameterized (branches fused) before QAD",
    "mobilenetv4_conv_small": "MobileNetV4 conv-only, universal inverted bottlenecks",
}
