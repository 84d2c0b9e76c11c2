"""pytest plugin for latency regression tests in users' own test suites (loaded via the ``pytest11`` entry point).

A test reads the way the requirement does::

    import pytest
    from edgekd.testing import assert_latency

    @pytest.mark.edgekd_target("jetson-orin-nano")      # skipped where that hardware/runtime is absent
    def test_student_is_fast_enough():
        assert_latency("bundle/", target="jetson-orin-nano")            # the target's own budget

    def test_student_meets_budget_on_cpu():
        assert_latency("model.onnx", runtime="ort-cpu", budget_ms=2.0, batch=1)

    def test_no_regression_against_baseline():
        assert_latency("model.onnx", baseline="benchmarks/baselines/model.json",
                       reference="reference.onnx", max_regression="10%")

``pytest --edgekd-update-baselines`` writes the baselines instead of comparing (like a snapshot
update). The ``edgekd_latency`` fixture is the same function with the session's options applied.

This module is imported by pytest for *every* test run of an environment where edgekd is
installed, so it imports nothing heavy at load time: no torch, no onnxruntime, no pydantic. The
measuring code (``edgekd.bench``) is imported inside the functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

_OPTIONS = {"update_baselines": False, "runs": None}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("edgekd", "edgekd latency tests")
    group.addoption("--edgekd-update-baselines", action="store_true", default=False,
                    help="assert_latency(baseline=FILE) writes FILE from this run instead of comparing")
    group.addoption("--edgekd-runs", type=int, default=None, help="timed runs per assert_latency call (default 200)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "edgekd_target(name): run only where the target's hardware and runtime are present (else skip)")
    config.addinivalue_line("markers", "edgekd_runtime(name): run only where this edgekd runtime (ort-cpu, ort-cuda, tensorrt...) is available")
    _OPTIONS["update_baselines"] = bool(config.getoption("--edgekd-update-baselines", default=False))
    _OPTIONS["runs"] = config.getoption("--edgekd-runs", default=None)


def target_unavailable(name: str) -> str | None:
    """Why ``name``'s hardware/runtime is absent here, or None when tests for it can run."""
    from edgekd.errors import EdgekdError  # lazy: pytest plugin, no torch at load
    from edgekd.targets import accelerator_present, get_target  # lazy: pytest plugin, no torch at load

    try:
        avail = accelerator_present(get_target(name))
    except EdgekdError as exc:
        return exc.one_line()
    return None if avail.ok else avail.reason


def runtime_unavailable(name: str) -> str | None:
    from edgekd.errors import EdgekdError  # lazy: pytest plugin, no torch at load
    from edgekd.runners import runtime_available  # lazy: pytest plugin, no torch at load

    try:
        ok, why = runtime_available(name)
    except EdgekdError as exc:
        return exc.one_line()
    return None if ok else why


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers(name="edgekd_target"):
        if not mark.args:
            raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.edgekd_target needs a target name")
        why = target_unavailable(str(mark.args[0]))
        if why:
            pytest.skip(f"edgekd target '{mark.args[0]}' not available here: {why}")
    for mark in item.iter_markers(name="edgekd_runtime"):
        why = runtime_unavailable(str(mark.args[0])) if mark.args else "no runtime named"
        if why:
            pytest.skip(f"edgekd runtime '{mark.args[0] if mark.args else ''}' not available here: {why}")


def _budget_from_target(target: str, batch: int) -> float | None:
    from edgekd.targets import get_target  # lazy: pytest plugin, no torch at load

    t = get_target(target)
    return {1: t.latency_budget.batch1_ms, t.batch: t.latency_budget.batch_ms}.get(batch)


def assert_latency(model: str | Path, target: str | None = None, runtime: str | None = None, budget_ms: float | None = None,
                   batch: int | None = None, baseline: str | Path | None = None, max_regression: str | float = "10%",
                   reference: str | Path | None = None, percentile: str = "p50", runs: int | None = None, warmup: int = 20,
                   threads: int | None = None, input_source: str = "random", allow_other_machine: bool = False,
                   confidence: float = 0.95) -> dict[str, Any]:
    """Measure ``model`` and fail the test when it is over ``budget_ms`` or regressed against ``baseline``.

    ``target`` supplies the runtime, batch, threads and (when ``budget_ms`` is None) the latency
    budget; a target whose hardware is absent skips the test with the reason. Returns the bench result.
    """
    from edgekd.bench import (  # lazy: pytest plugin, no torch at load
        BenchRequest, TimingPlan, check_regression, load_baseline, parse_percent, run_bench, save_baseline)
    from edgekd.errors import EdgekdError  # lazy: pytest plugin, no torch at load

    tgt_runtime, tgt_batch, tgt_threads = None, None, None
    if target:
        why = target_unavailable(target)
        if why:
            pytest.skip(f"edgekd target '{target}' not available here: {why}")
        from edgekd.targets import get_target  # lazy: pytest plugin, no torch at load

        t = get_target(target)
        tgt_runtime, tgt_batch, tgt_threads = t.runtime, t.batch, t.threads
    runtime = runtime or tgt_runtime or "ort-cpu"
    why = runtime_unavailable(runtime)
    if why:
        pytest.skip(f"edgekd runtime '{runtime}' not available here: {why}")
    batch = batch or tgt_batch or 1
    if budget_ms is None and target and baseline is None:
        budget_ms = _budget_from_target(target, batch)
    if budget_ms is None and baseline is None:
        raise pytest.UsageError("assert_latency needs budget_ms=, baseline=, or a target whose latency_budget covers this batch")
    budget = parse_percent(max_regression)
    n_runs = runs or _OPTIONS["runs"] or 200
    req = BenchRequest(model=str(model), runtime=runtime, batches=[batch], plan=TimingPlan(warmup, n_runs), threads=threads or tgt_threads,
                       input_source=input_source, reference=str(reference) if reference else None, target=target)
    result = run_bench(req)
    problems = []
    if budget_ms is not None:
        key = f"{percentile}_ms"
        if key not in result:
            raise pytest.UsageError(f"percentile must be p50, p90 or p99, got {percentile!r}")
        if result[key] > budget_ms:
            problems.append(f"{Path(str(model)).name}: {percentile} latency {result[key]:.4g} ms at batch {batch} on {runtime} is over the "
                            f"{budget_ms:.4g} ms budget ({result['runs']} runs, p50 {result['p50_ms']:.4g} / p90 {result['p90_ms']:.4g} / p99 {result['p99_ms']:.4g} ms)")
    if baseline is not None:
        if _OPTIONS["update_baselines"]:
            save_baseline(baseline, result, command="pytest --edgekd-update-baselines")
        else:
            try:
                comp = check_regression(result, load_baseline(baseline), budget, allow_other_machine, confidence, str(baseline))
            except EdgekdError as exc:
                pytest.fail(f"{exc.one_line()}; `pytest --edgekd-update-baselines` writes the baseline from this machine", pytrace=False)
            result["comparison"] = comp.to_dict()
            if comp.is_regression:
                problems.append(f"{Path(str(model)).name}: {comp.message()}")
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)
    return result


@pytest.fixture
def edgekd_latency() -> Any:
    """``assert_latency`` as a fixture: ``def test_x(edgekd_latency): edgekd_latency("m.onnx", budget_ms=1)``."""
    return assert_latency
