"""The hardware/software fingerprint every latency result carries, and how two of them differ.

No torch import: this runs on the device next to onnxruntime.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np


# Fields of the fingerprint that identify the machine and the measurement setting; a baseline from
# another value of any of them is refused unless --allow-other-machine. Software versions are
# reported when they differ but do not block: catching a slower runtime release is a use case.
MACHINE_KEYS = ("machine", "cpu_model", "cpu_cores_physical", "gpu", "jetson_power_mode", "runtime", "threads", "device")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _command_output(cmd: list[str], timeout: float = 10) -> str | None:
    exe = shutil.which(cmd[0]) or (cmd[0] if Path(cmd[0]).is_file() else None)
    if not exe:
        return None
    try:
        out = subprocess.run([exe, *cmd[1:]], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _gpu() -> str | None:
    smi = _command_output(["nvidia-smi", "--query-gpu=name,driver_version,compute_cap", "--format=csv,noheader"])
    if smi:
        return "; ".join(line.strip() for line in smi.splitlines() if line.strip())
    model = Path("/proc/device-tree/model")
    if model.exists() and Path("/etc/nv_tegra_release").exists():
        return model.read_text(errors="replace").strip("\x00 \n")
    return None


def _jetson_power_mode() -> str | None:
    """``nvpmodel -q`` on a Jetson ("NV Power Mode: MAXN" + mode id); None elsewhere."""
    out = _command_output(["nvpmodel", "-q"])
    return " ".join(out.split()) if out else None


def _package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def fingerprint(runtime: str = "ort-cpu", threads: int | None = None, device: str = "cpu", providers: list[str] | None = None) -> dict[str, Any]:
    """The hardware and software a latency was measured on; stored with every result and baseline."""
    software = {"python": platform.python_version(), "numpy": np.__version__}
    for pkg in ("edgekd", "onnxruntime", "onnxruntime-gpu", "tensorrt", "tensorrt-cu12", "tensorrt-cu13"):
        v = _package_version(pkg)
        if v:
            software[pkg] = v
    return {
        "machine": platform.machine(),
        "os": f"{platform.system()} {platform.release()}",
        "cpu_model": _cpu_model(),
        "cpu_cores_physical": _physical_cores(),
        "cpu_cores_logical": os.cpu_count(),
        "gpu": _gpu(),
        "jetson_power_mode": _jetson_power_mode(),
        "runtime": runtime,
        "providers": providers or [],
        "device": device,
        "threads": threads,
        "software": software,
    }


def _physical_cores() -> int:
    from edgekd.runners.ort import physical_cores  # light: numpy + onnxruntime, no torch

    try:
        return physical_cores()
    except Exception:  # noqa: BLE001 - the fingerprint must never fail a benchmark
        return os.cpu_count() or 1


def fingerprint_differences(baseline_fp: dict[str, Any], current_fp: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(machine differences that block a comparison, software differences that are only reported)."""
    machine = [f"{k}: {baseline_fp.get(k)!r} -> {current_fp.get(k)!r}" for k in MACHINE_KEYS if baseline_fp.get(k) != current_fp.get(k)]
    bs, cs = baseline_fp.get("software", {}) or {}, current_fp.get("software", {}) or {}
    software = [f"{k} {bs.get(k)} -> {cs.get(k)}" for k in sorted(set(bs) | set(cs)) if bs.get(k) != cs.get(k)]
    return machine, software
