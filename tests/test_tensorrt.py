"""Native TensorRT runner (edgekd/runners/tensorrt.py): needs TensorRT and an NVIDIA GPU, skips cleanly elsewhere.

On a GPU machine these build real engines (FP32 and FP16; INT8 from a symmetric Q/DQ graph), save
the engine metadata, reuse or rebuild engines, compare outputs with onnxruntime and time them
through edgekd.bench with device-side (CUDA event) timing and the IProfiler per-layer profile.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgekd.runners import runtime_available

_OK, _WHY = runtime_available("tensorrt")
pytestmark = [pytest.mark.tensorrt, pytest.mark.gpu, pytest.mark.skipif(not _OK, reason=f"TensorRT runtime unavailable: {_WHY}")]


def _qdq_conv_net(path: Path, qdq: bool) -> Path:
    """Conv-Relu-Conv-GAP-MatMul with a dynamic batch; with ``qdq`` the convs take symmetric int8 Q/DQ inputs (TensorRT layout)."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def qdq_pair(x: str, name: str, scale: float, axis: int | None = None, channels: int = 0) -> str:
        if not qdq:
            return x
        shape = (channels,) if axis is not None else ()
        inits.append(numpy_helper.from_array(np.full(shape, scale, np.float32), f"{name}_s"))
        inits.append(numpy_helper.from_array(np.zeros(shape, np.int8), f"{name}_z"))
        kw = {"axis": axis} if axis is not None else {}
        nodes.append(helper.make_node("QuantizeLinear", [x, f"{name}_s", f"{name}_z"], [f"{name}_q"], **kw))
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [f"{name}_dq"], **kw))
        return f"{name}_dq"

    def conv(name: str, x: str, cin: int, cout: int) -> str:
        inits.append(numpy_helper.from_array((rng.standard_normal((cout, cin, 3, 3)) * 0.1).astype(np.float32), f"{name}_w"))
        xin = qdq_pair(x, f"{name}_in", 0.05)
        w = qdq_pair(f"{name}_w", f"{name}_wq", 0.003, axis=0, channels=cout)
        nodes.append(helper.make_node("Conv", [xin, w], [f"{name}_c"], pads=[1, 1, 1, 1], name=name))
        nodes.append(helper.make_node("Relu", [f"{name}_c"], [f"{name}_r"], name=f"{name}_relu"))
        return f"{name}_r"

    x = conv("conv2", conv("conv1", "input", 3, 32), 32, 32)
    inits.append(numpy_helper.from_array((rng.standard_normal((32, 10)) * 0.1).astype(np.float32), "fc_w"))
    nodes += [helper.make_node("GlobalAveragePool", [x], ["gap"]), helper.make_node("Flatten", ["gap"], ["flat"]),
              helper.make_node("MatMul", ["flat", "fc_w"], ["logits"])]
    graph = helper.make_graph(nodes, "trt_tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _ort_logits(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


@pytest.mark.parametrize("precision, qdq, atol", [("fp32", False, 1e-3), ("fp16", False, 2e-2), ("int8", True, 5e-2)])
def test_engine_matches_onnxruntime(tmp_path: Path, precision: str, qdq: bool, atol: float) -> None:
    from edgekd.runners.tensorrt import TensorRTRunner

    onnx_path = _qdq_conv_net(tmp_path / "m.onnx", qdq)
    x = np.random.default_rng(1).standard_normal((4, 3, 32, 32)).astype(np.float32)
    runner = TensorRTRunner(onnx_path, precision=precision, batch=4, max_batch=8)
    try:
        got = runner.outputs(runner.prepare({"input": x}))[0]
    finally:
        runner.close()
    np.testing.assert_allclose(got, _ort_logits(onnx_path, x), atol=atol, rtol=atol)
    meta = json.loads(runner.engine_path.with_suffix(runner.engine_path.suffix + ".json").read_text())
    assert meta["tensorrt"] and meta["gpu"] and "." in meta["compute_capability"] and meta["options"]["precision"] == precision


def test_engine_reused_until_the_onnx_changes(tmp_path: Path) -> None:
    from edgekd.runners.tensorrt import EngineOptions, TensorRTRunner, engine_is_current

    onnx_path = _qdq_conv_net(tmp_path / "m.onnx", qdq=True)
    TensorRTRunner(onnx_path, precision="int8", batch=2, max_batch=64).close()
    engine = onnx_path.with_suffix(".int8.engine")
    opts = EngineOptions("int8", 2, 64, 1024, None, True, str(onnx_path.with_suffix(".timing.cache")))
    assert engine_is_current(onnx_path, engine, opts) and onnx_path.with_suffix(".timing.cache").is_file()
    _qdq_conv_net(onnx_path, qdq=False)
    assert not engine_is_current(onnx_path, engine, opts)


def test_bench_tensorrt_has_device_time_and_layer_profile(tmp_path: Path) -> None:
    from edgekd.bench import BenchRequest, TimingPlan, run_bench

    onnx_path = _qdq_conv_net(tmp_path / "m.onnx", qdq=True)
    r = run_bench(BenchRequest(str(onnx_path), runtime="tensorrt", batches=[1, 8], plan=TimingPlan(10, 50), profile_top=5,
                               runtime_options={"precision": "int8", "batch": 1, "max_batch": 8}))
    assert r["runtime"] == "tensorrt" and r["device_p50_ms"] is not None and 0 < r["device_p50_ms"] <= r["p50_ms"] * 1.05
    assert r["fingerprint"]["gpu"] and r["fingerprint"]["device"] == "gpu"
    assert r["profile"] and all(p["mean_ms"] >= 0 for p in r["profile"])


def test_missing_dla_core_is_a_clear_error(tmp_path: Path) -> None:
    from edgekd.errors import EdgekdError
    from edgekd.runners.tensorrt import EngineOptions, build_engine

    import tensorrt as trt

    if trt.Builder(trt.Logger(trt.Logger.ERROR)).num_DLA_cores > 0:
        pytest.skip("this device has DLA cores")
    with pytest.raises(EdgekdError, match="DLA core"):
        build_engine(_qdq_conv_net(tmp_path / "m.onnx", qdq=True), tmp_path / "m.engine", EngineOptions(dla_core=0))


def test_trt_model_splits_a_batch_above_the_engines_profile(tmp_path: Path) -> None:
    from edgekd.runtime.backends import TrtModel
    from edgekd.runners.tensorrt import EngineOptions, build_engine

    onnx_path = _qdq_conv_net(tmp_path / "m.onnx", qdq=True)
    engine = build_engine(onnx_path, tmp_path / "m.engine", EngineOptions("int8", batch=2, max_batch=4, timing_cache=str(tmp_path / "t.cache")))
    model = TrtModel(engine)
    x = np.random.default_rng(2).standard_normal((11, 3, 32, 32)).astype(np.float32)
    assert (model.min_batch, model.max_batch) == (1, 4)
    np.testing.assert_allclose(model.run(x), _ort_logits(onnx_path, x), atol=5e-2, rtol=5e-2)


def test_a_shape_outside_the_profile_is_a_clear_error(tmp_path: Path) -> None:
    from edgekd.errors import EdgekdError
    from edgekd.runners.tensorrt import TensorRTRunner

    runner = TensorRTRunner(_qdq_conv_net(tmp_path / "m.onnx", qdq=False), precision="fp32", batch=2, max_batch=4)
    try:
        with pytest.raises(EdgekdError, match="refused input shape"):
            runner.prepare({"input": np.zeros((8, 3, 32, 32), np.float32)})
    finally:
        runner.close()


def test_dla_builds_one_static_engine_per_batch(tmp_path: Path) -> None:
    import tensorrt as trt

    from edgekd.runners.tensorrt import TensorRTRunner

    if trt.Builder(trt.Logger(trt.Logger.ERROR)).num_DLA_cores == 0:
        pytest.skip("this device has no DLA core")
    onnx_path = _qdq_conv_net(tmp_path / "m.onnx", qdq=True)
    runner = TensorRTRunner(onnx_path, precision="int8", batch=1, max_batch=8, dla_core=0)
    try:
        for b in (1, 8):
            runner.prepare({"input": np.zeros((b, 3, 32, 32), np.float32)})
            engine = runner._engine_for(b)[0]
            assert tuple(engine.get_tensor_shape("input"))[0] in (b, -1)
            lo, opt, hi = engine.get_tensor_profile_shape("input", 0)
            assert lo[0] == opt[0] == hi[0] == b and onnx_path.with_suffix(f".int8.dla0.b{b}.engine").is_file()
    finally:
        runner.close()
