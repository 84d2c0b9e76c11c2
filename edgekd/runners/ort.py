"""onnxruntime runner: one InferenceSession, timed with ``perf_counter_ns`` around ``session.run``.

Follows onnxruntime's performance-tuning guide: graph optimisation level ALL, ``intra_op_num_threads``
set explicitly (default: the physical cores, since hyper-threads slow GEMM kernels), one inter-op
thread, sequential execution. Per-layer times come from onnxruntime's own profiler
(``SessionOptions.enable_profiling``; a Chrome-trace JSON with one ``Node`` event per kernel run),
taken in a separate session so profiling overhead never enters the latency numbers.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edgekd.errors import EdgekdError
from edgekd.runtime.backends import ORT_DISABLED_OPTIMIZERS
from edgekd.runners.base import LayerTime, RuntimeInfo, TensorSpec
from edgekd.runners.shapes import tensorrt_major

ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64", "tensor(uint8)": "uint8",
    "tensor(int8)": "int8", "tensor(int32)": "int32", "tensor(int64)": "int64", "tensor(bool)": "bool",
}


def physical_cores() -> int:
    """Physical cores usable by this process (hyper-threads and cores outside the affinity mask excluded)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    pairs = set()
    try:
        phys = core = None
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("physical id"):
                phys = line.split(":")[1].strip()
            elif line.startswith("core id"):
                core = line.split(":")[1].strip()
                pairs.add((phys, core))
    except OSError:
        pass
    return max(1, min(usable, len(pairs) or usable))


def session_options(threads: int, spinning: bool = True, profile_prefix: str | None = None) -> ort.SessionOptions:
    """SessionOptions for timing: all graph optimisations, a fixed thread count, optional profiling."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return so


def cpu_session(path: str | Path, threads: int | None = None, exact_qdq: bool = False) -> ort.InferenceSession:
    """An onnxruntime CPU session for computing outputs (not timing). ``exact_qdq`` turns graph
    optimisations off, so Q/DQ nodes run as written (quantize, dequantize, float op): the arithmetic
    TensorRT performs on a ``tensorrt``-layout graph. With optimisations on, onnxruntime fuses some
    DQ -> Conv -> Q groups of such a graph into its own s8 kernels, which saturate on AVX2 and are not
    what the device runs."""
    so = session_options(threads or physical_cores())
    if exact_qdq:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return load_session(path, ["CPUExecutionProvider"], so)


def load_session(path: str | Path, providers: list[Any], so: ort.SessionOptions) -> ort.InferenceSession:
    p = Path(path)
    if not p.is_file():
        raise EdgekdError(f"ONNX model not found: {p}", "check the path, or run `edgekd export` first")
    try:
        return ort.InferenceSession(str(p), sess_options=so, providers=providers, disabled_optimizers=ORT_DISABLED_OPTIMIZERS)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types for bad files
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EdgekdError(f"onnxruntime cannot load {p}: {first}", "check that the file is a complete ONNX model (re-export it)") from exc


def tensorrt_ep_options(precision: str = "int8", tensorrt: str | None = None, dla_core: int | None = None,
                       cache_dir: str | Path | None = None, workspace_mb: int = 1024) -> dict[str, Any]:
    """onnxruntime's TensorRT execution provider options for a target (names as in onnxruntime's
    ``OrtTensorRTProviderOptions``). Opened without options the provider builds FP32 engines, rebuilds
    them for every session and, on TensorRT 8.5 (JetPack 5), cannot run a Q/DQ model at all:

    - ``trt_fp16_enable`` for int8 and fp16 (the layers without Q/DQ run FP16, as with trtexec ``--int8 --fp16``;
      always on the DLA, which runs only INT8/FP16);
    - ``trt_int8_enable`` on TensorRT < 10 only: 8.x needs the INT8 flag for explicit Q/DQ, 10 reads
      the Q/DQ nodes without it (and the flag would make the provider look for a calibration table);
    - ``trt_dla_enable`` / ``trt_dla_core`` on a DLA target;
    - engine and timing caches in ``cache_dir`` (engines are built once per model, GPU and TensorRT version).

    No ``trt_profile_*_shapes``: without them the provider builds each engine for the shape it is fed
    (static, as the DLA needs; edgekd.runners.shapes decides shapes where edgekd builds engines itself).
    """
    opts: dict[str, Any] = {"trt_fp16_enable": precision in ("int8", "fp16") or dla_core is not None,
                            "trt_int8_enable": precision == "int8" and tensorrt_major(tensorrt) < 10,
                            "trt_max_workspace_size": workspace_mb << 20}
    if dla_core is not None:
        opts |= {"trt_dla_enable": True, "trt_dla_core": int(dla_core)}
    if cache_dir is not None:
        opts |= {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir),
                 "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache_dir)}
    return opts


def provider_list(providers: list[str], model: Path, options: dict[str, Any]) -> list[Any]:
    """``providers`` as onnxruntime takes them: the TensorRT provider with its options (caches beside the model)."""
    keys = ("precision", "tensorrt", "dla_core", "workspace_mb")
    trt = tensorrt_ep_options(**{k: options[k] for k in keys if options.get(k) is not None},
                              cache_dir=options.get("cache_dir") or model.with_suffix(".ort-trt-cache"))
    return [(p, trt) if p == "TensorrtExecutionProvider" else p for p in providers]


class OrtRunner:
    """Times one ONNX model with onnxruntime; see :class:`edgekd.runners.Runner`."""

    def __init__(self, path: str | Path, providers: list[str], threads: int | None = None, spinning: bool = True, **options: Any):
        self.path = Path(path)
        self.providers = provider_list(providers, self.path, options)
        for _name, opts in (p for p in self.providers if isinstance(p, tuple)):
            Path(opts["trt_engine_cache_path"]).mkdir(parents=True, exist_ok=True)
        self.threads = threads or physical_cores()
        self.spinning = spinning
        self.session = load_session(self.path, self.providers, session_options(self.threads, spinning))
        used = self.session.get_providers()
        if providers[0] not in used:
            raise EdgekdError(f"onnxruntime fell back from {providers[0]} to {used[0]}", "check the GPU driver / CUDA libraries")
        self.info = RuntimeInfo(runtime=_runtime_name(providers), threads=self.threads, providers=used,
                                device="cpu" if used[0] == "CPUExecutionProvider" else "gpu",
                                extra={"graph_optimization": "all", "spinning": spinning,
                                       **({"provider_options": self.providers[0][1]} if isinstance(self.providers[0], tuple) else {})})

    def input_specs(self) -> list[TensorSpec]:
        specs = []
        for i in self.session.get_inputs():
            shape = tuple(d if isinstance(d, int) and d > 0 else None for d in i.shape)
            specs.append(TensorSpec(i.name, shape, ORT_TYPES.get(i.type, "float32")))
        return specs

    def metadata(self) -> dict[str, str]:
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def prepare(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Contiguous arrays allocated once; every timed run feeds the same buffers."""
        return {k: np.ascontiguousarray(v) for k, v in arrays.items()}

    def timed_run(self, prepared: dict[str, np.ndarray]) -> tuple[int, float | None]:
        run = self.session.run
        t0 = time.perf_counter_ns()
        run(None, prepared)
        return time.perf_counter_ns() - t0, None

    def outputs(self, prepared: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, prepared)

    def layer_profile(self, arrays: dict[str, np.ndarray], runs: int) -> list[LayerTime]:
        """Per-node kernel time from onnxruntime's profiler, averaged over ``runs`` runs (after 3 warm-up runs)."""
        warmup = 3
        with tempfile.TemporaryDirectory(prefix="edgekd-ort-prof-") as tmp:
            so = session_options(self.threads, self.spinning, profile_prefix=str(Path(tmp) / "ort"))
            sess = load_session(self.path, self.providers, so)
            feeds = self.prepare(arrays)
            for _ in range(warmup + runs):
                sess.run(None, feeds)
            events = json.loads(Path(sess.end_profiling()).read_text())
        return layer_times_from_trace(events, runs, skip_runs=warmup)

    def close(self) -> None:
        self.session = None


def layer_times_from_trace(events: list[dict[str, Any]], runs: int, skip_runs: int = 0) -> list[LayerTime]:
    """Sum the ``Node`` ``*_kernel_time`` events of an onnxruntime trace per node; slowest first.

    The first ``skip_runs`` ``model_run`` events are warm-up: node events before the next run starts are dropped.
    """
    starts = sorted(float(ev["ts"]) for ev in events if ev.get("name") == "model_run" and "ts" in ev)
    after = starts[skip_runs] if 0 < skip_runs < len(starts) else float("-inf")
    total_us: dict[str, float] = defaultdict(float)
    ops: dict[str, str] = {}
    for ev in events:
        if ev.get("cat") != "Node" or not str(ev.get("name", "")).endswith("_kernel_time") or float(ev.get("ts", 0)) < after:
            continue
        name = ev["name"][: -len("_kernel_time")]
        total_us[name] += float(ev.get("dur", 0))
        ops[name] = ev.get("args", {}).get("op_name", "?")
    grand = sum(total_us.values()) or 1.0
    rows = [LayerTime(name, ops[name], us / max(runs, 1) / 1000.0, us / grand) for name, us in total_us.items()]
    return sorted(rows, key=lambda r: r.mean_ms, reverse=True)


def _runtime_name(providers: list[str]) -> str:
    return {"CPUExecutionProvider": "ort-cpu", "CUDAExecutionProvider": "ort-cuda", "TensorrtExecutionProvider": "ort-tensorrt"}.get(providers[0], providers[0])
