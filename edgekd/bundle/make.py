"""``make_bundle``: the models, labels, reference outputs, device scripts, runtime and checksums,
written into a temp folder and renamed into place."""


from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from edgekd import runtime as rt
from edgekd.errors import EdgekdError
from edgekd.manifest import versions
from edgekd.atomic import out_of_space
from edgekd.bundle.archive import EXECUTABLE, tar_bundle
from edgekd.bundle.scripts import RUN_SH, build_engine_script, float_layers_in, onnx_input, readme_text, trtexec_commands


PACKAGE_DIR = Path(__file__).resolve().parent.parent  # edgekd/
RUNTIME_FILES = ("__init__.py", "errors.py", "atomic.py", "runtime/__init__.py", "runtime/__main__.py", "runtime/backends.py",
                 "runtime/checks.py", "runtime/classifier.py", "runtime/cli.py", "runtime/integrity.py", "runtime/preprocessing.py")


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
    on_openvino = tgt.get("runtime") == "openvino" and rt.openvino_usable() is None  # the device's arithmetic: OpenVINO's integer kernels
    backend = rt.OvModel(root / models[primary]) if on_openvino else rt.OrtModel(root / models[primary])
    logits = backend.run(rt.preprocess(images, pre))
    meta: dict[str, Any] = {
        "format": rt.BUNDLE_FORMAT, "version": rt.BUNDLE_VERSION, "name": name, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "primary": primary, "models": models, "input": {"name": input_name, "shape": dims}, "classes": list(classes), "preprocess": pre,
        "target": tgt, "metrics": metrics, "extra": extra, "versions": versions(),
        "reference": {"inputs": rt.REFERENCE_INPUTS, "logits": np.round(logits.astype(np.float64), 6).tolist(), "computed_with": ("OpenVINO" if on_openvino else "onnxruntime") + " CPU on the host"},
    }
    meta["float_layers"] = float_layers_in(root / models[primary])
    if tgt.get("runtime") == "tensorrt":
        meta["trtexec"] = trtexec_commands(tgt, models[primary], input_name, dims, primary)
        _write_text(root / "engine" / "build_engine.sh", build_engine_script(meta["trtexec"], tgt, meta["float_layers"]))
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
