"""OpenVINO runner: one compiled model per input shape, timed with ``perf_counter_ns`` around ``infer()``.

Follows OpenVINO's latency guide: ``PERFORMANCE_HINT=LATENCY``, one stream, a fixed number of
inference threads (default: the physical cores), f32 as the inference precision so INT8 is
compared with real FP32 (on CPUs with AMX or AVX512-FP16 the plugin would otherwise run "FP32" in
bf16 / f16). Each batch size gets its own static-shape compile (the CPU plugin's fastest kernels
need static shapes; the batch sweep reshapes the model, as ``benchmark_app -shape`` does). Per-layer
times come from OpenVINO's performance counters (``PERF_COUNT``), in a separate compile so the
counters never enter the latency numbers. The input is bound once (``set_input_tensor`` on a
tensor that shares the numpy buffer), so a timed run is ``infer()`` alone.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov

from edgekd.errors import EdgekdError
from edgekd.runners.base import LayerTime, RuntimeInfo, TensorSpec
from edgekd.runners.ort import physical_cores

OV_TYPES = {"f32": "float32", "f16": "float16", "f64": "float64", "u8": "uint8", "i8": "int8", "i32": "int32", "i64": "int64", "boolean": "bool"}


def read_model(core: ov.Core, path: Path) -> ov.Model:
    if not path.is_file():
        raise EdgekdError(f"model not found: {path}", "check the path, or run `edgekd export` first")
    try:
        return core.read_model(str(path))
    except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError with a long multi-line message
        raise EdgekdError(f"OpenVINO cannot read {path}: {str(exc).splitlines()[0][:200]}", "check that the file is a complete ONNX / IR model (re-export it)") from exc


def compile_config(threads: int, device: str, profile: bool = False) -> dict[str, Any]:
    """The compile options for timing on ``device``; CPU-only keys are left out elsewhere."""
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": "YES" if profile else "NO"}
    if device == "CPU":
        config.update({"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "INFERENCE_PRECISION_HINT": "f32"})
    return config


class OpenVinoRunner:
    """Times one model (ONNX or OpenVINO IR) with OpenVINO; see :class:`edgekd.runners.Runner`."""

    def __init__(self, path: str | Path, threads: int | None = None, device: str = "CPU", **_: Any):
        self.path = Path(path)
        self.device = device.upper()
        self.threads = threads or physical_cores()
        self.core = ov.Core()
        self.model = read_model(self.core, self.path)
        if self.device not in self.core.available_devices and self.device.split(".")[0] not in self.core.available_devices:
            raise EdgekdError(f"OpenVINO has no {self.device} device here (available: {', '.join(self.core.available_devices)})",
                              "install the device's driver, or time on CPU")
        self.compiled: dict[tuple[int, ...], Any] = {}
        self.info = RuntimeInfo(runtime="openvino", threads=self.threads, providers=[f"OpenVINO {ov.get_version().split('-')[0]} {self.device}"],
                                device="cpu" if self.device == "CPU" else self.device.lower(),
                                extra={"performance_hint": "LATENCY", "streams": 1, "inference_precision": "f32" if self.device == "CPU" else "device default"})

    def input_specs(self) -> list[TensorSpec]:
        specs = []
        for inp in self.model.inputs:
            shape = tuple(d.get_length() if d.is_static else None for d in inp.get_partial_shape())
            specs.append(TensorSpec(inp.get_any_name(), shape, OV_TYPES.get(inp.get_element_type().get_type_name(), "float32")))
        return specs

    def metadata(self) -> dict[str, str]:
        """The ONNX file's metadata (edgekd's preprocessing, classes); an IR file has none."""
        if self.path.suffix != ".onnx":
            return {}
        import onnx

        return {p.key: p.value for p in onnx.load(str(self.path), load_external_data=False).metadata_props}

    def _compiled(self, shapes: dict[str, tuple[int, ...]], profile: bool = False) -> Any:
        key = (*[d for s in shapes.values() for d in s], int(profile))
        if key not in self.compiled:
            model = self.model.clone()
            try:
                model.reshape({name: ov.PartialShape(list(shape)) for name, shape in shapes.items()})
                self.compiled[key] = self.core.compile_model(model, self.device, compile_config(self.threads, self.device, profile))
            except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError for shapes the model cannot take
                raise EdgekdError(f"OpenVINO cannot compile {self.path.name} for input {shapes}: {str(exc).splitlines()[0][:160]}",
                                  "check --batch against the model's input shape") from exc
        return self.compiled[key]

    def prepare(self, arrays: dict[str, np.ndarray], profile: bool = False) -> Any:
        """An infer request for these shapes, its inputs bound once to tensors sharing the arrays' memory."""
        arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
        request = self._compiled({k: tuple(v.shape) for k, v in arrays.items()}, profile).create_infer_request()
        for name, array in arrays.items():
            request.set_tensor(name, ov.Tensor(array, shared_memory=True))
        request.edgekd_arrays = arrays  # keep the buffers alive as long as the request
        return request

    def timed_run(self, prepared: Any) -> tuple[int, float | None]:
        infer = prepared.infer
        t0 = time.perf_counter_ns()
        infer()
        return time.perf_counter_ns() - t0, None

    def outputs(self, prepared: Any) -> list[np.ndarray]:
        prepared.infer()
        return [prepared.get_output_tensor(i).data.copy() for i in range(len(prepared.model_outputs))]

    def layer_profile(self, arrays: dict[str, np.ndarray], runs: int) -> list[LayerTime]:
        """Per-layer time from OpenVINO's performance counters, averaged over ``runs`` runs (after 3 warm-up runs)."""
        request = self.prepare(arrays, profile=True)
        for _ in range(3):
            request.infer()
        total_us: dict[str, float] = {}
        kinds: dict[str, str] = {}
        for _ in range(runs):
            request.infer()
            for info in request.profiling_info:
                if info.status == info.Status.EXECUTED:
                    total_us[info.node_name] = total_us.get(info.node_name, 0.0) + info.real_time.total_seconds() * 1e6
                    kinds[info.node_name] = f"{info.node_type} ({info.exec_type})"
        grand = sum(total_us.values()) or 1.0
        rows = [LayerTime(name, kinds[name], us / max(runs, 1) / 1000.0, us / grand) for name, us in total_us.items()]
        return sorted(rows, key=lambda r: r.mean_ms, reverse=True)

    def close(self) -> None:
        self.compiled.clear()
