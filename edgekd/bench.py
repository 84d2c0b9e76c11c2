"""Stage 4: latency you can trust - timing, statistics, fingerprints, baselines and regression checks.

Method (after trtexec's and pyperf's practice): warm up, then time a fixed number of runs (or a
duration) with ``time.perf_counter_ns`` around one inference call on inputs allocated once, with
Python's garbage collector paused; report percentiles rather than the mean, because latency
distributions are skewed by the OS. Every result carries a hardware/software fingerprint.

Regression decision (noise-aware): the statistic is the ratio of medians, current / baseline. Its
uncertainty comes from a percentile bootstrap (Efron & Tibshirani, *An Introduction to the
Bootstrap*, 1993, ch. 13). A run is a **regression** only when, with the stated confidence (one
sided, default 95%), the slowdown exceeds the budget; a point estimate over budget whose bound is
not is reported as *possible* (more runs will settle it). When a reference model is given, both
models are timed interleaved (ABBA order) and the statistic becomes
``(model / reference) now  /  (model / reference) in the baseline``, so a machine that is slower
today (thermal state, a busy neighbour, a different clock) does not read as a regression.

No torch import here: this module runs on the device next to onnxruntime.
"""

from __future__ import annotations

import gc
import gzip
import json
import os
import platform
import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgekd.errors import EdgekdError

BASELINE_FORMAT = "edgekd-latency-baseline"
BASELINE_VERSION = 1
DEFAULT_CONFIDENCE = 0.95
# Fields of the fingerprint that identify the machine and the measurement setting; a baseline from
# another value of any of them is refused unless --allow-other-machine. Software versions are
# reported when they differ but do not block: catching a slower runtime release is a use case.
MACHINE_KEYS = ("machine", "cpu_model", "cpu_cores_physical", "gpu", "jetson_power_mode", "runtime", "threads", "device")
FASHION_MNIST_TEST = "t10k-images-idx3-ubyte.gz"


# --------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------
@dataclass
class LatencyStats:
    """Summary of one batch size's timed runs, in milliseconds per call (one call = one batch)."""

    batch: int
    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    max_ms: float
    throughput: float  # images per second at the median latency
    device_p50_ms: float | None = None  # runtime-side time (e.g. CUDA events) where available

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def summarize(samples_ms: Any, batch: int, device_ms: Any = None) -> LatencyStats:
    """Percentiles (linear interpolation), mean, sample std and throughput of per-call latencies.

    >>> summarize([1.0, 2.0, 3.0, 4.0], batch=2).p50_ms
    2.5
    """
    x = np.asarray(samples_ms, dtype=np.float64)
    if x.size == 0:
        raise EdgekdError("no timed runs to summarize", "use --runs 10 or more")
    p50, p90, p99 = np.percentile(x, [50, 90, 99])
    dev = None if device_ms is None or len(device_ms) == 0 else float(np.median(np.asarray(device_ms, dtype=np.float64)))
    return LatencyStats(batch=batch, runs=int(x.size), p50_ms=float(p50), p90_ms=float(p90), p99_ms=float(p99),
                        mean_ms=float(x.mean()), std_ms=float(x.std(ddof=1)) if x.size > 1 else 0.0,
                        min_ms=float(x.min()), max_ms=float(x.max()), throughput=float(batch * 1000.0 / p50) if p50 > 0 else float("inf"),
                        device_p50_ms=dev)


def _boot_medians(samples: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return np.median(samples[idx], axis=1)


def bootstrap_ratio(current: Any, baseline: Any, current_ref: Any = None, baseline_ref: Any = None,
                    n_boot: int = 2000, seed: int = 0) -> tuple[float, np.ndarray]:
    """Ratio of medians current/baseline (or of model/reference ratios) and its bootstrap distribution.

    With references, a run's model and reference samples were taken interleaved, so they are
    resampled as pairs (same indices), keeping the shared drift of the machine inside each pair.
    """
    rng = np.random.default_rng(seed)
    cur, base = np.asarray(current, np.float64), np.asarray(baseline, np.float64)
    if cur.size < 5 or base.size < 5:
        raise EdgekdError(f"too few runs to compare ({cur.size} now, {base.size} in the baseline)", "use --runs 50 or more")
    i_cur = rng.integers(0, cur.size, size=(n_boot, cur.size))
    i_base = rng.integers(0, base.size, size=(n_boot, base.size))
    if current_ref is None:
        point = float(np.median(cur) / np.median(base))
        boots = _boot_medians(cur, i_cur) / _boot_medians(base, i_base)
        return point, boots
    cref, bref = np.asarray(current_ref, np.float64), np.asarray(baseline_ref, np.float64)
    if cref.size != cur.size or bref.size != base.size:
        raise EdgekdError("model and reference sample counts differ", "measure both in the same interleaved run")
    point = float((np.median(cur) / np.median(cref)) / (np.median(base) / np.median(bref)))
    boots = (_boot_medians(cur, i_cur) / _boot_medians(cref, i_cur)) / (_boot_medians(base, i_base) / _boot_medians(bref, i_base))
    return point, boots


@dataclass
class Comparison:
    """The regression decision and the numbers behind it."""

    verdict: str  # "regression" | "possible-regression" | "ok" | "faster"
    ratio: float  # current / baseline (>1 = slower)
    low: float  # one-sided lower confidence bound of the ratio
    high: float  # one-sided upper confidence bound of the ratio
    confidence: float
    budget: float  # allowed slowdown, e.g. 0.10
    mode: str  # "absolute" or "reference"
    current_p50_ms: float
    baseline_p50_ms: float
    notes: list[str] = field(default_factory=list)

    @property
    def is_regression(self) -> bool:
        return self.verdict == "regression"

    def message(self) -> str:
        """One sentence with the size of the change and how sure we are."""
        pct = lambda r: f"{(r - 1) * 100:+.1f}%"  # noqa: E731
        conf = f"{self.confidence:.0%}"
        what = f"median {self.current_p50_ms:.4g} ms vs {self.baseline_p50_ms:.4g} ms in the baseline"
        if self.mode == "reference":
            what += "; compared as the ratio to the reference model timed in the same runs"
        if self.verdict == "regression":
            return (f"latency regression: {pct(self.ratio)} slower ({what}); with {conf} confidence the slowdown is at least "
                    f"{pct(self.low)}, over the {self.budget:.0%} budget")
        if self.verdict == "possible-regression":
            return (f"possible latency regression: {pct(self.ratio)} ({what}), over the {self.budget:.0%} budget, but not with {conf} "
                    f"confidence (lower bound {pct(self.low)}); rerun with more --runs to settle it")
        if self.verdict == "faster":
            return f"faster than the baseline: {pct(self.ratio)} ({what}; {conf} upper bound {pct(self.high)}); consider --save-baseline"
        return f"no regression: {pct(self.ratio)} ({what}; {conf} bounds {pct(self.low)} .. {pct(self.high)}, budget {self.budget:.0%})"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["message"] = self.message()
        return d


def decide(ratio: float, boots: np.ndarray, budget: float, confidence: float = DEFAULT_CONFIDENCE) -> tuple[str, float, float]:
    """Verdict from the bootstrap distribution of the ratio: (verdict, lower bound, upper bound).

    "faster" needs a speed-up of at least half the budget with confidence: on a quiet machine a 0.1%
    change is statistically real but is noise to the user, and must not invite a new baseline."""
    if not 0 < confidence < 1:
        raise EdgekdError(f"confidence must be between 0 and 1, got {confidence}", "use e.g. 0.95")
    low, high = (float(v) for v in np.quantile(boots, [1 - confidence, confidence]))
    if low > 1 + budget:
        return "regression", low, high
    if ratio > 1 + budget:
        return "possible-regression", low, high
    if high < 1.0 - budget / 2:  # a real speed-up worth re-baselining, not a significant 0.1%
        return "faster", low, high
    return "ok", low, high


def compare_samples(current: Any, baseline: Any, budget: float, current_ref: Any = None, baseline_ref: Any = None,
                    confidence: float = DEFAULT_CONFIDENCE, n_boot: int = 2000, seed: int = 0) -> Comparison:
    """Compare two sets of latency samples (ms) against a slowdown budget (0.10 = 10%).

    >>> rng = np.random.default_rng(0)
    >>> base = 1.0 + 0.02 * rng.standard_normal(200)
    >>> compare_samples(base * 1.3, base, budget=0.10).verdict
    'regression'
    """
    if budget < 0:
        raise EdgekdError(f"the regression budget must be >= 0, got {budget}", "e.g. --max-regression 10%")
    use_ref = current_ref is not None and baseline_ref is not None
    ratio, boots = bootstrap_ratio(current, baseline, current_ref if use_ref else None, baseline_ref if use_ref else None, n_boot, seed)
    verdict, low, high = decide(ratio, boots, budget, confidence)
    return Comparison(verdict, ratio, low, high, confidence, budget, "reference" if use_ref else "absolute",
                      float(np.median(current)), float(np.median(baseline)))


def parse_percent(text: str | float) -> float:
    """'10%' -> 0.10, '0.1' -> 0.10, '10' -> 0.10 (a bare number over 1 is read as percent)."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(%?)\s*", str(text))
        if not m:
            raise EdgekdError(f"cannot read '{text}' as a percentage", "write e.g. 10% or 0.1")
        if m.group(2):
            return float(m.group(1)) / 100.0  # '400%' is a 4.0 budget, not 0.04
        value = float(m.group(1))
    return value / 100.0 if value > 1 else value


# --------------------------------------------------------------------------------------------
# fingerprint
# --------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _command_output(cmd: list[str], timeout: float = 10) -> str | None:
    exe = shutil.which(cmd[0]) or (cmd[0] if Path(cmd[0]).is_file() else None)
    if not exe:
        return None
    try:
        out = subprocess.run([exe, *cmd[1:]], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _gpu() -> str | None:
    smi = _command_output(["nvidia-smi", "--query-gpu=name,driver_version,compute_cap", "--format=csv,noheader"])
    if smi:
        return "; ".join(line.strip() for line in smi.splitlines() if line.strip())
    model = Path("/proc/device-tree/model")
    if model.exists() and Path("/etc/nv_tegra_release").exists():
        return model.read_text(errors="replace").strip("\x00 \n")
    return None


def _jetson_power_mode() -> str | None:
    """``nvpmodel -q`` on a Jetson ("NV Power Mode: MAXN" + mode id); None elsewhere."""
    out = _command_output(["nvpmodel", "-q"])
    return " ".join(out.split()) if out else None


def _package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def fingerprint(runtime: str = "ort-cpu", threads: int | None = None, device: str = "cpu", providers: list[str] | None = None) -> dict[str, Any]:
    """The hardware and software a latency was measured on; stored with every result and baseline."""
    software = {"python": platform.python_version(), "numpy": np.__version__}
    for pkg in ("edgekd", "onnxruntime", "onnxruntime-gpu", "tensorrt", "tensorrt-cu12", "tensorrt-cu13"):
        v = _package_version(pkg)
        if v:
            software[pkg] = v
    return {
        "machine": platform.machine(),
        "os": f"{platform.system()} {platform.release()}",
        "cpu_model": _cpu_model(),
        "cpu_cores_physical": _physical_cores(),
        "cpu_cores_logical": os.cpu_count(),
        "gpu": _gpu(),
        "jetson_power_mode": _jetson_power_mode(),
        "runtime": runtime,
        "providers": providers or [],
        "device": device,
        "threads": threads,
        "software": software,
    }


def _physical_cores() -> int:
    from edgekd.runtimes.ort import physical_cores  # light: numpy + onnxruntime, no torch

    try:
        return physical_cores()
    except Exception:  # noqa: BLE001 - the fingerprint must never fail a benchmark
        return os.cpu_count() or 1


def fingerprint_differences(baseline_fp: dict[str, Any], current_fp: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(machine differences that block a comparison, software differences that are only reported)."""
    machine = [f"{k}: {baseline_fp.get(k)!r} -> {current_fp.get(k)!r}" for k in MACHINE_KEYS if baseline_fp.get(k) != current_fp.get(k)]
    bs, cs = baseline_fp.get("software", {}) or {}, current_fp.get("software", {}) or {}
    software = [f"{k} {bs.get(k)} -> {cs.get(k)}" for k in sorted(set(bs) | set(cs)) if bs.get(k) != cs.get(k)]
    return machine, software


# --------------------------------------------------------------------------------------------
# model lookup and inputs
# --------------------------------------------------------------------------------------------
def resolve_model_path(path: str | os.PathLike) -> Path:
    """An .onnx / .engine file, or a bundle directory: its ``bundle.json`` / ``manifest.json`` names the model
    (``primary`` + ``models`` as edgekd.bundle writes it, or ``model`` / ``onnx`` / ``artifacts.onnx``), else ``model.onnx``.
    A bundle with ``SHA256SUMS`` is verified first, as the device runtime does."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.exists():
        raise EdgekdError(f"model not found: {p}", "pass an .onnx file or a bundle directory")
    if not p.is_dir():
        raise EdgekdError(f"{p} is not a file or a directory", "pass an .onnx file or a bundle directory")
    from edgekd import runtime as rt

    if (p / rt.SUMS_NAME).is_file():  # an edgekd bundle: time only what its checksums vouch for
        rt.verify_bundle(p)
    for name in ("bundle.json", "manifest.json"):
        meta = p / name
        if meta.is_file():
            named = _model_named_in(meta)
            if named:
                target = (p / named).resolve()
                if not target.is_file():
                    raise EdgekdError(f"{meta} names {named}, which is missing", "re-create the bundle")
                return target
    if (p / "model.onnx").is_file():
        return p / "model.onnx"
    raise EdgekdError(f"no model in {p}", "a bundle holds model.onnx, or a bundle.json naming the model file")


def bundle_preprocess(model_path: Path) -> dict[str, Any] | None:
    """The ``preprocess`` block (input_size, channels, mean, std) of the bundle a model file sits in, if any."""
    for folder in (model_path.parent, model_path.parent.parent):
        meta = folder / "bundle.json"
        if meta.is_file():
            try:
                pre = json.loads(meta.read_text()).get("preprocess")
            except (OSError, ValueError, AttributeError):
                return None
            return pre if isinstance(pre, dict) and {"mean", "std", "channels", "input_size"} <= set(pre) else None
    return None


def _path_in(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("path"), str):
        return value["path"]
    return None


def _model_named_in(meta: Path) -> str | None:
    from edgekd.manifest import read_json

    data = read_json(meta, "bundle description")
    if not isinstance(data, dict):
        return None
    models = data.get("models")
    if isinstance(models, dict) and data.get("primary") in models:
        return _path_in(models[data["primary"]])
    for key in ("model", "onnx", "model_file"):
        if _path_in(data.get(key)):
            return _path_in(data.get(key))
    arts = data.get("artifacts")
    if isinstance(arts, dict):
        for key in ("onnx", "model", "engine"):
            if _path_in(arts.get(key)):
                return _path_in(arts.get(key))
    return None


def _read_idx_images(path: Path) -> np.ndarray:
    """The IDX image file format of (Fashion-)MNIST, read with numpy alone."""
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    n, h, w = (int.from_bytes(raw[i:i + 4], "big") for i in (4, 8, 12))
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, h, w)


def _real_images(batch: int, seed: int) -> np.ndarray:
    root = Path(os.environ.get("EDGEKD_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
    path = root / FASHION_MNIST_TEST
    if not path.is_file():
        raise EdgekdError(f"Fashion-MNIST test images not found at {path}", "apt-get install dataset-fashion-mnist, set EDGEKD_FASHION_MNIST, or use --input random")
    images = _read_idx_images(path)
    pick = np.random.default_rng(seed).choice(len(images), size=batch, replace=len(images) < batch)
    return images[pick]


def _resize_nearest(images: np.ndarray, h: int, w: int) -> np.ndarray:
    rows = (np.arange(h) * images.shape[1] / h).astype(int)
    cols = (np.arange(w) * images.shape[2] / w).astype(int)
    return images[:, rows][:, :, cols]


def _norm_params(meta: dict[str, str], channels: int) -> tuple[np.ndarray, np.ndarray]:
    """mean/std from the model's ONNX metadata (``mean``/``std`` or ``edgekd.mean``/``edgekd.std``, JSON lists), else 0.5/0.5."""
    def get(key: str) -> np.ndarray:
        for k in (key, f"edgekd.{key}", f"preprocess.{key}"):
            if k in meta:
                try:
                    return np.resize(np.asarray(json.loads(meta[k]), np.float32), channels)
                except (ValueError, TypeError):
                    continue
        return np.full(channels, 0.5, np.float32)

    return get("mean"), get("std")


def sample_inputs(spec: Any, batch: int, source: str = "random", seed: int = 0, meta: dict[str, str] | None = None,
                  pre: dict[str, Any] | None = None) -> np.ndarray:
    """One input batch: ``random`` (seeded), ``fashion-mnist`` (real test images, preprocessed with the bundle's
    ``pre`` block when there is one, else resized and normalised the way the ONNX metadata says), or a ``.npy``
    file of preprocessed samples (rows repeated to fill the batch)."""
    shape = spec.batch_shape(batch)
    dtype = np.dtype(spec.dtype)
    if source == "random":
        rng = np.random.default_rng(seed)
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            return rng.integers(max(info.min, 0), min(info.max, 255) + 1, size=shape).astype(dtype)
        return rng.standard_normal(shape).astype(dtype)
    if source in ("fashion-mnist", "images"):
        if len(shape) != 4:
            raise EdgekdError(f"input '{spec.name}' has shape {shape}, not an image batch (N, C, H, W)", "use --input random")
        if pre is not None and not np.issubdtype(dtype, np.integer):
            from edgekd.runtime import preprocess  # torch-free, the same code the device runs

            return preprocess(_real_images(batch, seed)[:, None], pre).astype(dtype)
        imgs = _resize_nearest(_real_images(batch, seed), shape[2], shape[3])[:, None].repeat(shape[1], axis=1)
        if np.issubdtype(dtype, np.integer):
            return imgs.astype(dtype)
        mean, std = _norm_params(meta or {}, shape[1])
        x = (imgs.astype(np.float32) / 255.0 - mean[None, :, None, None]) / std[None, :, None, None]
        return x.astype(dtype)
    p = Path(source)
    if p.suffix == ".npy" and p.is_file():
        data = np.load(p, allow_pickle=False)
        if tuple(data.shape[1:]) != tuple(shape[1:]):
            raise EdgekdError(f"{p} holds samples of shape {data.shape[1:]}, the model wants {shape[1:]}", "save preprocessed samples as (N, C, H, W)")
        return np.resize(data, shape).astype(dtype)
    raise EdgekdError(f"unknown input source '{source}'", "use random, fashion-mnist, or a .npy file of preprocessed samples")


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------
@dataclass
class TimingPlan:
    """How long to measure: warm-up runs, then ``runs`` timed runs or until ``duration_s`` has passed."""

    warmup: int = 20
    runs: int = 200
    duration_s: float | None = None
    min_runs: int = 10

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.runs < 1:
            raise EdgekdError(f"need warmup >= 0 and runs >= 1 (got {self.warmup}, {self.runs})", "e.g. --warmup 20 --runs 200")
        if self.duration_s is not None and self.duration_s <= 0:
            raise EdgekdError(f"--duration must be positive, got {self.duration_s}", "e.g. --duration 10")


class _GcPaused:
    """Pause the cyclic garbage collector while timing, so a collection never lands inside a run."""

    def __enter__(self) -> None:
        self.was = gc.isenabled()
        gc.collect()
        gc.disable()

    def __exit__(self, *exc: Any) -> None:
        if self.was:
            gc.enable()


def _keep_going(plan: TimingPlan, done: int, started_ns: int) -> bool:
    if plan.duration_s is None:
        return done < plan.runs
    return done < plan.min_runs or (time.perf_counter_ns() - started_ns) < plan.duration_s * 1e9


def time_runner(runner: Any, prepared: Any, plan: TimingPlan) -> tuple[list[float], list[float]]:
    """Host latencies (ms) and device latencies (ms, empty when the runtime has none) of repeated runs."""
    for _ in range(plan.warmup):
        runner.timed_run(prepared)
    host, device = [], []
    with _GcPaused():
        started = time.perf_counter_ns()
        while _keep_going(plan, len(host), started):
            ns, dev_ms = runner.timed_run(prepared)
            host.append(ns / 1e6)
            if dev_ms is not None:
                device.append(dev_ms)
    return host, device


def time_interleaved(runner_a: Any, prepared_a: Any, runner_b: Any, prepared_b: Any, plan: TimingPlan) -> tuple[list[float], list[float]]:
    """Time two models in ABBA order (A B B A A B ...), so both see the same machine state, pair by pair."""
    for _ in range(plan.warmup):
        runner_a.timed_run(prepared_a)
        runner_b.timed_run(prepared_b)
    a, b = [], []
    with _GcPaused():
        started = time.perf_counter_ns()
        while _keep_going(plan, len(a), started):
            first_a = len(a) % 2 == 0
            order = ((runner_a, prepared_a, a), (runner_b, prepared_b, b)) if first_a else ((runner_b, prepared_b, b), (runner_a, prepared_a, a))
            for runner, prepared, out in order:
                out.append(runner.timed_run(prepared)[0] / 1e6)
    return a, b


# --------------------------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------------------------
@dataclass
class BenchRequest:
    """Everything one ``edgekd bench`` run needs; the CLI and the pytest helper both build one."""

    model: str
    runtime: str = "ort-cpu"
    batches: list[int] = field(default_factory=lambda: [1])
    plan: TimingPlan = field(default_factory=TimingPlan)
    threads: int | None = None
    input_source: str = "random"
    seed: int = 0
    reference: str | None = None
    profile_top: int = 0  # >0: per-layer profile with this many slowest layers
    profile_runs: int = 20
    runtime_options: dict[str, Any] = field(default_factory=dict)
    target: str | None = None


def _open(runtime: str, path: Path, threads: int | None, options: dict[str, Any]) -> Any:
    from edgekd.runtimes import open_runner

    return open_runner(runtime, path, threads=threads, **options)


def _feeds(runner: Any, batch: int, source: str, seed: int, pre: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    meta = runner.metadata()
    return {spec.name: sample_inputs(spec, batch, source, seed, meta, pre) for spec in runner.input_specs()}


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def run_bench(req: BenchRequest, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure ``req.model`` (and the reference, interleaved) for each batch size; one JSON-able dict.

    The first batch is the primary one: its numbers sit at the top level (p50_ms, p90_ms, ...), and
    every batch is listed under ``sweep``. Raw samples of the primary batch are kept for baselines.
    """
    say = progress or (lambda _m: None)
    if not req.batches or any(b < 1 for b in req.batches):
        raise EdgekdError(f"batch sizes must be >= 1, got {req.batches}", "e.g. --batch 1 --batch 64")
    model_path = resolve_model_path(req.model)
    ref_path = resolve_model_path(req.reference) if req.reference else None
    pre = bundle_preprocess(model_path)
    runner = _open(req.runtime, model_path, req.threads, req.runtime_options)
    ref_runner = _open(req.runtime, ref_path, req.threads, req.runtime_options) if ref_path else None
    load_before = _load_average()
    sweep, primary_samples, primary_device, ref_samples = [], [], [], None
    try:
        for i, batch in enumerate(req.batches):
            try:
                feeds = runner.prepare(_feeds(runner, batch, req.input_source, req.seed, pre))
            except EdgekdError as exc:
                if i == 0:
                    raise
                say(f"skipping batch {batch}: {exc.one_line()}")
                continue
            say(f"timing {model_path.name} at batch {batch}" + (f" interleaved with {ref_path.name}" if ref_runner and i == 0 else ""))
            if ref_runner is not None and i == 0:
                ref_feeds = ref_runner.prepare(_feeds(ref_runner, batch, req.input_source, req.seed, bundle_preprocess(ref_path)))
                host, ref_host = time_interleaved(runner, feeds, ref_runner, ref_feeds, req.plan)
                device: list[float] = []
                ref_samples = ref_host
            else:
                host, device = time_runner(runner, feeds, req.plan)
            stats = summarize(host, batch, device)
            sweep.append(stats.to_dict())
            if i == 0:
                primary_samples, primary_device = host, device
        profile = []
        if req.profile_top > 0:
            say(f"profiling layers over {req.profile_runs} runs")
            layers = runner.layer_profile(_feeds(runner, req.batches[0], req.input_source, req.seed, pre), req.profile_runs)
            profile = [asdict(layer) for layer in layers[: req.profile_top]]
    finally:
        runner.close()
        if ref_runner is not None:
            ref_runner.close()
    info = runner.info
    result: dict[str, Any] = dict(sweep[0])
    result.update({
        "model": str(model_path),
        "runtime": info.runtime,
        "threads": info.threads,
        "target": req.target,
        "input": req.input_source,
        "warmup": req.plan.warmup,
        "duration_s": req.plan.duration_s,
        "sweep": sweep,
        "samples_ms": [round(v, 5) for v in primary_samples],
        "device_samples_ms": [round(v, 5) for v in primary_device],
        "fingerprint": fingerprint(info.runtime, info.threads, info.device, info.providers),
        "runtime_info": asdict(info),
        "load_average": {"before": load_before, "after": _load_average()},
        "profile": profile,
    })
    if ref_path is not None and ref_samples is not None:
        ref_stats = summarize(ref_samples, req.batches[0])
        result["reference"] = {"model": str(ref_path), **ref_stats.to_dict(), "samples_ms": [round(v, 5) for v in ref_samples],
                               "ratio_p50": round(result["p50_ms"] / ref_stats.p50_ms, 6)}
    return result


def busy_machine_note(result: dict[str, Any]) -> str | None:
    """A warning when the 1-minute load average exceeded the core count: numbers are then less trustworthy."""
    cores = result.get("fingerprint", {}).get("cpu_cores_logical") or os.cpu_count() or 1
    loads = [v for v in (result.get("load_average") or {}).values() if v]
    worst = max((v[0] for v in loads), default=0.0)
    if worst > cores:
        tail = "" if result.get("reference") else "; pass --reference to cancel such drift"
        if (result.get("threads") or 1) > 1:
            tail += "; --threads 1 is far more repeatable on a shared machine"
        return f"the machine was busy while measuring (load average {worst:.1f} on {cores} cores){tail}"
    return None


# --------------------------------------------------------------------------------------------
# baselines
# --------------------------------------------------------------------------------------------
def baseline_from_result(result: dict[str, Any], command: str | None = None) -> dict[str, Any]:
    """A baseline file's content: the primary batch's stats, raw samples, fingerprint (and the reference's)."""
    from edgekd.manifest import sha256_file

    model = Path(result["model"])
    base = {
        "format": BASELINE_FORMAT,
        "version": BASELINE_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command,
        "model": {"name": model.name, "sha256": sha256_file(model) if model.is_file() else None},
        "runtime": result["runtime"],
        "batch": result["batch"],
        "threads": result["threads"],
        "stats": {k: result[k] for k in ("runs", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "min_ms", "max_ms", "throughput")},
        "samples_ms": result["samples_ms"],
        "fingerprint": result["fingerprint"],
        "reference": None,
    }
    ref = result.get("reference")
    if ref:
        ref_path = Path(ref["model"])
        base["reference"] = {"name": ref_path.name, "sha256": sha256_file(ref_path) if ref_path.is_file() else None,
                             "p50_ms": ref["p50_ms"], "samples_ms": ref["samples_ms"]}
    return base


def save_baseline(path: str | os.PathLike, result: dict[str, Any], command: str | None = None) -> Path:
    from edgekd.manifest import write_json_atomic

    return write_json_atomic(path, baseline_from_result(result, command))


def load_baseline(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a baseline file; every problem is one clear EdgekdError."""
    from edgekd.manifest import read_json

    data = read_json(path, "latency baseline")
    hint = "write a fresh one with `edgekd bench MODEL --save-baseline FILE`"
    if not isinstance(data, dict) or data.get("format") != BASELINE_FORMAT:
        raise EdgekdError(f"{path} is not an edgekd latency baseline", hint)
    if data.get("version") != BASELINE_VERSION:
        raise EdgekdError(f"{path} is baseline version {data.get('version')}, this edgekd reads version {BASELINE_VERSION}", hint)
    samples = data.get("samples_ms")
    if not isinstance(samples, list) or len(samples) < 5 or not all(isinstance(v, (int, float)) and v > 0 for v in samples):
        raise EdgekdError(f"{path} has no usable latency samples (samples_ms)", hint)
    for key in ("fingerprint", "batch", "runtime"):
        if key not in data:
            raise EdgekdError(f"{path} lacks '{key}'", hint)
    if not isinstance(data["fingerprint"], dict):
        raise EdgekdError(f"{path}: fingerprint is not an object", hint)
    ref = data.get("reference")
    if ref is not None and (not isinstance(ref, dict) or not isinstance(ref.get("samples_ms"), list) or len(ref["samples_ms"]) != len(samples)):
        raise EdgekdError(f"{path}: the reference samples are missing or do not pair with the model samples", hint)
    return data


def check_regression(result: dict[str, Any], baseline: dict[str, Any], budget: float, allow_other_machine: bool = False,
                     confidence: float = DEFAULT_CONFIDENCE, baseline_path: str = "baseline") -> Comparison:
    """Compare a ``run_bench`` result with a loaded baseline; refuses another machine unless allowed."""
    if int(baseline["batch"]) != int(result["batch"]):
        raise EdgekdError(f"{baseline_path} was measured at batch {baseline['batch']}, this run at batch {result['batch']}",
                          f"pass --batch {baseline['batch']} first, or save a new baseline")
    machine, software = fingerprint_differences(baseline["fingerprint"], result["fingerprint"])
    notes = []
    if machine and not allow_other_machine:
        raise EdgekdError(f"{baseline_path} was measured on another machine or setting ({'; '.join(machine)})",
                          "compare on the baseline's machine, save a new baseline here, or pass --allow-other-machine")
    if machine:
        notes.append("compared across machines (--allow-other-machine): " + "; ".join(machine))
    if software:
        notes.append("software differs from the baseline: " + "; ".join(software))
    base_ref = (baseline.get("reference") or {}).get("samples_ms")
    cur_ref = (result.get("reference") or {}).get("samples_ms")
    if cur_ref is not None and base_ref is None:
        raise EdgekdError(f"{baseline_path} has no reference measurement, so --reference cannot be used against it",
                          "save the baseline with --reference OTHER.onnx, or drop --reference")
    if base_ref is not None and cur_ref is None:
        notes.append("the baseline has a reference model; pass --reference to cancel machine drift")
    comp = compare_samples(result["samples_ms"], baseline["samples_ms"], budget, cur_ref, base_ref, confidence)
    comp.notes = notes
    return comp
