"""Native TensorRT: build an engine from a Q/DQ ONNX, save it with its metadata, run and time it.

Written against the TensorRT 10 Python API as in NVIDIA's "TensorRT Developer Guide" (Python API
sections: *Building an Engine*, *Performing Inference*, *Optimization Profiles*, *Working with
DLA*, *Profiling*) and trtexec's timing practice: explicit-quantisation networks (Q/DQ in the
ONNX, no calibrator), a timing cache reused between builds, an optimisation profile for the batch,
``execute_async_v3`` on a CUDA stream with inputs already on the device (trtexec's
``--noDataTransfers``), device time from CUDA events (trtexec's "GPU Compute Time"), per-layer
times through ``IProfiler`` in a separate profiling pass (trtexec's ``--separateProfileRun``).

Engines are specific to the GPU and TensorRT version, so each ``.engine`` has a ``.engine.json``
beside it (TensorRT version, GPU name, compute capability, flags, source ONNX sha256); a stale
engine is rebuilt rather than loaded. Needs ``tensorrt`` and ``cuda-python``; without a GPU every
entry point raises an EdgekdError that says so (tests skip with that reason).

Pinned to TensorRT >= 10.3, < 11 (pyproject's ``[tensorrt]`` extra; JetPack 6.1 and NGC 24.08 ship
10.3) and read against NVIDIA/TensorRT's v10.3.0, v10.12.0 and v11.1 headers and Python bindings
(docs/jetson.md lists what). ``BuilderFlag.FP16``/``INT8`` exist through 10.x (deprecated from
10.12); where they are gone (11) the network is built strongly typed and the ONNX's own types decide.
Shapes (dynamic profile on the GPU, one static engine per batch on the DLA, a user's fixed batch)
come from :mod:`edgekd.runners.shapes`.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.atomic import read_json
from edgekd.errors import EdgekdError
from edgekd.runners.base import LayerTime, RuntimeInfo, TensorSpec
from edgekd.runners.tensorrt_build import (EngineOptions, _check, _cudart, _logger, build_engine, engine_is_current,  # noqa: F401 - re-exported
                                         gpu_description, require_tensorrt, strongly_typed_only)

try:  # both are optional: the [tensorrt] extra
    import tensorrt as trt
except ImportError:  # pragma: no cover - exercised on machines without TensorRT
    trt = None


class _LayerProfiler(trt.IProfiler if trt is not None else object):  # type: ignore[misc]
    """Collects ``report_layer_time`` callbacks (ms per layer per run)."""

    def __init__(self) -> None:
        if trt is not None:
            trt.IProfiler.__init__(self)
        self.total: dict[str, float] = {}

    def report_layer_time(self, layer_name: str, ms: float) -> None:
        self.total[layer_name] = self.total.get(layer_name, 0.0) + ms


def onnx_fixed_batch(onnx_path: Path) -> int | None:
    """The first input's batch when the ONNX fixes it (a user's file exported without a dynamic axis), else None."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    inp = next(i for i in model.graph.input if i.name not in inits)
    first = inp.type.tensor_type.shape.dim[0]
    return int(first.dim_value) if first.HasField("dim_value") and first.dim_value > 0 else None


def set_shape(ctx: Any, engine: Any, name: str, shape: tuple[int, ...]) -> None:
    """``set_input_shape`` returns False (it does not raise) for a shape outside the engine's profile."""
    if not ctx.set_input_shape(name, tuple(shape)):
        lo, _opt, hi = (tuple(d) for d in engine.get_tensor_profile_shape(name, 0))
        raise EdgekdError(f"TensorRT refused input shape {tuple(shape)} for '{name}': the engine's profile is {lo}..{hi}",
                          "rebuild the engine for this batch (--batch / max_batch), or feed batches within the profile")


class TensorRTRunner:
    """Runs a TensorRT engine (an ``.engine`` file, or an ``.onnx`` built into ``<onnx>.<precision>.engine``).

    On a DLA core an ONNX gets one static engine per batch size (``<onnx>.int8.dla0.b8.engine``),
    built the first time that batch is prepared, so each batch is timed on an engine of its own shape."""

    def __init__(self, path: str | Path, precision: str = "int8", batch: int = 1, max_batch: int | None = None, workspace_mb: int = 1024,
                 dla_core: int | None = None, gpu_fallback: bool = True, timing_cache: str | None = None, **_: Any):
        require_tensorrt()
        self.cudart = _cudart()
        path = Path(path)
        self.runtime = trt.Runtime(_logger())
        if dla_core is not None:
            self.runtime.DLA_core = dla_core
        self.stream = _check(self.cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.start_event = _check(self.cudart.cudaEventCreate(), "cudaEventCreate")
        self.end_event = _check(self.cudart.cudaEventCreate(), "cudaEventCreate")
        self._buffers: list[int] = []
        self._engines: dict[int | None, tuple[Any, Any, Path]] = {}
        self.onnx = path if path.suffix == ".onnx" else None
        self._path_given = path
        self.fixed_batch = onnx_fixed_batch(path) if self.onnx else None
        self.per_batch = dla_core is not None and self.onnx is not None and self.fixed_batch is None
        self.opts = EngineOptions(precision, batch, max_batch or max(batch, 64), workspace_mb, dla_core, gpu_fallback,
                                  timing_cache or (str(path.with_suffix(".timing.cache")) if self.onnx else None))
        self.engine, self.context, self.engine_path = self._engine_for(batch)
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        meta_path = self.engine_path.with_suffix(self.engine_path.suffix + ".json")
        extra = {"engine": str(self.engine_path), "tensorrt": trt.__version__, **gpu_description(), "static_per_batch": self.per_batch}
        if meta_path.is_file():
            extra["engine_metadata"] = read_json(meta_path, "engine metadata")
        self.info = RuntimeInfo(runtime="tensorrt", threads=None, providers=["TensorRT"], device="gpu" if dla_core is None else f"dla{dla_core}", extra=extra)

    def _engine_file(self, batch: int) -> Path:
        assert self.onnx is not None
        dla = f".dla{self.opts.dla_core}" if self.opts.dla_core is not None else ""
        return self.onnx.with_suffix(f".{self.opts.precision}{dla}{f'.b{batch}' if self.per_batch else ''}.engine")

    def _engine_for(self, batch: int) -> tuple[Any, Any, Path]:
        """(engine, context, file) that runs ``batch``: the one engine, or on the DLA the static one of that batch."""
        key = batch if self.per_batch else None
        if key in self._engines:
            return self._engines[key]
        if self.onnx is None:
            path = self._path_given
        else:
            path, opts = self._engine_file(batch), EngineOptions(**{**asdict(self.opts), "batch": batch}) if self.per_batch else self.opts
            if not engine_is_current(self.onnx, path, opts):
                build_engine(self.onnx, path, opts)
        if not path.is_file():
            raise EdgekdError(f"TensorRT engine not found: {path}", "pass an .engine file or the .onnx to build one from")
        engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise EdgekdError(f"TensorRT cannot load {path}", "engines only load with the TensorRT version and GPU they were built for; rebuild it")
        self._engines[key] = (engine, engine.create_execution_context(), path)
        return self._engines[key]

    def _is_input(self, name: str) -> bool:
        return self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT

    def input_specs(self) -> list[TensorSpec]:
        specs = []
        for name in self.names:
            if self._is_input(name):
                shape = tuple(d if d >= 0 else None for d in self.engine.get_tensor_shape(name))
                if self.per_batch:  # one static engine per batch: any batch can be asked for
                    shape = (None, *shape[1:])
                specs.append(TensorSpec(name, shape, np.dtype(trt.nptype(self.engine.get_tensor_dtype(name))).name))
        return specs

    def metadata(self) -> dict[str, str]:
        return {}

    def prepare(self, arrays: dict[str, np.ndarray], context: Any = None) -> dict[str, Any]:
        """Copy inputs to the GPU once, allocate outputs, bind every tensor address on the context."""
        cudart = self.cudart
        batch = int(next(iter(arrays.values())).shape[0])
        engine, own_ctx, _path = self._engine_for(batch)
        ctx = context or own_ctx
        host_out: dict[str, np.ndarray] = {}
        for name, arr in arrays.items():
            arr = np.ascontiguousarray(arr)
            set_shape(ctx, engine, name, arr.shape)
            ptr = _check(cudart.cudaMalloc(arr.nbytes), "cudaMalloc")
            self._buffers.append(ptr)
            _check(cudart.cudaMemcpy(ptr, arr.ctypes.data, arr.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice), "cudaMemcpy")
            ctx.set_tensor_address(name, int(ptr))
        for name in self.names:
            if self._is_input(name):
                continue
            shape = tuple(ctx.get_tensor_shape(name))
            out = np.empty(shape, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
            ptr = _check(cudart.cudaMalloc(max(out.nbytes, 1)), "cudaMalloc")
            self._buffers.append(ptr)
            ctx.set_tensor_address(name, int(ptr))
            host_out[name] = out
        return {"outputs": host_out, "context": ctx}

    def timed_run(self, prepared: dict[str, Any]) -> tuple[int, float | None]:
        """Host wall time around enqueue + stream sync; device time between CUDA events on the stream."""
        cudart = self.cudart
        t0 = time.perf_counter_ns()
        _check(cudart.cudaEventRecord(self.start_event, self.stream), "cudaEventRecord")
        if not prepared["context"].execute_async_v3(int(self.stream)):
            raise EdgekdError("TensorRT execution failed", "rerun with --debug and read TensorRT's log")
        _check(cudart.cudaEventRecord(self.end_event, self.stream), "cudaEventRecord")
        _check(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        host_ns = time.perf_counter_ns() - t0
        device_ms = _check(cudart.cudaEventElapsedTime(self.start_event, self.end_event), "cudaEventElapsedTime")
        return host_ns, float(device_ms)

    def outputs(self, prepared: dict[str, Any]) -> list[np.ndarray]:
        cudart = self.cudart
        self.timed_run(prepared)
        outs = []
        for name, host in prepared["outputs"].items():
            ptr = int(prepared["context"].get_tensor_address(name))
            _check(cudart.cudaMemcpy(host.ctypes.data, ptr, host.nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost), "cudaMemcpy")
            outs.append(host.copy())
        return outs

    def layer_profile(self, arrays: dict[str, np.ndarray], runs: int) -> list[LayerTime]:
        """IProfiler times per engine layer over ``runs`` runs, on a separate pass (profiling slows execution)."""
        ctx = self._engine_for(int(next(iter(arrays.values())).shape[0]))[0].create_execution_context()  # never the timing context
        profiler = _LayerProfiler()
        ctx.profiler = profiler
        prepared = self.prepare(arrays, ctx)
        for _ in range(runs):
            self.timed_run(prepared)
        grand = sum(profiler.total.values()) or 1.0
        rows = [LayerTime(name, "trt", total / max(runs, 1), total / grand) for name, total in profiler.total.items()]
        return sorted(rows, key=lambda r: r.mean_ms, reverse=True)

    def close(self) -> None:
        for ptr in self._buffers:
            self.cudart.cudaFree(ptr)
        self._buffers = []
        for ev in (self.start_event, self.end_event):
            self.cudart.cudaEventDestroy(ev)
        self.cudart.cudaStreamDestroy(self.stream)
