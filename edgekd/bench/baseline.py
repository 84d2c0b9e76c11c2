"""Latency baselines: save a result as a baseline file, load one safely, and check a new result
against it (the regression test of ``edgekd bench --baseline`` and the pytest plugin).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any


from edgekd.atomic import read_json, sha256_file, write_json_atomic
from edgekd.errors import EdgekdError
from edgekd.bench.fingerprint import fingerprint_differences
from edgekd.bench.stats import DEFAULT_CONFIDENCE, Comparison, compare_samples

BASELINE_FORMAT = "edgekd-latency-baseline"
BASELINE_VERSION = 1


def baseline_from_result(result: dict[str, Any], command: str | None = None) -> dict[str, Any]:
    """A baseline file's content: the primary batch's stats, raw samples, fingerprint (and the reference's)."""
    model = Path(result["model"])
    base = {
        "format": BASELINE_FORMAT,
        "version": BASELINE_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command,
        "model": {"name": model.name, "sha256": sha256_file(model) if model.is_file() else None},
        "runtime": result["runtime"],
        "batch": result["batch"],
        "threads": result["threads"],
        "stats": {k: result[k] for k in ("runs", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "min_ms", "max_ms", "throughput")},
        "samples_ms": result["samples_ms"],
        "fingerprint": result["fingerprint"],
        "reference": None,
    }
    ref = result.get("reference")
    if ref:
        ref_path = Path(ref["model"])
        base["reference"] = {"name": ref_path.name, "sha256": sha256_file(ref_path) if ref_path.is_file() else None,
                             "p50_ms": ref["p50_ms"], "samples_ms": ref["samples_ms"]}
    return base


def save_baseline(path: str | os.PathLike, result: dict[str, Any], command: str | None = None) -> Path:
    return write_json_atomic(path, baseline_from_result(result, command))


def load_baseline(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a baseline file; every problem is one clear EdgekdError."""
    data = read_json(path, "latency baseline")
    hint = "write a fresh one with `edgekd bench MODEL --save-baseline FILE`"
    if not isinstance(data, dict) or data.get("format") != BASELINE_FORMAT:
        raise EdgekdError(f"{path} is not an edgekd latency baseline", hint)
    if data.get("version") != BASELINE_VERSION:
        raise EdgekdError(f"{path} is baseline version {data.get('version')}, this edgekd reads version {BASELINE_VERSION}", hint)
    samples = data.get("samples_ms")
    if not isinstance(samples, list) or len(samples) < 5 or not all(isinstance(v, (int, float)) and v > 0 for v in samples):
        raise EdgekdError(f"{path} has no usable latency samples (samples_ms)", hint)
    for key in ("fingerprint", "batch", "runtime"):
        if key not in data:
            raise EdgekdError(f"{path} lacks '{key}'", hint)
    if not isinstance(data["fingerprint"], dict):
        raise EdgekdError(f"{path}: fingerprint is not an object", hint)
    ref = data.get("reference")
    if ref is not None and (not isinstance(ref, dict) or not isinstance(ref.get("samples_ms"), list) or len(ref["samples_ms"]) != len(samples)):
        raise EdgekdError(f"{path}: the reference samples are missing or do not pair with the model samples", hint)
    return data


def check_regression(result: dict[str, Any], baseline: dict[str, Any], budget: float, allow_other_machine: bool = False,
                     confidence: float = DEFAULT_CONFIDENCE, baseline_path: str = "baseline") -> Comparison:
    """Compare a ``run_bench`` result with a loaded baseline; refuses another machine unless allowed."""
    if int(baseline["batch"]) != int(result["batch"]):
        raise EdgekdError(f"{baseline_path} was measured at batch {baseline['batch']}, this run at batch {result['batch']}",
                          f"pass --batch {baseline['batch']} first, or save a new baseline")
    machine, software = fingerprint_differences(baseline["fingerprint"], result["fingerprint"])
    notes = []
    if machine and not allow_other_machine:
        raise EdgekdError(f"{baseline_path} was measured on another machine or setting ({'; '.join(machine)})",
                          "compare on the baseline's machine, save a new baseline here, or pass --allow-other-machine")
    if machine:
        notes.append("compared across machines (--allow-other-machine): " + "; ".join(machine))
    if software:
        notes.append("software differs from the baseline: " + "; ".join(software))
    base_ref = (baseline.get("reference") or {}).get("samples_ms")
    cur_ref = (result.get("reference") or {}).get("samples_ms")
    if cur_ref is not None and base_ref is None:
        raise EdgekdError(f"{baseline_path} has no reference measurement, so --reference cannot be used against it",
                          "save the baseline with --reference OTHER.onnx, or drop --reference")
    if base_ref is not None and cur_ref is None:
        notes.append("the baseline has a reference model; pass --reference to cancel machine drift")
    comp = compare_samples(result["samples_ms"], baseline["samples_ms"], budget, cur_ref, base_ref, confidence)
    comp.notes = notes
    return comp
