"""Inference backends: onnxruntime (any device), OpenVINO (Intel / AMD x86 CPUs, Intel GPUs and
NPUs) and TensorRT (an engine built on the device).

All expose the same small surface (``name``, ``providers``, ``run(x) -> logits``), so the
classifier can prefer TensorRT where an engine exists, OpenVINO where the target says so, and fall
back to whichever runtime is installed. TensorRT, the CUDA bindings and OpenVINO are imported only
when used: a plain device needs none of them.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.errors import EdgekdError

# onnxruntime >= 1.20 quantizes, at session start, the float weights of a Conv/Gemm fed by a DQ
# (per-tensor, ``WeightBiasQuantization``): a layer edgekd's accuracy budget keeps in float would
# silently run in INT8 with coarser weights than the rest. Every edgekd session turns it off (a
# name an older onnxruntime does not know is ignored); your own sessions should pass the same.
ORT_DISABLED_OPTIMIZERS = ["WeightBiasQuantization"]


class OrtModel:
    """An onnxruntime session; fixed-batch graphs are fed in chunks."""

    name = "onnxruntime"

    def __init__(self, onnx_path: str | os.PathLike, threads: int | None = None, cuda: bool = False):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise EdgekdError("onnxruntime is not installed on this machine", "pip install onnxruntime numpy pillow") from exc
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        if cuda and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=providers, disabled_optimizers=ORT_DISABLED_OPTIMIZERS)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types (InvalidProtobuf, Fail, ...)
            raise EdgekdError(f"onnxruntime cannot load {onnx_path}: {str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__}",
                              "the file is truncated or not an ONNX model; copy the bundle again") from exc
        inp = self.session.get_inputs()[0]
        if len(inp.shape) != 4:
            raise EdgekdError(f"{onnx_path} takes a rank-{len(inp.shape)} input {inp.shape}, the runtime feeds images as (N, C, H, W)",
                              "bundle an image classifier exported by edgekd")
        self.input_name = inp.name
        self.fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None
        self.providers = self.session.get_providers()

    def run(self, x: np.ndarray) -> np.ndarray:
        try:
            return self._run(x)
        except EdgekdError:
            raise
        except Exception as exc:  # noqa: BLE001 - onnxruntime's InvalidArgument etc.: inputs that do not fit the model
            raise EdgekdError(f"onnxruntime refused an input of shape {tuple(x.shape)}: {str(exc).splitlines()[0][:160]}",
                              "the bundle's preprocess settings do not match its model; rebuild the bundle") from exc

    def _run(self, x: np.ndarray) -> np.ndarray:
        if self.fixed_batch is None or x.shape[0] == self.fixed_batch:
            return self.session.run(None, {self.input_name: x})[0]
        outs = []
        for start in range(0, x.shape[0], self.fixed_batch):
            chunk = x[start : start + self.fixed_batch]
            pad = self.fixed_batch - chunk.shape[0]
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
            outs.append(self.session.run(None, {self.input_name: chunk})[0][: self.fixed_batch - pad])
        return np.concatenate(outs)


class OvModel:
    """An OpenVINO compiled model (``pip install openvino``; no torch). The bundle's ONNX file is read
    directly; one static-shape compile per batch size, as the CPU plugin's fastest kernels need.
    A small copy of the host's runner (:mod:`edgekd.runners.openvino`): the bundle stays torch-free."""

    name = "openvino"

    def __init__(self, onnx_path: str | os.PathLike, threads: int | None = None, device: str = "CPU"):
        try:
            import openvino as ov
        except ImportError as exc:
            raise EdgekdError("OpenVINO is not installed on this machine", "pip install openvino numpy pillow") from exc
        self.ov, self.device, self.core = ov, device.upper(), ov.Core()
        try:
            self.model = self.core.read_model(str(onnx_path))
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError with a multi-line message
            raise EdgekdError(f"OpenVINO cannot load {onnx_path}: {str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__}",
                              "the file is truncated or not an ONNX model; copy the bundle again") from exc
        shape = self.model.inputs[0].get_partial_shape()
        if shape.rank.is_dynamic or shape.rank.get_length() != 4:
            raise EdgekdError(f"{onnx_path} takes a rank-{shape.rank} input, the runtime feeds images as (N, C, H, W)", "bundle an image classifier exported by edgekd")
        self.config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if self.device == "CPU":
            self.config.update({"NUM_STREAMS": 1, "INFERENCE_PRECISION_HINT": "f32", **({"INFERENCE_NUM_THREADS": threads} if threads else {})})
        self.requests: dict[tuple[int, ...], Any] = {}
        self.providers = [f"OpenVINO {ov.get_version().split('-')[0]} {self.device}"]

    def _request(self, shape: tuple[int, ...]) -> Any:
        if shape not in self.requests:
            model = self.model.clone()
            model.reshape({0: self.ov.PartialShape(list(shape))})
            self.requests[shape] = self.core.compile_model(model, self.device, self.config).create_infer_request()
        return self.requests[shape]

    def run(self, x: np.ndarray) -> np.ndarray:
        try:
            request = self._request(tuple(x.shape))
            request.infer({0: np.ascontiguousarray(x, dtype=np.float32)})
        except Exception as exc:  # noqa: BLE001 - OpenVINO's RuntimeError for inputs that do not fit the model
            raise EdgekdError(f"OpenVINO refused an input of shape {tuple(x.shape)}: {str(exc).splitlines()[0][:160]}",
                              "the bundle's preprocess settings do not match its model; rebuild the bundle") from exc
        return request.get_output_tensor(0).data.copy()


def openvino_usable() -> str | None:
    """None when OpenVINO can be imported here, else the reason it cannot."""
    try:
        importlib.import_module("openvino")
    except ImportError as exc:
        return f"{exc.name or 'openvino'} not importable"
    return None


def _cudart() -> Any:
    """cuda-python's runtime bindings (new and old module paths)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        from cuda import cudart  # type: ignore[no-redef]
    return cudart


def _cuda_ok(result: Any) -> Any:
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise EdgekdError(f"CUDA call failed with error {err}", "check the GPU with nvidia-smi / tegrastats")
    return rest[0] if len(rest) == 1 else rest


def engine_batch_range(engine: Any, input_name: str) -> tuple[int, int]:
    """(min, max) batch the engine takes: its static batch, or profile 0's range (DLA engines: min = max)."""
    fixed = int(engine.get_tensor_shape(input_name)[0])
    if fixed > 0:
        return fixed, fixed
    lo, _opt, hi = engine.get_tensor_profile_shape(input_name, 0)
    return int(lo[0]), int(hi[0])


def run_within_profile(x: np.ndarray, min_batch: int, max_batch: int, run_one: Any) -> np.ndarray:
    """``run_one`` on chunks the engine accepts: a batch above ``max_batch`` is split (the selfcheck feeds
    more reference images than the target's batch), a chunk below a static engine's ``min_batch`` is
    zero-padded and the padding's rows dropped."""
    outs = []
    for start in range(0, x.shape[0], max_batch):
        chunk = x[start : start + max_batch]
        n = chunk.shape[0]
        if n < min_batch:
            chunk = np.concatenate([chunk, np.zeros((min_batch - n, *chunk.shape[1:]), chunk.dtype)])
        outs.append(run_one(np.ascontiguousarray(chunk))[:n])
    return np.concatenate(outs)


class TrtModel:
    """A TensorRT engine built on this device (``engine/*.plan``), run with the TensorRT 10 tensor API."""

    name = "tensorrt"

    def __init__(self, engine_path: str | os.PathLike):
        import tensorrt as trt

        self.trt = trt
        self.cudart = _cudart()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise EdgekdError(f"TensorRT could not load {engine_path}", "engines are tied to the GPU and TensorRT version: rebuild it on this device with engine/build_engine.sh")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.out_dtype = trt.nptype(self.engine.get_tensor_dtype(self.output_name))
        self.stream = _cuda_ok(self.cudart.cudaStreamCreate())
        self.buffers: dict[tuple, tuple[int, int, np.ndarray]] = {}
        self.providers = ["TensorRT " + trt.__version__]
        self.min_batch, self.max_batch = engine_batch_range(self.engine, self.input_name)

    def _buffers(self, shape: tuple[int, ...]) -> tuple[int, int, np.ndarray]:
        if shape not in self.buffers:
            if not self.context.set_input_shape(self.input_name, shape):  # returns False, does not raise
                raise EdgekdError(f"TensorRT refused input shape {shape} (engine batch {self.min_batch}..{self.max_batch})",
                                  "rebuild the engine with engine/build_engine.sh for this bundle")
            out = np.empty(tuple(self.context.get_tensor_shape(self.output_name)), dtype=self.out_dtype)
            d_in = _cuda_ok(self.cudart.cudaMalloc(int(np.prod(shape)) * 4))
            d_out = _cuda_ok(self.cudart.cudaMalloc(out.nbytes))
            self.buffers[shape] = (d_in, d_out, out)
        return self.buffers[shape]

    def run(self, x: np.ndarray) -> np.ndarray:
        return run_within_profile(np.ascontiguousarray(x, dtype=np.float32), self.min_batch, self.max_batch, self._run)

    def _run(self, x: np.ndarray) -> np.ndarray:
        d_in, d_out, out = self._buffers(tuple(x.shape))
        cu = self.cudart
        if not self.context.set_input_shape(self.input_name, x.shape):
            raise EdgekdError(f"TensorRT refused input shape {tuple(x.shape)}", "rebuild the engine with engine/build_engine.sh for this bundle")
        self.context.set_tensor_address(self.input_name, int(d_in))
        self.context.set_tensor_address(self.output_name, int(d_out))
        _cuda_ok(cu.cudaMemcpyAsync(d_in, x.ctypes.data, x.nbytes, cu.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))
        if not self.context.execute_async_v3(self.stream):
            raise EdgekdError("TensorRT inference failed", "see the TensorRT log above")
        _cuda_ok(cu.cudaMemcpyAsync(out.ctypes.data, d_out, out.nbytes, cu.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
        _cuda_ok(cu.cudaStreamSynchronize(self.stream))
        return out.astype(np.float32).copy()


def tensorrt_usable() -> str | None:
    """None when TensorRT can really run here, else the reason it cannot: ``tensorrt`` and cuda-python
    both import and a CUDA device answers (cudaGetDeviceCount >= 1). Any of them missing or broken
    (no driver, a CUDA-13 binding on a CUDA-12 driver) makes the ``auto`` backend use onnxruntime.
    The host's runtime probe (``edgekd.runners``) asks this same function."""
    for module, what in (("tensorrt", "TensorRT"), (None, "cuda-python")):
        try:
            importlib.import_module(module) if module else _cudart()
        except Exception as exc:  # noqa: BLE001 - ImportError, or an OSError/RuntimeError from a broken native library
            return f"{what} is not importable ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else exc.__class__.__name__})"
    try:
        count = _cuda_ok(_cudart().cudaGetDeviceCount())
    except Exception as exc:  # noqa: BLE001 - EdgekdError from a CUDA error code, or the binding failing to load libcuda
        return f"no CUDA device answers ({str(exc).splitlines()[0][:120]})"
    if int(count) < 1:
        return "no CUDA device answers (cudaGetDeviceCount = 0)"
    return None
