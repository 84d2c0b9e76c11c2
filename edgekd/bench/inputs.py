"""What is timed and on what: the model file behind a path or bundle, its preprocessing, and the
input batches (real Fashion-MNIST test images when present, else seeded random ones).

No torch import: this runs on the device next to onnxruntime.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from edgekd import runtime as rt
from edgekd.atomic import read_json
from edgekd.errors import EdgekdError



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


def _real_images(batch: int, seed: int) -> np.ndarray:
    """``batch`` Fashion-MNIST test images (uint8, N x 28 x 28), read by the data package's IDX reader."""
    from edgekd.data import fashion_mnist_root, load_fashion_mnist_split  # lazy: torch, only when real images are asked for

    try:
        images = load_fashion_mnist_split(fashion_mnist_root(None), "test").images[:, 0].numpy()
    except EdgekdError as exc:
        raise EdgekdError(exc.message, "apt-get install dataset-fashion-mnist, set EDGEKD_FASHION_MNIST, or use --input random") from exc
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
