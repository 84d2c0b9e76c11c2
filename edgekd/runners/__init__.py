"""Host-side runners: load an exported model on a runtime of this machine, run it and time it; one
small registry, imported lazily. (The torch-free code that runs *on the device*, inside every
bundle, is :mod:`edgekd.runtime`.)

Each runtime is a *runner* with the same few methods (see :class:`Runner`), so ``edgekd.bench``
times onnxruntime on this CPU, onnxruntime's CUDA / TensorRT execution providers, native
TensorRT engines and OpenVINO with one loop. The registry maps a runtime name to a factory and to an
availability probe; nothing heavy (onnxruntime, tensorrt, torch) is imported until a runner is
opened, so ``edgekd.testing`` (a pytest plugin) can ask "is this runtime here?" cheaply.
Pattern borrowed from Model Optimizer's deploy registry (runtime name -> compile/profile/infer).

Remote devices (``ssh``): the deploy path (``edgekd.deploy``) copies the model to the device and
times it there (``edgekd.deploy.remote_bench``); bench only needs its samples back.

>>> from edgekd.runners import open_runner
>>> runner = open_runner("ort-cpu", "model.onnx", threads=2)  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import importlib.util
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from edgekd.errors import EdgekdError
from edgekd.runners.base import LayerTime, Runner, RuntimeInfo, TensorSpec

__all__ = ["CPU_RUNTIMES", "RUNTIMES", "LayerTime", "Runner", "RuntimeEntry", "RuntimeInfo", "TensorSpec", "gpu_present", "open_runner",
           "runtime_available", "runtime_entry"]


@dataclass
class RuntimeEntry:
    name: str
    about: str
    open: Callable[..., Runner]
    available: Callable[[], tuple[bool, str]]


def _ort_provider_available(provider: str) -> tuple[bool, str]:
    if importlib.util.find_spec("onnxruntime") is None:
        return False, "onnxruntime is not installed (pip install onnxruntime)"
    import onnxruntime as ort

    if provider not in ort.get_available_providers():
        return False, f"onnxruntime has no {provider} here (install onnxruntime-gpu on a machine with an NVIDIA GPU)"
    return True, ""


def gpu_present() -> tuple[bool, str]:
    """An NVIDIA GPU is visible (nvidia-smi lists one, or this is a Jetson with its tegra GPU)."""
    if Path("/etc/nv_tegra_release").exists():
        return True, ""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False, "no NVIDIA GPU (nvidia-smi not found)"
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"nvidia-smi failed: {exc}"
    if out.returncode != 0 or "GPU" not in out.stdout:
        return False, "no NVIDIA GPU (nvidia-smi lists none)"
    return True, ""


@functools.lru_cache(maxsize=1)
def _tensorrt_available() -> tuple[bool, str]:
    """tensorrt and cuda-python import and a CUDA device answers: the bundle runtime's own probe,
    so host and device agree on what "TensorRT is usable" means."""
    if importlib.util.find_spec("tensorrt") is None:
        return False, "TensorRT is not installed (pip install 'edgekd[tensorrt]' on a machine with an NVIDIA GPU)"
    from edgekd.runtime.backends import tensorrt_usable  # imports tensorrt + cuda-python: only when the runtime is asked for

    why = tensorrt_usable()
    return (False, why) if why else (True, "")


def _open_ort(providers: list[str]) -> Callable[..., Runner]:
    def factory(path: str | Path, threads: int | None = None, **options: Any) -> Runner:
        from edgekd.runners.ort import OrtRunner  # lazy: onnxruntime / TensorRT load only when this runtime is opened

        return OrtRunner(path, providers=providers, threads=threads, **options)

    return factory


def _openvino_available() -> tuple[bool, str]:
    if importlib.util.find_spec("openvino") is None:
        return False, "OpenVINO is not installed (pip install 'edgekd[openvino]')"
    return True, ""


def _open_openvino(path: str | Path, threads: int | None = None, **options: Any) -> Runner:
    from edgekd.runners.openvino import OpenVinoRunner  # OpenVINO is an optional extra: imported when asked for

    return OpenVinoRunner(path, threads=threads, **options)


def _open_tensorrt(path: str | Path, threads: int | None = None, **options: Any) -> Runner:
    from edgekd.runners.tensorrt import TensorRTRunner  # lazy: onnxruntime / TensorRT load only when this runtime is opened

    return TensorRTRunner(path, **options)


RUNTIMES: dict[str, RuntimeEntry] = {
    "ort-cpu": RuntimeEntry("ort-cpu", "onnxruntime, CPU execution provider", _open_ort(["CPUExecutionProvider"]),
                            lambda: _ort_provider_available("CPUExecutionProvider")),
    "ort-cuda": RuntimeEntry("ort-cuda", "onnxruntime, CUDA execution provider", _open_ort(["CUDAExecutionProvider", "CPUExecutionProvider"]),
                             lambda: _ort_provider_available("CUDAExecutionProvider")),
    "ort-tensorrt": RuntimeEntry("ort-tensorrt", "onnxruntime, TensorRT execution provider",
                                 _open_ort(["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]),
                                 lambda: _ort_provider_available("TensorrtExecutionProvider")),
    "tensorrt": RuntimeEntry("tensorrt", "native TensorRT engine (built from a Q/DQ ONNX)", _open_tensorrt, _tensorrt_available),
    "openvino": RuntimeEntry("openvino", "OpenVINO (CPU plugin; device=GPU / NPU on Intel hardware)", _open_openvino, _openvino_available),
}
CPU_RUNTIMES = ("ort-cpu", "openvino")  # what an x86 build benches side by side


def runtime_entry(name: str) -> RuntimeEntry:
    if name not in RUNTIMES:
        raise EdgekdError(f"unknown runtime '{name}'", f"choose one of: {', '.join(RUNTIMES)}")
    return RUNTIMES[name]


def runtime_available(name: str) -> tuple[bool, str]:
    """(True, '') when ``name`` can run here, else (False, why) - used to skip tests cleanly."""
    return runtime_entry(name).available()


def open_runner(runtime: str, path: str | Path, threads: int | None = None, **options: Any) -> Runner:
    """Open ``path`` with ``runtime``; a runtime that is absent here is a clear EdgekdError, not an ImportError."""
    entry = runtime_entry(runtime)
    ok, why = entry.available()
    if not ok:
        raise EdgekdError(f"runtime '{runtime}' is not available here: {why}", "pick another --runtime / --target, or run on the device")
    return entry.open(path, threads=threads, **options)
