"""Deployment targets: one TOML file per device in ``targets/``, validated by a strict schema.

A target says how a model must be shaped to be fast *there*: the runtime (TensorRT, onnxruntime
CPU or CUDA), the precision and the Q/DQ layout that runtime fuses into integer kernels, input size
and batch, the TensorRT/JetPack versions it assumes, DLA use, the Jetson power mode (``nvpmodel``
id + name) latencies are measured in, a latency budget, and where the engine is built. The numbers
in the shipped files follow NVIDIA's Jetson Linux Developer Guide ("Platform Power and
Performance") and the JetPack release notes; each file names its sources in comments.

Users add their own devices by dropping ``NAME.toml`` into a folder given with ``--targets-dir``
or ``$EDGEKD_TARGETS_DIR`` (``os.pathsep``-separated); a user file of the same name overrides a
shipped one. Strict ``extra="forbid"`` models (as in NVIDIA Model Optimizer's configs) make a typo
fail with the file and the dotted field name.

>>> from edgekd.targets import get_target
>>> get_target("jetson").name
'jetson-orin-nano'
"""

from __future__ import annotations

import importlib.util
import os
import sys
import platform
import shutil
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (e.g. NGC TensorRT containers, JetPack 5)
    import tomli as tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgekd.errors import EdgekdError

TARGETS_ENV = "EDGEKD_TARGETS_DIR"
def _builtin_targets_dir() -> Path:
    """The repo's targets/ (editable install, the README's) or the copy a wheel installs under <prefix>/share/edgekd/targets."""
    repo = Path(__file__).resolve().parents[1] / "targets"
    if repo.is_dir():
        return repo
    return Path(sys.prefix) / "share" / "edgekd" / "targets"


BUILTIN_TARGETS_DIR = _builtin_targets_dir()
JETSON_RELEASE_FILE = Path("/etc/nv_tegra_release")
TRTEXEC_PATHS = ("/usr/src/tensorrt/bin/trtexec", "/opt/tensorrt/bin/trtexec", "/usr/bin/trtexec")  # JetPack, NGC container, deb


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PowerMode(_Strict):
    """The ``nvpmodel`` mode latencies are measured in (``sudo nvpmodel -m ID``)."""

    id: int = Field(ge=0, description="nvpmodel mode id")
    name: str = Field(min_length=1, description="mode name as `nvpmodel -q` prints it, e.g. 15W, MAXN")
    jetson_clocks: bool = Field(True, description="lock clocks at the mode's maximum (`sudo jetson_clocks`) before timing")


class Dla(_Strict):
    """Deep Learning Accelerator use. Orin Nano has no DLA; AGX Orin, Orin NX and Xavier NX have two."""

    cores: int = Field(0, ge=0, le=2, description="DLA cores on the module")
    core: int | None = Field(None, ge=0, le=1, description="run on this DLA core (None: GPU only)")
    gpu_fallback: bool = Field(True, description="let layers the DLA cannot run fall back to the GPU (--allowGPUFallback)")

    @model_validator(mode="after")
    def _core_exists(self) -> "Dla":
        if self.core is not None and self.core >= self.cores:
            raise ValueError(f"core {self.core} requested but the module has {self.cores} DLA core(s)")
        return self


class LatencyBudget(_Strict):
    """What 'fast enough' means on this device; bench compares its measured p50 against these."""

    batch1_ms: float = Field(gt=0, description="median latency budget at batch 1 (ms)")
    batch_ms: float = Field(gt=0, description="median latency budget at the target batch (ms)")


class Target(_Strict):
    """One deployment target; see targets/*.toml for the shipped ones."""

    name: str = Field(min_length=1, description="defaults to the file name without .toml")
    description: str = ""
    aliases: list[str] = Field(default_factory=list, description="other names, e.g. 'jetson'")
    kind: Literal["jetson", "dgpu", "cpu", "intel-gpu", "intel-npu"] = Field(description="hardware class; decides how accelerator_present() looks")
    arch: Literal["x86_64", "aarch64"]
    runtime: Literal["tensorrt", "ort-cpu", "ort-cuda", "openvino"]
    precision: Literal["int8", "fp16", "fp32"] = "int8"
    layout: Literal["tensorrt", "ort-cpu", "openvino"] = Field(description="Q/DQ layout the runtime fuses (see FACTS: the layout decides the speed)")
    input_size: int | None = Field(None, ge=16, le=1024, description="input side in pixels; None keeps the model's")
    batch: int = Field(1, ge=1, le=4096, description="the batch the engine is optimised for (optShapes/maxShapes)")
    tensorrt: str | None = Field(None, pattern=r"^\d+\.\d+", description="TensorRT version assumed on the device (see tensorrt_pins)")
    jetpack: str | None = Field(None, description="JetPack version assumed (Jetson only)")
    cuda: str | None = Field(None, pattern=r"^\d+\.\d+", description="CUDA version of the device's driver/toolkit (see tensorrt_pins)")
    dla: Dla = Field(default_factory=Dla)
    power: PowerMode | None = Field(None, description="Jetson power mode; None elsewhere")
    latency_budget: LatencyBudget
    engine_build: Literal["host", "device", "none"] = Field(description="where the TensorRT engine is built; engines are not portable across GPUs/TRT versions")
    threads: int | None = Field(None, ge=1, description="onnxruntime intra-op threads (CPU targets)")
    openvino_device: Literal["CPU", "GPU", "NPU"] | None = Field(None, description="OpenVINO device the model is compiled for (runtime 'openvino')")

    @model_validator(mode="after")
    def _consistent(self) -> "Target":
        if self.runtime == "tensorrt" and self.layout != "tensorrt":
            raise ValueError("runtime 'tensorrt' needs layout 'tensorrt' (symmetric int8, Q/DQ on op inputs)")
        if self.runtime == "tensorrt" and self.engine_build == "none":
            raise ValueError("runtime 'tensorrt' needs engine_build 'host' or 'device'")
        if self.runtime != "tensorrt" and self.dla.core is not None:
            raise ValueError("dla.core needs runtime 'tensorrt'")
        if self.dla.core is not None and self.precision == "fp32":
            raise ValueError("the DLA runs int8 or fp16 only")
        if self.runtime == "tensorrt" and (self.tensorrt is None or self.cuda is None):
            raise ValueError("runtime 'tensorrt' needs the TensorRT and CUDA versions it means (tensorrt = \"10.3\", cuda = \"12.6\")")
        if (self.runtime == "openvino") != (self.openvino_device is not None):
            raise ValueError("runtime 'openvino' needs openvino_device (CPU, GPU or NPU), and only it takes one")
        if self.kind == "jetson" and self.power is None:
            raise ValueError("a Jetson target needs a [power] table (nvpmodel id + name)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @property
    def uses_dla(self) -> bool:
        return self.dla.core is not None

    def tensorrt_pins(self) -> dict[str, str] | None:
        """Which TensorRT and CUDA bindings this target means, as pip requirements (None: no TensorRT).

        The one place that turns a target's ``tensorrt`` / ``cuda`` into packages: a dGPU host pins
        ``tensorrt-cu<CUDA major>`` from its TensorRT up to the next major (the API edgekd is written
        for) and cuda-python below the next CUDA major (newer bindings link a newer CUDA runtime than the
        driver); a Jetson uses JetPack's own TensorRT and, because Tegra drivers take no newer CUDA
        minor, cuda-python of the device's CUDA minor. pyproject's ``[tensorrt]`` extra is x86-cuda's."""
        if self.tensorrt is None or self.cuda is None:
            return None
        trt_major, (cuda_major, cuda_minor) = int(self.tensorrt.split(".")[0]), (int(v) for v in self.cuda.split(".")[:2])
        if self.kind == "jetson":
            return {"tensorrt": f"JetPack {self.jetpack}: TensorRT {self.tensorrt} (apt python3-libnvinfer, not pip)",
                    "cuda-python": f"cuda-python>={self.cuda},<{cuda_major}.{cuda_minor + 1}"}
        return {"tensorrt": f"tensorrt-cu{cuda_major}>={self.tensorrt},<{trt_major + 1}", "cuda-python": f"cuda-python>={self.cuda},<{cuda_major + 1}"}


@dataclass(frozen=True)
class LoadedTarget:
    target: Target
    path: Path


@dataclass(frozen=True)
class Availability:
    """Whether this machine can run a target's runtime for real, and why not."""

    ok: bool
    reason: str


# ----------------------------------------------------------------------------- loading
def target_dirs(targets_dir: str | os.PathLike | None = None) -> list[Path]:
    """Search order: --targets-dir, then $EDGEKD_TARGETS_DIR entries, then the shipped targets/."""
    dirs: list[Path] = []
    if targets_dir:
        dirs.append(Path(targets_dir))
    for entry in os.environ.get(TARGETS_ENV, "").split(os.pathsep):
        if entry.strip():
            dirs.append(Path(entry.strip()))
    for d in dirs:
        if not d.is_dir():
            raise EdgekdError(f"targets folder not found: {d}", f"create it or fix --targets-dir / ${TARGETS_ENV}")
    dirs.append(BUILTIN_TARGETS_DIR)
    return dirs


def describe_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
    return f"{where}: {msg}"


def load_target_file(path: str | os.PathLike) -> Target:
    """Parse and validate one target file; any problem names the file and the field."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise EdgekdError(f"target file {p} is not valid TOML: {str(exc).splitlines()[0]}", "fix the syntax") from exc
    except OSError as exc:
        raise EdgekdError(f"cannot read target file {p}: {exc.strerror}", "check the path and permissions") from exc
    data.setdefault("name", p.stem)
    try:
        target = Target.model_validate(data)
    except ValidationError as exc:
        raise EdgekdError(f"target file {p}: {describe_error(exc)}", "see targets/x86-cpu.toml for a complete example") from exc
    if target.name != p.stem:
        raise EdgekdError(f"target file {p}: name: '{target.name}' differs from the file name '{p.stem}'", f"rename the file to {target.name}.toml or drop the name key")
    return target


def load_targets(targets_dir: str | os.PathLike | None = None) -> dict[str, LoadedTarget]:
    """All targets by name; earlier folders in :func:`target_dirs` override later ones."""
    found: dict[str, LoadedTarget] = {}
    for d in reversed(target_dirs(targets_dir)):
        for path in sorted(d.glob("*.toml")):
            found[path.stem] = LoadedTarget(load_target_file(path), path)
    _check_aliases(found)
    return dict(sorted(found.items()))


def _check_aliases(found: dict[str, LoadedTarget]) -> None:
    owner: dict[str, Path] = {}
    for name, lt in found.items():
        for alias in lt.target.aliases:
            if alias in found:
                raise EdgekdError(f"target file {lt.path}: aliases: '{alias}' is also a target name", "pick another alias")
            if alias in owner:
                raise EdgekdError(f"target file {lt.path}: aliases: '{alias}' is already an alias in {owner[alias]}", "keep each alias in one file")
            owner[alias] = lt.path


def resolve(name: str, targets_dir: str | os.PathLike | None = None) -> LoadedTarget:
    """A target by name or alias; an unknown name lists the known ones."""
    found = load_targets(targets_dir)
    if name in found:
        return found[name]
    for lt in found.values():
        if name in lt.target.aliases:
            return lt
    aliases = sorted(f"{a} -> {n}" for n, lt in found.items() for a in lt.target.aliases)
    raise EdgekdError(
        f"unknown target '{name}'; known: {', '.join(found)}" + (f" (aliases: {', '.join(aliases)})" if aliases else ""),
        f"see `edgekd targets list`, or add {name}.toml to a folder given with --targets-dir",
    )


def get_target(name: str, targets_dir: str | os.PathLike | None = None) -> Target:
    return resolve(name, targets_dir).target


# ----------------------------------------------------------------------------- what runs here
def host_arch() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def is_jetson() -> bool:
    return JETSON_RELEASE_FILE.is_file()


def nvidia_gpu_present() -> bool:
    """A CUDA GPU as the driver sees it (no CUDA library import needed)."""
    return Path("/dev/nvidia0").exists() or Path("/dev/nvhost-gpu").exists() or Path("/dev/nvgpu/igpu0").exists() or is_jetson()


def trtexec_path() -> str | None:
    found = shutil.which("trtexec")
    if found:
        return found
    return next((p for p in TRTEXEC_PATHS if Path(p).is_file()), None)


def _module_present(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def accelerator_present(target: Target) -> Availability:
    """Can this machine run ``target``'s runtime for real (so its latency numbers mean something)?"""
    arch = host_arch()
    if target.arch != arch:
        return Availability(False, f"target is {target.arch}, this machine is {arch}; measure on the device (edgekd deploy)")
    if target.kind == "jetson" and not is_jetson():
        return Availability(False, f"not a Jetson ({JETSON_RELEASE_FILE} missing); deploy the bundle to the device")
    if target.runtime == "openvino":
        return _openvino_available(target.openvino_device or "CPU")
    if target.runtime == "ort-cpu":
        ok = _module_present("onnxruntime")
        return Availability(ok, "onnxruntime CPU provider" if ok else "onnxruntime is not installed (pip install onnxruntime)")
    if not nvidia_gpu_present():
        return Availability(False, "no NVIDIA GPU on this machine")
    if target.runtime == "ort-cuda":
        return _ort_cuda_available()
    if not (_module_present("tensorrt") or trtexec_path()):
        return Availability(False, "TensorRT is not installed (pip install 'edgekd[tensorrt]' or JetPack's trtexec)")
    return Availability(True, "NVIDIA GPU and TensorRT present")


def _ort_cuda_available() -> Availability:
    try:
        import onnxruntime as ort
    except ImportError:
        return Availability(False, "onnxruntime is not installed")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        return Availability(True, "onnxruntime CUDAExecutionProvider")
    return Availability(False, "onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)")


def _openvino_available(device: str) -> Availability:
    """OpenVINO installed and the target's device (CPU, GPU, NPU) visible to it."""
    if not _module_present("openvino"):
        return Availability(False, "OpenVINO is not installed (pip install 'edgekd[openvino]')")
    import openvino as ov  # an optional extra: imported only for an OpenVINO target

    devices = ov.Core().available_devices
    if not any(d.split(".")[0] == device for d in devices):
        return Availability(False, f"OpenVINO sees no {device} here (devices: {', '.join(devices)}); measure on the device")
    return Availability(True, f"OpenVINO {device}")
