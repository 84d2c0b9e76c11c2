"""Preprocessing in numpy: the device must feed the model exactly what the host measured.

This reproduces ``edgekd.data.Preprocess`` (timm's data config fields: input size, channels, mean,
std; bilinear resize with ``align_corners=False`` and no antialias; ITU-R 601 grey weights) without
torch, which a Jetson's JetPack install must not have replaced.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from edgekd.errors import EdgekdError

GREY_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


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


RESIZE_MODES = ("crop", "pad", "stretch")


def fit_to_square(im: Any, size: int, mode: str = "crop") -> Any:
    """A PIL image -> ``size`` x ``size``, as the build stores its training images (``data.resize``):
    'crop' resizes the shorter side to ``size`` and cuts the centre (timm's and torchvision's eval
    transform), 'pad' fits the longer side and pads with black, 'stretch' ignores the aspect ratio.
    Bilinear (PIL's, with its antialiasing), the same call on the host and on the device."""
    from PIL import Image

    w, h = im.size
    if (w, h) == (size, size):
        return im
    if mode == "stretch":
        return im.resize((size, size), Image.BILINEAR)
    if mode not in RESIZE_MODES:
        raise EdgekdError(f"unknown resize mode '{mode}'", f"use one of {', '.join(RESIZE_MODES)}")
    scale = size / (min(w, h) if mode == "crop" else max(w, h))
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    if mode == "crop":
        nw, nh = max(size, nw), max(size, nh)
        left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
        return im.resize((nw, nh), Image.BILINEAR).crop((left, top, left + size, top + size))
    canvas = Image.new(im.mode, (size, size))
    canvas.paste(im.resize((nw, nh), Image.BILINEAR), (int(round((size - nw) / 2.0)), int(round((size - nh) / 2.0))))
    return canvas


def load_image(path: str | os.PathLike, pre: dict[str, Any] | None = None) -> np.ndarray:
    """Decode an image file to uint8 (C, H, W): grey stays 1 channel, anything else becomes RGB.
    With a bundle's ``pre`` that records how the build stored its images (``store_size``,
    ``resize``), the image is brought to that square the same way, so the model sees the pixels
    it was trained and measured on."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L") if im.mode in ("L", "1", "I;16", "I", "F") else im.convert("RGB")
            if pre and pre.get("store_size"):
                im = fit_to_square(im, int(pre["store_size"]), pre.get("resize", "crop"))
            arr = np.asarray(im, dtype=np.uint8)
    except (FileNotFoundError, UnidentifiedImageError, OSError) as exc:
        raise EdgekdError(f"cannot read image {path}: {exc}", "pass PNG/JPEG files") from exc
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)
