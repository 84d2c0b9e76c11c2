"""Deployment bundles: everything a device needs to run (and re-check) the model, in one folder.

A bundle is a folder plus a deterministic ``.tar.gz`` of it::

    bundle/
      bundle.json          name, models, classes, preprocessing, resolved target, measured
                           metrics, trtexec commands, reference outputs, sha256 of every file
      SHA256SUMS           sha256 of every file incl. bundle.json (``sha256sum -c SHA256SUMS``)
      labels.txt           one class per line
      model/NAME.onnx      the INT8 (or FP16/FP32) ONNX model(s)
      reference/inputs.npy images the host ran; the device must give the same top-1 (selfcheck)
      engine/build_engine.sh  TensorRT targets: the exact trtexec build + timing commands
      edgekd/runtime/      the torch-free runtime package (+ edgekd/__init__.py, errors.py, manifest.py)
      run.sh, README.md

The trtexec flags follow NVIDIA's TensorRT "Best Practices" guide and the Jetson benchmarking
norms: explicit Q/DQ needs ``--int8`` (``--fp16`` lets non-quantized layers run in half), dynamic
batch via ``--min/opt/maxShapes``, ``--useDLACore`` + ``--allowGPUFallback`` for the DLA, a timing
cache, ``--useCudaGraph --noDataTransfers`` with warm-up and a fixed duration for timing, and
``--separateProfileRun --dumpProfile`` for per-layer profiles. The bundle is written atomically
(built in a temp folder, renamed into place); extraction goes through
:func:`edgekd.runtime.safe_extract`.

>>> make_bundle("runs/x/bundle", BundleModel({"student_int8": "runs/x/student_int8.onnx"}, "student_int8",
...             classes, model.preprocess), get_target("jetson"), {"test_top1": 0.90})  # doctest: +SKIP
PosixPath('runs/x/bundle')
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shlex
import shutil
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from edgekd import runtime as rt
from edgekd.errors import EdgekdError
from edgekd.manifest import atomic_path, out_of_space, versions

PACKAGE_DIR = Path(__file__).resolve().parent
RUNTIME_FILES = ("__init__.py", "errors.py", "manifest.py", "runtime/__init__.py", "runtime/__main__.py", "runtime/backends.py",
                 "runtime/checks.py", "runtime/classifier.py", "runtime/cli.py", "runtime/integrity.py", "runtime/preprocessing.py")
EXECUTABLE = {"run.sh", "engine/build_engine.sh"}
DEFAULT_WARMUP_MS = 500
DEFAULT_DURATION_S = 10


# ----------------------------------------------------------------------------- ONNX facts
def onnx_input(onnx_path: str | os.PathLike) -> tuple[str, list[int | None]]:
    """The model's first input name and shape (None for symbolic dims such as a dynamic batch)."""
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - onnx raises several types for a bad file
        raise EdgekdError(f"{onnx_path} is not a readable ONNX model: {exc}", "re-export it with `edgekd export`") from exc
    inits = {i.name for i in model.graph.initializer}
    inp = next((i for i in model.graph.input if i.name not in inits), None)
    if inp is None:
        raise EdgekdError(f"{onnx_path} has no graph input", "re-export it with `edgekd export`")
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in inp.type.tensor_type.shape.dim]
    return inp.name, dims


# ----------------------------------------------------------------------------- trtexec
def _shape(name: str, dims: list[int]) -> str:
    return f"{name}:" + "x".join(str(d) for d in dims)


def trtexec_commands(target: Mapping[str, Any], onnx_rel: str, input_name: str, input_dims: list[int | None], primary: str) -> dict[str, list[str]]:
    """The exact trtexec command lines (argv) to build and time the engine on the device."""
    engine = f"engine/{primary}.plan"
    chw = [int(d) for d in input_dims[1:]]
    dynamic = input_dims[0] is None
    batch = int(target.get("batch") or 1) if dynamic else int(input_dims[0])
    precision = {"int8": ["--int8", "--fp16"], "fp16": ["--fp16"], "fp32": []}[target.get("precision", "int8")]
    dla = target.get("dla") or {}
    dla_flags = [f"--useDLACore={dla['core']}"] + (["--allowGPUFallback"] if dla.get("gpu_fallback", True) else []) if dla.get("core") is not None else []
    shapes = [f"--minShapes={_shape(input_name, [1, *chw])}", f"--optShapes={_shape(input_name, [batch, *chw])}", f"--maxShapes={_shape(input_name, [batch, *chw])}"] if dynamic else []
    timing = ["--noDataTransfers", f"--warmUp={DEFAULT_WARMUP_MS}", f"--duration={DEFAULT_DURATION_S}", "--useSpinWait", "--percentile=99"]
    if dla.get("core") is None:
        timing.insert(0, "--useCudaGraph")  # CUDA graphs cannot capture DLA work
    load = ["trtexec", f"--loadEngine={engine}", *dla_flags[:1]]
    cmds = {
        "build": ["trtexec", f"--onnx={onnx_rel}", f"--saveEngine={engine}", *precision, *shapes, *dla_flags,
                  "--timingCacheFile=engine/timing.cache", "--profilingVerbosity=detailed", "--skipInference"],
        "bench_batch1": [*load, *([f"--shapes={_shape(input_name, [1, *chw])}"] if dynamic else []), *timing],
        "profile": [*load, *([f"--shapes={_shape(input_name, [batch, *chw])}"] if dynamic else []), "--noDataTransfers", "--separateProfileRun",
                    "--dumpProfile", "--exportProfile=engine/profile.json", "--exportLayerInfo=engine/layers.json"],
    }
    if batch != 1:
        cmds["bench_batch"] = [*load, f"--shapes={_shape(input_name, [batch, *chw])}", *timing]
    if str(target.get("tensorrt") or "10").split(".")[0] in ("8", "9"):
        cmds["build"][-1] = "--buildOnly"  # TensorRT < 10 spells --skipInference as --buildOnly
    return cmds


def build_engine_script(cmds: Mapping[str, list[str]], target: Mapping[str, Any]) -> str:
    """A POSIX sh script that runs the trtexec commands on the device and keeps every log."""
    power = target.get("power") or {}
    lines = [
        "#!/bin/sh",
        "# Build and time the TensorRT engine on this device (written by edgekd; run from the bundle folder).",
        "set -eu",
        'cd "$(dirname "$0")/.."',
        "TRTEXEC=$(command -v trtexec || true)",
        'for p in /usr/src/tensorrt/bin/trtexec /opt/tensorrt/bin/trtexec; do [ -n "$TRTEXEC" ] || { [ -x "$p" ] && TRTEXEC=$p; } || true; done',
        '[ -n "$TRTEXEC" ] || { echo "trtexec not found (JetPack installs it at /usr/src/tensorrt/bin/trtexec)" >&2; exit 3; }',
    ]
    if power:
        lines += [
            f"# Timing assumes nvpmodel mode {power['id']} ({power['name']})" + (" with jetson_clocks" if power.get("jetson_clocks") else "") + ":",
            f"#   sudo nvpmodel -m {power['id']}" + ("  &&  sudo jetson_clocks" if power.get("jetson_clocks") else ""),
            "if command -v nvpmodel >/dev/null 2>&1; then nvpmodel -q > engine/nvpmodel.txt 2>&1 || true; fi",
        ]
    for key in ("build", "bench_batch1", "bench_batch", "profile"):
        if key in cmds:
            argv = ['"$TRTEXEC"', *(shlex.quote(a) for a in cmds[key][1:])]
            lines.append(f"{' '.join(argv)} > engine/{key}.log 2>&1 || {{ tail -n 30 engine/{key}.log >&2; exit 4; }}")
    lines.append('echo "engine: engine/$(ls engine | grep .plan$)"')
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- README / run.sh
RUN_SH = """#!/bin/sh
# Classify images with this bundle: ./run.sh image.png [more.png ...]   (needs python3, numpy, pillow, onnxruntime)
# Also: ./run.sh selfcheck   |   ./run.sh bench --runs 200
set -eu
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
case "${1:-}" in
  selfcheck|bench) cmd=$1; shift; exec "$PY" -m edgekd.runtime "$cmd" . "$@" ;;
  *) exec "$PY" -m edgekd.runtime predict . "$@" ;;
esac
"""


def readme_text(meta: Mapping[str, Any]) -> str:
    t = meta.get("target") or {}
    m = meta.get("metrics") or {}
    trt = "\n".join(f"    {' '.join(shlex.quote(a) for a in argv)}" for argv in (meta.get("trtexec") or {}).values())
    return f"""# edgekd bundle: {meta['name']}

Target: **{t.get('name', 'none')}** ({t.get('description', '')}); runtime {t.get('runtime', '-')}, precision {t.get('precision', '-')},
Q/DQ layout {t.get('layout', '-')}, batch {t.get('batch', '-')}.
Input: {meta['preprocess']['input_size']}x{meta['preprocess']['input_size']}, {meta['preprocess']['channels']} channel(s), mean {meta['preprocess']['mean']}, std {meta['preprocess']['std']}.
Classes: {len(meta['classes'])} (labels.txt). Measured on the host: {json.dumps(m)}

## On the device (no torch needed)

    pip install numpy pillow onnxruntime       # on a Jetson: JetPack's python3 + tensorrt work too
    sha256sum -c SHA256SUMS                   # every file is checked again when the runtime loads
    ./run.sh selfcheck                        # checksums, load, same top-1 as the host on reference/inputs.npy
    ./run.sh image.png                        # top-5 labels and probabilities
    ./run.sh bench --runs 200                 # latency p50/p90/p99 (records nvpmodel -q / jetson_clocks --show)

## TensorRT engine (built on the device: engines are tied to the GPU and TensorRT version)

    sh engine/build_engine.sh

which runs:

{trt or '    (not a TensorRT target)'}

Time in a fixed power mode: `sudo nvpmodel -m ID && sudo jetson_clocks`, and report trtexec's "GPU Compute Time" percentiles.
"""


# ----------------------------------------------------------------------------- make_bundle
def _as_dict(obj: Any, what: str) -> dict[str, Any]:
    if obj is None:
        return {}
    if isinstance(obj, Mapping):
        return dict(obj)
    for attr in ("to_dict", "model_dump"):
        if hasattr(obj, attr):
            return dict(getattr(obj, attr)())
    raise EdgekdError(f"{what} must be a dict or have to_dict(), got {type(obj).__name__}", "pass model.preprocess / get_target(name)")


def reference_images(preprocess: Mapping[str, Any], n: int = 8, seed: int = 0) -> np.ndarray:
    """Deterministic uint8 images when the caller has no real ones (real test images are better)."""
    s, c = int(preprocess["input_size"]), int(preprocess["channels"])
    return np.random.default_rng(seed).integers(0, 256, size=(n, c, s, s), dtype=np.uint8)


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@dataclass(frozen=True)
class BundleModel:
    """What a bundle runs: ``onnx_files`` maps a model name to its ONNX path, ``primary`` names the
    one the runtime runs, ``preprocess`` is a dict or has ``to_dict()`` (e.g. ``model.preprocess``)."""

    onnx_files: Mapping[str, str | os.PathLike]
    primary: str
    classes: list[str]
    preprocess: Any


def _checked_model(model: BundleModel) -> BundleModel:
    """``model`` with its preprocessing as a plain dict, once its files and names are valid."""
    if model.primary not in model.onnx_files:
        raise EdgekdError(f"primary model '{model.primary}' is not among {sorted(model.onnx_files)}", "name one of the ONNX files as primary")
    for name, path in model.onnx_files.items():
        if not Path(path).is_file():
            raise EdgekdError(f"ONNX file for '{name}' not found: {path}", "run `edgekd export` first")
        if not name.replace("-", "_").replace(".", "_").isidentifier():
            raise EdgekdError(f"model name '{name}' must be a plain identifier", "use letters, digits, '_' or '-'")
    return BundleModel(model.onnx_files, model.primary, model.classes, _as_dict(model.preprocess, "preprocess"))


def make_bundle(
    out_dir: str | os.PathLike,
    model: BundleModel,
    target: Any,
    metrics: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    sample_images: np.ndarray | None = None,
    make_tar: bool = True,
    attachments: Mapping[str, str | os.PathLike] | None = None,
) -> Path:
    """Write the bundle folder (atomically) and, by default, ``<out_dir>.tar.gz`` next to it.

    ``model`` is what the runtime runs (see :class:`BundleModel`). ``metrics`` are the caller's
    *measured* accuracy/latency; ``sample_images`` (uint8 NCHW, e.g. real test images) become the
    reference the device must reproduce. ``attachments`` maps a relative path in the bundle to a
    file copied there (the build report), checksummed like the rest.
    """
    out = Path(out_dir)
    model = _checked_model(model)
    tgt = _as_dict(target, "target")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        for rel, src in (attachments or {}).items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, tmp / rel)
        meta = _fill(tmp, out.name, model, tgt, dict(metrics or {}), dict(extra or {}), sample_images)
        _write_sums(tmp, meta)
        os.chmod(tmp, 0o755)  # mkdtemp made it private
        rt.verify_bundle(tmp)  # what the device will do, done once here
        _swap_into_place(tmp, out)
    except Exception as exc:
        full = out_of_space(exc, out.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise EdgekdError(f"disk full while writing the bundle {out}", "free some space and rerun; nothing was left half-written") from exc
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if make_tar:
        tar_bundle(out)
    return out


def _fill(root: Path, name: str, model: BundleModel, tgt: dict, metrics: dict, extra: dict, sample_images: np.ndarray | None) -> dict[str, Any]:
    primary, classes, pre = model.primary, model.classes, model.preprocess
    models = {}
    for model_name, path in model.onnx_files.items():
        rel = f"model/{model_name}.onnx"
        (root / "model").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, root / rel)
        models[model_name] = rel
    _write_text(root / "labels.txt", "\n".join(classes) + "\n")
    for f in RUNTIME_FILES:  # keeps the relative paths: edgekd/runtime/*.py in the bundle
        (root / "edgekd" / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(PACKAGE_DIR / f, root / "edgekd" / f)
    input_name, dims = onnx_input(root / models[primary])
    images = sample_images if sample_images is not None else reference_images(pre)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise EdgekdError(f"sample_images must be uint8 (N, C, H, W), got {images.dtype} {images.shape}", "pass raw test images, not preprocessed tensors")
    (root / "reference").mkdir()
    np.save(root / rt.REFERENCE_INPUTS, np.ascontiguousarray(images), allow_pickle=False)
    logits = rt.OrtModel(root / models[primary]).run(rt.preprocess(images, pre))
    meta: dict[str, Any] = {
        "format": rt.BUNDLE_FORMAT, "version": rt.BUNDLE_VERSION, "name": name, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "primary": primary, "models": models, "input": {"name": input_name, "shape": dims}, "classes": list(classes), "preprocess": pre,
        "target": tgt, "metrics": metrics, "extra": extra, "versions": versions(),
        "reference": {"inputs": rt.REFERENCE_INPUTS, "logits": np.round(logits.astype(np.float64), 6).tolist(), "computed_with": "onnxruntime CPU on the host"},
    }
    if tgt.get("runtime") == "tensorrt":
        meta["trtexec"] = trtexec_commands(tgt, models[primary], input_name, dims, primary)
        _write_text(root / "engine" / "build_engine.sh", build_engine_script(meta["trtexec"], tgt))
    _write_text(root / "run.sh", RUN_SH)
    _write_text(root / "README.md", readme_text(meta))
    meta["files"] = {str(p.relative_to(root).as_posix()): {"sha256": rt.sha256_file(p), "bytes": p.stat().st_size} for p in sorted(root.rglob("*")) if p.is_file()}
    _write_text(root / rt.BUNDLE_JSON, json.dumps(meta, indent=2) + "\n")
    return meta


def _write_sums(root: Path, meta: Mapping[str, Any]) -> None:
    lines = [f"{v['sha256']}  {rel}" for rel, v in meta["files"].items()]
    lines.append(f"{rt.sha256_file(root / rt.BUNDLE_JSON)}  {rt.BUNDLE_JSON}")
    _write_text(root / rt.SUMS_NAME, "\n".join(sorted(lines, key=lambda s: s.split('  ', 1)[1])) + "\n")
    for rel in EXECUTABLE:
        if (root / rel).is_file():
            os.chmod(root / rel, 0o755)


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished temp folder onto ``out``; an older bundle there is removed only afterwards."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old.{os.getpid()}.tmp")  # a killed swap leaves a name the next build cleans up
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- tar
def _tarinfo(rel: str, size: int | None) -> tarfile.TarInfo:
    info = tarfile.TarInfo(rel)
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if size is None:
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
    else:
        info.size = size
        info.mode = 0o755 if rel.split("/", 1)[-1] in EXECUTABLE else 0o644
    return info


def tar_bytes(bundle_dir: str | os.PathLike) -> bytes:
    """A reproducible .tar.gz of the folder: sorted entries, zero mtimes/owners, fixed modes."""
    root = Path(bundle_dir)
    raw = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(_tarinfo(root.name, None))
            for p in sorted(root.rglob("*"), key=lambda q: q.relative_to(root).as_posix()):
                rel = f"{root.name}/{p.relative_to(root).as_posix()}"
                if p.is_symlink():
                    raise EdgekdError(f"bundle contains a symlink {p}", "bundles hold plain files only")
                if p.is_dir():
                    tar.addfile(_tarinfo(rel, None))
                else:
                    data = p.read_bytes()
                    tar.addfile(_tarinfo(rel, len(data)), io.BytesIO(data))
    return raw.getvalue()


def tar_bundle(bundle_dir: str | os.PathLike, tar_path: str | os.PathLike | None = None) -> Path:
    """Write ``<bundle_dir>.tar.gz`` (or ``tar_path``) atomically."""
    root = Path(bundle_dir)
    dest = Path(tar_path) if tar_path else root.with_name(root.name + ".tar.gz")
    with atomic_path(dest) as tmp:
        tmp.write_bytes(tar_bytes(root))
        os.chmod(tmp, 0o644)
    return dest


def load_bundle_meta(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """Open (folder or .tar.gz, safely extracted) and verify a bundle; returns its root and bundle.json."""
    root = rt.open_bundle(path)
    return root, rt.verify_bundle(root)
