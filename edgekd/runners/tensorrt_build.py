"""Building TensorRT engines from a Q/DQ ONNX: builder flags, profiles, timing cache, engine metadata.

Split from :mod:`edgekd.runners.tensorrt` (which runs and times engines); see its docstring for the
TensorRT versions this is written for and read against. Needs ``tensorrt`` and ``cuda-python``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgekd import ui
from edgekd.atomic import read_json, sha256_file, write_bytes_atomic, write_json_atomic
from edgekd.errors import EdgekdError
from edgekd.runners.shapes import engine_profile

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
    return {"tensorrt": trt.__version__, **gpu_description(), "options": asdict(opts), "onnx": onnx_path.name, "onnx_sha256": sha256_file(onnx_path)}


def build_engine(onnx_path: str | Path, engine_path: str | Path, opts: EngineOptions | None = None) -> Path:
    """Build and save ``engine_path`` (+ ``.json`` metadata) from a Q/DQ ONNX; returns the engine path."""
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
    meta_path = engine_path.with_suffix(engine_path.suffix + ".json")
    if not engine_path.is_file() or not meta_path.is_file():
        return False
    old = read_json(meta_path, "engine metadata")
    new = engine_metadata(onnx_path, opts)
    return all(old.get(k) == new[k] for k in ("tensorrt", "gpu", "compute_capability", "options", "onnx_sha256"))


