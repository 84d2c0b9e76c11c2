"""The TensorRT / CUDA side, checked on a CPU: version pins, engine shapes, builder flags, the
availability probe, onnxruntime's TensorRT provider options and TrtModel's batch split.

No GPU here, so where TensorRT's own objects are needed (the builder config, an engine's profile)
small stand-ins record what edgekd asks of them; the same code runs for real in
tests/test_tensorrt.py and benchmarks/gpu_check.sh on a machine with a GPU.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from packaging.requirements import Requirement

from edgekd.runtime.backends import engine_batch_range, run_within_profile
from edgekd.runners.ort import provider_list, tensorrt_ep_options
from edgekd.runners.shapes import engine_batches, engine_profile
from edgekd.targets import get_target, load_targets

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- pins
def test_tensorrt_extra_pins_what_the_code_is_written_for():
    reqs = [Requirement(r) for r in importlib.metadata.requires("edgekd") or []]
    extra = {r.name: r for r in reqs if r.marker is not None and r.marker.evaluate({"extra": "tensorrt", "platform_machine": "x86_64"})}
    assert str(extra["tensorrt-cu12"].specifier) == "<11,>=10.3" and str(extra["cuda-python"].specifier) == "<13,>=12.6"
    assert "tensorrt" not in extra  # unpinned `tensorrt` resolves to 11 (BuilderFlag.FP16/INT8 removed)
    assert not extra["tensorrt-cu12"].marker.evaluate({"extra": "tensorrt", "platform_machine": "aarch64"})  # Jetson: JetPack's TensorRT
    pins = get_target("x86-cuda").tensorrt_pins()  # the one place that maps a target to packages agrees with the extra
    assert Requirement(pins["tensorrt"]).specifier == extra["tensorrt-cu12"].specifier
    assert Requirement(pins["cuda-python"]).specifier == extra["cuda-python"].specifier
    for name, lt in load_targets().items():
        t = lt.target
        if t.runtime == "tensorrt":
            assert t.tensorrt and t.cuda, name
            assert t.tensorrt_pins()["cuda-python"] in lt.path.read_text(), name  # each file says which it means
    assert get_target("jetson").tensorrt_pins()["cuda-python"] == "cuda-python>=12.6,<12.7"
    assert get_target("jetson-xavier-nx").tensorrt_pins()["cuda-python"] == "cuda-python>=11.4,<11.5"
    assert '"cuda-python>=12.6,<13"' in (ROOT / "Dockerfile").read_text() and '"cuda-python>=12.6,<12.7"' in (ROOT / "docs/jetson.md").read_text()


# ----------------------------------------------------------------------------- shapes
def test_engine_shapes_static_on_the_dla_and_for_a_fixed_batch():
    assert engine_profile(8, 64) == engine_profile(8, 64, dla=False) and engine_profile(8, 64).shapes((3, 32, 32))[2] == (64, 3, 32, 32)
    assert (engine_profile(8, 64).min, engine_profile(8, 64).opt) == (1, 8)
    assert engine_profile(8, 64, dla=True).static and engine_profile(8, 64, dla=True).max == 8
    assert engine_profile(8, 64, fixed_batch=4).static and engine_profile(8, 64, fixed_batch=4).opt == 4
    assert engine_batches([1, 8], dla=True) == [1, 8] and engine_batches([1, 8], dla=False) == [1] and engine_batches([1, 8], True, fixed_batch=4) == [4]


class _Recorder:
    """Stands in for TensorRT's builder / config / profile / network: records what edgekd sets."""

    def __init__(self, input_shape, accept_cache=True):
        self.flags, self.shapes, self.caches = set(), {}, []
        self.accept_cache, self.input_shape = accept_cache, input_shape
        self.default_device_type = self.DLA_core = self.profiling_verbosity = None

    # builder
    def create_builder_config(self):
        return self

    def create_optimization_profile(self):
        return self

    # config
    def set_memory_pool_limit(self, *_):
        pass

    def set_flag(self, flag):
        self.flags.add(flag)

    def create_timing_cache(self, data):
        return ("cache", data)

    def set_timing_cache(self, cache, ignore_mismatch):
        self.caches.append(cache)
        return self.accept_cache or cache[1] == b""  # a cache from another GPU is refused, an empty one taken

    def add_optimization_profile(self, _p):
        pass

    # profile
    def set_shape(self, name, lo, opt, hi):
        self.shapes[name] = (lo, opt, hi)

    # network
    num_inputs = 1

    def get_input(self, _i):
        return SimpleNamespace(name="input", shape=self.input_shape)


def _fake_trt(monkeypatch, with_precision_flags=True):
    import edgekd.runners.tensorrt_build as rt

    flags = {"GPU_FALLBACK": "GPU_FALLBACK", **({"FP16": "FP16", "INT8": "INT8"} if with_precision_flags else {})}
    fake = SimpleNamespace(BuilderFlag=SimpleNamespace(**flags), MemoryPoolType=SimpleNamespace(WORKSPACE=0),
                           ProfilingVerbosity=SimpleNamespace(DETAILED=2), DeviceType=SimpleNamespace(DLA="DLA"))
    monkeypatch.setattr(rt, "trt", fake)
    return rt


def test_builder_profiles_flags_and_timing_cache(monkeypatch, tmp_path):
    rt = _fake_trt(monkeypatch)
    dyn = _Recorder((-1, 3, 32, 32))
    rt._configure(dyn, dyn, rt.EngineOptions("int8", 8, 64))
    assert dyn.shapes["input"] == ((1, 3, 32, 32), (8, 3, 32, 32), (64, 3, 32, 32)) and dyn.flags == {"FP16", "INT8"}
    dla = _Recorder((-1, 3, 32, 32))
    rt._configure(dla, dla, rt.EngineOptions("fp32", 8, 64, dla_core=0))
    assert dla.shapes["input"] == ((8, 3, 32, 32),) * 3  # DLA: static
    assert dla.flags == {"FP16", "GPU_FALLBACK"} and dla.default_device_type == "DLA"  # DLA without INT8 runs FP16, not off the DLA
    fixed = _Recorder((4, 3, 32, 32))
    rt._configure(fixed, fixed, rt.EngineOptions("int8", 1, 64))
    assert fixed.shapes["input"] == ((4, 3, 32, 32),) * 3  # a user's fixed batch keeps its batch
    cache = tmp_path / "other-gpu.cache"
    cache.write_bytes(b"from another GPU")
    refused = _Recorder((-1, 3, 32, 32), accept_cache=False)
    warned = []
    monkeypatch.setattr("edgekd.ui.warn", warned.append)
    _config, _c, note = rt._configure(refused, refused, rt.EngineOptions("int8", 1, 8, timing_cache=str(cache)))
    assert note and "refused" in note and warned == [note] and refused.caches[-1] == ("cache", b"")
    strongly = _Recorder((-1, 3, 32, 32))
    rt = _fake_trt(monkeypatch, with_precision_flags=False)  # TensorRT 11: the flags are gone
    rt._configure(strongly, strongly, rt.EngineOptions("int8", 1, 8))
    assert strongly.flags == set() and rt.strongly_typed_only()


# ----------------------------------------------------------------------------- onnxruntime's TensorRT provider
@pytest.mark.parametrize("target, fp16, int8, dla", [("x86-cuda", True, False, None), ("jetson-orin-nano", True, False, None),
                                                     ("jetson-xavier-nx", True, True, None), ("jetson-orin-nx", True, False, 0)])
def test_tensorrt_provider_options_per_target(target, fp16, int8, dla, tmp_path):
    t = get_target(target)
    opts = tensorrt_ep_options(t.precision, t.tensorrt, t.dla.core, tmp_path / "cache")
    assert opts["trt_fp16_enable"] is fp16 and opts["trt_int8_enable"] is int8  # TensorRT 8.5 needs the INT8 flag for Q/DQ
    assert opts["trt_engine_cache_enable"] and opts["trt_timing_cache_enable"] and opts["trt_engine_cache_path"] == str(tmp_path / "cache")
    assert opts.get("trt_dla_enable", False) is (dla is not None) and opts.get("trt_dla_core") == dla
    listed = provider_list(["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], tmp_path / "m.onnx",
                           {"precision": t.precision, "tensorrt": t.tensorrt, "dla_core": t.dla.core})
    assert listed[0][0] == "TensorrtExecutionProvider" and listed[0][1]["trt_int8_enable"] is int8 and listed[1:] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert listed[0][1]["trt_engine_cache_path"] == str(tmp_path / "m.ort-trt-cache")
    assert provider_list(["CPUExecutionProvider"], tmp_path / "m.onnx", {}) == ["CPUExecutionProvider"]


# ----------------------------------------------------------------------------- the probe, with real import failures
_SHIMS = {
    "broken-cuda-python": {"tensorrt/__init__.py": "__version__ = '10.3.0'\n",
                           "cuda/__init__.py": "raise ImportError('libcudart.so.13: cannot open shared object file (shim)')\n"},
    "no-device": {"tensorrt/__init__.py": "__version__ = '10.3.0'\n", "cuda/__init__.py": "",
                  "cuda/bindings/__init__.py": "", "cuda/bindings/runtime.py": "def cudaGetDeviceCount():\n    return (100, 0)  # cudaErrorNoDevice\n"},
}


def _shim(tmp_path: Path, kind: str) -> dict[str, str]:
    root = tmp_path / kind
    for rel, text in _SHIMS[kind].items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    import os

    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(ROOT)])}


@pytest.mark.parametrize("kind, reason", [("broken-cuda-python", "cuda-python is not importable (ImportError: libcudart.so.13"),
                                          ("no-device", "no CUDA device answers")])
def test_probe_reports_broken_cuda_as_unavailable(kind, reason, tmp_path):
    env = _shim(tmp_path, kind)
    code = textwrap.dedent("""
        import tensorrt  # the shim: importable, as a real install without a working CUDA is
        from edgekd.runners import runtime_available
        from edgekd.runtime.backends import tensorrt_usable
        ok, why = runtime_available("tensorrt")
        print(ok, "|", why, "|", tensorrt_usable())
    """)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    ok, why, usable = (part.strip() for part in out.stdout.strip().split("|"))
    assert ok == "False" and why.startswith(reason) and usable == why


@pytest.mark.slow
def test_tensorrt_tests_skip_with_the_reason_and_the_bundle_falls_back(tmp_path, pico_model):
    from edgekd.bundle import BundleModel, make_bundle

    env = _shim(tmp_path, "broken-cuda-python")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-n", "0", "-p", "no:cacheprovider", str(ROOT / "tests/test_tensorrt.py")],
                         env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0 and "error" not in run.stdout.lower().split("short test summary")[0], run.stdout[-2000:]
    assert "skipped" in run.stdout and "cuda-python is not importable" in run.stdout, run.stdout[-2000:]
    bundle = make_bundle(tmp_path / "b", BundleModel({"pico": pico_model.onnx}, "pico", pico_model.classes, pico_model.preprocess),
                         get_target("jetson"), {}, make_tar=False)
    code = f"from edgekd.runtime import Classifier; c = Classifier({str(bundle)!r}); print(c.backend, '|', c.fallback_reason)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    backend, reason = (p.strip() for p in out.stdout.strip().split("|"))
    assert out.returncode == 0 and backend == "onnxruntime" and reason.startswith("cuda-python is not importable"), out.stderr[-1500:]


# ----------------------------------------------------------------------------- TrtModel edge cases
def test_trt_model_splits_batches_above_the_profile_and_pads_a_static_engine():
    calls = []

    def run_one(chunk):  # the engine's output: one row per input row, its sum (so rows can be checked)
        calls.append(chunk.shape[0])
        return chunk.reshape(chunk.shape[0], -1).sum(1, keepdims=True)

    x = np.arange(20 * 3, dtype=np.float32).reshape(20, 3, 1, 1)
    out = run_within_profile(x, 1, 8, run_one)
    assert calls == [8, 8, 4] and np.array_equal(out, x.reshape(20, -1).sum(1, keepdims=True))
    calls.clear()
    out = run_within_profile(x[:11], 8, 8, run_one)  # a static (DLA) engine of batch 8: the last chunk padded, its rows dropped
    assert calls == [8, 8] and out.shape == (11, 1) and np.array_equal(out, x[:11].reshape(11, -1).sum(1, keepdims=True))
    dynamic = SimpleNamespace(get_tensor_shape=lambda n: (-1, 3, 32, 32), get_tensor_profile_shape=lambda n, i: [(1, 3, 32, 32), (8, 3, 32, 32), (16, 3, 32, 32)])
    static = SimpleNamespace(get_tensor_shape=lambda n: (8, 3, 32, 32), get_tensor_profile_shape=None)
    assert engine_batch_range(dynamic, "input") == (1, 16) and engine_batch_range(static, "input") == (8, 8)
