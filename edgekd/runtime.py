"""The on-device runtime for edgekd bundles: numpy + Pillow + onnxruntime (or TensorRT), never torch.

Installing torch-based tools on a Jetson can replace JetPack's own torch build, so the device side
needs only ``python3``, ``numpy``, ``pillow`` and ``onnxruntime`` (or JetPack's ``tensorrt``).
This module is copied into every bundle (with ``edgekd/__init__.py`` and ``edgekd/errors.py``,
both torch-free) and runs from the bundle folder::

    python3 -m edgekd.runtime BUNDLE image.png ... [--top-k 5] [--json]
    python3 -m edgekd.runtime selfcheck BUNDLE [--json]     # checksums, load, reference outputs
    python3 -m edgekd.runtime bench BUNDLE --runs 200 [--batch 1 --batch 8] [--json]

Loading a bundle verifies every file's sha256 first (``SHA256SUMS``, also checkable with
``sha256sum -c``); a changed file is refused. Preprocessing reproduces ``edgekd.data.Preprocess``
(timm's data config fields: input size, channels, mean, std, bilinear resize with
``align_corners=False`` and no antialias, ITU-R 601 grey weights) in numpy, so the device feeds
the model exactly what the host measured. Latency follows the Jetson benchmarking norms
(warm-up, then percentiles over many runs; ``nvpmodel -q`` and ``jetson_clocks --show`` recorded).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import zlib
import tempfile
import time
import weakref
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Sequence

import numpy as np

from edgekd.errors import EdgekdError
from edgekd.manifest import sha256_file  # torch-free; shipped in the bundle beside this file

BUNDLE_FORMAT = "edgekd-bundle"
BUNDLE_VERSION = 1
BUNDLE_JSON = "bundle.json"
SUMS_NAME = "SHA256SUMS"
ENGINE_DIR = "engine"
REFERENCE_INPUTS = "reference/inputs.npy"
GREY_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)
JETSON_TOOLS = {"nvpmodel": ["nvpmodel", "-q"], "jetson_clocks": ["jetson_clocks", "--show"]}


# ----------------------------------------------------------------------------- checksums
def safe_relpath(rel: str) -> PurePosixPath:
    """A bundle-relative path that cannot leave the bundle (no absolute path, no '..')."""
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts or rel.startswith("\\"):
        raise EdgekdError(f"bundle lists an unsafe path '{rel}'", "the bundle was tampered with; rebuild it on the host")
    return p


def read_sums(root: Path) -> dict[str, str]:
    """Parse ``SHA256SUMS`` (``sha256sum`` format: '<hex>  <path>')."""
    path = root / SUMS_NAME
    if not path.is_file():
        raise EdgekdError(f"{root} is not an edgekd bundle: {SUMS_NAME} missing", "pass the folder or .tar.gz written by make_bundle / edgekd build")
    sums: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise EdgekdError(f"{path} is not a text file", "the bundle was tampered with; rebuild it on the host") from exc
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, rel = line.partition("  ")
        if not sep or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise EdgekdError(f"{path}:{n} is not a '<sha256>  <path>' line", "the bundle was tampered with; rebuild it on the host")
        sums[str(safe_relpath(rel))] = digest
    return sums


def verify_bundle(root: str | os.PathLike) -> dict[str, Any]:
    """Check every listed file's sha256, then return ``bundle.json``. Anything changed is refused."""
    root = Path(root)
    sums = read_sums(root)
    if BUNDLE_JSON not in sums:
        raise EdgekdError(f"{root / SUMS_NAME} does not cover {BUNDLE_JSON}", "the bundle was tampered with; rebuild it on the host")
    for rel, digest in sums.items():
        path = root / rel
        if path.is_symlink() or not path.is_file():
            raise EdgekdError(f"bundle file {rel} is missing (or not a plain file) in {root}", "copy the whole bundle again")
        if sha256_file(path) != digest:
            raise EdgekdError(f"bundle file {rel} was modified: sha256 does not match {SUMS_NAME}", "refusing to run it; copy the bundle again from the host")
    try:
        meta = json.loads((root / BUNDLE_JSON).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise EdgekdError(f"{root / BUNDLE_JSON} is not valid JSON", "rebuild the bundle on the host") from exc
    if not isinstance(meta, dict) or meta.get("format") != BUNDLE_FORMAT or meta.get("version") != BUNDLE_VERSION:
        got = f"{meta.get('format')} v{meta.get('version')}" if isinstance(meta, dict) else type(meta).__name__
        raise EdgekdError(f"{root} is bundle format {got}, this runtime reads {BUNDLE_FORMAT} v{BUNDLE_VERSION}", "use the runtime shipped inside the bundle")
    problem = meta_problem(meta, sums)
    if problem:
        raise EdgekdError(f"{root / BUNDLE_JSON}: {problem}", "the bundle was tampered with; rebuild it on the host")
    return meta


def meta_problem(meta: dict[str, Any], sums: dict[str, str]) -> str | None:
    """What a Classifier would trip on in ``bundle.json`` (checked here so the device gets one clear line)."""
    files = meta.get("files", {})
    if not isinstance(files, dict):
        return "'files' is not a mapping"
    unlisted = [rel for rel in files if rel not in sums]
    if unlisted:
        return f"files {unlisted} have no checksum in {SUMS_NAME}"
    classes, pre, models = meta.get("classes"), meta.get("preprocess"), meta.get("models")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        return "'classes' is not a list of class names"
    if not isinstance(pre, dict) or not {"input_size", "channels", "mean", "std"} <= set(pre):
        return "'preprocess' lacks input_size, channels, mean or std"
    numbers = [pre["input_size"], pre["channels"], *(pre["mean"] if isinstance(pre["mean"], list) else [None]), *(pre["std"] if isinstance(pre["std"], list) else [None])]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers) or pre["input_size"] < 1 or pre["channels"] not in (1, 3) \
            or len(pre["mean"]) != pre["channels"] or len(pre["std"]) != pre["channels"] or not all(s > 0 for s in pre["std"]):
        return "'preprocess' values are not a valid input size, channel count, mean and std"
    primary = meta.get("primary")
    if not isinstance(models, dict) or not isinstance(primary, str) or primary not in models or not isinstance(models[primary], str):
        return "'models' does not name the primary model's file"
    try:
        safe_relpath(models[meta["primary"]])
    except EdgekdError as exc:
        return exc.message
    if not isinstance(meta.get("target", {}) or {}, dict):
        return "'target' is not a mapping"
    return None


# ----------------------------------------------------------------------------- safe tar extraction
def member_problem(member: tarfile.TarInfo, dest: Path) -> str | None:
    """Why extracting ``member`` under ``dest`` would be unsafe, or None."""
    name = member.name
    if name.startswith(("/", "\\")) or PurePosixPath(name).is_absolute() or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if ".." in PurePosixPath(name).parts or ".." in name.replace("\\", "/").split("/"):
        return "path with '..'"
    if member.issym() or member.islnk():
        return "link"
    if not (member.isfile() or member.isdir()):
        return "device, fifo or other special file"
    target = (dest / name).resolve()
    if target != dest and dest not in target.parents:
        return "path outside the destination"
    return None


def safe_extract(tar_path: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Extract a bundle tar into ``dest``, refusing absolute paths, '..', links and special files.

    Every member is checked before anything is written, and Python's ``data`` filter
    (PEP 706) is applied on top where this Python has it.
    """
    dest = Path(dest).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                problem = member_problem(m, dest)
                if problem:
                    raise EdgekdError(f"refusing to extract {tar_path}: member '{m.name}' is a {problem}", "this archive is not a bundle written by edgekd; do not use it")
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, members=members, filter="data")
            else:  # Python < 3.11.4: our own checks above are the filter
                tar.extractall(dest, members=members)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:  # zlib.error: a corrupted .gz stream (found by tests/test_fuzz.py)
        if isinstance(exc, tarfile.FilterError if hasattr(tarfile, "FilterError") else ()):
            raise EdgekdError(f"refusing to extract {tar_path}: {exc}", "this archive is not a bundle written by edgekd") from exc
        raise EdgekdError(f"cannot read bundle archive {tar_path}: {exc}", "copy it again; the file may be truncated") from exc
    return dest


def bundle_root(folder: Path) -> Path:
    """The folder holding SHA256SUMS: ``folder`` itself or its single top-level directory."""
    if (folder / SUMS_NAME).is_file():
        return folder
    subdirs = [p for p in folder.iterdir() if p.is_dir()]
    if len(subdirs) == 1 and (subdirs[0] / SUMS_NAME).is_file():
        return subdirs[0]
    raise EdgekdError(f"{folder} holds no edgekd bundle ({SUMS_NAME} not found)", "pass the bundle folder or its .tar.gz")


def open_bundle(path: str | os.PathLike, workdir: str | os.PathLike | None = None) -> Path:
    """A bundle folder, or a .tar.gz safely extracted into ``workdir`` (default: a temp folder)."""
    p = Path(path)
    if p.is_dir():
        return bundle_root(p)
    if not p.is_file():
        raise EdgekdError(f"bundle not found: {p}", "pass the bundle folder or its .tar.gz")
    dest = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="edgekd-bundle-"))
    return bundle_root(safe_extract(p, dest))


# ----------------------------------------------------------------------------- preprocessing
def _axis_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of PyTorch's bilinear resize (align_corners=False, no antialias)."""
    scale = n_in / n_out
    src = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
    i0 = np.floor(src).astype(np.int64)
    i0 = np.minimum(i0, n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (src - i0).astype(np.float32)
    return i0, i1, w1


def resize_bilinear(x: np.ndarray, size: int) -> np.ndarray:
    """(N, C, H, W) float32 -> (N, C, size, size), the same sampling as torch's F.interpolate bilinear."""
    n, c, h, w = x.shape
    if h == size and w == size:
        return x
    r0, r1, rw = _axis_weights(h, size)
    c0, c1, cw = _axis_weights(w, size)
    rows = x[:, :, r0, :] * (1 - rw)[None, None, :, None] + x[:, :, r1, :] * rw[None, None, :, None]
    return (rows[:, :, :, c0] * (1 - cw) + rows[:, :, :, c1] * cw).astype(np.float32)


def map_channels(x: np.ndarray, channels: int) -> np.ndarray:
    """Grey -> RGB by repetition, RGB -> grey with ITU-R 601 weights (as data.Preprocess)."""
    have = x.shape[1]
    if have == channels:
        return x
    if have == 1:
        return np.repeat(x, channels, axis=1)
    if channels == 1:
        return (x[:, :3] * GREY_WEIGHTS.reshape(1, 3, 1, 1)).sum(1, keepdims=True, dtype=np.float32)
    raise EdgekdError(f"cannot map {have}-channel images to {channels} channels", "give grey or RGB images")


def preprocess(images_u8: np.ndarray, pre: dict[str, Any]) -> np.ndarray:
    """uint8 (N, C, H, W) -> normalised float32 (N, channels, input_size, input_size)."""
    if images_u8.ndim != 4:
        raise EdgekdError(f"expected images as (N, C, H, W), got shape {images_u8.shape}", "stack the images into one batch")
    if pre.get("interpolation", "bilinear") != "bilinear":
        raise EdgekdError(f"interpolation '{pre['interpolation']}' is not supported by the runtime", "export with bilinear preprocessing")
    x = images_u8.astype(np.float32) / np.float32(255.0)
    x = map_channels(x, int(pre["channels"]))
    x = resize_bilinear(x, int(pre["input_size"]))
    mean = np.asarray(pre["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(pre["std"], dtype=np.float32).reshape(1, -1, 1, 1)
    return ((x - mean) / std).astype(np.float32)


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file to uint8 (C, H, W): grey stays 1 channel, anything else becomes RGB."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L") if im.mode in ("L", "1", "I;16", "I", "F") else im.convert("RGB")
            arr = np.asarray(im, dtype=np.uint8)
    except (FileNotFoundError, UnidentifiedImageError, OSError) as exc:
        raise EdgekdError(f"cannot read image {path}: {exc}", "pass PNG/JPEG files") from exc
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


# ----------------------------------------------------------------------------- backends
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
            self.session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=providers)
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

    def _buffers(self, shape: tuple[int, ...]) -> tuple[int, int, np.ndarray]:
        if shape not in self.buffers:
            self.context.set_input_shape(self.input_name, shape)
            out = np.empty(tuple(self.context.get_tensor_shape(self.output_name)), dtype=self.out_dtype)
            d_in = _cuda_ok(self.cudart.cudaMalloc(int(np.prod(shape)) * 4))
            d_out = _cuda_ok(self.cudart.cudaMalloc(out.nbytes))
            self.buffers[shape] = (d_in, d_out, out)
        return self.buffers[shape]

    def run(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        d_in, d_out, out = self._buffers(tuple(x.shape))
        cu = self.cudart
        self.context.set_input_shape(self.input_name, x.shape)
        self.context.set_tensor_address(self.input_name, int(d_in))
        self.context.set_tensor_address(self.output_name, int(d_out))
        _cuda_ok(cu.cudaMemcpyAsync(d_in, x.ctypes.data, x.nbytes, cu.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))
        if not self.context.execute_async_v3(self.stream):
            raise EdgekdError("TensorRT inference failed", "see the TensorRT log above")
        _cuda_ok(cu.cudaMemcpyAsync(out.ctypes.data, d_out, out.nbytes, cu.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
        _cuda_ok(cu.cudaStreamSynchronize(self.stream))
        return out.astype(np.float32).copy()


def tensorrt_usable() -> str | None:
    """None when TensorRT + a CUDA binding can be imported here, else the reason it cannot."""
    try:
        import tensorrt  # noqa: F401

        _cudart()
    except ImportError as exc:
        return f"{exc.name or 'tensorrt'} not importable"
    return None


# ----------------------------------------------------------------------------- classifier
class Classifier:
    """A verified bundle ready to classify images.

    >>> clf = Classifier("bundle.tar.gz")                     # doctest: +SKIP
    >>> clf.classify_files(["shoe.png"], top_k=3)              # doctest: +SKIP
    [[('Sneaker', 0.91), ('Sandal', 0.05), ('Ankle boot', 0.03)]]
    """

    def __init__(self, bundle: str | os.PathLike, backend: str = "auto", threads: int | None = None, workdir: str | os.PathLike | None = None):
        self.root = open_bundle(bundle, workdir)
        if workdir is None and not Path(bundle).is_dir():
            weakref.finalize(self, shutil.rmtree, self.root.parent if self.root.parent.name.startswith("edgekd-bundle-") else self.root, True)
        self.meta = verify_bundle(self.root)
        self.classes: list[str] = list(self.meta["classes"])
        self.pre: dict[str, Any] = self.meta["preprocess"]
        self.target: dict[str, Any] = self.meta.get("target") or {}
        self.model_file = self.root / self.meta["models"][self.meta["primary"]]
        self.engine_file = self.root / ENGINE_DIR / f"{self.meta['primary']}.plan"
        self.fallback_reason: str | None = None
        self.model = self._backend(backend, threads or self.target.get("threads"))

    def _backend(self, backend: str, threads: int | None) -> OrtModel | TrtModel:
        if backend not in ("auto", "ort", "tensorrt"):
            raise EdgekdError(f"unknown backend '{backend}'", "use auto, ort or tensorrt")
        if backend in ("auto", "tensorrt"):
            why = tensorrt_usable() or (None if self.engine_file.is_file() else f"no engine at {self.engine_file.relative_to(self.root)} (run engine/build_engine.sh)")
            if why is None:
                return TrtModel(self.engine_file)
            if backend == "tensorrt":
                raise EdgekdError(f"cannot use TensorRT: {why}", "build the engine on the device or use --backend ort")
            self.fallback_reason = why if self.target.get("runtime") == "tensorrt" else None
        return OrtModel(self.model_file, threads=threads, cuda=self.target.get("runtime") == "ort-cuda")

    @property
    def backend(self) -> str:
        return self.model.name

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Preprocessed float32 (N, C, S, S) -> logits (N, classes)."""
        return np.asarray(self.model.run(np.ascontiguousarray(x, dtype=np.float32)), dtype=np.float32)

    def predict_u8(self, images_u8: np.ndarray) -> np.ndarray:
        """uint8 (N, C, H, W) -> class probabilities (N, classes)."""
        return softmax(self.logits(preprocess(images_u8, self.pre)))

    def classify(self, images: Sequence[np.ndarray], top_k: int = 5) -> list[list[tuple[str, float]]]:
        """uint8 (C, H, W) images of any size -> top-k (label, probability) per image."""
        probs = np.concatenate([self.predict_u8(img[None]) for img in images]) if images else np.zeros((0, len(self.classes)))
        k = max(1, min(top_k, len(self.classes)))
        out = []
        for p in probs:
            order = np.argsort(-p, kind="stable")[:k]
            out.append([(self.classes[i], float(p[i])) for i in order])
        return out

    def classify_files(self, paths: Iterable[str | os.PathLike], top_k: int = 5) -> list[list[tuple[str, float]]]:
        return self.classify([load_image(p) for p in paths], top_k)


# ----------------------------------------------------------------------------- selfcheck and latency
def latency_ms(clf: Classifier, batch: int, runs: int, warmup: int, seed: int = 0, samples: bool = False) -> dict[str, Any]:
    """Median/p90/p99 of end-to-end model time (host buffers in, logits out) over ``runs`` calls."""
    s = int(clf.pre["input_size"])
    x = np.random.default_rng(seed).standard_normal((batch, int(clf.pre["channels"]), s, s)).astype(np.float32)
    for _ in range(warmup):
        clf.logits(x)
    times = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter()
        clf.logits(x)
        times[i] = (time.perf_counter() - t0) * 1e3
    p50, p90, p99 = np.percentile(times, [50, 90, 99])
    out: dict[str, Any] = {"batch": batch, "runs": runs, "warmup": warmup, "p50_ms": round(float(p50), 4), "p90_ms": round(float(p90), 4), "p99_ms": round(float(p99), 4),
                           "mean_ms": round(float(times.mean()), 4), "min_ms": round(float(times.min()), 4), "images_per_s": round(batch * 1e3 / float(p50), 1)}
    if samples:  # raw timings, so the host can run its own statistics and regression tests on device numbers
        out["samples_ms"] = [round(float(t), 5) for t in times]
    return out


def _tool_output(argv: list[str]) -> dict[str, Any] | None:
    exe = shutil.which(argv[0]) or next((p for p in (f"/usr/sbin/{argv[0]}", f"/usr/bin/{argv[0]}") if Path(p).is_file()), None)
    if not exe:
        return None
    try:
        r = subprocess.run([exe, *argv[1:]], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"rc": None, "output": str(exc)}
    return {"rc": r.returncode, "output": (r.stdout + r.stderr).strip()[-4000:]}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":")[0].strip() in ("model name", "Model", "Hardware"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def device_info() -> dict[str, Any]:
    """What the numbers were measured on; on a Jetson also the power mode and clock state."""
    info: dict[str, Any] = {"hostname_hash": hashlib.sha256(platform.node().encode()).hexdigest()[:12], "machine": platform.machine(),
                            "system": platform.platform(), "python": platform.python_version(), "numpy": np.__version__, "cpus": os.cpu_count(),
                            "torch_loaded": "torch" in sys.modules, "cpu_model": _cpu_model()}
    try:
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
    except ImportError:
        info["onnxruntime"] = None
    release = Path("/etc/nv_tegra_release")
    if release.is_file():
        info["l4t"] = release.read_text().splitlines()[0][:200]
    for key, argv in JETSON_TOOLS.items():
        out = _tool_output(argv)
        if out is not None:
            info[key] = out
    return info


def check_reference(clf: Classifier) -> dict[str, Any]:
    """Run the bundle's reference images and compare with the host's outputs of the same file."""
    ref = clf.meta.get("reference")
    if not ref:
        return {"checked": False}
    images = np.load(clf.root / REFERENCE_INPUTS, allow_pickle=False)
    logits = clf.logits(preprocess(images, clf.pre))
    expected = np.asarray(ref["logits"], dtype=np.float32)
    agree = float((logits.argmax(1) == expected.argmax(1)).mean())
    return {"checked": True, "images": int(images.shape[0]), "top1_agreement": agree, "max_abs_diff": float(np.abs(logits - expected).max())}


def selfcheck(bundle: str | os.PathLike, backend: str = "auto", min_agreement: float = 0.9) -> dict[str, Any]:
    """Checksums, load, one inference, agreement with the host: what deploy runs first on a device."""
    t0 = time.perf_counter()
    clf = Classifier(bundle, backend)
    load_s = time.perf_counter() - t0
    ref = check_reference(clf)
    one = clf.classify([np.zeros((int(clf.pre["channels"]), int(clf.pre["input_size"]), int(clf.pre["input_size"])), np.uint8)], top_k=1)[0][0]
    ok = (not ref["checked"]) or ref["top1_agreement"] >= min_agreement
    return {"ok": ok, "checksums": "ok", "files": len(read_sums(clf.root)), "bundle": clf.meta.get("name"), "backend": clf.backend,
            "providers": clf.model.providers, "fallback_reason": clf.fallback_reason, "load_seconds": round(load_s, 3),
            "one_inference": {"label": one[0], "probability": round(one[1], 6)}, "reference": ref, "device": device_info()}


def bench(bundle: str | os.PathLike, batches: Sequence[int] = (), runs: int = 200, warmup: int = 20, backend: str = "auto",
          samples: bool = False, threads: int | None = None) -> dict[str, Any]:
    """Latency percentiles at batch 1 and at the target's batch (or the given batches)."""
    clf = Classifier(bundle, backend, threads=threads)
    sizes = list(batches) or sorted({1, int(clf.target.get("batch") or 1)})
    results = [latency_ms(clf, b, runs, warmup, samples=samples) for b in sizes]
    budget = clf.target.get("latency_budget") or {}
    for r in results:
        limit = budget.get("batch1_ms") if r["batch"] == 1 else budget.get("batch_ms") if r["batch"] == clf.target.get("batch") else None
        r["budget_ms"] = limit
        # A TensorRT target timed on its onnxruntime fallback says nothing about the TensorRT budget.
        r["within_budget"] = None if limit is None or clf.fallback_reason else r["p50_ms"] <= limit
    return {"bundle": clf.meta.get("name"), "backend": clf.backend, "providers": clf.model.providers, "fallback_reason": clf.fallback_reason,
            "latency": results, "device": device_info()}


# ----------------------------------------------------------------------------- command line
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m edgekd.runtime", description="Run an edgekd bundle (no torch needed).")
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("predict", help="classify image files")
    pr.add_argument("bundle")
    pr.add_argument("images", nargs="+")
    pr.add_argument("--top-k", type=int, default=5)
    sc = sub.add_parser("selfcheck", help="verify checksums, load, compare with the host's reference outputs")
    sc.add_argument("bundle")
    be = sub.add_parser("bench", help="latency percentiles")
    be.add_argument("bundle")
    be.add_argument("--runs", type=int, default=200)
    be.add_argument("--warmup", type=int, default=20)
    be.add_argument("--batch", type=int, action="append", default=[])
    be.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: the target's, else the runtime's)")
    be.add_argument("--samples", action="store_true", help="include every run's time (samples_ms) in the JSON")
    for sp in (pr, sc, be):
        sp.add_argument("--backend", default="auto", choices=["auto", "ort", "tensorrt"])
        sp.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] not in ("predict", "selfcheck", "bench", "-h", "--help"):
        args.insert(0, "predict")  # python -m edgekd.runtime BUNDLE img.png ...
    ns = _parser().parse_args(args)
    try:
        if ns.cmd == "predict":
            clf = Classifier(ns.bundle, ns.backend)
            preds = clf.classify_files(ns.images, ns.top_k)
            result: dict[str, Any] = {"backend": clf.backend, "predictions": [{"image": str(i), "top": [{"label": lab, "probability": round(pr, 6)} for lab, pr in p]} for i, p in zip(ns.images, preds)]}
            text = "\n".join(f"{i}: " + ", ".join(f"{lab} {pr:.3f}" for lab, pr in p) for i, p in zip(ns.images, preds))
        elif ns.cmd == "selfcheck":
            result = selfcheck(ns.bundle, ns.backend)
            ref = result["reference"]
            text = f"selfcheck {'ok' if result['ok'] else 'FAILED'}: {result['files']} files verified, backend {result['backend']}" + (
                f", reference top-1 agreement {ref['top1_agreement']:.3f} (max |diff| {ref['max_abs_diff']:.2e})" if ref["checked"] else "")
        else:
            result = bench(ns.bundle, ns.batch, ns.runs, ns.warmup, ns.backend, ns.samples, ns.threads)
            text = "\n".join(f"batch {r['batch']}: p50 {r['p50_ms']} ms, p90 {r['p90_ms']} ms, p99 {r['p99_ms']} ms ({r['images_per_s']} img/s)" for r in result["latency"])
    except EdgekdError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return 2
    print(json.dumps(result) if ns.json else text)
    return 0 if result.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
