"""Which input shapes a TensorRT engine is built for: the one place that decides, for the native
runner (:mod:`edgekd.runners.tensorrt`), the bundle's ``trtexec`` lines (:mod:`edgekd.bundle.scripts`)
and onnxruntime's TensorRT execution provider.

- GPU engines get one optimisation profile over the batch: ``min 1 / opt batch / max max_batch``.
- DLA engines are static. TensorRT's DLA supports no dynamic dimension ("DLA supported layers and
  restrictions": min = opt = max, and the runtime shape must equal it; otherwise the layers move
  to the GPU, or the build fails without GPU fallback). So a DLA target gets one engine per batch
  size, and each is timed with its own shape.
- An ONNX whose batch axis is fixed (a user's file, exported without a dynamic axis) keeps that
  batch: a 1..N profile over a fixed dimension fails to build.

Also which precision flags a TensorRT version takes: 10.x has ``BuilderFlag.FP16``/``INT8``
(deprecated from 10.12); 11 removed them (strongly typed networks only: the ONNX's own types
decide, and trtexec 11 has no ``--fp16``/``--int8``).

Torch- and TensorRT-free, so every side can import it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchProfile:
    """The batch dimension of one optimisation profile (the other dims are the model's)."""

    min: int
    opt: int
    max: int

    @property
    def static(self) -> bool:
        return self.min == self.opt == self.max

    def shapes(self, rest: tuple[int, ...] | list[int]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) full shapes for an input whose non-batch dims are ``rest``."""
        return (self.min, *rest), (self.opt, *rest), (self.max, *rest)


def engine_profile(batch: int, max_batch: int | None = None, dla: bool = False, fixed_batch: int | None = None) -> BatchProfile:
    """The profile one engine is built with (see the module docstring)."""
    if fixed_batch:
        return BatchProfile(fixed_batch, fixed_batch, fixed_batch)
    if dla:
        return BatchProfile(batch, batch, batch)
    top = max(max_batch or batch, batch)
    return BatchProfile(1, batch, top)


def engine_batches(batches: list[int] | tuple[int, ...], dla: bool, fixed_batch: int | None = None) -> list[int]:
    """The batch sizes that need an engine of their own: one per batch on the DLA, else one for all
    (listed by its opt batch, the first). A fixed-batch ONNX has exactly one."""
    if fixed_batch:
        return [fixed_batch]
    ordered = list(dict.fromkeys(int(b) for b in batches))
    return ordered if dla else ordered[:1]


def tensorrt_major(version: str | None, default: int = 10) -> int:
    """'10.3' -> 10; None -> ``default``."""
    if not version:
        return default
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return default


def has_precision_flags(tensorrt_version: str | None) -> bool:
    """TensorRT < 11 builds weakly typed networks steered by FP16/INT8 flags; 11 only strongly typed ones."""
    return tensorrt_major(tensorrt_version) < 11


def trtexec_precision_flags(precision: str, tensorrt_version: str | None, dla: bool) -> list[str]:
    """trtexec's precision flags. INT8 with explicit Q/DQ also enables FP16 for the float layers (as the
    fp16 path of trtexec does); the DLA runs only INT8/FP16, so a DLA build never goes without ``--fp16``
    (the Python builder below sets FP16 for the DLA the way trtexec's sampleEngines.cpp does)."""
    if not has_precision_flags(tensorrt_version):
        return []  # TensorRT 11: strongly typed, the ONNX's Q/DQ and float types decide
    flags = {"int8": ["--int8", "--fp16"], "fp16": ["--fp16"], "fp32": []}[precision]
    if dla and "--fp16" not in flags:
        flags = [*flags, "--fp16"]
    return flags
