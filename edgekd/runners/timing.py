"""The timing loops, the only ones on the host side: warm-up, then a fixed number of runs (or a
duration) with ``time.perf_counter_ns`` around one inference, the garbage collector paused; two
models timed interleaved (ABBA) when a reference is given. ``edgekd bench`` and the export's own
INT8-vs-FP32 check (:func:`median_latency_ms`) both time through them. (The bundle's torch-free
runtime keeps its own copy: it runs on the device without edgekd.)
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, TypeVar

import numpy as np

from edgekd.errors import EdgekdError
from edgekd.runners import open_runner

K = TypeVar("K")


@dataclass
class TimingPlan:
    """How long to measure: warm-up runs, then ``runs`` timed runs or until ``duration_s`` has passed."""

    warmup: int = 20
    runs: int = 200
    duration_s: float | None = None
    min_runs: int = 10

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.runs < 1:
            raise EdgekdError(f"need warmup >= 0 and runs >= 1 (got {self.warmup}, {self.runs})", "e.g. --warmup 20 --runs 200")
        if self.duration_s is not None and self.duration_s <= 0:
            raise EdgekdError(f"--duration must be positive, got {self.duration_s}", "e.g. --duration 10")


class _GcPaused:
    """Pause the cyclic garbage collector while timing, so a collection never lands inside a run.

    Only the young generations are collected first (the warm-up's garbage): a full collection walks
    every object the process holds, 0.3 s per timing once Model Optimizer (and with it torch._dynamo)
    is imported, a third of a tiny build's time; the old generation does not grow while timing."""

    def __enter__(self) -> None:
        self.was = gc.isenabled()
        gc.collect(1)
        gc.disable()

    def __exit__(self, *exc: Any) -> None:
        if self.was:
            gc.enable()


def _keep_going(plan: TimingPlan, done: int, started_ns: int) -> bool:
    if plan.duration_s is None:
        return done < plan.runs
    return done < plan.min_runs or (time.perf_counter_ns() - started_ns) < plan.duration_s * 1e9


def time_runner(runner: Any, prepared: Any, plan: TimingPlan) -> tuple[list[float], list[float]]:
    """Host latencies (ms) and device latencies (ms, empty when the runtime has none) of repeated runs."""
    for _ in range(plan.warmup):
        runner.timed_run(prepared)
    host, device = [], []
    with _GcPaused():
        started = time.perf_counter_ns()
        while _keep_going(plan, len(host), started):
            ns, dev_ms = runner.timed_run(prepared)
            host.append(ns / 1e6)
            if dev_ms is not None:
                device.append(dev_ms)
    return host, device


def time_interleaved(runner_a: Any, prepared_a: Any, runner_b: Any, prepared_b: Any, plan: TimingPlan) -> tuple[list[float], list[float]]:
    """Time two models in ABBA order (A B B A A B ...), so both see the same machine state, pair by pair."""
    for _ in range(plan.warmup):
        runner_a.timed_run(prepared_a)
        runner_b.timed_run(prepared_b)
    a, b = [], []
    with _GcPaused():
        started = time.perf_counter_ns()
        while _keep_going(plan, len(a), started):
            first_a = len(a) % 2 == 0
            order = ((runner_a, prepared_a, a), (runner_b, prepared_b, b)) if first_a else ((runner_b, prepared_b, b), (runner_a, prepared_a, a))
            for runner, prepared, out in order:
                out.append(runner.timed_run(prepared)[0] / 1e6)
    return a, b


def median_latency_ms(runtime: str, path: str | Path, batch: int, shape: tuple[int, int, int], runs: int = 30, warmup: int = 3,
                      threads: int | None = None) -> float:
    """Median host time (ms) of one run of ``path`` at ``batch`` (random input of ``shape``) on ``runtime``."""
    runner = open_runner(runtime, path, threads=threads)
    x = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
    try:
        host, _ = time_runner(runner, runner.prepare({runner.input_specs()[0].name: x}), TimingPlan(warmup=warmup, runs=runs))
    finally:
        runner.close()
    return float(np.median(host))


def interleaved_latency_ms(files: Mapping[K, str | Path], batch: int, shape: tuple[int, int, int], runs: int, rounds: int,
                           runtime: str = "ort-cpu") -> dict[K, list[float]]:
    """Each file's :func:`median_latency_ms` once per round, every file in turn each round: on a shared
    or throttling CPU the speed drifts by tens of percent within a minute, and files timed one after
    the other would show that drift as a difference between them. Take the median of each list."""
    per: dict[K, list[float]] = {key: [] for key in files}
    for _ in range(rounds):
        for key, path in files.items():
            per[key].append(median_latency_ms(runtime, path, batch, shape, runs))
    return per
