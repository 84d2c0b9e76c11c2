"""Stage: bench. Runs a :class:`BenchRequest` (model, runtime, batches, timing plan) and returns
the latency sweep with its fingerprint.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgekd.errors import EdgekdError
from edgekd.bench.fingerprint import fingerprint
from edgekd.bench.inputs import bundle_preprocess, resolve_model_path, sample_inputs
from edgekd.bench.stats import summarize
from edgekd.runners import open_runner
from edgekd.runners.timing import TimingPlan, time_interleaved, time_runner


@dataclass
class BenchRequest:
    """Everything one ``edgekd bench`` run needs; the CLI and the pytest helper both build one."""

    model: str
    runtime: str = "ort-cpu"
    batches: list[int] = field(default_factory=lambda: [1])
    plan: TimingPlan = field(default_factory=TimingPlan)
    threads: int | None = None
    input_source: str = "random"
    seed: int = 0
    reference: str | None = None
    profile_top: int = 0  # >0: per-layer profile with this many slowest layers
    profile_runs: int = 20
    runtime_options: dict[str, Any] = field(default_factory=dict)
    target: str | None = None


def _open(runtime: str, path: Path, threads: int | None, options: dict[str, Any]) -> Any:
    return open_runner(runtime, path, threads=threads, **options)


def _feeds(runner: Any, batch: int, source: str, seed: int, pre: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    meta = runner.metadata()
    return {spec.name: sample_inputs(spec, batch, source, seed, meta, pre) for spec in runner.input_specs()}


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def run_bench(req: BenchRequest, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure ``req.model`` (and the reference, interleaved) for each batch size; one JSON-able dict.

    The first batch is the primary one: its numbers sit at the top level (p50_ms, p90_ms, ...), and
    every batch is listed under ``sweep``. Raw samples of the primary batch are kept for baselines.
    """
    say = progress or (lambda _m: None)
    if not req.batches or any(b < 1 for b in req.batches):
        raise EdgekdError(f"batch sizes must be >= 1, got {req.batches}", "e.g. --batch 1 --batch 64")
    model_path = resolve_model_path(req.model)
    ref_path = resolve_model_path(req.reference) if req.reference else None
    # Two onnxruntime sessions timed in turns must not spin: a session's workers keep spinning after
    # its run and steal the other's cores, which skewed the model/reference ratio of two identical
    # networks by 0.78-1.17x from one process to the next (1.00 +- 0.01 without spinning).
    options = {**req.runtime_options, "spinning": False} if ref_path else req.runtime_options
    runner = _open(req.runtime, model_path, req.threads, options)
    ref_runner = _open(req.runtime, ref_path, req.threads, options) if ref_path else None
    load_before = _load_average()
    try:
        timed = _sweep(req, runner, model_path, (ref_runner, ref_path), say)
        profile = []
        if req.profile_top > 0:
            say(f"profiling layers over {req.profile_runs} runs")
            layers = runner.layer_profile(_feeds(runner, req.batches[0], req.input_source, req.seed, bundle_preprocess(model_path)), req.profile_runs)
            profile = [asdict(layer) for layer in layers[: req.profile_top]]
    finally:
        runner.close()
        if ref_runner is not None:
            ref_runner.close()
    return _result(req, runner.info, model_path, timed, {"load_average": {"before": load_before, "after": _load_average()}, "profile": profile})


@dataclass
class _Timed:
    """What the batch sweep measured: per-batch statistics and the primary batch's raw samples."""

    sweep: list[dict[str, Any]]
    samples: list[float]
    device_samples: list[float]
    ref_path: Path | None = None
    ref_samples: list[float] | None = None


def _sweep(req: BenchRequest, runner: Any, model_path: Path, reference: tuple[Any, Path | None], say: Callable[[str], None]) -> _Timed:
    """Time every batch size; the first one interleaved with the reference model when there is one.
    A later batch size the model cannot take (a fixed batch axis) is skipped with a note."""
    ref_runner, ref_path = reference
    pre = bundle_preprocess(model_path)
    timed = _Timed([], [], [], ref_path)
    for i, batch in enumerate(req.batches):
        try:
            feeds = runner.prepare(_feeds(runner, batch, req.input_source, req.seed, pre))
        except EdgekdError as exc:
            if i == 0:
                raise
            say(f"skipping batch {batch}: {exc.one_line()}")
            continue
        say(f"timing {model_path.name} at batch {batch}" + (f" interleaved with {ref_path.name}" if ref_runner and i == 0 else ""))
        if ref_runner is not None and i == 0:
            ref_feeds = ref_runner.prepare(_feeds(ref_runner, batch, req.input_source, req.seed, bundle_preprocess(ref_path)))
            host, timed.ref_samples = time_interleaved(runner, feeds, ref_runner, ref_feeds, req.plan)
            device: list[float] = []
        else:
            host, device = time_runner(runner, feeds, req.plan)
        timed.sweep.append(summarize(host, batch, device).to_dict())
        if i == 0:
            timed.samples, timed.device_samples = host, device
    return timed


def _result(req: BenchRequest, info: Any, model_path: Path, timed: _Timed, extra: dict[str, Any]) -> dict[str, Any]:
    """The JSON-able result: the primary batch's numbers at the top level, the sweep, raw samples."""
    result: dict[str, Any] = dict(timed.sweep[0])
    result.update({
        "model": str(model_path), "runtime": info.runtime, "threads": info.threads, "target": req.target, "input": req.input_source,
        "warmup": req.plan.warmup, "duration_s": req.plan.duration_s, "sweep": timed.sweep,
        "samples_ms": [round(v, 5) for v in timed.samples], "device_samples_ms": [round(v, 5) for v in timed.device_samples],
        "fingerprint": fingerprint(info.runtime, info.threads, info.device, info.providers), "runtime_info": asdict(info), **extra,
    })
    if timed.ref_path is not None and timed.ref_samples is not None:
        ref_stats = summarize(timed.ref_samples, req.batches[0])
        result["reference"] = {"model": str(timed.ref_path), **ref_stats.to_dict(), "samples_ms": [round(v, 5) for v in timed.ref_samples],
                               "ratio_p50": round(result["p50_ms"] / ref_stats.p50_ms, 6)}
    return result


def busy_machine_note(result: dict[str, Any]) -> str | None:
    """A warning when the 1-minute load average exceeded the core count: numbers are then less trustworthy."""
    cores = result.get("fingerprint", {}).get("cpu_cores_logical") or os.cpu_count() or 1
    loads = [v for v in (result.get("load_average") or {}).values() if v]
    worst = max((v[0] for v in loads), default=0.0)
    if worst > cores:
        tail = "" if result.get("reference") else "; pass --reference to cancel such drift"
        if (result.get("threads") or 1) > 1:
            tail += "; --threads 1 is far more repeatable on a shared machine"
        return f"the machine was busy while measuring (load average {worst:.1f} on {cores} cores){tail}"
    return None
