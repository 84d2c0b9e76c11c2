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
come from :mod:`edgekd.runtimes.shapes`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.errors import EdgekdError
from edgekd.runtimes import LayerTime, RuntimeInfo, TensorSpec
from edgekd.runtimes.shapes import engine_profile

try:  # both are optional: the [tensorrt] extra
    import tensorrt as trt
except ImportError:  # pragma: no cover - exercised on machines without TensorRT
    trt = None


def _cudart() -> Any:
    """cuda-python's runtime bindings (``cuda.bindings.runtime`` from 12.6, ``cuda.cudart`` before)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as exc:
            raise EdgekdError("cuda-python is not installed", "pip install 'edgekd[tensorrt]'") from exc
    return cudart


def _check(result: Any, what: str) -> Any:
    """cuda-python calls return (error, value...); raise on any error, return the value(s)."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise EdgekdError(f"CUDA call {what} failed: {err}", "check the GPU driver and that no other process holds the GPU")
    return rest[0] if len(rest) == 1 else rest


def require_tensorrt() -> None:
    if trt is None:
        raise EdgekdError("TensorRT is not installed", "pip install 'edgekd[tensorrt]' on a machine with an NVIDIA GPU, or use --runtime ort-cpu")


@dataclass
class EngineOptions:
    """How to build an engine; stored in the engine's metadata so a changed option triggers a rebuild."""

    precision: str = "int8"  # int8 | fp16 | fp32 (int8 also enables fp16 for layers without Q/DQ)
    batch: int = 1  # optimisation profile: min 1, opt batch, max max_batch (DLA: static at batch; see runtimes.shapes)
    max_batch: int | None = None
    workspace_mb: int = 1024
    dla_core: int | None = None
    gpu_fallback: bool = True
    timing_cache: str | None = None  # path; read if present, written back after the build


def _logger() -> Any:
    return trt.Logger(trt.Logger.WARNING)


def gpu_description() -> dict[str, Any]:
    """Name and compute capability of device 0 (recorded with the engine)."""
    cudart = _cudart()
    props = _check(cudart.cudaGetDeviceProperties(0), "cudaGetDeviceProperties")
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return {"gpu": name.strip("\x00 "), "compute_capability": f"{props.major}.{props.minor}"}


def strongly_typed_only() -> bool:
    """TensorRT 11 removed BuilderFlag.FP16/INT8: networks are strongly typed (the ONNX's types decide)."""
    return not hasattr(trt.BuilderFlag, "FP16")


def _parse_onnx(builder: Any, onnx_path: Path) -> Any:
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode; 11: strongly typed is the only mode
    parser = trt.OnnxParser(network, _logger())
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EdgekdError(f"TensorRT cannot parse {onnx_path}: {errors}", "export with the 'tensorrt' layout (symmetric int8 Q/DQ), opset >= 17")
    return network, parser


def _precision_flags(config: Any, opts: EngineOptions) -> None:
    """FP16 for fp16 and int8 (explicit Q/DQ: the float layers run FP16, as trtexec --int8 --fp16); the
    DLA runs only INT8/FP16, so a DLA build always gets FP16 (trtexec's sampleEngines.cpp does the same)."""
    if strongly_typed_only():
        return
    if opts.precision in ("int8", "fp16") or opts.dla_core is not None:
        config.set_flag(trt.BuilderFlag.FP16)
    if opts.precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)


def _timing_cache(config: Any, opts: EngineOptions) -> tuple[Any, str | None]:
    """Attach the timing cache; one from another GPU or TensorRT version is refused (set_timing_cache
    returns False): say so and build with a fresh one instead of silently timing every tactic."""
    path = Path(opts.timing_cache) if opts.timing_cache else None
    old = path.read_bytes() if path is not None and path.is_file() else b""
    cache = config.create_timing_cache(old)
    if config.set_timing_cache(cache, ignore_mismatch=False):
        return cache, None
    note = f"timing cache {path} was refused (made on another GPU or TensorRT version); building with a new one"
    from edgekd import ui

    ui.warn(note)
    cache = config.create_timing_cache(b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise EdgekdError("TensorRT refused an empty timing cache", "rerun with --debug and read TensorRT's log")
    return cache, note


def _configure(builder: Any, network: Any, opts: EngineOptions) -> tuple[Any, Any, str | None]:
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts.workspace_mb << 20)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # layer names for IProfiler
    _precision_flags(config, opts)
    if opts.dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = opts.dla_core
        if opts.gpu_fallback:
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    cache, note = _timing_cache(config, opts)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        first, *rest = tuple(tensor.shape)
        if any(d < 0 for d in rest):
            raise EdgekdError(f"input '{tensor.name}' has dynamic non-batch dims {tuple(tensor.shape)}", "export with a fixed image size")
        prof = engine_profile(opts.batch, opts.max_batch, opts.dla_core is not None, first if first > 0 else None)
        profile.set_shape(tensor.name, *prof.shapes(rest))
    config.add_optimization_profile(profile)
    return config, cache, note


def dla_fallback_layers(network: Any, config: Any) -> list[str]:
    """Layers the DLA cannot run (TensorRT places them on the GPU when GPU_FALLBACK is set).

    Asked of the builder config before the build, so the user is told *which* layers leave the DLA:
    each one costs a DLA<->GPU transfer and can make a DLA engine slower than a GPU-only one.
    """
    return [network.get_layer(i).name for i in range(network.num_layers) if not config.can_run_on_DLA(network.get_layer(i))]


def engine_metadata(onnx_path: Path, opts: EngineOptions) -> dict[str, Any]:
    from edgekd.manifest import sha256_file

    return {"tensorrt": trt.__version__, **gpu_description(), "options": asdict(opts), "onnx": onnx_path.name, "onnx_sha256": sha256_file(onnx_path)}


def build_engine(onnx_path: str | Path, engine_path: str | Path, opts: EngineOptions | None = None) -> Path:
    """Build and save ``engine_path`` (+ ``.json`` metadata) from a Q/DQ ONNX; returns the engine path."""
    from edgekd.manifest import write_bytes_atomic, write_json_atomic

    require_tensorrt()
    opts = opts or EngineOptions()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    builder = trt.Builder(_logger())
    if opts.dla_core is not None and builder.num_DLA_cores <= opts.dla_core:
        raise EdgekdError(f"DLA core {opts.dla_core} requested, this device has {builder.num_DLA_cores}", "drop --dla-core or pick an existing core")
    network, _parser = _parse_onnx(builder, onnx_path)
    config, _cache, cache_note = _configure(builder, network, opts)
    fallback = dla_fallback_layers(network, config) if opts.dla_core is not None else []
    if fallback:
        if not opts.gpu_fallback:
            raise EdgekdError(f"{len(fallback)} layer(s) cannot run on the DLA ({', '.join(fallback[:5])}) and GPU fallback is off", "allow GPU fallback or run GPU-only")
        from edgekd import ui

        ui.warn(f"{len(fallback)} of {network.num_layers} layers fall back from DLA core {opts.dla_core} to the GPU: {', '.join(fallback[:10])}"
                + (" ..." if len(fallback) > 10 else ""))
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EdgekdError(f"TensorRT failed to build an engine from {onnx_path}", "rerun with --debug and read TensorRT's log above")
    write_bytes_atomic(engine_path, bytes(serialized))
    if opts.timing_cache:
        write_bytes_atomic(opts.timing_cache, bytes(config.get_timing_cache().serialize()))
    meta = engine_metadata(onnx_path, opts) | {"build_seconds": round(time.perf_counter() - t0, 2), "dla_fallback_layers": fallback,
                                               "timing_cache_refused": cache_note, "strongly_typed": strongly_typed_only()}
    write_json_atomic(engine_path.with_suffix(engine_path.suffix + ".json"), meta)
    return engine_path


def engine_is_current(onnx_path: Path, engine_path: Path, opts: EngineOptions) -> bool:
    """An engine can be reused when it was built from the same ONNX, options, TensorRT and GPU."""
    from edgekd.manifest import read_json

    meta_path = engine_path.with_suffix(engine_path.suffix + ".json")
    if not engine_path.is_file() or not meta_path.is_file():
        return False
    old = read_json(meta_path, "engine metadata")
    new = engine_metadata(onnx_path, opts)
    return all(old.get(k) == new[k] for k in ("tensorrt", "gpu", "compute_capability", "options", "onnx_sha256"))


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
            from edgekd.manifest import read_json

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
