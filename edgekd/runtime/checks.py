"""Selfcheck and latency on the device: what deploy runs there before trusting the bundle.

Selfcheck proves the copy is intact and gives the host's top-1 on the bundle's reference images.
Latency follows the Jetson benchmarking norms (warm-up, then percentiles over many runs;
``nvpmodel -q`` and ``jetson_clocks --show`` recorded), so device numbers can be compared.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgekd.runtime.classifier import Classifier
from edgekd.runtime.integrity import REFERENCE_INPUTS, read_sums
from edgekd.runtime.preprocessing import preprocess

JETSON_TOOLS = {"nvpmodel": ["nvpmodel", "-q"], "jetson_clocks": ["jetson_clocks", "--show"]}


def latency_ms(clf: Classifier, batch: int, runs: int, warmup: int, seed: int = 0, samples: bool = False) -> dict[str, Any]:
    """Median/p90/p99 of end-to-end model time (host buffers in, logits out) over ``runs`` calls."""
    s = int(clf.pre["input_size"])
    x = np.random.default_rng(seed).standard_normal((batch, int(clf.pre["channels"]), s, s)).astype(np.float32)
    for _ in range(warmup):
        clf.logits(x)
    times = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter()
        clf.logits(x)
        times[i] = (time.perf_counter() - t0) * 1e3
    p50, p90, p99 = np.percentile(times, [50, 90, 99])
    out: dict[str, Any] = {"batch": batch, "runs": runs, "warmup": warmup, "p50_ms": round(float(p50), 4), "p90_ms": round(float(p90), 4), "p99_ms": round(float(p99), 4),
                           "mean_ms": round(float(times.mean()), 4), "min_ms": round(float(times.min()), 4), "images_per_s": round(batch * 1e3 / float(p50), 1)}
    if samples:  # raw timings, so the host can run its own statistics and regression tests on device numbers
        out["samples_ms"] = [round(float(t), 5) for t in times]
    return out


def _tool_output(argv: list[str]) -> dict[str, Any] | None:
    exe = shutil.which(argv[0]) or next((p for p in (f"/usr/sbin/{argv[0]}", f"/usr/bin/{argv[0]}") if Path(p).is_file()), None)
    if not exe:
        return None
    try:
        r = subprocess.run([exe, *argv[1:]], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"rc": None, "output": str(exc)}
    return {"rc": r.returncode, "output": (r.stdout + r.stderr).strip()[-4000:]}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":")[0].strip() in ("model name", "Model", "Hardware"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def device_info() -> dict[str, Any]:
    """What the numbers were measured on; on a Jetson also the power mode and clock state."""
    info: dict[str, Any] = {"hostname_hash": hashlib.sha256(platform.node().encode()).hexdigest()[:12], "machine": platform.machine(),
                            "system": platform.platform(), "python": platform.python_version(), "numpy": np.__version__, "cpus": os.cpu_count(),
                            "torch_loaded": "torch" in sys.modules, "cpu_model": _cpu_model()}
    try:
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
    except ImportError:
        info["onnxruntime"] = None
    release = Path("/etc/nv_tegra_release")
    if release.is_file():
        info["l4t"] = release.read_text().splitlines()[0][:200]
    for key, argv in JETSON_TOOLS.items():
        out = _tool_output(argv)
        if out is not None:
            info[key] = out
    return info


def check_reference(clf: Classifier) -> dict[str, Any]:
    """Run the bundle's reference images and compare with the host's outputs of the same file."""
    ref = clf.meta.get("reference")
    if not ref:
        return {"checked": False}
    images = np.load(clf.root / REFERENCE_INPUTS, allow_pickle=False)
    logits = clf.logits(preprocess(images, clf.pre))
    expected = np.asarray(ref["logits"], dtype=np.float32)
    agree = float((logits.argmax(1) == expected.argmax(1)).mean())
    return {"checked": True, "images": int(images.shape[0]), "top1_agreement": agree, "max_abs_diff": float(np.abs(logits - expected).max())}


def selfcheck(bundle: str | os.PathLike, backend: str = "auto", min_agreement: float = 0.9) -> dict[str, Any]:
    """Checksums, load, one inference, agreement with the host: what deploy runs first on a device."""
    t0 = time.perf_counter()
    clf = Classifier(bundle, backend)
    load_s = time.perf_counter() - t0
    ref = check_reference(clf)
    one = clf.classify([np.zeros((int(clf.pre["channels"]), int(clf.pre["input_size"]), int(clf.pre["input_size"])), np.uint8)], top_k=1)[0][0]
    ok = (not ref["checked"]) or ref["top1_agreement"] >= min_agreement
    return {"ok": ok, "checksums": "ok", "files": len(read_sums(clf.root)), "bundle": clf.meta.get("name"), "backend": clf.backend,
            "providers": clf.model.providers, "fallback_reason": clf.fallback_reason, "load_seconds": round(load_s, 3),
            "one_inference": {"label": one[0], "probability": round(one[1], 6)}, "reference": ref, "device": device_info()}


def bench(bundle: str | os.PathLike, batches: Sequence[int] = (), runs: int = 200, warmup: int = 20, backend: str = "auto",
          samples: bool = False, threads: int | None = None) -> dict[str, Any]:
    """Latency percentiles at batch 1 and at the target's batch (or the given batches)."""
    clf = Classifier(bundle, backend, threads=threads)
    sizes = list(batches) or sorted({1, int(clf.target.get("batch") or 1)})
    results = [latency_ms(clf, b, runs, warmup, samples=samples) for b in sizes]
    budget = clf.target.get("latency_budget") or {}
    for r in results:
        limit = budget.get("batch1_ms") if r["batch"] == 1 else budget.get("batch_ms") if r["batch"] == clf.target.get("batch") else None
        r["budget_ms"] = limit
        # A TensorRT target timed on its onnxruntime fallback says nothing about the TensorRT budget.
        r["within_budget"] = None if limit is None or clf.fallback_reason else r["p50_ms"] <= limit
    return {"bundle": clf.meta.get("name"), "backend": clf.backend, "providers": clf.model.providers, "fallback_reason": clf.fallback_reason,
            "latency": results, "device": device_info()}
