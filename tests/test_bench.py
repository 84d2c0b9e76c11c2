"""Latency benchmarking (issue 6): statistics, the regression decision, baselines, the CLI and the pytest helper.

Statistics are tested on synthetic samples (known answers, no timing noise); timing tests use tiny
real ONNX models built with onnx.helper and run by real onnxruntime sessions, with few runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings, strategies as st
from onnx import TensorProto, helper, numpy_helper

from edgekd.bench import (BenchRequest, TimingPlan, check_regression, compare_samples, fingerprint, fingerprint_differences, load_baseline,
                          parse_percent, resolve_model_path, run_bench, sample_inputs, save_baseline, summarize)
from edgekd.errors import EdgekdError
from edgekd.runners import TensorSpec, runtime_available
from edgekd.runners.ort import layer_times_from_trace
from cli_helpers import assert_one_line_error, json_out, run_cli, run_inprocess
from needs import needs_fmnist


# ------------------------------------------------------------------------------------------ models
def conv_net(path: Path, extra_convs: int = 0, channels: int = 16, size: int = 28, batch: int | str = "batch", seed: int = 0) -> Path:
    """A real conv net (Conv-Relu x (2 + extra) -> GAP -> MatMul); ``extra_convs`` plants a slowdown."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def conv(name: str, x: str, cin: int, cout: int) -> str:
        inits.append(numpy_helper.from_array((rng.standard_normal((cout, cin, 3, 3)) * 0.1).astype(np.float32), f"{name}_w"))
        inits.append(numpy_helper.from_array(np.zeros(cout, np.float32), f"{name}_b"))
        nodes.append(helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [f"{name}_c"], pads=[1, 1, 1, 1], name=name))
        nodes.append(helper.make_node("Relu", [f"{name}_c"], [f"{name}_r"], name=f"{name}_relu"))
        return f"{name}_r"

    x = conv("conv1", "input", 1, channels)
    x = conv("conv2", x, channels, channels)
    for i in range(extra_convs):
        x = conv(f"planted{i}", x, channels, channels)
    inits.append(numpy_helper.from_array((rng.standard_normal((channels, 10)) * 0.1).astype(np.float32), "fc_w"))
    nodes += [helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"), helper.make_node("Flatten", ["gap"], ["flat"], name="flat"),
              helper.make_node("MatMul", ["flat", "fc_w"], ["logits"], name="fc")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 1, size, size])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bench_models")
    return {"base": conv_net(d / "base.onnx"), "slow": conv_net(d / "slow.onnx", extra_convs=4), "ref": conv_net(d / "ref.onnx", seed=1),
            "fixed": conv_net(d / "fixed.onnx", batch=1)}


QUICK = TimingPlan(warmup=5, runs=60)


# ------------------------------------------------------------------------------------------ statistics
def test_summarize_known_samples() -> None:
    s = summarize(np.arange(1, 101, dtype=float), batch=4)
    assert (s.p50_ms, s.p90_ms, s.p99_ms) == pytest.approx((50.5, 90.1, 99.01))
    assert s.mean_ms == pytest.approx(50.5) and s.std_ms == pytest.approx(np.std(np.arange(1, 101), ddof=1))
    assert (s.min_ms, s.max_ms, s.runs, s.batch) == (1.0, 100.0, 100, 4)
    assert s.throughput == pytest.approx(4 * 1000 / 50.5)
    assert summarize([2.0, 2.0], 1, device_ms=[1.0, 3.0, 5.0]).device_p50_ms == 3.0


def test_summarize_refuses_no_samples() -> None:
    with pytest.raises(EdgekdError, match="no timed runs"):
        summarize([], 1)


@pytest.mark.parametrize("text, value", [("10%", 0.10), ("2.5%", 0.025), ("0.1", 0.1), ("10", 0.10), (0.05, 0.05), ("0%", 0.0), ("150%", 1.5), ("400%", 4.0)])
def test_parse_percent(text: str, value: float) -> None:
    assert parse_percent(text) == pytest.approx(value)


def test_parse_percent_rejects_garbage() -> None:
    with pytest.raises(EdgekdError, match="percentage"):
        parse_percent("ten percent")


def _latencies(n: int, median: float, seed: int, spread: float = 0.05) -> np.ndarray:
    """Right-skewed latencies like a real machine's: lognormal body plus a few 5x outliers."""
    rng = np.random.default_rng(seed)
    x = median * np.exp(spread * rng.standard_normal(n))
    x[rng.random(n) < 0.03] *= 5
    return x


def test_clear_slowdown_is_a_regression_with_its_size() -> None:
    comp = compare_samples(_latencies(200, 1.25, 1), _latencies(200, 1.0, 2), budget=0.10)
    assert comp.verdict == "regression" and comp.is_regression
    assert 1.20 < comp.ratio < 1.30 and comp.low > 1.10
    msg = comp.message()
    assert "slower" in msg and "95% confidence" in msg and "10% budget" in msg


@pytest.mark.parametrize("seed", range(10))
def test_noise_alone_is_not_a_regression(seed: int) -> None:
    comp = compare_samples(_latencies(200, 1.0, 100 + seed), _latencies(200, 1.0, 200 + seed), budget=0.10)
    assert comp.verdict == "ok", comp.message()


def test_speedup_is_reported_as_faster() -> None:
    comp = compare_samples(_latencies(200, 0.7, 3), _latencies(200, 1.0, 4), budget=0.10)
    assert comp.verdict == "faster" and comp.high < 1.0


def test_tiny_but_certain_speedup_is_ok_not_faster() -> None:
    base = _latencies(400, 1.0, 5)
    comp = compare_samples(base * 0.99, base, budget=0.10)
    assert comp.high < 1.0 and comp.verdict == "ok", comp.message()


def test_small_sample_over_budget_is_only_possible() -> None:
    # 15% slower on the point estimate, but 8 very noisy runs cannot show it exceeds 10% with 95% confidence
    base = np.array([0.6, 0.7, 0.8, 0.9, 1.1, 1.2, 1.3, 1.4])
    comp = compare_samples(base * 1.15, base, budget=0.10)
    assert comp.ratio == pytest.approx(1.15) and comp.low < 1.10
    assert comp.verdict == "possible-regression" and not comp.is_regression and "rerun with more --runs" in comp.message()


def test_reference_cancels_a_slower_machine() -> None:
    base_m, base_r = _latencies(200, 1.0, 7), _latencies(200, 2.0, 8)
    slow_machine = 1.4  # everything 40% slower today: not the model's fault
    cur_m, cur_r = _latencies(200, 1.0 * slow_machine, 9), _latencies(200, 2.0 * slow_machine, 10)
    assert compare_samples(cur_m, base_m, 0.10).verdict == "regression"
    comp = compare_samples(cur_m, base_m, 0.10, cur_r, base_r)
    assert comp.mode == "reference" and comp.verdict == "ok", comp.message()
    worse = compare_samples(_latencies(200, 1.3 * slow_machine, 11), base_m, 0.10, cur_r, base_r)
    assert worse.verdict == "regression" and "reference" in worse.message()


@settings(max_examples=15, deadline=None)
@given(scale=st.floats(0.01, 100.0))
def test_verdict_does_not_depend_on_the_time_unit(scale: float) -> None:
    cur, base = _latencies(100, 1.2, 12), _latencies(100, 1.0, 13)
    a, b = compare_samples(cur, base, 0.1), compare_samples(cur * scale, base * scale, 0.1)
    assert a.verdict == b.verdict and a.ratio == pytest.approx(b.ratio)


def test_too_few_runs_to_compare() -> None:
    with pytest.raises(EdgekdError, match="too few runs"):
        compare_samples([1.0, 1.1], [1.0] * 50, 0.1)


# ------------------------------------------------------------------------------------------ inputs and lookup
@needs_fmnist
def test_sample_inputs_random_and_real_images() -> None:
    spec = TensorSpec("input", (None, 3, 32, 32), "float32")
    rnd = sample_inputs(spec, 4, "random", seed=1)
    assert rnd.shape == (4, 3, 32, 32) and rnd.dtype == np.float32
    assert np.array_equal(rnd, sample_inputs(spec, 4, "random", seed=1))
    real = sample_inputs(spec, 4, "fashion-mnist", seed=0)
    assert real.shape == (4, 3, 32, 32) and -1.0 <= real.min() < real.max() <= 1.0  # (x/255 - 0.5) / 0.5
    assert np.array_equal(real[:, 0], real[:, 1])  # grey repeated into 3 channels


def test_sample_inputs_errors(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((2, 1, 8, 8), np.float32))
    with pytest.raises(EdgekdError, match="shape"):
        sample_inputs(TensorSpec("input", (None, 1, 28, 28), "float32"), 2, str(tmp_path / "x.npy"))
    with pytest.raises(EdgekdError, match="fixed batch of 1"):
        sample_inputs(TensorSpec("input", (1, 1, 28, 28), "float32"), 8)
    with pytest.raises(EdgekdError, match="unknown input source"):
        sample_inputs(TensorSpec("input", (None, 1, 28, 28), "float32"), 1, "webcam")


def test_resolve_model_path_for_files_and_bundles(tmp_path: Path, models: dict[str, Path]) -> None:
    assert resolve_model_path(models["base"]) == models["base"]
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "model.onnx").write_bytes(models["base"].read_bytes())
    assert resolve_model_path(plain) == plain / "model.onnx"
    bundle = tmp_path / "bundle"
    (bundle / "model").mkdir(parents=True)
    (bundle / "model" / "student_int8.onnx").write_bytes(models["base"].read_bytes())
    (bundle / "bundle.json").write_text(json.dumps({"primary": "student_int8", "models": {"student_int8": "model/student_int8.onnx"}}))
    assert resolve_model_path(bundle) == (bundle / "model" / "student_int8.onnx").resolve()
    (bundle / "bundle.json").write_text(json.dumps({"primary": "x", "models": {"x": "model/gone.onnx"}}))
    with pytest.raises(EdgekdError, match="missing"):
        resolve_model_path(bundle)
    with pytest.raises(EdgekdError, match="model not found"):
        resolve_model_path(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EdgekdError, match="no model in"):
        resolve_model_path(empty)


# ------------------------------------------------------------------------------------------ real timing
def test_run_bench_result_shape(models: dict[str, Path]) -> None:
    r = run_bench(BenchRequest(str(models["base"]), batches=[1, 4], plan=QUICK, threads=1, profile_top=3))
    for key in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "min_ms", "throughput", "batch", "runs", "fingerprint"):
        assert key in r
    assert r["batch"] == 1 and r["runs"] == 60 and r["threads"] == 1 and len(r["samples_ms"]) == 60
    assert [s["batch"] for s in r["sweep"]] == [1, 4] and r["sweep"][1]["p50_ms"] > r["sweep"][0]["p50_ms"] * 0.9
    assert r["min_ms"] <= r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] <= r["max_ms"]
    assert r["fingerprint"]["runtime"] == "ort-cpu" and r["fingerprint"]["threads"] == 1 and r["fingerprint"]["software"]["onnxruntime"]
    assert r["profile"] and {p["op"] for p in r["profile"]} & {"Conv", "FusedConv"}
    assert all(r["profile"][i]["mean_ms"] >= r["profile"][i + 1]["mean_ms"] for i in range(len(r["profile"]) - 1))


def test_duration_mode_runs_for_the_time_asked(models: dict[str, Path]) -> None:
    import time

    t0 = time.perf_counter()
    r = run_bench(BenchRequest(str(models["base"]), plan=TimingPlan(warmup=2, runs=1, duration_s=0.3)))
    assert time.perf_counter() - t0 >= 0.3 and r["runs"] >= 10 and r["duration_s"] == 0.3


def test_fixed_batch_model_skips_other_sweep_sizes(models: dict[str, Path]) -> None:
    r = run_bench(BenchRequest(str(models["fixed"]), batches=[1, 8], plan=TimingPlan(2, 20)))
    assert [s["batch"] for s in r["sweep"]] == [1]
    with pytest.raises(EdgekdError, match="fixed batch"):
        run_bench(BenchRequest(str(models["fixed"]), batches=[8], plan=TimingPlan(2, 20)))


def test_ort_trace_parsing_skips_warmup_runs() -> None:
    events = [{"name": "model_run", "ts": 0}, {"cat": "Node", "name": "c1_kernel_time", "ts": 1, "dur": 900, "args": {"op_name": "Conv"}},
              {"name": "model_run", "ts": 10}, {"cat": "Node", "name": "c1_kernel_time", "ts": 11, "dur": 100, "args": {"op_name": "Conv"}},
              {"cat": "Node", "name": "fc_kernel_time", "ts": 12, "dur": 300, "args": {"op_name": "Gemm"}},
              {"name": "model_run", "ts": 20}, {"cat": "Node", "name": "c1_kernel_time", "ts": 21, "dur": 100, "args": {"op_name": "Conv"}},
              {"cat": "Node", "name": "fc_kernel_time", "ts": 22, "dur": 300, "args": {"op_name": "Gemm"}},
              {"cat": "Node", "name": "fc_fence_before", "ts": 23, "dur": 999}]
    rows = layer_times_from_trace(events, runs=2, skip_runs=1)
    assert [(r.name, r.op, round(r.mean_ms, 4), round(r.share, 2)) for r in rows] == [("fc", "Gemm", 0.3, 0.75), ("c1", "Conv", 0.1, 0.25)]


# ------------------------------------------------------------------------------------------ baselines
@pytest.fixture(scope="module")
def measured(models: dict[str, Path]) -> dict:
    return run_bench(BenchRequest(str(models["base"]), plan=QUICK, reference=str(models["ref"])))


def test_baseline_roundtrip_and_self_comparison(tmp_path: Path, measured: dict) -> None:
    path = save_baseline(tmp_path / "b.json", measured, command="test")
    base = load_baseline(path)
    assert base["batch"] == 1 and base["reference"]["samples_ms"] and base["model"]["sha256"]
    comp = check_regression(measured, base, 0.10)
    assert comp.verdict == "ok" and comp.ratio == pytest.approx(1.0) and comp.mode == "reference"


@pytest.mark.parametrize("content, needle", [
    (None, "not found"),
    ("{not json", "not valid JSON"),
    ('{"format": "something-else"}', "not an edgekd latency baseline"),
    ('{"format": "edgekd-latency-baseline", "version": 99}', "version 99"),
    ('{"format": "edgekd-latency-baseline", "version": 1, "samples_ms": [1, 2]}', "no usable latency samples"),
    ('{"format": "edgekd-latency-baseline", "version": 1, "samples_ms": [1, 2, 3, 4, 5], "batch": 1, "runtime": "ort-cpu"}', "lacks 'fingerprint'"),
])
def test_bad_baseline_files(tmp_path: Path, content: str | None, needle: str) -> None:
    path = tmp_path / "b.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(EdgekdError, match=needle):
        load_baseline(path)


def test_baseline_from_another_machine_is_refused_unless_allowed(tmp_path: Path, measured: dict) -> None:
    base = load_baseline(save_baseline(tmp_path / "b.json", measured))
    base["fingerprint"] = base["fingerprint"] | {"cpu_model": "Some Other CPU", "threads": 8}
    base["fingerprint"]["software"] = base["fingerprint"]["software"] | {"onnxruntime": "0.0.1"}
    with pytest.raises(EdgekdError, match="another machine.*cpu_model.*--allow-other-machine"):
        check_regression(measured, base, 0.10)
    comp = check_regression(measured, base, 0.10, allow_other_machine=True)
    assert any("across machines" in n for n in comp.notes) and any("onnxruntime 0.0.1" in n for n in comp.notes)
    machine, software = fingerprint_differences(fingerprint(), fingerprint())
    assert machine == [] and software == []


def test_baseline_batch_and_reference_mismatches(tmp_path: Path, measured: dict) -> None:
    base = load_baseline(save_baseline(tmp_path / "b.json", measured))
    with pytest.raises(EdgekdError, match="batch 64"):
        check_regression(measured, base | {"batch": 64}, 0.10)
    with pytest.raises(EdgekdError, match="no reference measurement"):
        check_regression(measured, base | {"reference": None}, 0.10)
    without_ref = {k: v for k, v in measured.items() if k != "reference"}
    assert any("pass --reference" in n for n in check_regression(without_ref, base, 0.10).notes)


# ------------------------------------------------------------------------------------------ CLI
@needs_fmnist
def test_cli_json_sweep_and_profile(models: dict[str, Path]) -> None:
    out = json_out(run_cli("bench", models["base"], "--runtime", "ort-cpu", "-b", "1", "-b", "2", "--runs", "30", "--warmup", "3",
                           "--threads", "1", "--profile", "--top", "2", "--input", "fashion-mnist", "--json"))
    assert out["batch"] == 1 and out["runs"] == 30 and [s["batch"] for s in out["sweep"]] == [1, 2]
    assert {"p50_ms", "p90_ms", "p99_ms", "mean_ms", "throughput", "fingerprint"} <= set(out) and len(out["profile"]) == 2
    assert "samples_ms" not in out and out["input"] == "fashion-mnist"


def test_cli_target_sets_runtime_batch_and_budget(models: dict[str, Path]) -> None:
    out = json_out(run_cli("bench", models["base"], "--target", "x86-cpu", "--runs", "20", "--warmup", "2", "--json"))
    assert out["target"] == "x86-cpu" and out["runtime"] == "ort-cpu" and [s["batch"] for s in out["sweep"]] == [1, 64]


def test_cli_target_absent_here_is_one_line_error(models: dict[str, Path]) -> None:
    if runtime_available("tensorrt")[0]:
        pytest.skip("this machine has TensorRT and a GPU")
    assert_one_line_error(run_inprocess("bench", models["base"], "--target", "jetson-orin-nano", "--runs", "20"), "cannot run here")


def test_cli_regression_exit_codes(tmp_path: Path, models: dict[str, Path]) -> None:
    base = tmp_path / "base.json"
    # 1 thread and batch 8: compute, not call overhead, dominates, so a busy machine cannot fake a 10% change
    common = ["--runs", "150", "--warmup", "10", "-b", "8", "--threads", "1", "--reference", str(models["ref"])]
    json_out(run_cli("bench", models["base"], *common, "--save-baseline", base, "--json"))
    same = run_cli("bench", models["base"], *common, "--baseline", base, "--max-regression", "10%", "--json")
    assert same.returncode == 0 and json.loads(same.stdout)["comparison"]["verdict"] in ("ok", "faster"), same.stderr
    slow = run_cli("bench", models["slow"], *common, "--baseline", base, "--max-regression", "10%", "--json")
    assert slow.returncode == 1, slow.stderr
    comp = json.loads(slow.stdout)["comparison"]
    assert comp["verdict"] == "regression" and comp["low"] > 1.1
    assert "latency regression" in slow.stderr and "confidence" in slow.stderr


def test_cli_baseline_errors_are_one_line(tmp_path: Path, models: dict[str, Path]) -> None:
    assert_one_line_error(run_inprocess("bench", models["base"], "--baseline", tmp_path / "missing.json", "--runs", "10"), "latency baseline not found")
    (tmp_path / "bad.json").write_text("[1, 2")
    assert_one_line_error(run_inprocess("bench", models["base"], "--baseline", tmp_path / "bad.json", "--runs", "10"), "not valid JSON")
    assert_one_line_error(run_inprocess("bench", models["base"], "--max-regression", "lots", "--runs", "10"), "percentage")
    assert_one_line_error(run_inprocess("bench", tmp_path / "nope.onnx", "--runs", "10"), "model not found")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    assert_one_line_error(run_inprocess("bench", tmp_path / "junk.onnx", "--runs", "10"), "cannot load")
    assert_one_line_error(run_inprocess("bench", models["base"], "--runtime", "nnapi", "--runs", "10"), "unknown runtime")


# ------------------------------------------------------------------------------------------ pytest plugin, used as a user would
def test_pytest_plugin_from_a_users_test_file(tmp_path: Path, models: dict[str, Path]) -> None:
    test_file = tmp_path / "test_user_latency.py"
    test_file.write_text(textwrap.dedent(f"""
        import pytest
        from edgekd.testing import assert_latency

        MODEL, SLOW, REF = {str(models['base'])!r}, {str(models['slow'])!r}, {str(models['ref'])!r}
        BASE = {str(tmp_path / 'baseline.json')!r}

        def test_within_budget():
            r = assert_latency(MODEL, runtime="ort-cpu", budget_ms=1000.0, runs=20)
            assert r["p50_ms"] < 1000.0

        def test_over_budget():
            assert_latency(MODEL, runtime="ort-cpu", budget_ms=1e-6, runs=20)

        def test_fixture(edgekd_latency):
            edgekd_latency(MODEL, runtime="ort-cpu", budget_ms=1000.0, percentile="p99", runs=20)

        @pytest.mark.edgekd_target("jetson-orin-nano")
        def test_on_jetson():
            assert_latency(MODEL, target="jetson-orin-nano")

        # one thread, as the CI worker that runs this owns one core; batch 8 so a call is not all jitter
        def test_baseline_then_compare():
            assert_latency(MODEL, baseline=BASE, reference=REF, runs=600, threads=1, batch=8)

        def test_planted_slowdown():
            assert_latency(SLOW, baseline=BASE, reference=REF, runs=600, threads=1, batch=8, max_regression="10%")
        """))
    env = {**os.environ, "PYTHONPATH": ""}
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(test_file)]
    first = subprocess.run([*cmd, "-k", "baseline_then_compare", "--edgekd-update-baselines"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert first.returncode == 0 and (tmp_path / "baseline.json").is_file(), first.stdout[-2000:]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    out = proc.stdout
    assert "2 failed, 3 passed, 1 skipped" in out, out[-3000:]
    assert "over the 1e-06 ms budget" in out
    assert "latency regression" in out and "confidence" in out
    assert "target 'jetson-orin-nano' not available here" in out
    skip_reason = [line for line in out.splitlines() if "SKIPPED" in line]
    assert skip_reason and ("aarch64" in skip_reason[0] or "Jetson" in skip_reason[0]), skip_reason


def test_plugin_import_is_light() -> None:
    code = "import sys, edgekd.testing; heavy = [m for m in ('torch', 'onnxruntime', 'pydantic', 'numpy') if m in sys.modules]; print(heavy)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
