"""Shared by the benchmark scripts: how the machine is described next to every result."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine() -> str:
    cpu, flags = "unknown CPU", ""
    try:
        info = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in Path("/proc/cpuinfo").read_text().splitlines()) if v}
        cpu = info.get("model name", cpu)
        have = set(info.get("flags", "").split())
        flags = " (" + ("AVX-512 VNNI" if "avx512_vnni" in have else "AVX2 only, no AVX-512 VNNI" if "avx2" in have else "no AVX2") + ")"
    except OSError:
        pass
    load = ""
    try:
        load = f", 1-min load average {os.getloadavg()[0]:.1f} when this was written"
    except OSError:
        pass
    return f"{cpu}{flags}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}, Python {platform.python_version()}{load}"
